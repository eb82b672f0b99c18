"""The waiting room: where a queued buyer sees their position and ETA and collects their admission."""
from __future__ import annotations

from flask import Blueprint, jsonify, render_template

from shared.admission import MAX_RETRY_AFTER_SECONDS, InvalidAdmission, SalesPaused, retry_after_seconds
from web.context import admission, settings
from web.errors import status_for

bp = Blueprint("queue", __name__)


def _status_body(ticket: str) -> dict:
    status = admission().status(ticket)
    body = {"position": status.position, "eta_seconds": status.eta_seconds, "admitted": status.admitted}
    if status.admission_token:
        body["admission_token"] = status.admission_token
    return body


@bp.get("/api/v1/queue/<ticket>")
def queue_status(ticket: str):
    body = _status_body(ticket)
    response = jsonify(body)
    response.headers["Cache-Control"] = "no-store"
    if not body["admitted"]:
        response.headers["Retry-After"] = str(retry_after_seconds(body["eta_seconds"],
                                                                  settings().admission_max_retry_after_seconds))
    return response


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

