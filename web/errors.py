"""One place that turns failures into the API's error shape ``{"error": {"code", "message"}}``."""
from __future__ import annotations

import logging

import psycopg
from flask import Flask, jsonify
from psycopg_pool import PoolTimeout
from werkzeug.exceptions import HTTPException

from shared.errors import DomainError, TransientError
from shared.logs import log_event

log = logging.getLogger(__name__)


def error_response(code: str, message: str, status: int, *, retry_after: int | None = None, **extra):
    response = jsonify({"error": {"code": code, "message": message}, **extra})
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def register(app: Flask) -> None:
    @app.errorhandler(DomainError)
    def domain_error(exc: DomainError):
        retry_after = 5 if isinstance(exc, TransientError) or exc.status in (429, 503) else None
        response = error_response(exc.code, exc.message, exc.status, retry_after=retry_after)
        response.headers.update(getattr(exc, "headers", {}))
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        message = exc.description or exc.name
        if exc.code == 413:
            code, message = "too_large", "The upload is larger than this service accepts."
        return error_response(code, message, exc.code or 500,
                              retry_after=5 if exc.code in (429, 503) else None)

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
