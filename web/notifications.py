"""Gateway notifications: verify the signature, store the body, answer 200 fast.

The gateway retries until it gets a 2xx, so a duplicate is answered 200 too. Nothing here moves money:
the worker confirms the status with the gateway first.
"""
from __future__ import annotations

import logging

from flask import Blueprint, jsonify, request

from shared.errors import DomainError
from shared.logs import log_event
from shared.payments.gateway import verify_notification
from shared.services.payments import accept_notification
from web.context import settings
from web.limits import rate_limited

log = logging.getLogger(__name__)

bp = Blueprint("notifications", __name__, url_prefix="/api/v1/payments")

REQUIRED = ("order_id", "status_code", "gross_amount", "transaction_status", "signature_key")


@bp.post("/notifications")
@rate_limited("notifications", "rate_limit_notifications")
def receive_notification():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise DomainError("Expected a JSON notification body.", code="bad_request", status=400)
    if not body.get("signature_key"):
        raise DomainError("Missing signature_key.", code="unsigned_notification", status=401)
    missing = [name for name in REQUIRED if not body.get(name)]
    if missing or not verify_notification(body, settings().gateway_server_key):
        log_event(log, "notification_rejected", logging.WARNING,
                  gateway_order_id=str(body.get("order_id", ""))[:64], missing=",".join(missing) or None)
        raise DomainError("Notification signature does not verify.", code="bad_signature", status=403)
    new = accept_notification(settings(), body)
    return jsonify({"status": "accepted" if new else "duplicate"}), 200
