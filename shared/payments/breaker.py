"""A circuit breaker per gateway per process: fail fast while the gateway is down.

Why: during a gateway outage every worker call would otherwise wait out its timeout, and every retry
would pile onto a gateway that is trying to come back. After a few consecutive failures the breaker
opens and calls fail at once (a :class:`~shared.payments.protocol.GatewayUnavailable`, retried later like
any other), until one probe call after a cool-down finds the gateway answering again.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from shared.breaker import Breaker
from shared.payments.protocol import GatewayRejected, GatewayUnavailable


def _open_error() -> GatewayUnavailable:
    return GatewayUnavailable("Payment gateway circuit is open after repeated failures; not calling it for now.",
                              code="gateway_circuit_open")


class CircuitBreaker(Breaker):
    """The gateway's breaker (:class:`shared.breaker.Breaker`): a :class:`GatewayUnavailable` is a
    failure; any answer from the gateway, even a rejection, counts as "the gateway is up"."""

    def __init__(self, threshold: int = 5, cooldown_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__("gateway", failures=(GatewayUnavailable,), answered=(GatewayRejected,),
                         opened=_open_error, threshold=threshold, cooldown_seconds=cooldown_seconds, clock=clock)


_breakers: dict[str, CircuitBreaker] = {}
_breakers_lock = threading.Lock()


def breaker_for(base_url: str, threshold: int = 5, cooldown_seconds: float = 30.0) -> CircuitBreaker:
    """One breaker per gateway per process, shared by every adapter instance pointing at it."""
    with _breakers_lock:
        return _breakers.setdefault(
            f"{base_url} {threshold} {cooldown_seconds}", CircuitBreaker(threshold, cooldown_seconds))


def states() -> list[str]:
    """The state of every gateway breaker this process made (none before its first gateway call), for
    the worker's metrics and its report to the ops page."""
    with _breakers_lock:
        return [b.state for b in _breakers.values()]
