"""Where a request's CPU goes: exclusive CPU and wall time per named step, measured in-process.

:class:`Spans` wraps chosen functions (``module.attr`` or ``Class.method``) so each call records its CPU
(``time.thread_time``) and wall time, minus what wrapped functions called inside it took: exclusive
figures that add up to the whole. The benchmarks run a few hundred requests through the real Flask app
(``app.test_client()``, same settings, same PostgreSQL and Redis as the served one) with these wrappers
on, after the timed wrk runs, so the wrappers never touch the throughput figures.
"""
from __future__ import annotations

import functools
import importlib
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Span:
    calls: int = 0
    cpu: float = 0.0
    wall: float = 0.0


class Spans:
    def __init__(self) -> None:
        self.spans: dict[str, Span] = defaultdict(Span)
        self._stack: list[list[float]] = []  # per open call: [child cpu, child wall]
        self._undo: list[Callable[[], None]] = []

    def wrap(self, target: str, label: str) -> None:
        """Wrap ``target`` ("package.module:attr" or "package.module:Class.attr") under ``label``."""
        module_name, _, path = target.partition(":")
        owner: Any = importlib.import_module(module_name)
        *parents, attr = path.split(".")
        for name in parents:
            owner = getattr(owner, name)
        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        func = original.__func__ if isinstance(original, (staticmethod, classmethod)) else original

        @functools.wraps(func)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append([0.0, 0.0])
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
                child_cpu, child_wall = self._stack.pop()
                span = self.spans[label]
                span.calls += 1
                span.cpu += cpu - child_cpu
                span.wall += wall - child_wall
                if self._stack:
                    self._stack[-1][0] += cpu
                    self._stack[-1][1] += wall

        replacement = type(original)(timed) if isinstance(original, (staticmethod, classmethod)) else timed
        setattr(owner, attr, replacement)
        self._undo.append(lambda: setattr(owner, attr, original))

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    def table(self, requests: int, title: str) -> str:
        total_cpu = sum(s.cpu for s in self.spans.values())
        lines = [f"{title}: CPU and wall ms per request, exclusive (over {requests} requests, in-process)",
                 f"  {'step':<44} {'calls/req':>9} {'CPU ms':>8} {'share':>6} {'wall ms':>8}"]
        for label, s in sorted(self.spans.items(), key=lambda kv: -kv[1].cpu):
            lines.append(f"  {label:<44} {s.calls / requests:>9.1f} {1000 * s.cpu / requests:>8.2f}"
                         f" {100 * s.cpu / max(total_cpu, 1e-9):>5.0f}% {1000 * s.wall / requests:>8.2f}")
        lines.append(f"  {'total':<44} {'':>9} {1000 * total_cpu / requests:>8.2f}")
        return "\n".join(lines)

    def as_dict(self, requests: int) -> dict[str, dict[str, float]]:
        return {label: {"calls_per_request": s.calls / requests, "cpu_ms": 1000 * s.cpu / requests,
                        "wall_ms": 1000 * s.wall / requests} for label, s in self.spans.items()}
