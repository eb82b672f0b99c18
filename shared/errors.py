"""Domain exceptions.

Every failure the system can name carries a machine ``code`` and a ``message`` for a person, and nothing
about HTTP: the web layer chooses the status from the code in one place (``web/errors.py``), and the
workers know without guessing whether to retry: a :class:`TransientError` (timeout, dependency down) is
always retried, a :class:`PermanentError` (unreadable document) never is.
"""
from __future__ import annotations


class DomainError(Exception):
    """A failure with a machine code and a message for a person."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class TransientError(DomainError):
    """Worth retrying: the same call may succeed later (timeouts, 5xx, a store that is briefly away)."""

    code = "transient"


class PermanentError(DomainError):
    """Retrying cannot help: the input itself is wrong (an unreadable PDF, a refused request)."""

    code = "permanent"
