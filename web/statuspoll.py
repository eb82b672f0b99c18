"""``GET /api/v1/orders/<order_id>``, answered before Flask when the status cache has the answer.

A buyer's order page polls its order every few seconds (every 30 s while hidden, as it is while the buyer
pays in another tab), and most polls find the answer in the status cache (``shared/statuscache.py``: one
Redis GET): the order changes a handful of times in its life. Through Flask such a poll cost about twice
the cache lookup and the token check (``loadtests.bench.web``: "Flask's glue 0.39 ms, the Redis GET 0.20";
``loadtests.bench.buyer_requests``), so here a poll that hits is the lookup, the token check and one write.

The answer is the one ``web/api.py``'s ``get_order_status`` gives from the cache (the cached body,
``Cache-Control: no-store``), with the security headers, a request id, the access line's route and the
request metrics Flask's hooks add. Everything else goes to Flask, which answers as it always did: a miss,
a token the entry doesn't know (the row decides: a replayed create may just have added one), no bearer
token, an id that isn't a canonical UUID. What the cache said is left in the environ
(:data:`LOOKED_UP`), so the route never asks Redis twice for one poll.
"""
from __future__ import annotations

import re
import time
from typing import Any, Callable, Iterable

from shared import metrics, statuscache
from shared.logs import ROUTE_ENVIRON, new_request_id, sane_request_id
from shared.orders import token_hash_matches

ROUTE = "/api/v1/orders/<order_id>"
PREFIX = "/api/v1/orders/"
# Where the fast path leaves the cache's answer (a hit it could not use, or None: a miss) for the route.
LOOKED_UP = "meterai.status_cache_lookup"
# Canonical lower-case UUIDs only: the form our links use, and the only keys the status cache holds.
CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def bearer(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, as ``web/api.py`` reads it; None if absent."""
    if not header.startswith("Bearer ") or not header[7:].strip():
        return None
    return header[7:].strip()


class StatusPolls:
    """WSGI middleware answering order-status polls the status cache can answer, before ``app``."""

    def __init__(self, app: Callable, headers: dict[str, str]) -> None:
        self.app = app
        self.headers = list(headers.items())

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "GET" or not path.startswith(PREFIX):
            return self.app(environ, start_response)
        order_id = path[len(PREFIX):]
        token = bearer(environ.get("HTTP_AUTHORIZATION", ""))
        if token is None or not CANONICAL_UUID.fullmatch(order_id):
            return self.app(environ, start_response)  # the route's 401 or 404 (or another route)
        started = time.perf_counter()
        try:
            cached = statuscache.get(order_id)
            usable = cached is not None and token_hash_matches(cached[0], token)
        except Exception:  # noqa: BLE001 - the route asks again and answers (or fails) as it always did
            return self.app(environ, start_response)
        if not usable:
            environ[LOOKED_UP] = cached
            return self.app(environ, start_response)
        assert cached is not None
        body = cached[1]
        environ[ROUTE_ENVIRON] = ROUTE
        request_id = sane_request_id(environ.get("HTTP_X_REQUEST_ID")) or new_request_id()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-store"), ("X-Request-Id", request_id), *self.headers])
        metrics.record_http(ROUTE, "GET", 200, time.perf_counter() - started)
        return [body]
