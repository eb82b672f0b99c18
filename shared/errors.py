"""Domain exceptions.

Every failure the system can name carries a machine ``code`` and a ``message`` for a person, so the web
layer maps it to HTTP in one handler and the workers know without guessing whether to retry: a
:class:`TransientError` (timeout, dependency down) is always retried, a :class:`PermanentError`
(unreadable document) never is.
"""
from __future__ import annotations


class DomainError(Exception):
    """A failure with a machine code, a human message and the HTTP status it maps to."""

    code: str = "error"
    status: int = 400

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class TransientError(DomainError):
    """Worth retrying: the same call may succeed later (timeouts, 5xx, a store that is briefly away)."""

    code = "transient"
    status = 503


class PermanentError(DomainError):
    """Retrying cannot help: the input itself is wrong (an unreadable PDF, a refused request)."""

    code = "permanent"
    status = 422
