"""Load shapes for the surge drills: the CPNS deadline spike and a steady day.

Each shape is a plan: (users, spawn rate) as a pure function of the seconds since the start, ``None``
once it is over. The locustfile's ``LoadTestShape`` classes only read the clock and call these. Nothing
here imports Locust (importing it monkey-patches the process for gevent), so the drill's orchestrator
can use the plans too. Parameters are plain dataclasses, passed to the Locust process as JSON in the
environment (``DRILL_SHAPE``, ``DRILL_SHAPE_PARAMS``).

"Users" are concurrent virtual buyers. Each buys a stamp, thinks a while and buys again, so offered
demand grows with users; the drill's profiles size the peak at many times what the waiting room's
outflow admits, which is the point: the excess must wait in the queue, not break anything.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping

Tick = tuple[int, float] | None


@dataclass(frozen=True)
class SpikeParams:
    """quiet → ramp (linear, to many times capacity) → hold → drain (linear, to zero) → stop."""

    quiet_users: int = 5
    quiet_seconds: float = 60
    peak_users: int = 300
    ramp_seconds: float = 60
    hold_seconds: float = 300
    drain_seconds: float = 60

    @property
    def total_seconds(self) -> float:
        return self.quiet_seconds + self.ramp_seconds + self.hold_seconds + self.drain_seconds


@dataclass(frozen=True)
class SteadyParams:
    """ramp to a constant number of buyers, hold, drain, stop."""

    users: int = 40
    ramp_seconds: float = 30
    hold_seconds: float = 600
    drain_seconds: float = 15

    @property
    def total_seconds(self) -> float:
        return self.ramp_seconds + self.hold_seconds + self.drain_seconds


def _rate(delta: float, seconds: float) -> float:
    """A spawn/stop rate that lets Locust follow a linear segment tick by tick (at least 1 user/s)."""
    return max(1.0, abs(delta) / max(seconds, 1e-9))


def _linear(start: float, end: float, elapsed: float, seconds: float) -> int:
    fraction = min(1.0, max(0.0, elapsed / seconds)) if seconds > 0 else 1.0
    return int(round(start + (end - start) * fraction))


def spike_plan(p: SpikeParams, t: float) -> Tick:
    """(users, spawn rate) at ``t`` seconds for the deadline spike, or ``None`` once it is over."""
    if t < 0:
        t = 0.0
    if t < p.quiet_seconds:
        return p.quiet_users, _rate(p.quiet_users, 1.0)
    t -= p.quiet_seconds
    if t < p.ramp_seconds:
        return (_linear(p.quiet_users, p.peak_users, t + 1, p.ramp_seconds),
                _rate(p.peak_users - p.quiet_users, p.ramp_seconds))
    t -= p.ramp_seconds
    if t < p.hold_seconds:
        return p.peak_users, _rate(p.peak_users - p.quiet_users, p.ramp_seconds)
    t -= p.hold_seconds
    if t < p.drain_seconds:
        return (_linear(p.peak_users, 0, t + 1, p.drain_seconds), _rate(p.peak_users, p.drain_seconds))
    return None


def steady_plan(p: SteadyParams, t: float) -> Tick:
    """(users, spawn rate) at ``t`` seconds for a steady day, or ``None`` once it is over."""
    if t < 0:
        t = 0.0
    if t < p.ramp_seconds:
        return _linear(0, p.users, t + 1, p.ramp_seconds), _rate(p.users, p.ramp_seconds)
    t -= p.ramp_seconds
    if t < p.hold_seconds:
        return p.users, _rate(p.users, p.ramp_seconds)
    t -= p.hold_seconds
    if t < p.drain_seconds:
        return _linear(p.users, 0, t + 1, p.drain_seconds), _rate(p.users, p.drain_seconds)
    return None


PLANS: dict[str, tuple[Callable[[Any, float], Tick], type]] = {
    "spike": (spike_plan, SpikeParams),
    "steady": (steady_plan, SteadyParams),
}


def params_from(kind: str, values: dict[str, Any] | None) -> Any:
    """The ``kind`` shape's parameters with ``values`` (unknown names are an error, not a silent no-op)."""
    _, params_type = PLANS[kind]
    values = dict(values or {})
    known = {f.name for f in fields(params_type)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {kind} shape parameters: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return params_type(**values)


def plan(kind: str, params: Any, t: float) -> Tick:
    return PLANS[kind][0](params, t)


def selected(environ: Mapping[str, str] | None = None) -> tuple[str, Any]:
    """The shape the drill asked for: ``DRILL_SHAPE`` (spike|steady) with ``DRILL_SHAPE_PARAMS`` (JSON)."""
    env = os.environ if environ is None else environ
    kind = env.get("DRILL_SHAPE", "spike").strip().lower() or "spike"
    if kind not in PLANS:
        raise ValueError(f"DRILL_SHAPE must be one of {', '.join(PLANS)}, not {kind!r}")
    return kind, params_from(kind, json.loads(env.get("DRILL_SHAPE_PARAMS") or "{}"))


def describe(kind: str, params: Any) -> str:
    return f"{kind} {json.dumps(asdict(params), separators=(',', ':'))} ({math.ceil(params.total_seconds)} s)"
