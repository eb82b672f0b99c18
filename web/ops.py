"""Ops switches: see the waiting room, queue everyone, pause sales. Bearer ``OPS_TOKEN``; off when unset.

Only ``Authorization: Bearer <token>`` is accepted (a bare token in the header is refused), wrong tokens
count against a per-client limit (:data:`FAILED_ATTEMPTS`) so the token can't be guessed online, and
every mode change is logged with who asked (address, user agent) and what it was before.
"""
from __future__ import annotations

import hmac
import logging

from flask import Blueprint, jsonify, request

from shared.admission import Mode
from shared.errors import DomainError
from shared.logs import log_event
from web.context import admission, settings
from web.limits import client_id, enforce_limit
from web.payloads import json_body

log = logging.getLogger(__name__)

bp = Blueprint("ops", __name__, url_prefix="/ops")

# Wrong ops tokens a client may try per window before it is refused outright (count/seconds).
FAILED_ATTEMPTS = "10/600"


@bp.before_request
def require_ops_token():
    expected = settings().ops_token
    if not expected:
        raise DomainError("Not found.", code="not_found")
    header = request.headers.get("Authorization", "")
    given = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        enforce_limit("ops_auth", FAILED_ATTEMPTS)
        log_event(log, "ops_token_refused", logging.WARNING, client=client_id(), path=request.path)
        raise DomainError("Send the ops token as 'Authorization: Bearer <token>'.", code="unauthorized")


def _state() -> dict:
    controller = admission()
    return {"mode": controller.mode().value, "outflow_per_minute": controller.outflow_per_minute()}


@bp.get("/admission")
def get_admission():
    return jsonify(_state())


@bp.post("/admission")
def set_admission():
    body = json_body(4096)
    try:
        mode = Mode(body.get("mode", "") if isinstance(body, dict) else "")
    except ValueError:
        raise DomainError(f"mode must be one of {[m.value for m in Mode]}.", code="invalid_mode") from None
    controller = admission()
    before = controller.mode()
    controller.set_mode(mode)
    log_event(log, "admission_mode_changed", logging.WARNING, mode=mode.value, previous=before.value,
              client=client_id(), user_agent=request.headers.get("User-Agent", "")[:120], via="ops_api")
    return jsonify(_state())
