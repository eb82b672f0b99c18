"""The ledger report: money captured, earned by stamping, given back, still held — and proof it balances.

Invariant 6 of DESIGN.md: per order and in total, ``captured = stamped revenue + refunded + in flight``,
and invariant 1 per gateway transaction: every capture has exactly one outcome. :func:`order_problems`
is that rule for one order, as a pure function of its status and its transactions' ledger entries
(testable without a database). An order's own capture (at most one) may have only these shapes:

* never paid (created, awaiting_payment, expired, rejected): no capture of the order's own;
* in flight (paid, stamping, refund_pending, refund_manual): captured, and nothing else yet;
* stamped: captured, and revenue of exactly that amount, no refund;
* refunded: captured, and a refund of exactly that amount, no revenue, its refund record completed.

Any further capture of the same order (an *extra* capture: the buyer paid twice) must have its own
refund: pending or waiting for a manual payout (in flight), or done (refunded, exactly the amount), and
never revenue. Everywhere: never revenue and refund on one transaction, every capture's ledger entry
equal to what the gateway confirmed, no ledger entry on a transaction that was never captured, and no
transaction the gateway last reported as captured or settled without a capture booked here.

:func:`ledger_report` applies it to every order created in a period (``[start, end)``; each order is
judged on all its entries, whenever booked) and adds the totals. ``meterai ledger-report`` prints it and
exits non-zero on any imbalance; the tests use it as their oracle. It reads our tables only: what the
gateway holds is checked by ``meterai gateway-reconcile`` (:mod:`shared.services.gateway_reconcile`).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from shared.config import Settings
from shared.db import get_pool
from shared.lifecycle import CaptureRole, Status

# Finance reads periods in Jakarta time (WIB, UTC+7, no daylight saving).
WIB = timezone(timedelta(hours=7), "WIB")

NEVER_PAID = frozenset({Status.CREATED, Status.AWAITING_PAYMENT, Status.EXPIRED, Status.REJECTED})
IN_FLIGHT = frozenset({Status.PAID, Status.STAMPING, Status.REFUND_PENDING, Status.REFUND_MANUAL})
# What the gateway says when it holds the buyer's money.
GATEWAY_CAPTURED = frozenset({"settlement", "capture"})


@dataclass(frozen=True)
class TransactionMoney:
    """One gateway transaction of an order: what we recorded about it and its ledger entries."""

    gateway_order_id: str | None  # None: ledger entries that name no transaction (booked before 0004)
    role: str | None = None  # CaptureRole, or None when we never recorded a capture
    payment_captured: int | None = None  # the amount the gateway confirmed as captured
    gateway_status: str | None = None
    captured: int | None = None
    revenue: int | None = None
    refunded: int | None = None
    refund_status: str | None = None

    @property
    def extra(self) -> bool:
        return self.role == CaptureRole.EXTRA


@dataclass(frozen=True)
class OrderMoney:
    """One order's status and money, per gateway transaction."""

    order_id: str
    status: str
    amount_idr: int
    transactions: tuple[TransactionMoney, ...] = ()

    @property
    def own(self) -> list[TransactionMoney]:
        return [t for t in self.transactions if t.role == CaptureRole.ORDER]

    @property
    def extras(self) -> list[TransactionMoney]:
        return [t for t in self.transactions if t.extra]

    def total(self, kind: str) -> int:
        return sum(getattr(t, kind) or 0 for t in self.transactions)

    def in_flight(self) -> int:
        """Captured money that has no outcome yet (still to be stamped or refunded)."""
        held = 0
        for t in self.transactions:
            if t.role == CaptureRole.ORDER and Status(self.status) in IN_FLIGHT:
                held += t.captured or 0
            elif t.extra and t.refunded is None and t.revenue is None:
                held += t.captured or 0
        return held


def _transaction_problems(t: TransactionMoney) -> list[str]:
    name = t.gateway_order_id or "(no transaction)"
    problems: list[str] = []
    if t.gateway_order_id is None:
        problems.append("ledger entries that name no gateway transaction")
    if t.revenue is not None and t.refunded is not None:
        problems.append(f"{name}: both revenue and a refund are booked")
    if t.role is None:
        if (t.captured, t.revenue, t.refunded) != (None, None, None) and t.gateway_order_id is not None:
            problems.append(f"{name}: ledger entries on a transaction never captured")
        if t.gateway_status in GATEWAY_CAPTURED:
            problems.append(f"{name}: the gateway reported it {t.gateway_status}, nothing booked here")
        return problems
    if t.captured is None:
        problems.append(f"{name}: captured payment of {t.payment_captured} not booked")
    elif t.payment_captured != t.captured:
        problems.append(f"{name}: captured {t.captured} but the confirmed payment is {t.payment_captured}")
    if t.extra:
        if t.revenue is not None:
            problems.append(f"{name}: an extra capture has revenue booked")
        if t.refund_status is None:
            problems.append(f"{name}: an extra capture of {t.captured} has no refund")
        elif t.refund_status == "succeeded" and t.refunded != t.captured:
            problems.append(f"{name}: extra capture refunded {t.refunded}, captured {t.captured}")
        elif t.refund_status != "succeeded" and t.refunded is not None:
            problems.append(f"{name}: refund booked but its record is {t.refund_status}")
    return problems


def order_problems(money: OrderMoney) -> list[str]:
    """Why this order's money doesn't balance; empty when it does."""
    status = Status(money.status)
    problems: list[str] = []
    for t in money.transactions:
        problems.extend(_transaction_problems(t))
    own = money.own
    if len(own) > 1:
        problems.append(f"{len(own)} captures are each booked as the order's own")
    if status in NEVER_PAID:
        if own:
            problems.append(f"{status} order has a capture of its own ({own[0].payment_captured}) booked")
        return problems
    if not own:
        problems.append(f"{status} order has no capture booked")
        return problems
    t = own[0]
    if status is Status.STAMPED:
        if t.revenue != t.captured:
            problems.append(f"stamped: revenue {t.revenue} differs from captured {t.captured}")
        if t.refunded is not None:
            problems.append("stamped order has a refund booked")
    elif status is Status.REFUNDED:
        if t.refunded != t.captured:
            problems.append(f"refunded {t.refunded} differs from captured {t.captured}")
        if t.revenue is not None:
            problems.append("refunded order has revenue booked")
        if t.refund_status != "succeeded":
            problems.append(f"refunded order's refund record is {t.refund_status}")
    elif t.revenue is not None or t.refunded is not None:
        problems.append(f"{status} order (in flight) already has an outcome booked")
    return problems


@dataclass
class LedgerReport:
    start: datetime | None
    end: datetime | None
    orders: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    captured: int = 0
    revenue: int = 0
    refunded: int = 0
    in_flight: int = 0
    # Further captures of already-paid orders, each refunded on its own.
    extra_captures: int = 0
    extra_captured: int = 0
    extra_refunded: int = 0
    extra_in_flight: int = 0
    imbalances: list[tuple[OrderMoney, list[str]]] = field(default_factory=list)

    @property
    def totals_balance(self) -> bool:
        return self.captured == self.revenue + self.refunded + self.in_flight

    @property
    def balanced(self) -> bool:
        return not self.imbalances and self.totals_balance

    def add(self, money: OrderMoney) -> None:
        self.orders += 1
        self.by_status[money.status] += 1
        self.captured += money.total("captured")
        self.revenue += money.total("revenue")
        self.refunded += money.total("refunded")
        self.in_flight += money.in_flight()
        for t in money.extras:
            self.extra_captures += 1
            self.extra_captured += t.captured or 0
            self.extra_refunded += t.refunded or 0
            if t.refunded is None and t.revenue is None:
                self.extra_in_flight += t.captured or 0
        problems = order_problems(money)
        if problems:
            self.imbalances.append((money, problems))

    def as_json(self) -> dict[str, Any]:
        return {
            "from": self.start.isoformat() if self.start else None,
            "to": self.end.isoformat() if self.end else None,
            "orders": self.orders,
            "by_status": dict(sorted(self.by_status.items())),
            "captured": self.captured,
            "stamped_revenue": self.revenue,
            "refunded": self.refunded,
            "in_flight": self.in_flight,
            "extra_captures": {"count": self.extra_captures, "captured": self.extra_captured,
                               "refunded": self.extra_refunded, "in_flight": self.extra_in_flight},
            "balanced": self.balanced,
            "imbalances": [{"order_id": m.order_id, "status": m.status, "captured": m.total("captured"),
                            "revenue": m.total("revenue"), "refunded": m.total("refunded"),
                            "problems": problems}
                           for m, problems in self.imbalances],
        }


# One row per order; its transactions (every captured one, every one with ledger entries, a refund, or
# a gateway status saying captured) as JSON. Ledger entries without a transaction come as one more.
_ORDERS_MONEY = """
    SELECT o.id::text AS order_id, o.status, o.amount_idr,
        (SELECT coalesce(json_agg(t), '[]'::json) FROM (
            SELECT coalesce(p.gateway_order_id, l.gateway_order_id) AS gateway_order_id,
                   p.capture_role AS role,
                   CASE WHEN p.captured_at IS NOT NULL THEN p.amount_idr END AS payment_captured,
                   p.gateway_status, l.captured, l.revenue, l.refunded, r.status AS refund_status
            FROM (SELECT * FROM payments WHERE order_id = o.id) p
            FULL JOIN (
                SELECT gateway_order_id,
                       max(amount_idr) FILTER (WHERE kind = 'captured') AS captured,
                       max(amount_idr) FILTER (WHERE kind = 'revenue') AS revenue,
                       max(amount_idr) FILTER (WHERE kind = 'refunded') AS refunded
                FROM ledger_entries WHERE order_id = o.id GROUP BY gateway_order_id
            ) l ON l.gateway_order_id = p.gateway_order_id
            LEFT JOIN refunds r ON r.gateway_order_id = coalesce(p.gateway_order_id, l.gateway_order_id)
            WHERE p.captured_at IS NOT NULL OR l.gateway_order_id IS NOT NULL OR p.gateway_order_id IS NULL
               OR r.gateway_order_id IS NOT NULL OR p.gateway_status IN ('settlement', 'capture')
            ORDER BY p.created_at NULLS LAST
        ) t) AS transactions
    FROM orders o
    WHERE o.created_at >= %(start)s AND o.created_at < %(end)s
    ORDER BY o.created_at, o.id
"""

_EARLIEST = datetime(2000, 1, 1, tzinfo=timezone.utc)
_LATEST = datetime(9999, 1, 1, tzinfo=timezone.utc)


def ledger_report(settings: Settings, start: datetime | None = None, end: datetime | None = None) -> LedgerReport:
    """Check every order created in ``[start, end)`` (all orders when both are None) and total them.

    Reads through a server-side cursor, so a period of millions of orders streams in constant memory.
    """
    report = LedgerReport(start, end)
    with get_pool(settings.database_url).connection() as conn, conn.transaction(force_rollback=True):
        # A server-side cursor lives in a transaction; the pool's connections are autocommit.
        with conn.cursor(name="ledger_report") as cursor:
            cursor.itersize = 2000
            cursor.execute(_ORDERS_MONEY, {"start": start or _EARLIEST, "end": end or _LATEST})
            for row in cursor:
                transactions = tuple(TransactionMoney(**t) for t in row.pop("transactions"))
                report.add(OrderMoney(**row, transactions=transactions))
    return report


_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_bound(text: str, *, end: bool = False) -> datetime:
    """A period bound from the command line. A date alone is a whole day in WIB: ``--from 2024-09-01
    --to 2024-09-30`` is all of September (the end bound of a date is the next midnight). A date and
    time without an offset is WIB too; an explicit offset is honoured."""
    text = text.strip()
    if _DATE_ONLY.match(text):
        day = date.fromisoformat(text) + (timedelta(days=1) if end else timedelta())
        return datetime.combine(day, time(), WIB)
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=WIB)


def rupiah(amount: int) -> str:
    return ("-" if amount < 0 else "") + "Rp" + f"{abs(amount):,}".replace(",", ".")


def format_report(report: LedgerReport) -> str:
    """The report for a person: totals, the balance check, and every offending order."""
    def when(moment: datetime | None, fallback: str) -> str:
        return moment.astimezone(WIB).strftime("%Y-%m-%d %H:%M WIB") if moment else fallback

    width = max(len(rupiah(v)) for v in (report.captured, report.revenue, report.refunded, report.in_flight))
    lines = [
        f"Ledger report for orders created {when(report.start, 'since the beginning')}"
        f" until {when(report.end, 'now')}",
        f"  orders            {report.orders}"
        + (f"  ({', '.join(f'{s} {n}' for s, n in sorted(report.by_status.items()))})" if report.orders else ""),
        f"  captured          {rupiah(report.captured):>{width}}",
        f"  stamped revenue   {rupiah(report.revenue):>{width}}",
        f"  refunded          {rupiah(report.refunded):>{width}}",
        f"  in flight         {rupiah(report.in_flight):>{width}}",
    ]
    if report.extra_captures:
        lines.append(f"  extra captures    {report.extra_captures} ({rupiah(report.extra_captured)}, included above):"
                     f" refunded {rupiah(report.extra_refunded)}, in flight {rupiah(report.extra_in_flight)}")
    if report.totals_balance:
        lines.append("  captured = stamped revenue + refunded + in flight: yes")
    else:
        difference = report.captured - report.revenue - report.refunded - report.in_flight
        lines.append(f"  captured = stamped revenue + refunded + in flight: NO (off by {rupiah(difference)})")
    if report.imbalances:
        lines.append(f"IMBALANCED: {len(report.imbalances)} order(s)")
        for money, problems in report.imbalances:
            lines.append(f"  {money.order_id} {money.status}: {'; '.join(problems)}")
    else:
        lines.append("Balanced: every order's money adds up.")
    return "\n".join(lines)
