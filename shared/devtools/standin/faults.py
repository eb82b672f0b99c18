"""The stand-in's fault knobs: what a drill can make the gateway do wrong, checked, and drawn per request.

Knobs are per process and start cleared, so a restarted stand-in is a healthy gateway. Faults are drawn
from one seeded random source, so a drill that sets ``seed`` gets the same failures every run.
"""
from __future__ import annotations

import copy
import random
import threading
from typing import Any, Callable

# Protocol endpoints, by the names the ``endpoints`` fault knob uses.
ENDPOINTS = ("create", "status", "refund", "expire", "cancel")

DEFAULT_FAULTS: dict[str, Any] = {
    "latency_ms": 0,
    "error_rate": 0.0,
    "timeout_rate": 0.0,
    "timeout_sleep_seconds": 10.0,
    "endpoints": list(ENDPOINTS),
    "max_faults": None,
    "drop_notifications": False,
    "duplicate_notifications": 0,
    "notification_jitter_ms": 0,
    "refuse_refunds_for": [],
    "seed": None,
    # Not a fault: how long a card capture stays "capture" before it settles (Midtrans: the next day).
    "card_settlement_seconds": 86400,
}


def _number(low: float, high: float | None = None) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be a number")
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be between {low} and {high}" if high is not None else f"must be >= {low}")
        return value
    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
        raise ValueError("must be an integer from 0 to 20")
    return value


def _payment_types(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of payment types")
    return value


def _endpoints(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(v in ENDPOINTS for v in value):
        raise ValueError(f"must be a list of endpoint names from {', '.join(ENDPOINTS)}")
    return value


def _optional_budget(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError("must be a non-negative integer or null")
    return value


def _seed(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError("must be an integer or null")
    return value


FAULT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "latency_ms": _number(0),
    "error_rate": _number(0, 1),
    "timeout_rate": _number(0, 1),
    "timeout_sleep_seconds": _number(0),
    "endpoints": _endpoints,
    "max_faults": _optional_budget,
    "drop_notifications": _boolean,
    "duplicate_notifications": _count,
    "notification_jitter_ms": _number(0),
    "refuse_refunds_for": _payment_types,
    "seed": _seed,
    "card_settlement_seconds": _number(0),
}


def validate_faults(knobs: Any) -> dict[str, Any]:
    """Checked copy of ``knobs``; ValueError names the first bad knob."""
    if not isinstance(knobs, dict):
        raise ValueError("faults must be a JSON object")
    checked: dict[str, Any] = {}
    for name, value in knobs.items():
        if name not in FAULT_CHECKS:
            raise ValueError(f"unknown fault knob: {name}")
        try:
            checked[name] = FAULT_CHECKS[name](value)
        except ValueError as exc:
            raise ValueError(f"{name} {exc}") from None
    return checked


class Faults:
    """The knobs of one stand-in process and the random source behind every fault (one lock for both)."""

    def __init__(self, seed: int | None = None) -> None:
        self.lock = threading.Lock()
        self.knobs: dict[str, Any] = copy.deepcopy(DEFAULT_FAULTS)
        self.injected = {"error": 0, "timeout": 0}
        self.random = random.Random(seed)
        self.knobs["seed"] = seed

    def _view(self) -> dict[str, Any]:
        return copy.deepcopy(self.knobs) | {"injected": dict(self.injected)}

    def view(self) -> dict[str, Any]:
        with self.lock:
            return self._view()

    def set(self, knobs: Any) -> dict[str, Any]:
        """Merge checked ``knobs`` into the current ones (ValueError names a bad one); the new view."""
        checked = validate_faults(knobs)
        with self.lock:
            self.knobs.update(checked)
            if "seed" in checked:
                self.random.seed(checked["seed"])
            if "max_faults" in checked:
                self.injected = {"error": 0, "timeout": 0}
            return self._view()

    def reset(self) -> dict[str, Any]:
        with self.lock:
            self.knobs = copy.deepcopy(DEFAULT_FAULTS)
            self.injected = {"error": 0, "timeout": 0}
            return self._view()

    def get(self, name: str) -> Any:
        with self.lock:
            return copy.deepcopy(self.knobs[name])

    def draw(self, endpoint: str) -> tuple[float, str | None]:
        """Decide one protocol request's fate: seconds to sleep first, then "error", "timeout" or None.

        Only endpoints named in the ``endpoints`` knob are affected, and at most ``max_faults`` errors
        and timeouts are injected in all (then the gateway is healthy again), so a drill can say "the
        next three status queries fail" and nothing else.
        """
        with self.lock:
            if endpoint not in self.knobs["endpoints"]:
                return 0.0, None
            latency = self.knobs["latency_ms"] / 1000.0
            budget = self.knobs["max_faults"]
            error = self.random.random() < self.knobs["error_rate"]
            timeout = self.random.random() < self.knobs["timeout_rate"]
            if budget is not None and sum(self.injected.values()) >= budget:
                return latency, None
            if error:
                self.injected["error"] += 1
                return latency, "error"
            if timeout:
                self.injected["timeout"] += 1
                return latency + self.knobs["timeout_sleep_seconds"], "timeout"
            return latency, None

    def notification_jitter(self) -> float:
        """Seconds to hold one notification copy back (``notification_jitter_ms``, drawn)."""
        with self.lock:
            return self.random.uniform(0, self.knobs["notification_jitter_ms"]) / 1000.0

    def va_number(self) -> str:
        """A virtual-account number, from the same seeded source."""
        with self.lock:
            return f"{self.random.randrange(10**10, 10**11)}"
