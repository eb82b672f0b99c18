"""The drill's SLO gate: what a surge drill must show to pass, as pure functions over plain records.

The gate is the drill's exit code. It passes only when, over the whole run:

* no request was answered 5xx and none failed to connect or timed out (the front end answers fast or
  says "come back" with 429, never breaks; the failover drill also allows 503 with ``Retry-After`` while
  a dependency is away, and leaves out requests that never reach our system, the stand-in's pay button);
* the 95th percentile latency of creating an order and of polling its status is under the thresholds
  (drill thresholds for a shared machine, not a test);
* buyers did get stamped documents back, and every one of them carried the stamp and its serial;
* after the drain window, the design's invariants hold in the database: every paid order ended stamped
  or refunded (nothing left in paid / stamping / refund_pending), the ledger balances per order
  (stamped ⇒ captured = revenue; refunded ⇒ captured = refunded; never both revenue and refund; no money
  on an order that was never paid), serials match their orders, and every payment the gateway settled
  belongs to an order that was stamped (or is being paid out by hand).

The records come from the Locust run (:func:`load_summary_from_json`) and from SQL
(:mod:`loadtests.invariants`); :func:`evaluate` judges them, which is what ``tests/test_loadtests.py``
checks with synthetic inputs.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

# Request names the locustfile uses; the thresholds refer to these.
CREATE = "create-order"
STATUS = "order-status"
QUEUE = "queue-status"
PAY = "gateway-pay"
DOWNLOAD = "download-document"
STAMP_CHECK = "stamp-check"

STUCK_STATUSES = ("paid", "stamping", "refund_pending")
UNPAID_STATUSES = ("created", "awaiting_payment", "rejected", "expired")
IN_FLIGHT_STATUSES = ("paid", "stamping", "refund_pending", "refund_manual")


@dataclass
class EndpointStats:
    name: str
    requests: int = 0
    failures: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)  # "202": 10, "0": connection errors
    unavailable_with_retry_after: int = 0  # of the 503s, those that said when to come back
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.status_counts.items() if code.isdigit() and int(code) >= 500)

    @property
    def connection_errors(self) -> int:
        return self.status_counts.get("0", 0)

    @property
    def bare_server_errors(self) -> int:
        """5xx other than a 503 with ``Retry-After``."""
        return self.server_errors - self.unavailable_with_retry_after


@dataclass
class LoadSummary:
    """What the Locust run saw (the locustfile writes it as JSON when the run stops)."""

    endpoints: dict[str, EndpointStats] = field(default_factory=dict)
    flows_started: int = 0
    flows_completed: int = 0   # downloaded a stamped document
    flows_refunded: int = 0
    flows_rejected: int = 0
    flow_timeouts: int = 0
    stamp_checks_failed: int = 0
    stamp_check_examples: list[str] = field(default_factory=list)
    duration_seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(e.server_errors for e in self.endpoints.values())

    @property
    def connection_errors(self) -> int:
        return sum(e.connection_errors for e in self.endpoints.values())

    @property
    def bare_server_errors(self) -> int:
        return sum(e.bare_server_errors for e in self.endpoints.values())

    @property
    def unavailable_with_retry_after(self) -> int:
        return sum(e.unavailable_with_retry_after for e in self.endpoints.values())

    @property
    def requests(self) -> int:
        return sum(e.requests for e in self.endpoints.values())


@dataclass(frozen=True)
class OrderLedger:
    """One order's status and the sums of its ledger entries by kind (0 when none)."""

    order_id: str
    status: str
    captured: int = 0
    revenue: int = 0
    refunded: int = 0


@dataclass
class InvariantReport:
    """What the database says after the drain window."""

    orders_by_status: dict[str, int] = field(default_factory=dict)
    ledger: list[OrderLedger] = field(default_factory=list)
    serial_problems: list[str] = field(default_factory=list)
    gateway_problems: list[str] = field(default_factory=list)
    drain_seconds: float = 0.0

    @property
    def stuck(self) -> dict[str, int]:
        return {s: n for s, n in self.orders_by_status.items() if s in STUCK_STATUSES and n}


@dataclass(frozen=True)
class Thresholds:
    p95_create_ms: float = 1500.0
    p95_status_ms: float = 1000.0
    max_flow_timeouts: int = 0
    min_completed_flows: int = 1
    # The failover drill: a dependency lost for a while may be answered 503 with Retry-After ("come
    # back"); a 503 without it, any other 5xx, a connection error still fail the gate.
    allow_unavailable_with_retry_after: bool = False
    # Requests that don't reach our system (the stand-in gateway's pay button): counted, not judged.
    unjudged_endpoints: tuple[str, ...] = ()


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class GateResult:
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def render(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [f"  {'PASS' if c.passed else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in self.checks]
        lines.append(f"SLO gate: {'PASSED' if self.passed else 'FAILED'}"
                     + ("" if self.passed else f" ({len(self.failures)} of {len(self.checks)} checks failed)"))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}


def ledger_problems(rows: Iterable[OrderLedger], limit: int = 20) -> tuple[int, list[str]]:
    """(how many orders break the ledger rules, the first ``limit`` described)."""
    count, examples = 0, []
    for r in rows:
        problem = None
        if r.revenue and r.refunded:
            problem = "has both revenue and a refund"
        elif r.status == "stamped" and not (r.captured > 0 and r.captured == r.revenue and not r.refunded):
            problem = "stamped but captured != revenue"
        elif r.status == "refunded" and not (r.captured > 0 and r.captured == r.refunded and not r.revenue):
            problem = "refunded but captured != refunded"
        elif r.status in UNPAID_STATUSES and (r.captured or r.revenue or r.refunded):
            problem = f"{r.status} yet money moved"
        elif r.status in IN_FLIGHT_STATUSES and not (r.captured > 0 and not r.revenue and not r.refunded):
            problem = f"{r.status} without exactly a capture"
        if problem:
            count += 1
            if len(examples) < limit:
                examples.append(f"order {r.order_id} ({r.status}: captured={r.captured} revenue={r.revenue}"
                                f" refunded={r.refunded}): {problem}")
    return count, examples


def _p95_check(load: LoadSummary, name: str, limit: float) -> Check:
    stats = load.endpoints.get(name)
    if stats is None or stats.requests == 0:
        return Check(f"p95 {name}", False, f"no {name} requests were made")
    return Check(f"p95 {name}", stats.p95_ms <= limit,
                 f"{stats.p95_ms:.0f} ms (limit {limit:.0f} ms) over {stats.requests} requests")


def evaluate(load: LoadSummary, invariants: InvariantReport, thresholds: Thresholds = Thresholds()) -> GateResult:
    """Judge one drill. Every check is listed, passed or not, so a report shows the whole picture."""
    checks: list[Check] = []
    judged = {n: e for n, e in load.endpoints.items() if n not in thresholds.unjudged_endpoints}
    total = sum(e.requests for e in judged.values())
    if thresholds.allow_unavailable_with_retry_after:
        bad = {n: e.bare_server_errors for n, e in sorted(judged.items()) if e.bare_server_errors}
        allowed = sum(e.unavailable_with_retry_after for e in judged.values())
        checks.append(Check("no 5xx but 503 with Retry-After", not bad,
                            f"{sum(bad.values())} of {total} requests"
                            + (f" ({', '.join(f'{n}: {c}' for n, c in bad.items())})" if bad else "")
                            + f"; {allowed} answered 503 with Retry-After"))
    else:
        bad = {n: e.server_errors for n, e in sorted(judged.items()) if e.server_errors}
        checks.append(Check("no 5xx", not bad, f"{sum(bad.values())} of {total} requests"
                            + (f" ({', '.join(f'{n}: {c}' for n, c in bad.items())})" if bad else "")))
    per_endpoint = ", ".join(f"{n}: {e.connection_errors}" for n, e in sorted(judged.items()) if e.connection_errors)
    connection_errors = sum(e.connection_errors for e in judged.values())
    checks.append(Check("no connection errors or timeouts", connection_errors == 0,
                        f"{connection_errors}" + (f" ({per_endpoint})" if per_endpoint else "")))
    checks.append(_p95_check(load, CREATE, thresholds.p95_create_ms))
    checks.append(_p95_check(load, STATUS, thresholds.p95_status_ms))
    checks.append(Check("stamped documents delivered", load.flows_completed >= thresholds.min_completed_flows,
                        f"{load.flows_completed} downloaded of {load.flows_started} purchases started"
                        f" (at least {thresholds.min_completed_flows})"))
    checks.append(Check("every download carries the stamp and serial", load.stamp_checks_failed == 0,
                        f"{load.stamp_checks_failed} failed"
                        + (f"; e.g. {load.stamp_check_examples[0]}" if load.stamp_check_examples else "")))
    checks.append(Check("buyers not left hanging", load.flow_timeouts <= thresholds.max_flow_timeouts,
                        f"{load.flow_timeouts} purchases timed out waiting (at most {thresholds.max_flow_timeouts})"))
    stuck = invariants.stuck
    checks.append(Check("paid ⇒ stamped or refunded after the drain", not stuck,
                        ("nothing in " + "/".join(STUCK_STATUSES) if not stuck else
                         "still " + ", ".join(f"{n} {s}" for s, n in sorted(stuck.items())))
                        + f" after {invariants.drain_seconds:.0f} s of drain"))
    bad, examples = ledger_problems(invariants.ledger)
    totals = {k: sum(getattr(r, k) for r in invariants.ledger) for k in ("captured", "revenue", "refunded")}
    in_flight = sum(r.captured for r in invariants.ledger if r.status in IN_FLIGHT_STATUSES)
    balanced = totals["captured"] == totals["revenue"] + totals["refunded"] + in_flight
    checks.append(Check("ledger balances per order and in total", bad == 0 and balanced,
                        f"{len(invariants.ledger)} orders, {bad} unbalanced; captured Rp{totals['captured']:,}"
                        f" = revenue Rp{totals['revenue']:,} + refunded Rp{totals['refunded']:,}"
                        f" + in flight Rp{in_flight:,}: {'yes' if balanced else 'NO'}"
                        + (f"; e.g. {examples[0]}" if examples else "")))
    checks.append(Check("serials match their orders", not invariants.serial_problems,
                        f"{len(invariants.serial_problems)} problems"
                        + (f"; e.g. {invariants.serial_problems[0]}" if invariants.serial_problems else "")))
    checks.append(Check("every gateway settlement has its outcome", not invariants.gateway_problems,
                        f"{len(invariants.gateway_problems)} problems"
                        + (f"; e.g. {invariants.gateway_problems[0]}" if invariants.gateway_problems else "")))
    return GateResult(checks)


def load_summary_from_dict(data: dict[str, Any]) -> LoadSummary:
    endpoints = {name: EndpointStats(name=name, **{k: v for k, v in e.items() if k != "name"})
                 for name, e in data.get("endpoints", {}).items()}
    scalars = {k: v for k, v in data.items() if k != "endpoints" and k in LoadSummary.__dataclass_fields__}
    return LoadSummary(endpoints=endpoints, **scalars)


def load_summary_from_json(path: Path | str) -> LoadSummary:
    return load_summary_from_dict(json.loads(Path(path).read_text()))


def load_summary_as_dict(load: LoadSummary) -> dict[str, Any]:
    return asdict(load)
