"""A circuit breaker per dependency per process: fail fast while the dependency is down.

Why (DESIGN "Surge behaviour"): during an outage every call would otherwise wait out its timeout, and
every retry would pile onto a dependency that is trying to come back. After ``threshold`` consecutive
failures the breaker opens and calls fail at once (the dependency's own "come back" error, retried later
like any other), until one probe call after a cool-down finds it answering again. The payment gateway
(:mod:`shared.payments.breaker`) and the document store (:mod:`shared.store`) each have one.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

from shared.logs import log_event

log = logging.getLogger(__name__)

T = TypeVar("T")

# Longer than any call through a breaker can last (their timeouts) and than a task's hard time limit.
PROBE_ABANDONED_SECONDS = 300.0


class Breaker:
    """Closed: calls go through. After ``threshold`` consecutive ``failures`` it opens and every call
    raises ``opened()`` at once. After ``cooldown_seconds`` one probe call is let through (half-open): a
    dependency that answers closes the breaker, another failure opens it again for a full cool-down. An
    exception in ``answered`` (a refusal, a missing document) means the dependency is up."""

    def __init__(self, name: str, *, failures: tuple[type[BaseException], ...],
                 answered: tuple[type[BaseException], ...], opened: Callable[[], Exception],
                 threshold: int = 5, cooldown_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.failures = failures
        self.answered = answered
        self.opened = opened
        self.threshold = threshold
        self.cooldown_seconds = cooldown_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing: int | None = None  # the thread making the half-open probe
        self._probe_since = 0.0

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            if self._clock() - self._opened_at >= self.cooldown_seconds:
                return "half_open"
            return "open"

    def call(self, fn: Callable[[], T]) -> T:
        # The probe is ended by whoever holds it, whatever interrupts it (on Celery's threads pool a soft
        # time limit is raised wherever the thread happens to be: inside _admit too, workers/watchdog.py),
        # so an interrupted probe can't leave the breaker open for the whole process. A success is
        # recorded before the probe ends, so no second probe slips in as the breaker closes.
        try:
            self._admit()
            try:
                result = fn()
            except self.failures:
                self._record_failure()
                raise
            except self.answered:
                self._record_success()
                raise
            else:
                self._record_success()
        finally:
            if self._probing == threading.get_ident():
                with self._lock:
                    if self._probing == threading.get_ident():
                        self._probing = None
        return result

    def _admit(self) -> bool:
        """Let the call through (True if it is the half-open probe) or raise while open."""
        with self._lock:
            if self._opened_at is None:
                return False
            waited = self._clock() - self._opened_at
            # A probe out for PROBE_ABANDONED_SECONDS was abandoned (its thread interrupted where even the
            # finally above couldn't end it: no call of ours takes that long, a task's hard time limit is
            # shorter): the next caller probes instead.
            abandoned = (self._probing is not None
                         and self._clock() - self._probe_since >= max(self.cooldown_seconds, PROBE_ABANDONED_SECONDS))
            if waited >= self.cooldown_seconds and (self._probing is None or abandoned):
                self._probing, self._probe_since = threading.get_ident(), self._clock()
                return True
        raise self.opened()

    def _record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            failures = self._failures
            newly_open = self._opened_at is None and failures >= self.threshold
            if self._opened_at is not None or newly_open:
                self._opened_at = self._clock()
        if newly_open:
            log_event(log, f"{self.name}_circuit_open", logging.WARNING, failures=failures)

    def _record_success(self) -> None:
        with self._lock:
            was_open = self._opened_at is not None
            self._failures = 0
            self._opened_at = None
        if was_open:
            log_event(log, f"{self.name}_circuit_closed")
