"""The ledger report: money captured, earned by stamping, given back, still held — and proof it balances.

Invariant 6 of DESIGN.md: per order and in total, ``captured = stamped revenue + refunded + in flight``.
:func:`order_problems` is that invariant for one order, as a pure function of its status and ledger
entries (testable without a database), in the only shapes an order's money may have:

* never paid (created, awaiting_payment, expired, rejected): no entries at all, no captured payment;
* in flight (paid, stamping, refund_pending, refund_manual): captured, and nothing else yet;
* stamped: captured, and revenue of exactly that amount, no refund;
* refunded: captured, and a refund of exactly that amount, no revenue;
* and everywhere: never revenue and refund together, the captured entry equal to the payment the
  gateway confirmed, a refunded order's refund record completed.

:func:`ledger_report` applies it to every order created in a period (``[start, end)``; each order is
judged on all its entries, whenever booked) and adds the totals. ``meterai ledger-report`` prints it and
exits non-zero on any imbalance; the tests use it as their oracle.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from shared.config import Settings
from shared.db import get_pool
from shared.lifecycle import Status

# Finance reads periods in Jakarta time (WIB, UTC+7, no daylight saving).
WIB = timezone(timedelta(hours=7), "WIB")

NEVER_PAID = frozenset({Status.CREATED, Status.AWAITING_PAYMENT, Status.EXPIRED, Status.REJECTED})
IN_FLIGHT = frozenset({Status.PAID, Status.STAMPING, Status.REFUND_PENDING, Status.REFUND_MANUAL})


@dataclass(frozen=True)
class OrderMoney:
    """One order's status and money: its ledger entries (None when absent) and what backs them."""

    order_id: str
    status: str
    amount_idr: int
    captured: int | None = None
    revenue: int | None = None
    refunded: int | None = None
    payment_captured: int | None = None  # amount of the payment the gateway confirmed as captured
    refund_status: str | None = None


def order_problems(money: OrderMoney) -> list[str]:
    """Why this order's money doesn't balance; empty when it does."""
    status = Status(money.status)
    problems: list[str] = []
    if money.revenue is not None and money.refunded is not None:
        problems.append("both revenue and a refund are booked")
    if status in NEVER_PAID:
        if (money.captured, money.revenue, money.refunded) != (None, None, None):
            problems.append(f"{status} order has ledger entries")
        if money.payment_captured is not None:
            problems.append(f"{status} order has a captured payment of {money.payment_captured} not booked")
        return problems
    if money.captured is None:
        problems.append(f"{status} order has no capture booked")
    elif money.payment_captured != money.captured:
        problems.append(f"captured {money.captured} but the confirmed payment is {money.payment_captured}")
    if status is Status.STAMPED:
        if money.revenue != money.captured:
            problems.append(f"stamped: revenue {money.revenue} differs from captured {money.captured}")
        if money.refunded is not None:
            problems.append("stamped order has a refund booked")
    elif status is Status.REFUNDED:
        if money.refunded != money.captured:
            problems.append(f"refunded {money.refunded} differs from captured {money.captured}")
        if money.revenue is not None:
            problems.append("refunded order has revenue booked")
        if money.refund_status != "succeeded":
            problems.append(f"refunded order's refund record is {money.refund_status}")
    elif money.revenue is not None or money.refunded is not None:
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
        self.captured += money.captured or 0
        self.revenue += money.revenue or 0
        self.refunded += money.refunded or 0
        if Status(money.status) in IN_FLIGHT:
            self.in_flight += money.captured or 0
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
            "balanced": self.balanced,
            "imbalances": [{"order_id": m.order_id, "status": m.status, "captured": m.captured,
                            "revenue": m.revenue, "refunded": m.refunded, "problems": problems}
                           for m, problems in self.imbalances],
        }


_ORDERS_MONEY = """
    SELECT o.id::text AS order_id, o.status, o.amount_idr,
           max(l.amount_idr) FILTER (WHERE l.kind = 'captured') AS captured,
           max(l.amount_idr) FILTER (WHERE l.kind = 'revenue') AS revenue,
           max(l.amount_idr) FILTER (WHERE l.kind = 'refunded') AS refunded,
           (SELECT p.amount_idr FROM payments p
             WHERE p.order_id = o.id AND p.captured_at IS NOT NULL) AS payment_captured,
           (SELECT r.status FROM refunds r WHERE r.order_id = o.id) AS refund_status
    FROM orders o
    LEFT JOIN ledger_entries l ON l.order_id = o.id
    WHERE o.created_at >= %(start)s AND o.created_at < %(end)s
    GROUP BY o.id
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
                report.add(OrderMoney(**row))
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
