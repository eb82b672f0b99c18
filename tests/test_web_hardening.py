"""The web edge against a careless or hostile client (issue 9): notifications that replay or nest,
security headers, the checkout page's pay link, the ops switch's token."""
from __future__ import annotations

import json
import re
import uuid

import requests

from shared.payments.gateway import format_gross_amount, notification_signature
from tests.browser import browser_page  # noqa: F401 - fixture
from tests.conftest import SERVER_KEY, wait_until
from tests.test_admission import new_client, throttled  # noqa: F401 - fixture
from tests.test_checkout_page import _checkout


def _signed(gateway_order_id: str, *, status: str = "pending", code: str = "201", **extra) -> dict:
    amount = format_gross_amount(12500)
    return {"transaction_status": status, "status_code": code, "order_id": gateway_order_id,
            "gross_amount": amount, "payment_type": "qris", "transaction_id": "tx-1",
            "signature_key": notification_signature(gateway_order_id, code, amount, SERVER_KEY), **extra}


def _notify(sys_, body, **kwargs) -> requests.Response:
    url = f"{sys_.web_url}/api/v1/payments/notifications"
    if isinstance(body, (bytes, str)):
        return sys_.http.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=10,
                              **kwargs)
    return sys_.http.post(url, json=body, timeout=10, **kwargs)


def test_a_replayed_notification_with_new_unsigned_fields_is_one_small_row(sys_):
    _, _, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    genuine = _signed(gateway_order_id)
    assert _notify(sys_, genuine).json() == {"status": "accepted"}
    # The same signed notification, a new transaction id and unknown fields: a duplicate.
    replay = {**genuine, "transaction_id": "tx-2", "custom_field1": "x" * 10_000}
    assert _notify(sys_, replay).json() == {"status": "duplicate"}
    huge = {**genuine, "transaction_id": "tx-3", "padding": "x" * 256_000}
    assert _notify(sys_, huge).status_code == 413
    invented = {**genuine, "transaction_status": "settlement-but-not-really"}
    assert _notify(sys_, invented).status_code == 400
    rows = sys_.query("SELECT body, pg_column_size(body) AS size FROM payment_notifications"
                      " WHERE gateway_order_id = %s", (gateway_order_id,))
    assert len(rows) == 1
    assert rows[0]["size"] < 2048 and "custom_field1" not in rows[0]["body"]
    _all_processed(sys_)


def test_distinct_notifications_per_gateway_order_are_bounded(sys_):
    _, _, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    answers = [_notify(sys_, _signed(gateway_order_id, code=f"2{n:02d}")).status_code for n in range(40)]
    assert answers == [200] * 40  # the gateway is never made to retry
    stored = sys_.query("SELECT count(*) AS n FROM payment_notifications WHERE gateway_order_id = %s",
                        (gateway_order_id,))[0]["n"]
    assert stored == 32
    _all_processed(sys_)


def _all_processed(sys_) -> None:
    """Let the payments workers finish with what this test queued before the next test empties tables."""
    wait_until(lambda: not sys_.query("SELECT 1 FROM payment_notifications WHERE processed_at IS NULL"),
               timeout=60, message="notifications processed")


def test_deeply_nested_json_is_a_400_not_a_500(sys_):
    for body in ("[" * 5000 + "]" * 5000, '{"a":' * 2500 + "1" + "}" * 2500, "{not json"):
        r = _notify(sys_, body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "bad_request"


def test_every_answer_carries_the_security_headers(sys_):
    page = sys_.http.get(f"{sys_.web_url}/", timeout=5)
    api = sys_.http.get(f"{sys_.web_url}/healthz", timeout=5)
    for response in (page, api):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    policy = page.headers["Content-Security-Policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", policy).group(1)
    assert re.search(f'<script[^>]* nonce="{nonce}">', page.text) and "unsafe-inline" not in policy
    assert api.headers["Content-Security-Policy"].startswith("default-src 'none'")


def _nonces(response) -> tuple[str, set[str]]:
    policy = response.headers["Content-Security-Policy"]
    return (re.search(r"script-src 'nonce-([^']+)'", policy).group(1),
            set(re.findall(r' nonce="([^"]*)"', response.text)))


def test_a_kept_page_gets_a_fresh_nonce_and_its_own_order_each_time_and_reads_as_rendered(sys_):
    """The buyer pages are rendered once per process and kept (web/pages.py ``_page``): each answer
    must still carry a nonce of its own, in its header and every tag, and the order it was asked for."""
    from flask import g

    from web import create_app

    first, second = uuid.uuid4(), uuid.uuid4()
    answers = [sys_.http.get(f"{sys_.web_url}{path}", timeout=5)
               for path in ("/", "/", f"/pesanan/{first}", f"/pesanan/{second}", f"/pesanan/{first}")]
    seen = []
    for answer in answers:
        assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/html")
        header, tags = _nonces(answer)
        assert tags == {header}, (header, tags)
        seen.append(header)
        assert "pagenonce" not in answer.text and "00000000-0000-4000-8000-" not in answer.text
    assert len(set(seen)) == len(seen)  # none reused
    checkout_a, checkout_b, order_first, order_second, order_again = (a.text for a in answers)
    assert checkout_a.replace(seen[0], "N") == checkout_b.replace(seen[1], "N")
    assert str(first) in order_first and str(second) not in order_first
    assert str(second) in order_second and str(first) not in order_second
    assert order_first.replace(seen[2], "N") == order_again.replace(seen[4], "N")
    # What is kept is what Jinja renders for that request: made, reused, and rendered afresh (template
    # auto-reload on, as in debug) give one page; the served ones are that page with their own nonce.
    app = create_app(sys_.settings)
    for path, served, nonce in (("/", checkout_a, seen[0]), (f"/pesanan/{first}", order_first, seen[2])):
        pages = []
        for reload in (False, False, True):
            app.jinja_env.auto_reload = reload
            with app.test_request_context(path):
                g.csp_nonce = "N"
                endpoint, args = app.url_map.bind("localhost").match(path)
                pages.append(app.view_functions[endpoint](**args))
        assert pages[0] == pages[1] == pages[2] == served.replace(nonce, "N")
    assert len(app.extensions["meterai.pages"]) == 2  # one kept copy per page, reused
    # Script roots named at will (SCRIPT_NAME from a trusted peer) don't grow the kept pages past their cap;
    # the pages past it are rendered as before.
    app.jinja_env.auto_reload = False
    client = app.test_client()
    for n in range(20):
        answer = client.get("/", base_url=f"http://localhost/root{n}/")
        header, tags = _nonces(answer)
        assert answer.status_code == 200 and tags == {header} and f'/root{n}/api/v1/orders' in answer.text
    assert len(app.extensions["meterai.pages"]) == 8


def test_the_checkout_page_links_only_to_an_https_or_the_gateway_payment_page(sys_, browser_page, tmp_path):
    page = browser_page
    _checkout(page, sys_.web_url, tmp_path)
    link = page.wait_for_selector("text=Bayar sekarang")
    assert link.get_attribute("href").startswith(sys_.gateway_url)  # the stand-in's own origin
    # A payment link that is not a web address (however it got there) never becomes a link.
    order_id = sys_.query("UPDATE payments SET redirect_url = 'javascript:alert(document.domain)'"
                          " RETURNING order_id")[0]["order_id"]
    import redis

    redis.Redis.from_url(sys_.settings.redis_url).delete(
        f"{sys_.settings.redis_key_prefix}status:{order_id}")  # the page's next poll reads the row
    page.wait_for_function("() => !document.querySelector('a.button') || "
                           "!document.querySelector('a.button').href.startsWith('http')", timeout=30_000)
    page.wait_for_timeout(3000)  # a few more polls
    hrefs = page.eval_on_selector_all("a", "links => links.map(a => a.getAttribute('href'))")
    assert not any(h and h.startswith("javascript:") for h in hrefs), hrefs


OPS = "ops-secret-for-the-tests-0123456789"


def test_ops_token_only_as_bearer_and_wrong_tokens_are_throttled(throttled):
    base = throttled(ops_token=OPS)
    url = f"{base}/ops/admission"
    assert requests.get(url, headers={"Authorization": OPS}, timeout=5).status_code == 401  # bare token
    assert requests.get(url, headers={"Authorization": f"Bearer {OPS}"}, timeout=5).status_code == 200
    guesser = new_client()
    codes = [requests.get(url, headers={"Authorization": f"Bearer guess-{n}", "X-Forwarded-For": guesser},
                          timeout=5).status_code for n in range(12)]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
    # Someone else, with the right token, is not locked out by the guesser.
    assert requests.get(url, headers={"Authorization": f"Bearer {OPS}"}, timeout=5).status_code == 200


def test_mode_changes_are_audit_logged(throttled, caplog):
    base = throttled(ops_token=OPS)
    with caplog.at_level("WARNING", logger="web.ops"):
        r = requests.post(f"{base}/ops/admission", json={"mode": "queue_all"},
                          headers={"Authorization": f"Bearer {OPS}", "User-Agent": "ops-laptop",
                                   "X-Forwarded-For": "198.51.100.7"}, timeout=5)
        assert r.json()["mode"] == "queue_all"
    lines = [rec.getMessage() for rec in caplog.records if "admission_mode_changed" in rec.getMessage()]
    assert lines and "mode=queue_all" in lines[0] and "previous=auto" in lines[0]
    assert "client=198.51.100.7" in lines[0] and "ops-laptop" in lines[0]
    requests.post(f"{base}/ops/admission", json={"mode": "auto"},
                  headers={"Authorization": f"Bearer {OPS}"}, timeout=5)
