"""Manual refunds: money the gateway can't give back by API, paid out by finance and booked here.

Bank-transfer (virtual account) payments can't be refunded through the gateway, and a gateway may
refuse a refund for other reasons; those refunds wait as ``manual`` (and, when the refund is the order's
own, the order in ``refund_manual``). A refund belongs to one captured transaction, so an order paid
twice by bank transfer has two. Finance gets a list (and a CSV) with what they need to pay each one out,
pays it from the bank, and records the bank's reference with :func:`mark_paid_out`, which moves the
refund ``manual → succeeded`` (booking the ``refunded`` ledger entry) and, for the order's own refund,
the order ``refund_manual → refunded``, in the same transaction that stores the reference. Marking the
same refund with the same reference again is a no-op; with another reference it is refused, so a payout
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
from shared.lifecycle import NOW, CaptureRole, RefundStatus, Status, refund_transition, transition


class NotRefundManual(DomainError):
    code = "not_refund_manual"


class ReferenceConflict(DomainError):
    code = "manual_reference_conflict"


class UnknownOrder(DomainError):
    code = "order_not_found"


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
                   coalesce(r.manual_since, r.requested_at) AS manual_since,
                   r.reason AS refund_reason,
                   coalesce(r.gateway_response->>'message', r.gateway_response->>'error', r.last_error)
                       AS why_manual
            FROM refunds r
            JOIN orders o ON o.id = r.order_id
            JOIN payments p ON p.gateway_order_id = r.gateway_order_id
            WHERE r.status = 'manual'
            ORDER BY manual_since, o.id, r.gateway_order_id
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


def _find_refund(tx, identifier: str) -> dict | None:
    """The refund named by an order id (its only refund, or its one waiting for a payout) or by the
    gateway order id of its transaction, locked with its order (order first, like every money path)."""
    try:
        order_id = str(uuid.UUID(identifier))
    except ValueError:
        order_id = None
    if order_id is None:
        found = tx.execute("SELECT order_id FROM refunds WHERE gateway_order_id = %s", (identifier,)).fetchone()
        if found is None:
            raise UnknownOrder(f"No order or refund {identifier!r}.")
        order_id, where, params = str(found["order_id"]), "r.gateway_order_id = %s", (identifier,)
    else:
        where, params = "r.order_id = %s", (order_id,)
    order = tx.execute("SELECT status FROM orders WHERE id = %s FOR UPDATE", (order_id,)).fetchone()
    if order is None:
        raise UnknownOrder(f"No order {order_id}.")
    refunds = tx.execute(
        "SELECT r.*, p.capture_role, o.status AS order_status FROM refunds r"
        " JOIN payments p ON p.gateway_order_id = r.gateway_order_id JOIN orders o ON o.id = r.order_id"
        f" WHERE {where} ORDER BY r.requested_at FOR UPDATE OF r", params,
    ).fetchall()
    if len(refunds) > 1:
        waiting = [r for r in refunds if r["status"] == RefundStatus.MANUAL]
        if len(waiting) != 1:
            raise DomainError(
                f"Order {order_id} has {len(refunds)} refunds ({len(waiting)} waiting for a payout): name the "
                "one paid out by its gateway order id (see meterai manual-refunds).", code="ambiguous_refund")
        return waiting[0]
    return refunds[0] if refunds else {"order_status": order["status"], "status": None}


def mark_paid_out(settings: Settings, identifier: str, reference: str) -> str:
    """Record that finance paid a refund out, under the bank's ``reference``. ``identifier`` is the order
    id (when the order has one refund waiting) or the gateway order id of the refunded transaction.

    Returns ``"refunded"``, or ``"already_paid_out"`` when the same reference was recorded before.
    Raises :class:`NotRefundManual` for a refund not waiting for a manual payout and
    :class:`ReferenceConflict` for one already paid out under another reference.
    """
    reference = reference.strip()
    if not reference or len(reference) > 200:
        raise DomainError("A payout reference of 1 to 200 characters is required.", code="bad_reference")
    identifier = identifier.strip()
    with transaction(settings.database_url) as tx:
        refund = _find_refund(tx, identifier)
        if refund["status"] == RefundStatus.SUCCEEDED and refund["manual_reference"]:
            if refund["manual_reference"] == reference:
                return "already_paid_out"
            raise ReferenceConflict(
                f"The refund of {refund['gateway_order_id']} was already paid out under reference "
                f"{refund['manual_reference']!r}.")
        if refund["status"] != RefundStatus.MANUAL:
            raise NotRefundManual(
                f"{identifier} is {refund['order_status']}, not waiting for a manual refund; nothing booked.")
        paid_out = {"manual_reference": reference, "completed_at": NOW}
        if refund["capture_role"] == CaptureRole.ORDER:  # the order's own refund moves with the order
            moved = transition(tx, str(refund["order_id"]), Status.REFUND_MANUAL, Status.REFUNDED,
                               reason="paid out manually", refund_changes=paid_out,
                               detail={"manual_reference": reference,
                                       "gateway_order_id": refund["gateway_order_id"]})
        else:
            moved = refund_transition(tx, refund["gateway_order_id"], RefundStatus.MANUAL,
                                      RefundStatus.SUCCEEDED, changes=paid_out)
        if moved is None:  # the order is not where its refund says it is: book nothing, say so
            raise NotRefundManual(
                f"{identifier}: the refund waits for a payout but its order is {refund['order_status']}; "
                "nothing booked.")
    return "refunded"
