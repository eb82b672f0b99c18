"""Ops: the ops page, its live overview, and the admission switches. Bearer ``OPS_TOKEN``; off when unset.

Everything under ``/ops`` is 404 while ``OPS_TOKEN`` is unset. The page itself (``GET /ops``) is a
shell with no data in it, served without the token; every number comes from ``GET /ops/overview``
and every switch goes to ``POST /ops/admission``, both of which need ``Authorization: Bearer <token>``
(a bare token in the header is refused). Wrong tokens count against a per-client limit
(:data:`FAILED_ATTEMPTS`) so the token can't be guessed online.

Why the page keeps the token in ``sessionStorage`` and sends it as a header, never in the URL or a
cookie: a URL ends up in the browser's history, in proxies' access logs and in screenshots; a cookie is
sent by the browser on its own with every request to us, including a form another site makes the
operator's browser post (so a page elsewhere could flip the switches: cross-site request forgery), and
it outlives the tab. ``sessionStorage`` belongs to this one tab of our origin, is gone when the tab
closes, and leaves the browser only when our own script puts it in the ``Authorization`` header. Scripts
on our origin can read it, which is why every page's policy lets only scripts carrying the response's
nonce run (``web/security.py``).

Every mode change is an audit log line (``event=admission_mode_changed``, at WARNING) with who asked
(the name the operator typed on the page, sent as :data:`OPERATOR_HEADER`, bounded and sanitised; the
client's address and user agent), the mode before and after, and when (the line's timestamp, and
``at`` in seconds since the epoch). The page also lists the last switches from a short Redis list, a
view of the log, not the record.
"""
from __future__ import annotations

import logging
import time

import redis
from flask import Blueprint, current_app, jsonify, render_template, request

from shared.admission import Mode
from shared.errors import DomainError
from shared.logs import log_event
from shared.services.opsview import PACE_PER_MINUTE, OpsView, sanitised_operator
from web.context import admission, settings, store
from web.limits import client_id, enforce_limit
from web.payloads import json_body
from web.security import OPS_TOKEN_ATTEMPTS, bearer_token_matches

log = logging.getLogger(__name__)

bp = Blueprint("ops", __name__, url_prefix="/ops")

# Wrong ops tokens a client may try per window before it is refused outright (count/seconds).
FAILED_ATTEMPTS = OPS_TOKEN_ATTEMPTS
# The operator's name, as they typed it on the page (or any client sends it): for the audit log.
OPERATOR_HEADER = "X-Ops-Operator"
# How often the page asks for a fresh overview.
REFRESH_SECONDS = 5


@bp.before_request
def require_ops_token():
    expected = settings().ops_token
    if not expected:
        raise DomainError("Not found.", code="not_found")
    if request.endpoint == "ops.page":
        return  # the shell: no data in it, the token is asked for by its script
    if not bearer_token_matches(request.headers.get("Authorization", ""), expected):
        enforce_limit("ops_auth", FAILED_ATTEMPTS)
        log_event(log, "ops_token_refused", logging.WARNING, client=client_id(), path=request.path)
        raise DomainError("Send the ops token as 'Authorization: Bearer <token>'.", code="unauthorized")


def opsview() -> OpsView:
    view = current_app.extensions.get("meterai.opsview")
    if view is None:
        controller = admission()
        view = OpsView(settings(), controller.redis, controller, store().writable)
        current_app.extensions["meterai.opsview"] = view
    return view


def _state() -> dict:
    controller = admission()
    return {"mode": controller.mode().value, "outflow_per_minute": controller.outflow_per_minute()}


@bp.get("")
def page():
    response = current_app.make_response(render_template(
        "ops.html", refresh_seconds=REFRESH_SECONDS, pace=PACE_PER_MINUTE, operator_header=OPERATOR_HEADER))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/overview")
def overview():
    response = jsonify(opsview().overview())
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/admission")
def get_admission():
    return jsonify(_state())


@bp.post("/admission")
def set_admission():
    try:
        operator = sanitised_operator(request.headers.get(OPERATOR_HEADER))
    except ValueError as exc:
        raise DomainError(f"{OPERATOR_HEADER}: the operator's name takes {exc}.", code="invalid_operator") from None
    body = json_body(4096)
    try:
        mode = Mode(body.get("mode", "") if isinstance(body, dict) else "")
    except ValueError:
        raise DomainError(f"mode must be one of {[m.value for m in Mode]}.", code="invalid_mode") from None
    controller = admission()
    before = controller.mode()
    controller.set_mode(mode)
    at = round(time.time(), 3)
    entry = {"at": at, "operator": operator, "mode": mode.value, "previous": before.value, "client": client_id()}
    log_event(log, "admission_mode_changed", logging.WARNING, mode=mode.value, previous=before.value,
              operator=operator or "-", client=client_id(), user_agent=request.headers.get("User-Agent", "")[:120],
              at=at, via="ops_api")
    try:
        opsview().record_switch(entry)
    except redis.RedisError as exc:  # the page's list is a view; the log line above is the record
        log_event(log, "ops_switch_not_listed", logging.WARNING, error=type(exc).__name__)
    return jsonify(_state())
