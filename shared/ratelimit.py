"""Per-client rate limits on write endpoints, kept in Redis so every web process shares the count.

A fixed window per (endpoint, client): one INCR and one EXPIRE in a pipeline, cheap enough for every
request. Rate limits *fail open*: if Redis blips, requests are served unlimited (and logged) rather
than refused. The waiting room, which fails closed, is what protects the system from a surge; rate
limits only keep one client from hogging it, and a Redis hiccup must not become an outage of sales.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from shared.logs import log_event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limit:
    count: int
    seconds: int

    @classmethod
    def parse(cls, text: str) -> "Limit":
        count, _, seconds = text.partition("/")
        return cls(int(count), int(seconds or 60))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        """The IETF draft's RateLimit-* fields (and Retry-After when refused)."""
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.reset_seconds)
        return headers


class RateLimiter:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = f"{prefix}rl:"

    def hit(self, scope: str, client_id: str, limit: Limit) -> Decision | None:
        """Count one request; ``None`` when Redis can't be asked (fail open)."""
        now = time.time()
        window = int(now // limit.seconds)
        reset = max(1, int((window + 1) * limit.seconds - now))
        key = f"{self.prefix}{scope}:{client_id}:{window}"
        try:
            pipe = self.redis.pipeline()
            pipe.incr(key)
            pipe.expire(key, limit.seconds + 1)
            count = int(pipe.execute()[0])
        except redis.RedisError as exc:
            log_event(log, "rate_limit_unavailable", logging.WARNING, scope=scope, error=type(exc).__name__)
            return None
        return Decision(allowed=count <= limit.count, limit=limit.count,
                        remaining=max(0, limit.count - count), reset_seconds=reset)
