"""Gateway notifications: verify the signature, store what we know of the body, answer 200 fast.

The gateway retries until it gets a 2xx, so a duplicate is answered 200 too. Nothing here moves money:
the worker confirms the status with the gateway first. Only requests that fail verification count
against the per-client rate limit: the gateway sends every payment from a few addresses, and throttling
genuine notifications at the peak would delay paid work. Replays of a genuine notification are bounded
by what is stored of them (:mod:`shared.services.notifications`), not by a rate limit.
"""
from __future__ import annotations

import logging

from flask import Blueprint, jsonify

from shared.errors import DomainError
from shared.logs import log_event
from shared.payments.gateway import verify_notification
from shared.services.notifications import NotificationRefused, accept_notification
from web.context import settings
from web.limits import enforce
from web.payloads import json_body

log = logging.getLogger(__name__)

bp = Blueprint("notifications", __name__, url_prefix="/api/v1/payments")

REQUIRED = ("order_id", "status_code", "gross_amount", "transaction_status", "signature_key")
# A Midtrans notification is 1-3 KB; nothing legitimate comes near this.
MAX_NOTIFICATION_BYTES = 16 * 1024


def _refuse(error: DomainError) -> None:
    enforce("notifications", "rate_limit_notifications")
    raise error


@bp.post("/notifications")
def receive_notification():
    try:
        body = json_body(MAX_NOTIFICATION_BYTES)
    except DomainError as exc:
        _refuse(exc)
    if not isinstance(body, dict):
        _refuse(DomainError("Expected a JSON notification body.", code="bad_request"))
    if not body.get("signature_key"):
        _refuse(DomainError("Missing signature_key.", code="unsigned_notification"))
    missing = [name for name in REQUIRED if not body.get(name)]
    if missing or not verify_notification(body, settings().gateway_server_key):
        log_event(log, "notification_rejected", logging.WARNING, missing=",".join(missing) or None)
        _refuse(DomainError("Notification signature does not verify.", code="bad_signature"))
    try:
        new = accept_notification(settings(), body)
    except NotificationRefused as exc:
        log_event(log, "notification_refused", logging.WARNING, reason=str(exc))
        _refuse(DomainError(f"Notification refused: {exc}.", code="bad_notification"))
    return jsonify({"status": "accepted" if new else "duplicate"}), 200
