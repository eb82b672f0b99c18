"""A circuit breaker per gateway per process: fail fast while the gateway is down.

Why: during a gateway outage every worker call would otherwise wait out its timeout, and every retry
would pile onto a gateway that is trying to come back. After a few consecutive failures the breaker
opens and calls fail at once (a :class:`~shared.payments.protocol.GatewayUnavailable`, retried later like
any other), until one probe call after a cool-down finds the gateway answering again.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

from shared.logs import log_event
from shared.payments.protocol import GatewayRejected, GatewayUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


class CircuitBreaker:
    """Fail fast while the gateway is down, so workers don't each wait out a timeout per call.

    Closed: calls go through. After ``threshold`` consecutive :class:`GatewayUnavailable` it opens and
    every call raises at once. After ``cooldown_seconds`` one probe call is let through (half-open): a
    gateway that answers closes the breaker, another failure opens it again for a full cool-down.
    Any answer from the gateway, even a rejection, counts as "the gateway is up".
    """

    def __init__(
        self,
        threshold: int = 5,
        cooldown_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown_seconds = cooldown_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            if self._clock() - self._opened_at >= self.cooldown_seconds:
                return "half_open"
            return "open"

    def call(self, fn: Callable[[], T]) -> T:
        probe = self._admit()
        try:
            result = fn()
        except GatewayUnavailable:
            self._record_failure()
            raise
        except GatewayRejected:
            self._record_success()
            raise
        finally:
            if probe:
                with self._lock:
                    self._probing = False
        self._record_success()
        return result

    def _admit(self) -> bool:
        """Let the call through (True if it is the half-open probe) or raise while open."""
        with self._lock:
            if self._opened_at is None:
                return False
            waited = self._clock() - self._opened_at
            if waited >= self.cooldown_seconds and not self._probing:
                self._probing = True
                return True
        raise GatewayUnavailable(
            "Payment gateway circuit is open after repeated failures; not calling it for now.",
            code="gateway_circuit_open",
        )

    def _record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            failures = self._failures
            newly_open = self._opened_at is None and failures >= self.threshold
            if self._opened_at is not None or newly_open:
                self._opened_at = self._clock()
        if newly_open:
            log_event(log, "gateway_circuit_open", logging.WARNING, failures=failures)

    def _record_success(self) -> None:
        with self._lock:
            was_open = self._opened_at is not None
            self._failures = 0
            self._opened_at = None
        if was_open:
            log_event(log, "gateway_circuit_closed")


_breakers: dict[str, CircuitBreaker] = {}
_breakers_lock = threading.Lock()


def breaker_for(base_url: str, threshold: int = 5, cooldown_seconds: float = 30.0) -> CircuitBreaker:
    """One breaker per gateway per process, shared by every adapter instance pointing at it."""
    with _breakers_lock:
        return _breakers.setdefault(
            f"{base_url} {threshold} {cooldown_seconds}", CircuitBreaker(threshold, cooldown_seconds))
