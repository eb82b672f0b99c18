"""The logs ops read: JSON lines (shared/logs.py), a request id that follows an order across web and
workers (web/requestid.py, workers/context.py), and nothing secret in any process's output.

Run against the session's real system (gunicorn web, one Celery worker per queue, the stand-in gateway),
reading what each process wrote (the launcher keeps every process's output).
"""
from __future__ import annotations

import io
import json
import logging
import uuid
from typing import Any

import pytest
import requests
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen import canvas

from shared.devtools.services import free_port
from shared.logs import JsonFormatter, log_event
from tests.conftest import SERVER_KEY, System, wait_until

WORKER_GROUPS = ("checkout", "payments", "stamping")


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every log line of ``text`` that is a JSON object (a worker's start-up banner is not a log line);
    complete lines only: the output is read while the processes write, so the last line may be half."""
    complete = text[:text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.startswith("{")]


def events(text: str, event: str, **fields: Any) -> list[dict[str, Any]]:
    """The JSON lines of ``event`` whose fields have the given values."""
    return [line for line in json_lines(text)
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())]


class Outputs:
    """What each process of a system writes from now on."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.marks = {name: len(p.output()) for name, p in system.launcher.processes.items()}

    def __getitem__(self, name: str) -> str:
        data = self.system.launcher.processes[name].output()[self.marks.get(name, 0):]
        return data.decode("utf-8", errors="replace")

    def all(self) -> dict[str, str]:
        return {name: self[name] for name in self.system.launcher.processes}


def task_lines(text: str, order_id: str) -> list[dict[str, Any]]:
    """The per-attempt "task" lines of the tasks run for ``order_id`` (its id among their arguments)."""
    return [line for line in events(text, "task") if order_id in (line.get("args") or "")]


def stamping_logged(out: Outputs, order_id: str) -> bool:
    """Whether the stamping node has written all it writes for the order's stamp: the stamped line comes
    from inside the task, the task's own line and Celery's "succeeded" after it returns (so an order can
    read as stamped before they are in the output). Both later lines carry the stamped line's request id."""
    text = out["stamping"]
    ids = {line.get("request_id") for line in events(text, "stamped", order_id=order_id)} - {None}
    return bool(ids) and bool(task_lines(text, order_id)) and any(
        line["logger"].startswith("celery") and "succeeded" in str(line.get("event", ""))
        and line.get("request_id") in ids for line in json_lines(text))


def _create(base: str, document: bytes, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"{base}/api/v1/orders",
                         headers={"Idempotency-Key": uuid.uuid4().hex, **(headers or {})},
                         data={"page": "1", "x": "400", "y": "80", "email": "pelamar@example.id"},
                         files={"document": ("surat.pdf", document, "application/pdf")}, timeout=10)


def _pdf(marker: str = "") -> bytes:
    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=A4)
    if marker:
        c.setTitle(marker)  # the info dictionary is not compressed: the marker is in the file's bytes
        c.setSubject(marker)
    c.drawString(72, 700, "Surat Pernyataan")
    c.showPage()
    c.save()
    data = buf.getvalue()
    assert marker.encode() in data
    return data


def test_one_request_id_follows_an_order_across_web_and_workers(system: System):
    system.adopt()
    out = Outputs(system)
    request_id = f"proxy-{uuid.uuid4().hex}"
    r = _create(system.web_url, _pdf(), {"X-Request-Id": request_id})
    assert r.status_code == 202, r.text
    assert r.headers["X-Request-Id"] == request_id  # echoed, so a buyer's report names it
    order_id, token = r.json()["order_id"], r.json()["access_token"]
    view = system.wait_status(order_id, token, "awaiting_payment")
    system.pay(view["payment"]["gateway_order_id"])
    system.wait_status(order_id, token, "stamped")
    # Each worker writes its lines after its own commit (the task's line after the task returns), so the
    # order can move on before they are out.
    wait_until(lambda: stamping_logged(out, order_id)
               and events(out["checkout"], "payment_opened", order_id=order_id)
               and task_lines(out["checkout"], order_id)
               and events(out["payments"], "notification_processed", order_id=order_id),
               message="every worker's lines for the order")

    # The create: gunicorn's access line and every checkout line for the order carry the proxy's id.
    created = events(out["web"], "http_request", route="/api/v1/orders", method="POST")
    assert [line["request_id"] for line in created if line["status"] == 202] == [request_id], created
    opened = events(out["checkout"], "payment_opened", order_id=order_id)
    assert [line["request_id"] for line in opened] == [request_id]
    attempts = task_lines(out["checkout"], order_id)
    assert attempts and {line["request_id"] for line in attempts} == {request_id}  # the per-attempt line
    assert {line["logger"] for line in json_lines(out["checkout"]) if line.get("request_id") == request_id} \
        >= {"workers.tasks", "shared.services.checkout"}

    # The payment arrives as the gateway's own request, under an id of its own (made at our edge); the
    # payments worker links that id to the order's once it knows the order, and from there on (and in the
    # stamping task it publishes) the order's id is the one on every line.
    processed = events(out["payments"], "notification_processed", order_id=order_id)
    assert [line["request_id"] for line in processed] == [request_id], processed
    notification_id = processed[0]["notification_request_id"]
    assert notification_id and notification_id != request_id
    assert events(out["web"], "http_request", route="/api/v1/payments/notifications",
                  request_id=notification_id)
    stamped = events(out["stamping"], "stamped", order_id=order_id)
    assert [line["request_id"] for line in stamped] == [request_id]
    stamp_tasks = task_lines(out["stamping"], order_id)
    assert stamp_tasks and {line["request_id"] for line in stamp_tasks} == {request_id}
    # Celery's own lines ("Task … received/succeeded") are JSON and carry it too.
    celery_lines = [line for line in json_lines(out["stamping"])
                    if line["logger"].startswith("celery") and line.get("request_id") == request_id]
    assert celery_lines


def test_an_id_that_is_not_a_sane_token_is_replaced_by_ours(system: System):
    for forged in ("x" * 129, "short", 'a" b {"event": "forged"}', "abc;def=1234567"):
        r = requests.get(f"{system.web_url}/healthz", headers={"X-Request-Id": forged}, timeout=10)
        assert r.status_code == 200
        assert r.headers["X-Request-Id"] != forged and len(r.headers["X-Request-Id"]) == 32
    r = requests.get(f"{system.web_url}/healthz", timeout=10)
    assert len(r.headers["X-Request-Id"]) == 32
    assert r.headers["X-Request-Id"] != requests.get(f"{system.web_url}/healthz", timeout=10).headers["X-Request-Id"]


def test_no_secret_token_or_document_reaches_any_log(system: System):
    """A whole order through the waiting room and the ops switches, with every secret known: none of
    them, and none of the document's bytes, is in anything any process wrote."""
    system.adopt()
    ops_token, secret_key = f"ops-{uuid.uuid4().hex}{uuid.uuid4().hex}", f"sk-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    marker = f"DOKUMEN-RAHASIA-{uuid.uuid4().hex}"
    port = free_port()
    out = Outputs(system)
    system.launcher.start("web", name="web-logs", port=port, env={"OPS_TOKEN": ops_token, "SECRET_KEY": secret_key})
    base = f"http://127.0.0.1:{port}"
    secrets: dict[str, str] = {"ops token": ops_token, "secret key": secret_key, "server key": SERVER_KEY,
                               "system secret key": system.settings.secret_key, "document": marker}
    ops = {"Authorization": f"Bearer {ops_token}", "X-Operator": "piket-malam"}
    try:
        system.launcher.wait_ready(["web-logs"], timeout=90)
        r = requests.post(f"{base}/ops/admission", json={"mode": "queue_all"}, headers=ops, timeout=10)
        assert r.status_code == 200, r.text
        assert requests.get(f"{base}/ops/admission", headers={"Authorization": "Bearer wrong"},
                            timeout=10).status_code == 401
        queued = _create(base, _pdf(marker))
        assert queued.status_code == 429, queued.text
        ticket = queued.json()["queue"]["ticket"]
        secrets["ticket"] = ticket
        assert requests.post(f"{base}/ops/admission", json={"mode": "auto"}, headers=ops, timeout=10).ok
        admission = wait_until(lambda: requests.get(f"{base}/api/v1/queue/{ticket}", timeout=10)
                               .json().get("admission_token"), message="an admission")
        secrets["admission token"] = admission
        r = _create(base, _pdf(marker), {"Admission-Token": admission})
        assert r.status_code == 202, r.text
        order_id, token = r.json()["order_id"], r.json()["access_token"]
        secrets["access token"] = token
        auth = {"Authorization": f"Bearer {token}"}

        def status(*wanted: str) -> dict | None:
            body = requests.get(f"{base}/api/v1/orders/{order_id}", headers=auth, timeout=10).json()
            return body if body["status"] in wanted else None

        view = wait_until(lambda: status("awaiting_payment"), timeout=40)
        system.pay(view["payment"]["gateway_order_id"])
        wait_until(lambda: status("stamped"), timeout=40)
        document = requests.get(f"{base}/api/v1/orders/{order_id}/document", headers=auth, timeout=10)
        assert document.status_code == 200 and marker.encode() in document.content
        wait_until(lambda: stamping_logged(out, order_id), message="the stamping task's lines")
    finally:
        requests.post(f"{base}/ops/admission", json={"mode": "auto"}, headers=ops, timeout=10)
        system.launcher.stop("web-logs")

    written = out.all()
    assert events(written["web-logs"], "admission_mode_changed", mode="queue_all")  # the flow was logged
    assert events(written["web-logs"], "ops_token_refused")
    assert "order_id" in json.dumps(events(written["checkout"], "payment_opened", order_id=order_id))
    for name, text in written.items():
        for what, value in secrets.items():
            assert value not in text, f"the {what} is in {name}'s output"


def test_log_lines_are_json_whatever_the_values(system: System):
    """Every line our processes log is one JSON object; a value from outside can't break it in two."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.logs.forgery")
    log.addHandler(handler)
    log.propagate, log.level = False, logging.INFO
    try:
        log_event(log, "notification_refused", logging.WARNING, reason='x\n{"event": "stamped"}\r\u2028y',
                  timestamp="forged", attempt=2, skipped=None)
        log.info("a library's %s line", "plain")
    finally:
        log.removeHandler(handler)
    first, second = stream.getvalue().rstrip("\n").split("\n")  # "\n" only: the one line break a reader splits on
    parsed = json.loads(first)
    assert parsed["event"] == "notification_refused" and parsed["level"] == "warning"
    assert parsed["reason"] == 'x\n{"event": "stamped"}\r\u2028y' and parsed["timestamp_"] == "forged"
    assert parsed["attempt"] == 2 and "skipped" not in parsed and parsed["timestamp"].endswith("Z")
    assert json.loads(second)["event"] == "a library's plain line"

    # And what the running processes wrote: web (gunicorn's own lines included) from its start, every
    # worker from its "ready." on (the banner Celery prints before it is not a log line).
    for name in ("web", *WORKER_GROUPS):
        lines = system.launcher.processes[name].output().decode("utf-8", errors="replace").split("\n")
        start = 0 if name == "web" else next(i for i, line in enumerate(lines) if "ready." in line)
        body = [line for line in lines[start:] if line.strip()]
        bad = [line for line in body if not line.startswith("{")]
        assert not bad, f"{name}: {bad[:5]}"
        parsed_lines = [json.loads(line) for line in body]
        assert all({"timestamp", "level", "logger", "event"} <= set(line) for line in parsed_lines)
    web_loggers = {line["logger"] for line in json_lines(system.launcher.processes["web"].output().decode())}
    assert "gunicorn.error" in web_loggers
    ready = [line for line in json_lines(system.launcher.processes["stamping"].output().decode())
             if line["event"].endswith("ready.")]
    assert ready  # the launcher's readiness check still finds Celery's "ready." in a JSON line


@pytest.mark.parametrize("value", ["0123456789abcdef0123456789abcdef", "Root=1-5759e988-bd862e3fe1be46a994272793",
                                   "f47ac10b-58cc-4372-a567-0e02b2c3d479"])
def test_a_proxy_id_of_the_usual_forms_is_kept(system: System, value: str):
    r = requests.get(f"{system.web_url}/healthz", headers={"X-Request-Id": value}, timeout=10)
    assert r.headers["X-Request-Id"] == value


def test_the_access_line_keeps_only_the_route_template_status_size_time_and_request_id():
    """gunicorn's access line is built by shared.logs.access_line (gunicorn.conf.py's AccessLogger): the
    fields of the structlog path, never the path, query, headers or client address."""
    from datetime import timedelta

    from shared.logs import ROUTE_ENVIRON, access_line

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/v1/queue/SECRET-TICKET", "QUERY_STRING": "t=tok",
               "REMOTE_ADDR": "203.0.113.9", "HTTP_AUTHORIZATION": "Bearer sekret", ROUTE_ENVIRON: "/api/v1/queue/<ticket>"}
    line = access_line("200 OK", [("Content-Type", "application/json"), ("X-Request-Id", "abcdef0123456789")],
                       environ, 81, timedelta(seconds=1, microseconds=234_567))
    fields = json.loads(line)
    assert {k: v for k, v in fields.items() if k != "timestamp"} == {
        "level": "info", "logger": "gunicorn.access", "event": "http_request", "request_id": "abcdef0123456789",
        "method": "GET", "route": "/api/v1/queue/<ticket>", "status": 200, "bytes": 81, "ms": 1234}
    assert fields["timestamp"].endswith("Z") and "T" in fields["timestamp"]
    for secret in ("SECRET-TICKET", "tok", "203.0.113.9", "sekret"):
        assert secret not in line
    # A route nobody matched, a forged request id, a response with no body sent yet.
    odd = json.loads(access_line(404, [("x-request-id", "bad id\nforged")], {"REQUEST_METHOD": "POST",
                                 ROUTE_ENVIRON: "-"}, None, timedelta(0)))
    assert odd["route"] is None and odd["status"] == 404 and odd["bytes"] is None and "request_id" not in odd
    # Written through the JsonFormatter as it is.
    record = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, line, (), None)
    setattr(record, "meterai_rendered", True)
    assert JsonFormatter().format(record) == line
    # The same fields as the structlog path that formats gunicorn's own atoms (still used for a record
    # with atoms: JsonFormatter._access_record), so the two can't drift apart.
    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    class Response:
        status, headers, sent = "200 OK", [("X-Request-Id", "abcdef0123456789")], 81

    class Request:
        headers = [("AUTHORIZATION", "Bearer sekret")]

    atoms = Logger(Config()).atoms(Response(), Request(), {**environ, "RAW_URI": "/x", "SERVER_PROTOCOL": "HTTP/1.1"},
                                   timedelta(seconds=1, microseconds=234_567))
    old = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, "%(h)s", (), None)
    old.args = atoms  # as gunicorn's Logger.access passes them
    via_atoms = json.loads(JsonFormatter().format(old))
    assert {k: v for k, v in via_atoms.items() if k != "timestamp"} == \
        {k: v for k, v in fields.items() if k != "timestamp"}


def test_the_workers_handler_takes_its_lock_only_in_a_with_block():
    """Python 3.11's ``Handler.handle`` and ``StreamHandler.flush`` call ``lock.acquire()`` and only then
    enter their ``try``: an asynchronous exception (a threads-pool task's soft time limit,
    workers/watchdog.py) landing between the two leaves the lock taken, and every other thread waits on
    its next line for ever. A ``with`` block (the C-level ``__enter__``) can't be left that way, so the
    handler every process of ours logs through (shared.logs.StreamHandler) takes it no other way."""
    import io

    from shared.logs import StreamHandler, configure_logging

    class Recording:
        def __init__(self, lock) -> None:
            self.lock, self.calls = lock, []

        def acquire(self, *args):
            self.calls.append("acquire")
            return self.lock.acquire(*args)

        def release(self):
            self.calls.append("release")
            self.lock.release()

        def __enter__(self):
            self.calls.append("with")
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    for handler_class, expected in ((StreamHandler, ["with", "with"]), (logging.StreamHandler, None)):
        handler = handler_class(io.StringIO())
        handler.lock = Recording(handler.lock)
        handler.handle(logging.LogRecord("t", logging.INFO, __file__, 1, "line", None, None))
        if expected is None:  # the standard library's, to show the test tells them apart
            assert "acquire" in handler.lock.calls
        else:
            assert handler.lock.calls == expected  # handle, then emit's flush

    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers[:] = []
    try:
        configure_logging()
        assert [type(h) for h in root.handlers] == [StreamHandler]
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_a_soft_time_limit_landing_in_a_log_line_is_not_swallowed():
    """``StreamHandler.emit`` catches every Exception and hands it to ``handleError``; a soft time limit
    landing there belongs to the task (workers/watchdog.py), so ours lets it through while other write
    errors stay logging's business (reported, not raised)."""
    from celery.exceptions import SoftTimeLimitExceeded

    from shared.logs import StreamHandler

    class Failing:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def write(self, text: str) -> None:
            raise self.exc

        def flush(self) -> None:
            pass

    record = logging.LogRecord("t", logging.INFO, __file__, 1, "line", None, None)
    with pytest.raises(SoftTimeLimitExceeded):
        StreamHandler(Failing(SoftTimeLimitExceeded())).handle(record)
    raised = logging.raiseExceptions
    logging.raiseExceptions = False  # report, don't raise: a failed write is not the caller's exception
    try:
        StreamHandler(Failing(OSError("disk full"))).handle(record)
    finally:
        logging.raiseExceptions = raised
