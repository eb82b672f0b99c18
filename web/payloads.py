"""Reading a JSON request body we did not ask for: bounded in size and nesting, never a 500.

``request.get_json(silent=True)`` swallows malformed JSON but not a ``RecursionError`` from a deeply
nested one, which escaped as a 500 with a stack trace; and it reads whatever size the app allows.
"""
from __future__ import annotations

import json
from typing import Any

from flask import request

from shared.errors import DomainError


class BadJson(DomainError):
    code = "bad_request"


class BodyTooLarge(DomainError):
    """Answered before the body was read whole: the connection closes after the answer, because the
    unread rest of the body would otherwise be taken for the client's next request."""

    code = "too_large"
    headers = {"Connection": "close"}


def json_body(max_bytes: int) -> Any:
    """The request's JSON, at most ``max_bytes`` long (413 beyond), or :class:`BadJson` (400)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise BodyTooLarge(f"The body is larger than {max_bytes} bytes.")
    data = request.stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BodyTooLarge(f"The body is larger than {max_bytes} bytes.")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise BadJson("Expected a JSON body.") from None
