"""Ops switches: see the waiting room, queue everyone, pause sales. Bearer ``OPS_TOKEN``; off when unset."""
from __future__ import annotations

import hmac

from flask import Blueprint, jsonify, request

from shared.admission import Mode
from shared.errors import DomainError
from web.context import admission, settings

bp = Blueprint("ops", __name__, url_prefix="/ops")


@bp.before_request
def require_ops_token():
    expected = settings().ops_token
    if not expected:
        raise DomainError("Not found.", code="not_found", status=404)
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise DomainError("Ops token required.", code="unauthorized", status=401)


def _state() -> dict:
    controller = admission()
    return {"mode": controller.mode().value, "outflow_per_minute": controller.outflow_per_minute()}


@bp.get("/admission")
def get_admission():
    return jsonify(_state())


@bp.post("/admission")
def set_admission():
    body = request.get_json(silent=True) or {}
    try:
        mode = Mode(body.get("mode", ""))
    except ValueError:
        raise DomainError(f"mode must be one of {[m.value for m in Mode]}.", code="invalid_mode",
                          status=422) from None
    admission().set_mode(mode)
    return jsonify(_state())
