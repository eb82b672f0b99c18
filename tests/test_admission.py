"""The waiting room and rate limits, over HTTP against real Redis.

Each test serves its own app (same database, its own Redis key prefix and limits) next to the shared
test system, so throttling here never slows the other tests down.
"""
from __future__ import annotations

import dataclasses
import itertools
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import redis
import requests

from shared import admission
from shared.config import Settings
from shared.devtools.services import free_port, port_accepts
from shared.redisconn import redis_client
from tests.conftest import ServerThread, make_pdf, wait_until


class Base(str):
    """A throttled app's base URL, knowing its Redis key prefix and its settings."""

    prefix: str
    settings: Settings


@pytest.fixture
def throttled(sys_):
    """Start an app with the given settings overrides; yields a factory returning its base URL."""
    from web import create_app
    from workers.celery_app import make_celery_app

    servers: list[ServerThread] = []
    prefixes: list[str] = []

    def start(**overrides) -> str:
        prefix = f"meterai-adm-{uuid.uuid4().hex[:8]}:"
        prefixes.append(prefix)
        # Each test buyer is its own client (X-Forwarded-For), as buyers on the internet are.
        settings = dataclasses.replace(sys_.settings, redis_key_prefix=prefix, **{"proxy_hops": 1, **overrides})
        port = free_port()
        servers.append(ServerThread(create_app(settings), port))
        make_celery_app(sys_.settings)  # its tasks go to the shared system's workers
        base = Base(f"http://127.0.0.1:{port}")
        base.prefix = prefix
        base.settings = settings
        return base

    yield start
    for server in servers:
        server.stop()
    client = redis.Redis.from_url(sys_.settings.redis_url)
    for prefix in prefixes:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


_clients = itertools.count(1)


def new_client() -> str:
    n = next(_clients)
    return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def _create(base: str, key: str | None = None, admission: str | None = None, client: str | None = None,
            browser: str | None = None, document: bytes | None = None, **fields: str) -> requests.Response:
    headers = {"Idempotency-Key": key or uuid.uuid4().hex, "X-Forwarded-For": client or new_client()}
    if browser:
        headers["Client-Id"] = browser
    if admission:
        headers["Admission-Token"] = admission
    return requests.post(f"{base}/api/v1/orders", headers=headers,
                         data={"page": "1", "x": "400", "y": "80", "email": "a@b.id", **fields},
                         files={"document": ("a.pdf", document or make_pdf(pages=1), "application/pdf")}, timeout=10)


def _poll(base: str, ticket: str) -> requests.Response:
    return requests.get(f"{base}/api/v1/queue/{ticket}", timeout=10)


def test_below_the_outflow_buyers_are_admitted_at_once(throttled):
    base = throttled(admission_per_minute=600, admission_burst=5)
    assert [_create(base).status_code for _ in range(5)] == [202] * 5


def test_above_the_outflow_buyers_get_a_fifo_ticket_then_an_admission(throttled):
    base = throttled(admission_per_minute=30, admission_burst=1)
    assert _create(base).status_code == 202
    queued = [_create(base) for _ in range(3)]
    for n, response in enumerate(queued, start=1):
        assert response.status_code == 429
        assert int(response.headers["Retry-After"]) >= 1
        body = response.json()
        assert body["error"]["code"] == "queued"
        assert body["queue"]["position"] == n
        assert body["queue"]["eta_seconds"] >= 1
    tickets = [r.json()["queue"]["ticket"] for r in queued]

    def admitted() -> list[bool]:
        return [_poll(base, t).json()["admitted"] for t in tickets]

    states = wait_until(lambda: (s := admitted())[0] and s, timeout=15, message="first ticket admitted")
    assert states == sorted(states, reverse=True)  # only ever a prefix of the line is admitted
    status = _poll(base, tickets[0]).json()
    assert status["position"] == 0 and status["admission_token"]
    assert _poll(base, tickets[2]).json()["position"] >= 1

    ok = _create(base, admission=status["admission_token"])
    assert ok.status_code == 202
    again = _create(base, admission=status["admission_token"])  # single use
    assert again.status_code == 409 and again.json()["error"]["code"] == "admission_used"


def test_a_queue_poll_answered_before_flask_is_the_answer_flask_gives(throttled):
    """Queue polls skip Flask (web/queuepoll.py): the same body, caching, Retry-After and headers as the
    route's own answer (compared in one process with the route called directly), Flask never called for
    a normal poll, and the route's own answers for everything else."""
    from flask import Flask
    from werkzeug.test import Client

    from web import create_app
    from web.queuepoll import QueuePolls

    base = throttled(admission_per_minute=20, admission_burst=1)
    creates = [_create(base) for _ in range(2)]
    while creates[-1].status_code == 202 and len(creates) < 8:  # a count, not a clock (see below)
        creates.append(_create(base))
    assert creates[-1].status_code == 429
    ticket = creates[-1].json()["queue"]["ticket"]
    app = create_app(base.settings)  # a second web process on the same waiting room
    fast_path = app.wsgi_app
    while not isinstance(fast_path, QueuePolls):
        fast_path = fast_path.app
    behind, calls = fast_path.app, []
    fast_path.app = lambda environ, start_response: calls.append(environ["PATH_INFO"]) or behind(environ, start_response)
    room, asked = app.extensions["meterai.admission"], []
    status = room.status
    room.status = lambda ticket: asked.append(ticket) or status(ticket)  # the fast path's and the route's
    through_flask = Client(lambda environ, start_response: Flask.wsgi_app(app, environ, start_response))
    fast, slow = Client(app).get(f"/api/v1/queue/{ticket}"), through_flask.get(f"/api/v1/queue/{ticket}")
    assert calls == [] and fast.status_code == slow.status_code == 200
    # (Both read this process's 200 ms look at the line: the same place, unless the head moved between.)
    assert fast.get_json().keys() == slow.get_json().keys() == {"admitted", "position", "eta_seconds"}
    assert fast.get_json()["admitted"] is slow.get_json()["admitted"] is False
    assert fast.get_json()["position"] >= 1 and abs(fast.get_json()["position"] - slow.get_json()["position"]) <= 1
    same = ("Content-Type", "Cache-Control", "X-Content-Type-Options", "X-Frame-Options",
            "Referrer-Policy", "Content-Security-Policy")
    assert {h: fast.headers.get(h) for h in same} == {h: slow.headers.get(h) for h in same}
    assert 2 <= int(fast.headers["Retry-After"]) <= base.settings.admission_max_retry_after_seconds
    assert len(fast.headers["X-Request-Id"]) == 32
    kept = requests.get(f"{base}/api/v1/queue/{ticket}", headers={"X-Request-Id": "proxy-id-0001"}, timeout=10)
    assert kept.headers["X-Request-Id"] == "proxy-id-0001"
    # Its turn: the token, no Retry-After, still without Flask.
    admitted = wait_until(lambda: (a := Client(app).get(f"/api/v1/queue/{ticket}")).get_json()["admitted"] and a,
                          timeout=30, message="the ticket admitted")
    assert admitted.get_json()["admission_token"] and "Retry-After" not in admitted.headers and calls == []
    # Not the fast path's to answer: the route (and its error shape) answers, asked once.
    asked.clear()
    refused = Client(app).get("/api/v1/queue/garbage")
    assert refused.status_code == 404 and refused.get_json()["error"]["code"] == "invalid_ticket"
    assert calls == ["/api/v1/queue/garbage"] and asked == ["garbage"]  # the route raised the known answer
    assert requests.post(f"{base}/api/v1/queue/{ticket}", timeout=10).status_code == 405
    assert requests.get(f"{base}/api/v1/queue/{ticket}/x", timeout=10).status_code == 404


def test_forged_or_tampered_tickets_and_tokens_are_refused(throttled):
    base = throttled(admission_per_minute=1, admission_burst=1)
    assert _create(base).status_code == 202  # the one free place
    ticket = _create(base).json()["queue"]["ticket"]
    body, mac = ticket.split(".")
    assert _poll(base, f"{body}x.{mac}").status_code == 404
    assert _poll(base, "garbage").status_code == 404
    forged = _create(base, admission=ticket)  # a ticket is not an admission token
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "invalid_admission"
    assert requests.get(f"{base}/antrian/{ticket}", timeout=5).status_code == 200
    page = requests.get(f"{base}/antrian/{ticket}", timeout=5).text
    assert "Posisi Anda" in page and 'http-equiv="refresh"' in page


def test_ops_can_queue_everyone_or_pause_sales_but_status_and_payments_flow(sys_, throttled):
    base = throttled(admission_per_minute=600, admission_burst=50, ops_token="ops-secret-for-the-tests-0123456789")
    order = _create(base)
    assert order.status_code == 202
    order_id, token = order.json()["order_id"], order.json()["access_token"]
    ops = f"{base}/ops/admission"
    assert requests.post(ops, json={"mode": "queue_all"}, timeout=5).status_code == 401
    auth = {"Authorization": "Bearer ops-secret-for-the-tests-0123456789"}
    assert requests.post(ops, json={"mode": "queue_all"}, headers=auth, timeout=5).json()["mode"] == "queue_all"
    queued = _create(base)
    assert queued.status_code == 429
    time.sleep(0.5)
    assert _poll(base, queued.json()["queue"]["ticket"]).json()["admitted"] is False

    # Paid work is never subject to admission: this order is paid and stamped while everyone queues.
    view = sys_.wait_status(order_id, token, "awaiting_payment")
    sys_.pay(view["payment"]["gateway_order_id"])
    sys_.wait_status(order_id, token, "stamped")
    status = requests.get(f"{base}/api/v1/orders/{order_id}", headers={"Authorization": f"Bearer {token}"},
                          timeout=5)
    assert status.status_code == 200

    requests.post(ops, json={"mode": "paused"}, headers=auth, timeout=5)
    paused = _create(base)
    assert paused.status_code == 503 and paused.json()["error"]["code"] == "sales_paused"
    assert "Retry-After" in paused.headers
    assert requests.post(ops, json={"mode": "nope"}, headers=auth, timeout=5).status_code == 422
    requests.post(ops, json={"mode": "auto"}, headers=auth, timeout=5)
    assert _create(base).status_code in (202, 429)


def test_pausing_sales_also_holds_back_buyers_already_admitted(throttled):
    base = throttled(admission_per_minute=120, admission_burst=1, ops_token="ops-secret-for-the-tests-0123456789")
    # The line refills every half second: on a slow machine a second buyer may still find a free place,
    # so buyers keep arriving until one is queued (a count, not a clock).
    creates = [_create(base) for _ in range(2)]
    while creates[-1].status_code == 202 and len(creates) < 8:
        creates.append(_create(base))
    queued = creates[-1]
    assert creates[0].status_code == 202 and queued.status_code == 429
    ticket = queued.json()["queue"]["ticket"]
    wait_until(lambda: _poll(base, ticket).json()["admitted"], message="the ticket to be admitted")
    admission = _poll(base, ticket).json()["admission_token"]

    auth = {"Authorization": "Bearer ops-secret-for-the-tests-0123456789"}
    requests.post(f"{base}/ops/admission", json={"mode": "paused"}, headers=auth, timeout=5)
    time.sleep(0.3)  # past any web process's cached look at the line
    held = _create(base, admission=admission)
    assert held.status_code == 503 and held.json()["error"]["code"] == "sales_paused"
    poll = _poll(base, ticket)
    assert poll.status_code == 503 and poll.json()["error"]["code"] == "sales_paused"
    page = requests.get(f"{base}/antrian/{ticket}", timeout=5)
    assert page.status_code == 503 and "dihentikan sementara" in page.text and "refresh" in page.text

    requests.post(f"{base}/ops/admission", json={"mode": "auto"}, headers=auth, timeout=5)
    time.sleep(0.3)
    assert _create(base, admission=admission).status_code == 202  # the place was kept


def test_ops_endpoints_are_off_without_a_token(throttled):
    base = throttled()
    assert requests.get(f"{base}/ops/admission", timeout=5).status_code == 404


def test_rate_limit_per_client_with_standard_headers(throttled):
    base = throttled(rate_limit_create="3/60", admission_per_minute=600, admission_burst=50)
    client = new_client()
    responses = [_create(base, client=client) for _ in range(4)]
    assert [r.status_code for r in responses] == [202, 202, 202, 429]
    assert responses[0].headers["RateLimit-Limit"] == "3"
    assert responses[0].headers["RateLimit-Remaining"] == "2"
    refused = responses[3]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1 and refused.headers["RateLimit-Remaining"] == "0"


def test_redis_down_admission_fails_closed_and_rate_limits_fail_open(sys_, throttled):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    base = throttled(redis_url=dead, rate_limit_notifications="1/60")
    create = _create(base)
    assert create.status_code == 503
    assert create.json()["error"]["code"] == "admission_unavailable" and "Retry-After" in create.headers
    assert sys_.query("SELECT count(*) AS n FROM orders")[0]["n"] == 0
    # Notifications are only rate limited (fail open): bad signatures still get their honest 403s.
    for _ in range(3):
        r = requests.post(f"{base}/api/v1/payments/notifications", json={"signature_key": "x"}, timeout=5)
        assert r.status_code == 403


def test_default_outflow_follows_measured_stamping_throughput(sys_):
    from shared.admission import AdmissionController

    client = redis.Redis.from_url(sys_.settings.redis_url)
    minute = int(time.time() // 60)
    key = f"{sys_.settings.redis_key_prefix}stats:stamped:{minute}"
    before = int(client.get(key) or 0)
    order_id, token, view = sys_.order_awaiting_payment()
    sys_.pay(view["payment"]["gateway_order_id"])
    sys_.wait_status(order_id, token, "stamped")
    wait_until(lambda: int(client.get(key) or 0) > before or
               int(client.get(f"{sys_.settings.redis_key_prefix}stats:stamped:{minute + 1}") or 0),
               message="stamping workers to record throughput")

    auto = dataclasses.replace(sys_.settings, admission_per_minute=0, admission_min_per_minute=10,
                               redis_key_prefix=f"meterai-adm-{uuid.uuid4().hex[:8]}:")
    controller = AdmissionController(auto, client)
    assert controller.outflow_per_minute() == 10  # nothing measured yet: the floor
    client.set(f"{auto.redis_key_prefix}stats:stamped:{minute - 1}", 900, ex=120)
    assert controller.outflow_per_minute() == 900
    client.delete(f"{auto.redis_key_prefix}stats:stamped:{minute - 1}")


class _CountingController:
    """An AdmissionController (real Redis) that counts its runs of the advance script."""

    def __new__(cls, settings, client):
        from shared.admission import AdmissionController

        class Counting(AdmissionController):
            advances = 0

            def _advance(self, **kwargs):
                type(self).advances += 1
                return super()._advance(**kwargs)

        return Counting(settings, client)


def test_queue_polls_share_one_look_at_the_line_per_process_but_never_across_epochs(sys_):
    client = redis.Redis.from_url(sys_.settings.redis_url)
    prefix = f"meterai-adm-{uuid.uuid4().hex[:8]}:"
    settings = dataclasses.replace(sys_.settings, redis_key_prefix=prefix, admission_per_minute=1,
                                   admission_burst=1)
    a, b = _CountingController(settings, client), _CountingController(settings, client)
    try:
        a.LINE_MAX_AGE_SECONDS = b.LINE_MAX_AGE_SECONDS = 3600  # "recent" for the whole test
        assert a.admit_or_queue("c1").__class__.__name__ == "Admitted"
        first = a.admit_or_queue("c2")
        assert first.position == 1
        before = type(a).advances
        assert [a.status(first.ticket).position for _ in range(5)] == [1] * 5
        assert type(a).advances == before  # answered from this process's recent look at the line

        # Redis loses the line: another process starts a new one (a new epoch) and queues a buyer.
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        assert b.admit_or_queue("c3").__class__.__name__ == "Admitted"
        second = b.admit_or_queue("c4")
        # Process a still remembers the old epoch, but a ticket of another epoch makes it look again:
        # the new ticket is good there too, and the old one is now recognised as stale.
        assert a.status(second.ticket).position == 1
        with pytest.raises(Exception) as stale:
            a.status(first.ticket)
        assert getattr(stale.value, "code", None) == "ticket_expired"
    finally:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


def test_ops_cli_switches_the_waiting_room(sys_):
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**sys_.env, "REDIS_KEY_PREFIX": f"meterai-adm-{uuid.uuid4().hex[:8]}:"}

    logs: list[str] = []

    def cli(*args: str) -> dict:
        import json

        out = subprocess.run([sys.executable, "-m", "shared.cli", "admission", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        logs.append(out.stderr)
        return json.loads(out.stdout)

    assert cli()["mode"] == "auto"
    assert cli("paused")["mode"] == "paused"
    from tests.test_logs import events

    assert events(logs[-1], "admission_mode_changed", mode="paused", previous="auto", via="cli")  # a JSON line
    assert cli()["mode"] == "paused"
    assert "admission_mode_changed" not in logs[-1]  # looking is not changing
    assert cli("auto")["mode"] == "auto"
    client = redis.Redis.from_url(sys_.settings.redis_url)
    for key in client.scan_iter(match=f"{env['REDIS_KEY_PREFIX']}*"):
        client.delete(key)


def test_only_unverified_notifications_count_against_the_rate_limit(sys_, throttled):
    from tests.test_order_flow import _notification

    base = throttled(rate_limit_notifications="2/60")
    order_id, token, view = sys_.order_awaiting_payment()
    genuine = _notification(sys_, view["payment"]["gateway_order_id"], status="pending")
    genuine["status_code"] = "201"
    from shared.payments.gateway import notification_signature
    from tests.conftest import SERVER_KEY

    genuine["signature_key"] = notification_signature(genuine["order_id"], "201", genuine["gross_amount"],
                                                      SERVER_KEY)
    url = f"{base}/api/v1/payments/notifications"
    assert [requests.post(url, json=genuine, timeout=5).status_code for _ in range(5)] == [200] * 5
    forged = {**genuine, "signature_key": "0" * 128}
    assert [requests.post(url, json=forged, timeout=5).status_code for _ in range(3)] == [403, 403, 429]
    assert requests.post(url, json=genuine, timeout=5).status_code == 200  # the gateway still gets in


@pytest.fixture
def gunicorn_throttled(sys_):
    """The production server (gunicorn gthread, as in the Procfile) with a one-place outflow."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    port = free_port()
    prefix = f"meterai-adm-{uuid.uuid4().hex[:8]}:"
    env = {**sys_.env, "ADMISSION_PER_MINUTE": "1", "ADMISSION_BURST": "1", "REDIS_KEY_PREFIX": prefix}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--worker-class", "gthread",
         "--workers", "1", "--threads", "4", "web:create_app()"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_accepts(port), timeout=30, message="gunicorn to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        client = redis.Redis.from_url(sys_.settings.redis_url)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


def test_a_queued_upload_gets_its_429_over_a_connection_that_stays_open(gunicorn_throttled):
    """Answering before reading the upload would make gunicorn close the connection under a client
    still sending: it would never see its ticket. The body is drained, so the same kept-alive
    connection carries the 429 and the next request."""
    import http.client

    base = gunicorn_throttled
    assert _create(base).status_code == 202
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    boundary = "meteraiboundary"
    pdf = make_pdf(pages=1) + b"%" + b"x" * 1_500_000  # a big upload, well past any server buffer
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"document\"; filename=\"a.pdf\"\r\n"
            f"Content-Type: application/pdf\r\n\r\n").encode() + pdf + f"\r\n--{boundary}--\r\n".encode()
    fields = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                     for name, value in (("page", "1"), ("x", "400"), ("y", "80"), ("email", "a@b.id")))
    body = fields.encode() + body
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Idempotency-Key": "big-1"}
    for _ in range(3):
        conn.request("POST", "/api/v1/orders", body=body, headers=headers)
        response = conn.getresponse()
        assert response.status == 429
        assert b'"ticket"' in response.read()
    conn.close()


# --- no way to lock buyers out (issue 9, points 10 and 12) ------------------------------------------

def _redis(sys_) -> redis.Redis:
    return redis.Redis.from_url(sys_.settings.redis_url)


def test_a_spent_ticket_stays_spent_for_its_whole_life(sys_, throttled):
    base = throttled(admission_per_minute=60, admission_burst=1)  # a second create is queued for a second
    ticket = _queued(base).json()["queue"]["ticket"]  # after the free place is taken
    token = wait_until(lambda: _poll(base, ticket).json().get("admission_token"), message="an admission")
    second_token = _poll(base, ticket).json()["admission_token"]  # polled again before spending
    assert _create(base, admission=token).status_code == 202

    # Neither another token of the same ticket nor a new one can buy a second order...
    again = _create(base, admission=second_token)
    assert again.status_code == 409 and again.json()["error"]["code"] == "admission_used"
    poll = _poll(base, ticket)
    assert poll.status_code == 410 and poll.json()["error"]["code"] == "ticket_used"
    assert "sudah dipakai" in requests.get(f"{base}/antrian/{ticket}", timeout=5).text
    # ...and the record that it was spent lasts as long as the ticket itself (it used to lapse after the
    # token's ten minutes, when polling the ticket handed out a fresh, spendable token).
    client = _redis(sys_)
    spent = list(client.scan_iter(match=f"{base.prefix}adm:spent:*"))
    assert len(spent) == 1 and client.ttl(spent[0]) > sys_.settings.ticket_seconds


def test_requests_that_fail_validation_take_no_place_in_line(throttled):
    base = throttled(admission_per_minute=1, admission_burst=2)
    junk = []
    for n in range(25):
        junk.append(requests.post(f"{base}/api/v1/orders", headers={"Idempotency-Key": f"junk-{n}",
                                                                      "X-Forwarded-For": new_client()},
                                  timeout=5))  # no body at all
        junk.append(_create(base, email="not-an-address"))
    assert {r.status_code for r in junk} <= {400, 422}, {r.status_code for r in junk}
    # The burst of two is still there for real buyers.
    assert [_create(base).status_code for _ in range(2)] == [202, 202]
    assert _create(base).status_code == 429


def test_long_text_fields_are_refused_before_any_pattern_runs(throttled):
    base = throttled()
    huge = "a" * 20_000 + "@" + "b" * 40_000  # took the old e-mail pattern seconds of a web thread
    r = _create(base, email=huge)
    assert r.status_code == 422 and r.json()["error"]["code"] == "field_too_long"
    r = _create(base, email="a" * 250 + "@b.id")  # short enough to read, too long for an address
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_email"
    dotless = "a@" + "b" * 200  # the shape that backtracks in a "[^@]+\\.[^@]+" pattern
    assert _create(base, email=dotless).json()["error"]["code"] == "invalid_email"


def test_one_live_ticket_per_client(throttled):
    base = throttled(admission_per_minute=1, admission_burst=1)
    assert _create(base).status_code == 202
    client = new_client()
    first, again = _create(base, client=client).json()["queue"], _create(base, client=client).json()["queue"]
    assert again["ticket"] == first["ticket"] and again["position"] == first["position"] == 1
    other = _create(base).json()["queue"]
    assert other["position"] == 2  # the first client's repeat took no second place


def test_a_failed_create_gives_its_admission_back(sys_, throttled, tmp_path):
    blocked = tmp_path / "documents"
    blocked.write_text("not a folder")  # the store can't write: every create fails after admission
    base = throttled(admission_per_minute=1, admission_burst=1, admission_active_checkouts=1,
                     document_dir=str(blocked))
    failed = _create(base)
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "store_unavailable"
    client = _redis(sys_)
    assert client.zcard(f"{base.prefix}adm:active") == 0  # the slot went back...
    assert _create(base).status_code == 503  # ...and the outflow it took: the next buyer isn't queued

    # A buyer admitted from the line keeps a usable admission when their create fails.
    client.set(f"{base.prefix}adm:mode", "queue_all")
    time.sleep(0.3)
    ticket = _create(base).json()["queue"]["ticket"]
    client.set(f"{base.prefix}adm:mode", "auto")
    token = wait_until(lambda: _poll(base, ticket).json().get("admission_token"), timeout=90,
                       message="an admission")
    assert _create(base, admission=token).status_code == 503
    blocked.unlink()  # the store is back
    assert _create(base, admission=token).status_code == 202


def test_the_line_moves_over_tickets_nobody_polls_any_more(sys_, throttled):
    base = throttled(admission_per_minute=600, admission_burst=50, admission_active_checkouts=2)
    assert _create(base).status_code == 202  # one of the two active checkouts
    client = _redis(sys_)
    # Fill the line: three tickets nobody will poll (taken and abandoned), then a real buyer.
    client.set(f"{base.prefix}adm:mode", "queue_all")  # hold the line still while it fills
    time.sleep(0.3)
    abandoned = [_create(base).json()["queue"]["ticket"] for _ in range(3)]
    buyer = _create(base).json()["queue"]
    assert buyer["position"] == 4
    seen = f"{base.prefix}adm:seen"
    for n in client.zrange(seen, 0, 2):  # the three took their tickets ten minutes ago, never came back
        client.zadd(seen, {n: (time.time() - 600) * 1000})
    client.set(f"{base.prefix}adm:mode", "auto")
    time.sleep(0.3)
    # One active checkout is left: it goes to the buyer who is still here, not to an abandoned ticket.
    status = wait_until(lambda: (body := _poll(base, buyer["ticket"]).json())["admitted"] and body,
                        timeout=15, message="the waiting buyer to be admitted")
    assert status["admission_token"]
    assert _create(base, admission=status["admission_token"]).status_code == 202
    # An abandoned ticket's holder who does come back joins the line again; they don't jump it.
    late = _poll(base, abandoned[0])
    assert late.status_code == 410 and late.json()["error"]["code"] == "ticket_abandoned"


def test_the_line_counts_only_held_tickets_and_knows_its_oldest_waiter(sys_, throttled):
    from shared.services import observe

    base = throttled(admission_per_minute=600, admission_burst=50, admission_active_checkouts=2)
    assert _create(base).status_code == 202  # one of the two active checkouts
    client = _redis(sys_)
    controller = admission.AdmissionController(base.settings, client)
    client.set(f"{base.prefix}adm:mode", "queue_all")  # hold the line still while it fills
    time.sleep(0.3)
    tickets = [_create(base).json()["queue"] for _ in range(4)]
    assert [t["position"] for t in tickets] == [1, 2, 3, 4]
    # Tickets 1 and 2 were taken long ago and never polled again; 3 was issued 90 s ago and is held;
    # 4 was just issued.
    now, seen, issued = time.time(), f"{base.prefix}adm:seen", controller.issued_key
    for n, age in ((1, 500), (2, 400), (3, 90)):
        client.zremrangebyscore(issued, n, n)
        client.zadd(issued, {f"{n}:{int(now - age)}": n})
        client.zadd(seen, {str(n): (now - (age if n < 3 else 1)) * 1000})
    line = observe.snapshot(base.settings, client, controller)["line"]
    assert line["length"] == 4 and line["waiting"] == 2
    assert line["oldest_waiter_seconds"] == pytest.approx(90, abs=3)

    # The head moves over the two abandoned tickets and admits ticket 3; what is issued behind the head is
    # trimmed with it, and the oldest waiter is now ticket 4.
    client.set(f"{base.prefix}adm:mode", "auto")
    time.sleep(0.3)
    wait_until(lambda: _poll(base, tickets[2]["ticket"]).json()["admitted"], timeout=15,
               message="ticket 3 to be admitted")
    line = observe.snapshot(base.settings, client, controller)["line"]
    assert line["head"] == 3 and line["length"] == 1 and line["waiting"] == 1
    assert line["oldest_waiter_seconds"] < 60
    assert client.zcard(issued) == 1


def test_the_oldest_waiter_is_nobody_when_every_ticket_in_line_is_abandoned(sys_, throttled):
    from shared.services import observe

    base = throttled(admission_per_minute=600, admission_burst=50, admission_active_checkouts=1)
    assert _create(base).status_code == 202  # the one active checkout: the head can't move
    client = _redis(sys_)
    controller = admission.AdmissionController(base.settings, client)
    for _ in range(3):
        assert _create(base).status_code == 429
    seen = f"{base.prefix}adm:seen"
    for n in client.zrange(seen, 0, -1):
        client.zadd(seen, {n: (time.time() - 600) * 1000})
    line = observe.snapshot(base.settings, client, controller)["line"]
    assert (line["length"], line["waiting"], line["oldest_waiter_seconds"]) == (3, 0, 0.0)


def test_buyers_far_back_are_told_to_ask_rarely_and_buyers_near_the_head_often(throttled):
    base = throttled(admission_per_minute=1, admission_burst=1, admission_max_retry_after_seconds=100)
    assert _create(base).status_code == 202  # the one free place: everyone after waits a minute each
    answers = [_create(base) for _ in range(10)]
    assert [a.status_code for a in answers] == [429] * 10
    told = [(a.json()["queue"]["position"], int(a.headers["Retry-After"])) for a in answers]
    assert told[0] == (1, 15)  # ETA 60 s: ask again in a quarter of it
    assert told[-1] == (10, 100)  # ETA 600 s: a quarter is 150 s, capped
    polled = _poll(base, answers[-1].json()["queue"]["ticket"])
    assert int(polled.headers["Retry-After"]) == 100
    assert int(_poll(base, answers[0].json()["queue"]["ticket"]).headers["Retry-After"]) <= 15


def test_the_abandon_window_must_outlast_the_longest_retry_after(sys_):
    with pytest.raises(ValueError, match="ADMISSION_ABANDON_SECONDS"):
        dataclasses.replace(sys_.settings, admission_max_retry_after_seconds=200, admission_abandon_seconds=300)


def test_buyers_behind_one_address_get_places_of_their_own_up_to_a_bound(throttled):
    base = throttled(admission_per_minute=1, admission_burst=1, admission_tickets_per_address=3)
    assert _create(base).status_code == 202
    office = new_client()
    tabs = [_create(base, client=office, browser=f"browser-tab-{n}").json()["queue"] for n in range(3)]
    assert [t["position"] for t in tabs] == [1, 2, 3]  # three buyers, three places
    assert _create(base, client=office, browser="browser-tab-1").json()["queue"]["ticket"] == tabs[1]["ticket"]
    # A fourth browser at that address (or a script inventing ids) shares the newest place.
    assert _create(base, client=office, browser="browser-tab-x").json()["queue"]["ticket"] == tabs[2]["ticket"]
    assert _create(base).json()["queue"]["position"] == 4


# --- a create retried by nginx or by our own Redis client (issue 12 review) -----------------------------

def _queued(base: Base) -> requests.Response:
    """The answer of the first create put in line, after the free place is taken. Creates until one is
    (a count, not a clock): at 60/min a place comes back every second, which a busy machine may take
    between two creates."""
    for _ in range(50):
        answer = _create(base)
        if answer.status_code != 202:
            break
    assert answer.status_code == 429, answer.text
    return answer


def _admission_token(base: Base) -> str:
    """An admission token from the line."""
    ticket = _queued(base).json()["queue"]["ticket"]
    return wait_until(lambda: _poll(base, ticket).json().get("admission_token"), message="an admission")


def test_a_create_retried_on_another_node_keeps_the_admission_its_first_attempt_spent(sys_, throttled):
    """nginx retries a POST on another node when the first times out (proxy_next_upstream ...
    non_idempotent): the first node may already have spent the admission token and frozen before making
    the order. The retry, same token and same Idempotency-Key, must still become the order."""
    base = throttled(admission_per_minute=60, admission_burst=1)  # a second create is queued for a second
    token = _admission_token(base)
    key = f"proxy-retry-{uuid.uuid4().hex}"
    first_node = admission.AdmissionController(base.settings, _redis(sys_))  # spends, then freezes
    first_node.spend_token(first_node.check_token(token), "a@b.id", key)

    document = make_pdf(pages=1)
    retried = _create(base, key=key, admission=token, document=document)  # the same request, on the other node
    assert retried.status_code == 202, retried.text
    order_id = retried.json()["order_id"]
    again = _create(base, key=key, admission=token, document=document)
    assert again.json()["order_id"] == order_id  # and again: the same order
    other = _create(base, admission=token)  # another create can't use the spent admission
    assert other.status_code == 409 and other.json()["error"]["code"] == "admission_used"
    assert sys_.query("SELECT count(*) AS n FROM orders WHERE idempotency_key = %s", (key,))[0]["n"] == 1


def test_two_attempts_of_one_create_at_once_both_get_the_one_order(sys_, throttled):
    base = throttled(admission_per_minute=60, admission_burst=1)  # a second create is queued for a second
    token = _admission_token(base)
    key = f"twice-{uuid.uuid4().hex}"
    document = make_pdf(pages=1)
    barrier = threading.Barrier(2)

    def attempt(_: int) -> requests.Response:
        barrier.wait()
        return _create(base, key=key, admission=token, document=document)

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(attempt, range(2)))
    # 202 for the one that made it; the other replays it (202 while it is still "created", 200 after).
    assert {r.status_code for r in answers} <= {200, 202} and 202 in {r.status_code for r in answers}, \
        [r.text for r in answers]
    assert len({r.json()["order_id"] for r in answers}) == 1
    assert sys_.query("SELECT count(*) AS n FROM orders WHERE idempotency_key = %s", (key,))[0]["n"] == 1
    assert _create(base, admission=token).json()["error"]["code"] == "admission_used"


class LateRedis:
    """A TCP proxy in front of Redis that passes every request on but, on a connection that sent
    ``marker``, drops every reply from then on: a Redis that did the work and answered too late."""

    def __init__(self, port: int, marker: bytes) -> None:
        self.port, self.marker, self.sent = port, marker, 0  # requests with the marker passed on
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", self.port))
            self.sockets += [near, far]
            late = threading.Event()
            threading.Thread(target=self._requests, args=(near, far, late), daemon=True).start()
            threading.Thread(target=self._replies, args=(far, near, late), daemon=True).start()

    def _requests(self, near: socket.socket, far: socket.socket, late: threading.Event) -> None:
        try:
            while data := near.recv(65536):
                if self.marker in data:
                    self.sent += 1
                    late.set()
                far.sendall(data)
        except OSError:
            pass

    @staticmethod
    def _replies(far: socket.socket, near: socket.socket, late: threading.Event) -> None:
        try:
            while data := far.recv(65536):
                if not late.is_set():
                    near.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def test_a_write_whose_reply_times_out_is_not_sent_again(sys_):
    """Our client retries a connection error, never a timeout: a write whose reply came too late has
    run, and running it again would count a spend twice or take a second active-checkout slot."""
    prefix = f"meterai-adm-{uuid.uuid4().hex[:8]}:"
    settings = dataclasses.replace(sys_.settings, redis_key_prefix=prefix, admission_per_minute=600,
                                   admission_burst=5)
    location = urlsplit(sys_.settings.redis_url)
    direct = _redis(sys_)
    for script in (admission._SPEND, admission._ADVANCE):  # loaded, so the one call is the write itself
        direct.script_load(script)
    late = LateRedis(location.port or 6379, prefix.encode())
    try:
        # As the web builds its client (web/__init__.py): 0.5 s per reply, one retry.
        client = redis_client(f"redis://127.0.0.1:{late.address[1]}{location.path or '/0'}", timeout=0.5,
                              retries=1)
        controller = admission.AdmissionController(settings, client)
        claims = {"n": 7, "e": "an-epoch"}
        with pytest.raises(admission.AdmissionUnavailable):
            controller.spend_token(claims, "a@b.id", "key-1")
        with pytest.raises(admission.AdmissionUnavailable):
            controller.admit_or_queue("10.9.9.9")
        assert late.sent == 2  # each write went to Redis once...
        assert direct.hget(f"{prefix}adm:spender:an-epoch:7", "holders") == b"1"  # ...and ran once
        assert direct.zcard(f"{prefix}adm:active") == 1
        # The buyer's retry of the same create (same Idempotency-Key) still gets its admission.
        healthy = admission.AdmissionController(settings, redis_client(sys_.settings.redis_url, timeout=0.5))
        healthy.spend_token(claims, "a@b.id", "key-1")
        with pytest.raises(admission.InvalidAdmission) as used:
            healthy.spend_token(claims, "a@b.id", "key-2")
        assert used.value.code == "admission_used"
    finally:
        late.close()
        for key in direct.scan_iter(match=f"{prefix}*"):
            direct.delete(key)


def _take(base: str, client: str | None = None, browser: str | None = "tab-default-0001") -> requests.Response:
    headers = {"X-Forwarded-For": client or new_client()}
    if browser:
        headers["Client-Id"] = browser
    return requests.post(f"{base}/api/v1/queue", headers=headers, timeout=10)


def test_a_place_in_line_before_the_upload_is_admitted_at_once_when_the_room_is_free(sys_, throttled):
    base = throttled(admission_per_minute=600, admission_burst=5)
    client = new_client()
    taken = _take(base, client)
    assert taken.status_code == 200, taken.text
    body = taken.json()
    assert body["admitted"] and body["admission_token"] and "Retry-After" not in taken.headers
    # Until the create spends it, the slot is held only briefly (a request without a body can't keep a
    # checkout's place for the session window); the create makes it the checkout's.
    slots = _redis(sys_).zrange(f"{base.prefix}adm:active", 0, -1, withscores=True)
    held = [score for member, score in slots if member.startswith(b"t")]
    session_end = (time.time() - base.settings.admission_session_seconds) * 1000
    assert len(held) == 1 and held[0] < session_end + 130_000
    created = _create(base, admission=body["admission_token"], client=client)
    assert created.status_code == 202, created.text
    renewed = [score for member, score in _redis(sys_).zrange(f"{base.prefix}adm:active", 0, -1, withscores=True)
               if member.startswith(b"t")]
    assert renewed[0] > time.time() * 1000 - 5_000
    # A ticket request must name its tab (a custom header: no other site can send it from its visitors).
    refused = _take(base, browser=None)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "missing_client_id"


def test_above_the_outflow_a_place_in_line_costs_no_upload_and_the_upload_follows_the_turn(sys_, throttled):
    base = throttled(admission_per_minute=30, admission_burst=1)
    assert _create(base).status_code == 202  # the one free place
    client = new_client()
    taken = _take(base, client, browser="tab-0123456789")
    assert taken.status_code == 200 and not taken.json()["admitted"], taken.text
    queue = taken.json()
    assert queue["position"] == 1 and int(taken.headers["Retry-After"]) >= 1
    # The same tab asking again keeps its place; nothing was uploaded for it.
    again = _take(base, client, browser="tab-0123456789").json()
    assert again["ticket"] == queue["ticket"]
    assert sys_.query("SELECT count(*) AS n FROM orders")[0]["n"] == 1
    status = wait_until(lambda: (b := _poll(base, queue["ticket"]).json())["admitted"] and b, timeout=15,
                        message="the ticket to be admitted")
    created = _create(base, admission=status["admission_token"], client=client)
    assert created.status_code == 202, created.text
    # Paused sales take no tickets.
    _redis(sys_).set(f"{base.prefix}adm:mode", "paused")
    time.sleep(0.3)
    paused = _take(base)
    assert paused.status_code == 503 and paused.json()["error"]["code"] == "sales_paused"


@pytest.mark.parametrize("setting", ["rate_limit_create", "rate_limit_verify", "rate_limit_notifications"])
@pytest.mark.parametrize("wrong", ["20/minute", "0/60", "20/0", "-1/60", "20 / 60", "20/60/60", "1e3/60"])
def test_a_rate_limit_that_cannot_be_read_is_refused_as_settings_load(setting: str, wrong: str):
    """Read only when a request comes: a typo would otherwise be a 500 on every request it guards."""
    from shared.config import load_settings

    with pytest.raises(ValueError, match=setting.upper()):
        load_settings({"DEVELOPMENT": "1", setting.upper(): wrong})
    assert getattr(load_settings({"DEVELOPMENT": "1", setting.upper(): "20"}), setting) == "20"
