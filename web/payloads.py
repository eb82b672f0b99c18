"""Reading a JSON request body we did not ask for: bounded in size and nesting, never a 500.

``request.get_json(silent=True)`` swallows malformed JSON but not a ``RecursionError`` from a deeply
nested one, which escaped as a 500 with a stack trace; and it reads whatever size the app allows.
"""
from __future__ import annotations

import json
from typing import Any

from flask import request

from shared.errors import DomainError
from web.limits import drain_request_body


class BadJson(DomainError):
    code = "bad_request"


class BodyTooLarge(DomainError):
    code = "too_large"


def json_body(max_bytes: int) -> Any:
    """The request's JSON, at most ``max_bytes`` long (413 beyond), or :class:`BadJson` (400).

    An oversized body is read to its end (up to the app's own limit) and dropped before the 413: a server
    that answers a client still sending resets the connection under it, and it never sees the answer.
    """
    if request.content_length is not None and request.content_length > max_bytes:
        drain_request_body()
        raise BodyTooLarge(f"The body is larger than {max_bytes} bytes.")
    data = request.stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        drain_request_body()
        raise BodyTooLarge(f"The body is larger than {max_bytes} bytes.")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise BadJson("Expected a JSON body.") from None
