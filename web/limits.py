"""Per-client rate limiting for the write endpoints, as a decorator, with RateLimit-* headers."""
from __future__ import annotations

import re
from functools import wraps
from typing import Callable

from flask import current_app, g, request

from shared.errors import DomainError
from shared.ratelimit import Limit, RateLimiter
from web.context import settings


class RateLimited(DomainError):
    code = "rate_limited"

    def __init__(self, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.headers = headers


def client_id() -> str:
    """The socket's address, or the proxies' X-Forwarded-For when PROXY_HOPS says to trust them."""
    return request.remote_addr or "unknown"


_CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")


def browser_id() -> str:
    """The ``Client-Id`` a browser sends to keep one place in line per tab ("-" when absent or odd)."""
    value = request.headers.get("Client-Id", "")
    return value if _CLIENT_ID.fullmatch(value) else "-"


def drain_request_body() -> None:
    """Read and discard an unread upload before answering early (429, 503).

    A server that answers without reading the body closes the connection under the client, which is
    then still sending: the buyer sees a reset instead of the 429 and its queue ticket. Reading costs
    the upload's network time, bounded by the app's content-length limit.
    """
    stream = request.stream
    limit = current_app.config.get("MAX_CONTENT_LENGTH") or (4 << 20)
    read = 0
    while read <= limit:
        chunk = stream.read(64 * 1024)
        if not chunk:
            break
        read += len(chunk)


def enforce(scope: str, setting: str) -> None:
    """Count this request against the client's limit named by ``setting``; refuse it beyond."""
    enforce_limit(scope, getattr(settings(), setting))


def enforce_limit(scope: str, limit: str) -> None:
    """Count this request against the client's ``limit`` ("<count>/<seconds>") in ``scope``."""
    limiter: RateLimiter = current_app.extensions["meterai.ratelimiter"]
    decision = limiter.hit(scope, client_id(), Limit.parse(limit))
    if decision is not None:
        g.rate_limit_headers = decision.headers()
        if not decision.allowed:
            drain_request_body()
            raise RateLimited("Too many requests from this client; slow down and retry later.",
                              decision.headers())


def rate_limited(scope: str, setting: str) -> Callable:
    """Refuse a client's request beyond the limit named by ``setting`` (e.g. ``rate_limit_create``)."""

    def decorate(view: Callable) -> Callable:
        @wraps(view)
        def limited(*args, **kwargs):
            enforce(scope, setting)
            return view(*args, **kwargs)

        return limited

    return decorate


def add_rate_limit_headers(response):
    for name, value in getattr(g, "rate_limit_headers", {}).items():
        response.headers.setdefault(name, value)
    return response
