"""Reconciliation against the gateway's own view: every capture it made has an outcome here.

``meterai ledger-report`` proves our tables add up, but it reads only our tables: money the gateway took
that we never booked (a late bank transfer whose notification was lost, before the watch existed) is
invisible to it. This check starts from the other side — the gateway's list of captures for a period —
and proves, for each one, that we know the transaction and booked the capture, and what became of the
money: stamped revenue, refunded (by the gateway, or paid out by hand), or still in flight with what it
waits for (a stamp due by the order's deadline, a refund pending, a manual payout). A capture without
an outcome, one we don't know, or one whose amount or state disagrees is a problem, and ``meterai
gateway-reconcile`` exits 1.

Where the list comes from: the stand-in serves it (``GET /sandbox/captures``, through
:meth:`~shared.payments.gateway.MidtransGateway.list_captures`); Midtrans has no such API, so in
production ops download the settlement report for the period and pass it as ``--report FILE``, a CSV
with a header row (:func:`read_settlement_report` documents its columns).
"""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, Iterable, Mapping

from shared.config import Settings
from shared.db import get_pool
from shared.lifecycle import CaptureRole, Status
from shared.payments.gateway import GatewayCapture, parse_gross_amount
from shared.services.ledger import WIB, rupiah

# Transaction statuses that say the gateway took the money (whatever happened to it after). A "cancel"
# row of a report can't be told apart from a pending payment that was cancelled, so it is not one; the
# stand-in's list knows (it reports voided captures as "cancel").
CAPTURE_STATUSES = frozenset({"settlement", "capture", "refund", "partial_refund", "chargeback",
                              "partial_chargeback"})
# The gateway gave (or took) the money back.
RETURNED_STATUSES = frozenset({"refund", "cancel", "chargeback"})

# The settlement report's columns: name -> what it holds. Header names are matched case-insensitively,
# with spaces as underscores, and these aliases (the names Midtrans' dashboard export uses).
REPORT_COLUMNS: Mapping[str, str] = {
    "order_id": "required: the gateway order id (ours: MTR-...)",
    "gross_amount": "required: the amount captured, whole rupiah (12500 or 12500.00)",
    "transaction_status": "required: settlement, capture, refund, partial_refund, chargeback, ... "
                          "(rows with other statuses are not captures and are skipped)",
    "payment_type": "optional: qris, gopay, credit_card, bank_transfer, ...",
    "transaction_id": "optional: the gateway's transaction id",
    "settlement_time": "optional: when it was captured, 'YYYY-MM-DD HH:MM:SS' in WIB or ISO 8601 with an "
                       "offset (else transaction_time); rows outside --from/--to are skipped",
    "refund_amount": "optional: how much of it was refunded",
}
_ALIASES = {"order id": "order_id", "amount": "gross_amount", "gross amount": "gross_amount",
            "status": "transaction_status", "transaction status": "transaction_status",
            "payment method": "payment_type", "payment type": "payment_type",
            "transaction id": "transaction_id", "settlement time": "settlement_time",
            "transaction time": "transaction_time", "refund amount": "refund_amount"}


class ReportError(ValueError):
    """The settlement report can't be read; the message names the line."""


def _column(name: str) -> str:
    key = name.strip().lower().lstrip("\ufeff")
    return _ALIASES.get(key, key.replace(" ", "_"))


def _report_time(text: str) -> datetime | None:
    text = (text or "").strip()
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=WIB)


def read_settlement_report(stream: IO[str], start: datetime | None = None,
                           end: datetime | None = None) -> list[GatewayCapture]:
    """The captures in a settlement report CSV (columns: :data:`REPORT_COLUMNS`), within ``[start, end)``
    when a row says when it was captured. Raises :class:`ReportError` naming the first bad line."""
    reader = csv.DictReader(stream)
    if reader.fieldnames is None:
        raise ReportError("the report is empty (a header row is required)")
    columns = {_column(name): name for name in reader.fieldnames}
    missing = [c for c in ("order_id", "gross_amount", "transaction_status") if c not in columns]
    if missing:
        raise ReportError(f"the report has no {', '.join(missing)} column (header: {', '.join(reader.fieldnames)})")
    captures = []
    for line, row in enumerate(reader, start=2):
        cell = {ours: (row.get(theirs) or "").strip() for ours, theirs in columns.items()}
        status = cell["transaction_status"].lower()
        if status not in CAPTURE_STATUSES:
            continue
        try:
            when = _report_time(cell.get("settlement_time") or cell.get("transaction_time", ""))
            capture = GatewayCapture(
                gateway_order_id=cell["order_id"], gross_amount=parse_gross_amount(cell["gross_amount"]),
                transaction_status=status, payment_type=cell.get("payment_type") or None,
                transaction_id=cell.get("transaction_id") or None, captured_at=when,
                refunded=parse_gross_amount(cell.get("refund_amount") or "0"),
            )
        except ValueError as exc:
            raise ReportError(f"line {line}: {exc}") from None
        if not capture.gateway_order_id:
            raise ReportError(f"line {line}: no order_id")
        if when is not None and ((start and when < start) or (end and when >= end)):
            continue
        captures.append(capture)
    return captures


@dataclass(frozen=True)
class CaptureCheck:
    """One gateway capture and what it became here."""

    capture: GatewayCapture
    outcome: str  # revenue, refunded, refunded_by_hand, refund_pending, manual_payout, in_flight,
    #                returned_unbooked, problem
    detail: str
    order_id: str | None = None
    problem: bool = False


def check_capture(capture: GatewayCapture, here: Mapping[str, Any] | None) -> CaptureCheck:
    """What became of one capture here (a pure function of the gateway's line and our rows)."""
    def problem(detail: str) -> CaptureCheck:
        return CaptureCheck(capture, "problem", detail, here["order_id"] if here else None, True)

    def outcome(name: str, detail: str) -> CaptureCheck:
        return CaptureCheck(capture, name, detail, here["order_id"] if here else None)

    if here is None:
        return problem("captured at the gateway, but not a transaction we opened")
    returned = capture.transaction_status in RETURNED_STATUSES
    if here["captured_at"] is None or here["booked"] is None:
        if returned:
            # Taken and given back at the gateway before we ever booked it (a void of a capture we didn't
            # know about): no money is held, nothing to do here.
            return outcome("returned_unbooked", f"returned at the gateway ({capture.transaction_status}) "
                                                "before it was booked here")
        return problem(f"captured at the gateway ({capture.transaction_status}), nothing booked here "
                       f"(order {here['order_status']})")
    if here["booked"] != capture.gross_amount:
        return problem(f"the gateway captured {rupiah(capture.gross_amount)}, we booked {rupiah(here['booked'])}")
    refund = here["refund_status"]
    if refund == "succeeded":
        if here["manual_reference"]:
            if returned:  # finance paid it out, and the gateway gave it back too: paid twice
                return problem(f"paid out by finance (reference {here['manual_reference']}) and also "
                               f"returned at the gateway ({capture.transaction_status}): refunded twice")
            return outcome("refunded_by_hand", f"paid out by finance, reference {here['manual_reference']}")
        if not returned:
            return problem(f"booked as refunded, but the gateway says {capture.transaction_status}")
        return outcome("refunded", f"refunded ({capture.transaction_status} at the gateway)")
    if refund == "pending":
        return outcome("refund_pending", f"refund pending since {_when(here['refund_requested_at'])}")
    if refund == "manual":
        return outcome("manual_payout", f"waiting for a manual payout since {_when(here['manual_since'])}")
    if here["capture_role"] == CaptureRole.EXTRA:
        return problem("an extra capture of the order, with no refund")
    status = Status(here["order_status"])
    if returned:
        return problem(f"the gateway gave the money back ({capture.transaction_status}); order is {status}")
    if status is Status.STAMPED:
        return outcome("revenue", "stamped")
    if status in (Status.PAID, Status.STAMPING):
        return outcome("in_flight", f"{status}: stamped or refunded by {_when(here['refund_due_at'])}")
    return problem(f"order is {status}, with no refund of this capture")


def _when(moment: datetime | None) -> str:
    return moment.astimezone(WIB).strftime("%Y-%m-%d %H:%M WIB") if moment else "?"


_HERE = """
    SELECT p.gateway_order_id, p.order_id::text AS order_id, p.capture_role, p.captured_at,
           o.status AS order_status, o.refund_due_at,
           (SELECT l.amount_idr FROM ledger_entries l
             WHERE l.gateway_order_id = p.gateway_order_id AND l.kind = 'captured') AS booked,
           r.status AS refund_status, r.requested_at AS refund_requested_at, r.manual_since,
           r.manual_reference
    FROM payments p JOIN orders o ON o.id = p.order_id
    LEFT JOIN refunds r ON r.gateway_order_id = p.gateway_order_id
    WHERE p.gateway_order_id = ANY(%s)
"""


@dataclass
class GatewayReconcileReport:
    start: datetime | None
    end: datetime | None
    source: str
    checks: list[CaptureCheck] = field(default_factory=list)

    @property
    def problems(self) -> list[CaptureCheck]:
        return [c for c in self.checks if c.problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def by_outcome(self) -> dict[str, tuple[int, int]]:
        counts: Counter[str] = Counter()
        amounts: Counter[str] = Counter()
        for c in self.checks:
            counts[c.outcome] += 1
            amounts[c.outcome] += c.capture.gross_amount
        return {name: (counts[name], amounts[name]) for name in sorted(counts)}

    def as_json(self) -> dict[str, Any]:
        return {
            "from": self.start.isoformat() if self.start else None,
            "to": self.end.isoformat() if self.end else None,
            "source": self.source,
            "captures": len(self.checks),
            "captured": sum(c.capture.gross_amount for c in self.checks),
            "by_outcome": {k: {"count": n, "amount": a} for k, (n, a) in self.by_outcome().items()},
            "ok": self.ok,
            "checks": [{"gateway_order_id": c.capture.gateway_order_id, "order_id": c.order_id,
                        "amount": c.capture.gross_amount, "gateway_status": c.capture.transaction_status,
                        "outcome": c.outcome, "detail": c.detail} for c in self.checks],
        }


def reconcile_captures(settings: Settings, captures: Iterable[GatewayCapture], *, start: datetime | None,
                       end: datetime | None, source: str) -> GatewayReconcileReport:
    """Check each of the gateway's captures against our rows (read in chunks of 1000)."""
    report = GatewayReconcileReport(start, end, source)
    listed = list(captures)
    with get_pool(settings.database_url).connection() as conn:
        for i in range(0, len(listed), 1000):
            chunk = listed[i:i + 1000]
            rows = conn.execute(_HERE, ([c.gateway_order_id for c in chunk],)).fetchall()
            here = {row["gateway_order_id"]: row for row in rows}
            report.checks.extend(check_capture(c, here.get(c.gateway_order_id)) for c in chunk)
    return report


def format_gateway_report(report: GatewayReconcileReport) -> str:
    def when(moment: datetime | None, fallback: str) -> str:
        return moment.astimezone(WIB).strftime("%Y-%m-%d %H:%M WIB") if moment else fallback

    total = sum(c.capture.gross_amount for c in report.checks)
    lines = [f"Gateway captures {when(report.start, 'since the beginning')} until {when(report.end, 'now')}"
             f" ({report.source}): {len(report.checks)}, {rupiah(total)}"]
    for name, (count, amount) in report.by_outcome().items():
        lines.append(f"  {name:<17} {count:>6}  {rupiah(amount)}")
    if report.problems:
        lines.append(f"WITHOUT AN OUTCOME HERE: {len(report.problems)} capture(s)")
        for c in report.problems:
            lines.append(f"  {c.capture.gateway_order_id} {rupiah(c.capture.gross_amount)}"
                         f" (order {c.order_id or '-'}): {c.detail}")
    else:
        lines.append("Every capture the gateway made has its outcome here.")
    return "\n".join(lines)
