"""``GET /api/v1/queue/<ticket>``, answered before Flask.

At the design peak the people in line make more requests than everyone else together (``docs/capacity.md``:
≈ 8,000 queue polls a second against 60 orders), and a poll's own work is small: check the ticket's
HMAC, read this process's 200 ms look at the line, maybe collect an admission. Through Flask a poll cost
0.63 ms of CPU against a no-op endpoint's 0.56 (``loadtests.bench.web``, 2026-12-01): the framework was
the poll. Here it is the poll's work plus one write.

The answer is the one ``web/queue.py``'s ``queue_status`` gives (body, ``Cache-Control: no-store``,
``Retry-After`` from the ETA), with the security headers, a request id, the access line's route and the
request metrics Flask's hooks add. A refusal the waiting room gave (a ticket that isn't valid, expired,
used or abandoned; sales paused; Redis away) goes to Flask with the answer already known
(:data:`ANSWERED`): the route raises it, and its error handlers answer as they always did, without
asking the waiting room twice (which would double the wait on a slow Redis, and the cost of every poll
while sales are paused). Any other error falls through to Flask, which asks again: a poll that isn't
admitted changes nothing, and collecting an admission is the last thing
:meth:`~shared.admission.AdmissionController.status` does.
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterable

from shared import metrics
from shared.admission import AdmissionUnavailable, InvalidAdmission, QueueStatus, SalesPaused, retry_after_seconds
from shared.logs import ROUTE_ENVIRON, new_request_id, sane_request_id

ROUTE = "/api/v1/queue/<ticket>"
PREFIX = "/api/v1/queue/"
# Where the fast path leaves the waiting room's refusal for the route to raise (a WSGI environ key).
ANSWERED = "meterai.queue_status_refusal"


def json_bytes(body: dict) -> bytes:
    """As Flask's ``jsonify`` writes it outside debug mode: compact, keys sorted, ASCII, a newline."""
    return (json.dumps(body, separators=(",", ":"), sort_keys=True) + "\n").encode()


def line_body(status: QueueStatus) -> dict:
    """A place in line as the API answers it (API.md)."""
    body = {"position": status.position, "eta_seconds": status.eta_seconds, "admitted": status.admitted}
    if status.admission_token:
        body["admission_token"] = status.admission_token
    return body


def line_headers(body: dict, max_retry_after: int) -> list[tuple[str, str]]:
    """Never cached, and when not admitted yet, when to ask again (a quarter of the ETA, capped)."""
    headers = [("Cache-Control", "no-store")]
    if not body["admitted"]:
        headers.append(("Retry-After", str(retry_after_seconds(body["eta_seconds"], max_retry_after))))
    return headers


class QueuePolls:
    """WSGI middleware answering queue polls from ``flask_app``'s waiting room, before ``app``."""

    def __init__(self, app: Callable, flask_app: Any, headers: dict[str, str]) -> None:
        self.app = app
        self.admission = flask_app.extensions["meterai.admission"]
        self.max_retry_after = flask_app.extensions["meterai.settings"].admission_max_retry_after_seconds
        self.headers = list(headers.items())
        self.answered_here = metrics.QUEUE_POLLS.labels("web")

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "GET" or not path.startswith(PREFIX):
            return self.app(environ, start_response)
        ticket = path[len(PREFIX):]
        if not ticket or "/" in ticket:
            return self.app(environ, start_response)
        self.answered_here.inc()  # a poll the proxy would have sent to a poll server (docs/deploy.md)
        started = time.perf_counter()
        try:
            status = self.admission.status(ticket)
        except (InvalidAdmission, SalesPaused, AdmissionUnavailable) as refusal:
            environ[ANSWERED] = refusal  # the route raises it (see the module docstring)
            return self.app(environ, start_response)
        except Exception:  # noqa: BLE001 - Flask asks again and answers it (see the module docstring)
            return self.app(environ, start_response)
        body = line_body(status)
        data = json_bytes(body)
        environ[ROUTE_ENVIRON] = ROUTE
        request_id = sane_request_id(environ.get("HTTP_X_REQUEST_ID")) or new_request_id()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                                  *line_headers(body, self.max_retry_after), ("X-Request-Id", request_id),
                                  *self.headers])
        metrics.record_http(ROUTE, "GET", 200, time.perf_counter() - started)
        return [data]
