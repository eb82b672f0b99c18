"""The waiting room: where a queued buyer sees their position and ETA and collects their admission."""
from __future__ import annotations

from flask import Blueprint, jsonify, render_template, request, url_for

from shared.admission import MAX_RETRY_AFTER_SECONDS, InvalidAdmission, Queued, SalesPaused, retry_after_seconds
from web.api import BadRequest
from web.context import admission, settings
from web.errors import status_for
from web.limits import browser_id, client_id, rate_limited
from web.queuepoll import ANSWERED, line_body, line_headers

bp = Blueprint("queue", __name__)


def _status_body(ticket: str) -> dict:
    return line_body(admission().status(ticket))


def _line_answer(body: dict):
    """A place in line as JSON (the same headers as web/queuepoll.py's answer)."""
    response = jsonify(body)
    for name, value in line_headers(body, settings().admission_max_retry_after_seconds):
        response.headers[name] = value
    return response


@bp.post("/api/v1/queue")
@rate_limited("ticket", "rate_limit_create")
def take_ticket():
    """A place in line before any upload: the checkout asks for one first and uploads only once admitted,
    so people above the outflow cost a few hundred bytes, not a 200 KB read each. At a quiet moment the
    answer is already admitted, with the token the create then carries."""
    tab = browser_id()
    if tab == "-":
        # Required: a custom header makes a browser ask before sending this from another site, so no page
        # elsewhere can have its visitors take places in our line.
        raise BadRequest("Header Client-Id is required: 8-64 of A-Z a-z 0-9 _ -, one per browser tab.",
                         code="missing_client_id")
    answer = admission().take_ticket(client_id(), tab)
    if isinstance(answer, Queued):
        body = {"ticket": answer.ticket, "position": answer.position, "eta_seconds": answer.eta_seconds,
                "admitted": False, "status_url": url_for("queue.queue_status", ticket=answer.ticket),
                "page_url": url_for("queue.queue_page", ticket=answer.ticket)}
    else:
        body = {"admitted": True, "admission_token": answer.admission_token, "position": 0, "eta_seconds": 0}
    return _line_answer(body)


@bp.get("/api/v1/queue/<ticket>")
def queue_status(ticket: str):
    refusal = request.environ.pop(ANSWERED, None)  # the waiting room's answer to web/queuepoll.py
    if refusal is not None:
        raise refusal
    return _line_answer(_status_body(ticket))


@bp.get("/antrian/<ticket>")
def queue_page(ticket: str):
    try:
        body, error = _status_body(ticket), None
    except (InvalidAdmission, SalesPaused) as exc:
        body, error = None, exc
    paused = isinstance(error, SalesPaused)
    html = render_template("queue.html", ticket=ticket, status=body, error=error, paused=paused,
                           refresh=MAX_RETRY_AFTER_SECONDS if paused
                           else max(3, retry_after_seconds((body or {}).get("eta_seconds", 10),
                                                           settings().admission_max_retry_after_seconds)))
    return html, (status_for(error) if error else 200), {"Cache-Control": "no-store"}

