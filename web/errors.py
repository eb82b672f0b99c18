"""One place that turns failures into HTTP: the API's error shape ``{"error": {"code", "message"}}`` and
the status, chosen here from the failure's machine code (:data:`STATUS_BY_CODE`), never carried by the
core's exceptions. A code not listed gets its kind's status: 503 for a transient failure (come back), 422
for a permanent one (the input can't be served), 400 otherwise.

Some failures are ours and their detail (an object key, "check the bucket, the credentials") is for
operators: :data:`PUBLIC_FAILURES` gives the code and message a client sees instead, and the detail goes
to the log at ERROR.
"""
from __future__ import annotations

import logging

import psycopg
from flask import Flask, jsonify
from psycopg_pool import PoolTimeout
from werkzeug.exceptions import HTTPException

from shared.errors import DomainError, PermanentError, TransientError
from shared.logs import log_event

log = logging.getLogger(__name__)


STATUS_BY_CODE: dict[str, int] = {
    # the request itself
    "bad_request": 400, "missing_idempotency_key": 400, "missing_document": 400, "bad_notification": 400,
    "unauthorized": 401, "unsigned_notification": 401,
    "forbidden": 403, "bad_signature": 403,
    "not_found": 404, "unknown_serial": 404, "order_not_found": 404,
    "not_stamped": 409, "idempotency_conflict": 409, "not_refund_manual": 409,
    "manual_reference_conflict": 409,
    "too_large": 413,
    "not_pdf": 415,
    "invalid_field": 422, "invalid_mode": 422, "invalid_operator": 422, "field_too_long": 422, "invalid_email": 422,
    "missing_page": 422, "missing_x": 422, "missing_y": 422, "invalid_page": 422, "invalid_x": 422,
    "invalid_y": 422, "verification_timeout": 422,
    "rate_limited": 429,
    # the waiting room
    "invalid_admission": 403, "admission_expired": 403, "invalid_ticket": 404, "admission_used": 409,
    "ticket_expired": 410, "ticket_used": 410, "ticket_abandoned": 410,
    "sales_paused": 503, "admission_unavailable": 503,
    # dependencies
    "store_unavailable": 503, "store_misconfigured": 503, "verification_busy": 503,
    # our loss, not the buyer's input: a stamped file gone from the store, or not what was written
    "document_missing": 500, "document_corrupt": 500,
}
# Failures whose own message is for operators: what clients read instead (code, message).
_STORE_DOWN = ("store_unavailable", "Document storage is briefly unavailable; please retry shortly.")
PUBLIC_FAILURES: dict[str, tuple[str, str]] = {
    "store_unavailable": _STORE_DOWN,
    "store_misconfigured": _STORE_DOWN,
    "document_missing": ("document_missing", "The stamped document cannot be read from our storage right "
                                             "now. This is our error; please try again later."),
    "document_corrupt": ("document_corrupt", "The stored document failed its integrity check and was not "
                                             "served. This is our error; please contact support."),
}
# Statuses whose answer tells the client when to come back.
COME_BACK = frozenset({429, 503})


def status_for(exc: DomainError) -> int:
    """The HTTP status for a domain failure, from its code (or, unlisted, its kind)."""
    status = STATUS_BY_CODE.get(exc.code)
    if status is not None:
        return status
    if isinstance(exc, TransientError):
        return 503
    if isinstance(exc, PermanentError):
        return 422
    return 400


def error_response(code: str, message: str, status: int, *, retry_after: int | None = None, **extra):
    response = jsonify({"error": {"code": code, "message": message}, **extra})
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def register(app: Flask) -> None:
    @app.errorhandler(DomainError)
    def domain_error(exc: DomainError):
        status = status_for(exc)
        code, message = exc.code, exc.message
        if code in PUBLIC_FAILURES:
            log_event(log, "dependency_failure", logging.ERROR, code=code, detail=message)
            code, message = PUBLIC_FAILURES[code]
        response = error_response(code, message, status, retry_after=5 if status in COME_BACK else None)
        response.headers.update(getattr(exc, "headers", {}))
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        message = exc.description or exc.name
        headers = {}
        if exc.code == 413:
            code, message = "too_large", "The upload is larger than this service accepts."
            headers["Connection"] = "close"  # the rest of the body is unread: this connection is done
        response = error_response(code, message, exc.code or 500,
                                  retry_after=5 if exc.code in (429, 503) else None)
        response.headers.update(headers)
        return response

    @app.errorhandler(psycopg.DataError)
    def data_error(exc: Exception):
        # A value the database refuses (out of range, bad text): the input was wrong, not our service.
        log_event(log, "input_refused_by_database", logging.WARNING, error=type(exc).__name__)
        return error_response("invalid_input", "A field has a value this service cannot accept.", 422)

    @app.errorhandler(psycopg.OperationalError)
    @app.errorhandler(PoolTimeout)
    def database_unavailable(exc: Exception):
        log_event(log, "database_unavailable", logging.ERROR, error=type(exc).__name__)
        return error_response("service_unavailable",
                              "The service is briefly unavailable; please retry shortly.", 503,
                              retry_after=5)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log_event(log, "unhandled_error", logging.ERROR, error=type(exc).__name__)
        log.exception("unhandled error")
        return error_response("internal_error", "Something went wrong on our side; please retry.", 500)
