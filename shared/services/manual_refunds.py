"""Manual refunds: money the gateway can't give back by API, paid out by finance and booked here.

Bank-transfer (virtual account) payments can't be refunded through the gateway, and a gateway may
refuse a refund for other reasons; those orders wait in ``refund_manual``. Finance gets a list (and a
CSV) with what they need to pay each one out, pays it from the bank, and records the bank's reference
with :func:`mark_paid_out`, which moves the order ``refund_manual → refunded`` through the state machine
(booking the ``refunded`` ledger entry) in the same transaction that stores the reference. Marking the
same order with the same reference again is a no-op; with another reference it is refused, so a payout
is never booked twice.
"""
from __future__ import annotations

import csv
import uuid
from dataclasses import astuple, dataclass, fields
from datetime import datetime
from typing import IO

from shared.config import Settings
from shared.db import get_pool, transaction
from shared.errors import DomainError
from shared.lifecycle import Status, transition


class NotRefundManual(DomainError):
    code = "not_refund_manual"
    status = 409


class ReferenceConflict(DomainError):
    code = "manual_reference_conflict"
    status = 409


class UnknownOrder(DomainError):
    code = "order_not_found"
    status = 404


@dataclass(frozen=True)
class ManualRefund:
    """One refund finance must pay out by hand (the CSV's columns, in order)."""

    order_id: str
    gateway_order_id: str
    payment_type: str | None
    amount_idr: int
    buyer_email: str
    va_bank: str | None
    va_number: str | None
    manual_since: datetime
    refund_reason: str
    why_manual: str | None


CSV_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ManualRefund))


def list_manual_refunds(settings: Settings) -> list[ManualRefund]:
    """Every order waiting for a manual payout, the longest-waiting first."""
    with get_pool(settings.database_url).connection() as conn:
        rows = conn.execute(
            """
            SELECT o.id::text AS order_id, r.gateway_order_id, p.payment_type, r.amount_idr,
                   o.email AS buyer_email, p.va_bank, p.va_number,
                   coalesce((SELECT max(e.at) FROM order_events e
                             WHERE e.order_id = o.id AND e.to_status = 'refund_manual'),
                            o.updated_at) AS manual_since,
                   r.reason AS refund_reason,
                   coalesce(r.gateway_response->>'message', r.gateway_response->>'error', r.last_error)
                       AS why_manual
            FROM orders o
            JOIN refunds r ON r.order_id = o.id
            JOIN payments p ON p.gateway_order_id = r.gateway_order_id
            WHERE o.status = 'refund_manual'
            ORDER BY manual_since, o.id
            """
        ).fetchall()
    return [ManualRefund(**row) for row in rows]


def _cell(value: object) -> str:
    """A CSV cell that a spreadsheet shows as text: a leading = + - @ would otherwise run as a formula."""
    if value is None:
        return ""
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def write_csv(refunds: list[ManualRefund], stream: IO[str]) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for refund in refunds:
        writer.writerow([_cell(value) for value in astuple(refund)])


def mark_paid_out(settings: Settings, order_id: str, reference: str) -> str:
    """Record that finance paid ``order_id``'s refund out, under the bank's ``reference``.

    Returns ``"refunded"``, or ``"already_paid_out"`` when the same reference was recorded before.
    Raises :class:`NotRefundManual` for an order not waiting for a manual payout and
    :class:`ReferenceConflict` for one already paid out under another reference.
    """
    reference = reference.strip()
    if not reference or len(reference) > 200:
        raise DomainError("A payout reference of 1 to 200 characters is required.", code="bad_reference")
    try:
        order_id = str(uuid.UUID(order_id))
    except ValueError:
        raise UnknownOrder(f"Not an order id: {order_id!r}.") from None
    with transaction(settings.database_url) as tx:
        order = tx.execute("SELECT status FROM orders WHERE id = %s FOR UPDATE", (order_id,)).fetchone()
        if order is None:
            raise UnknownOrder(f"No order {order_id}.")
        refund = tx.execute("SELECT * FROM refunds WHERE order_id = %s", (order_id,)).fetchone()
        if order["status"] == Status.REFUNDED and refund is not None and refund["manual_reference"]:
            if refund["manual_reference"] == reference:
                return "already_paid_out"
            raise ReferenceConflict(
                f"Order {order_id} was already paid out under reference {refund['manual_reference']!r}.")
        if order["status"] != Status.REFUND_MANUAL or refund is None:
            raise NotRefundManual(
                f"Order {order_id} is {order['status']}, not waiting for a manual refund; nothing booked.")
        transition(tx, order_id, Status.REFUND_MANUAL, Status.REFUNDED, amount=refund["amount_idr"],
                   reason="paid out manually", detail={"manual_reference": reference})
        tx.execute(
            "UPDATE refunds SET status = 'succeeded', completed_at = now(), manual_reference = %s"
            " WHERE order_id = %s",
            (reference, order_id),
        )
    return "refunded"
