"""The order state machine: every status change of an order happens here and nowhere else.

The allowed transitions are data (:data:`TRANSITIONS`), declared once. :func:`transition` is the one
function that changes an order's status: a compare-and-set ``UPDATE … WHERE id = %s AND status = %s``
(plus an optional guard such as "the lease is mine") that writes the event row and, where money moves,
the ledger entry in the same transaction. A transition that finds another status did not happen and
returns ``None``: the caller treats that as "someone else already did it", never as an error.

Money is booked per gateway transaction, because one order can be paid twice: :func:`book_capture`
records a capture (the order's own, or an extra one), and a refund — one per captured transaction — moves
through its own small state machine (:data:`REFUND_TRANSITIONS`, :func:`refund_transition`), which books
the ``refunded`` ledger entry. The order's own ``stamping → stamped`` books the revenue. Every ledger row
names its transaction, and the database allows one row of each kind per transaction.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Mapping
from uuid import UUID

from psycopg import sql

from shared import statuscache
from shared.db import Tx


class Status(StrEnum):
    CREATED = "created"
    AWAITING_PAYMENT = "awaiting_payment"
    PAID = "paid"
    STAMPING = "stamping"
    STAMPED = "stamped"
    REFUND_PENDING = "refund_pending"
    REFUND_MANUAL = "refund_manual"
    REFUNDED = "refunded"
    EXPIRED = "expired"
    REJECTED = "rejected"


TERMINAL = frozenset({Status.STAMPED, Status.REFUNDED, Status.EXPIRED, Status.REJECTED})

# (from, to) -> what the move means. Anything not listed is refused before it reaches SQL.
TRANSITIONS: Mapping[tuple[Status, Status], str] = {
    (Status.CREATED, Status.AWAITING_PAYMENT): "preflight passed, payment opened",
    (Status.CREATED, Status.REJECTED): "document cannot be stamped",
    # Checkout's retries ran out (gateway down for long) or it never ran: nothing was charged.
    (Status.CREATED, Status.EXPIRED): "payment could not be opened",
    (Status.AWAITING_PAYMENT, Status.PAID): "payment captured",
    (Status.AWAITING_PAYMENT, Status.EXPIRED): "unpaid too long or payment failed",
    # A capture that arrives after the order expired is refunded, never kept.
    (Status.EXPIRED, Status.REFUND_PENDING): "late payment for an expired order",
    (Status.PAID, Status.STAMPING): "claimed by a stamping worker",
    # Re-claiming an order whose lease expired (the worker died or gave up this attempt).
    (Status.STAMPING, Status.STAMPING): "re-claimed after the lease expired",
    (Status.STAMPING, Status.STAMPED): "stamp affixed",
    (Status.PAID, Status.REFUND_PENDING): "not stamped before the deadline",
    (Status.STAMPING, Status.REFUND_PENDING): "stamping failed for good or past the deadline",
    (Status.REFUND_PENDING, Status.REFUNDED): "refunded by the gateway",
    (Status.REFUND_PENDING, Status.REFUND_MANUAL): "gateway cannot refund; ops pays out",
    (Status.REFUND_MANUAL, Status.REFUNDED): "paid out manually",
}

# Which money movement an order transition books, if any: only the revenue of a stamp. Captures and
# refunds are booked per transaction (:func:`book_capture`, :data:`REFUND_LEDGER_KINDS`), in the same
# database transaction as the order's move.
LEDGER_KINDS: Mapping[tuple[Status, Status], str] = {
    (Status.STAMPING, Status.STAMPED): "revenue",
}


class CaptureRole(StrEnum):
    """What a captured gateway transaction is to its order."""

    ORDER = "order"  # the order's own: it becomes the stamp, or the order's refund
    EXTRA = "extra"  # any further capture of the same order: refunded on its own


class RefundStatus(StrEnum):
    PENDING = "pending"
    MANUAL = "manual"
    SUCCEEDED = "succeeded"


# A refund (one per captured transaction): (from, to) -> what the move means.
REFUND_TRANSITIONS: Mapping[tuple[RefundStatus, RefundStatus], str] = {
    (RefundStatus.PENDING, RefundStatus.SUCCEEDED): "refunded by the gateway",
    (RefundStatus.PENDING, RefundStatus.MANUAL): "gateway cannot refund; ops pays out",
    # Paid out by finance, or (found on a later look) refunded by the gateway after all.
    (RefundStatus.MANUAL, RefundStatus.SUCCEEDED): "paid out",
}
REFUND_LEDGER_KINDS: Mapping[tuple[RefundStatus, RefundStatus], str] = {
    (RefundStatus.PENDING, RefundStatus.SUCCEEDED): "refunded",
    (RefundStatus.MANUAL, RefundStatus.SUCCEEDED): "refunded",
}


class IllegalTransition(Exception):
    """A programming error: code asked for a move the state machine does not allow."""


@dataclass(frozen=True)
class Guard:
    """An extra condition on the compare-and-set, e.g. "the lease is held by me"."""

    clause: sql.Composable
    params: Mapping[str, Any]


def lease_free() -> Guard:
    return Guard(sql.SQL("(lease_expires_at IS NULL OR lease_expires_at < now())"), {})


def lease_held_by(owner: str) -> Guard:
    return Guard(
        sql.SQL("lease_owner = %(guard_owner)s AND lease_expires_at >= now()"), {"guard_owner": owner}
    )


def before_deadline() -> Guard:
    return Guard(sql.SQL("refund_due_at > now()"), {})


def past_deadline() -> Guard:
    return Guard(sql.SQL("refund_due_at <= now()"), {})


def transition(
    tx: Tx,
    order_id: UUID | str,
    source: Status,
    target: Status,
    *,
    changes: Mapping[str, Any] | None = None,
    changes_sql: Mapping[str, str] | None = None,
    guards: tuple[Guard, ...] = (),
    reason: str | None = None,
    detail: Mapping[str, Any] | None = None,
    amount: int | None = None,
) -> dict[str, Any] | None:
    """Move one order from ``source`` to ``target`` if (and only if) it is still in ``source``.

    ``changes`` are column values set in the same UPDATE; ``changes_sql`` are column expressions
    (trusted, written in this codebase, e.g. ``"now()"``). Returns the updated row, or ``None`` when the
    order was not in ``source`` (or a guard failed): someone else already moved it.
    """
    key = (source, target)
    if key not in TRANSITIONS:
        raise IllegalTransition(f"{source} -> {target} is not an allowed transition")
    params: dict[str, Any] = {"id": str(order_id), "source": source.value, "target": target.value}
    sets = [sql.SQL("status = %(target)s"), sql.SQL("updated_at = now()")]
    for i, (column, value) in enumerate((changes or {}).items()):
        sets.append(sql.SQL("{} = %({})s").format(sql.Identifier(column), sql.SQL(f"c{i}")))
        params[f"c{i}"] = value
    for column, expression in (changes_sql or {}).items():
        sets.append(sql.SQL("{} = {}").format(sql.Identifier(column), sql.SQL(expression)))
    where = [sql.SQL("id = %(id)s"), sql.SQL("status = %(source)s")]
    for guard in guards:
        where.append(guard.clause)
        params.update(guard.params)
    query = sql.SQL("UPDATE orders SET {} WHERE {} RETURNING *").format(
        sql.SQL(", ").join(sets), sql.SQL(" AND ").join(where)
    )
    row = tx.execute(query, params).fetchone()
    if row is None:
        return None
    event = tx.execute(
        "INSERT INTO order_events (order_id, from_status, to_status, reason, detail)"
        " VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (str(order_id), source.value, target.value, reason or TRANSITIONS[key],
         json.dumps(detail) if detail else None),
    ).fetchone()
    statuscache.changed(tx, order_id, event["id"])
    kind = LEDGER_KINDS.get(key)
    if kind is not None:
        capture = order_capture(tx, order_id)
        if capture is None:
            raise IllegalTransition(f"{source} -> {target} books {kind}, but order {order_id} has no capture")
        _book(tx, order_id, capture["gateway_order_id"], kind,
              amount if amount is not None else row["amount_idr"])
    return row


def _book(tx: Tx, order_id: UUID | str, gateway_order_id: str, kind: str, amount: int) -> None:
    tx.execute(
        "INSERT INTO ledger_entries (order_id, gateway_order_id, kind, amount_idr) VALUES (%s, %s, %s, %s)",
        (str(order_id), gateway_order_id, kind, amount),
    )


def order_capture(tx: Tx, order_id: UUID | str) -> dict[str, Any] | None:
    """The order's own captured transaction (at most one: a unique index says so), or None."""
    return tx.execute(
        "SELECT * FROM payments WHERE order_id = %s AND capture_role = 'order'", (str(order_id),)
    ).fetchone()


def book_capture(tx: Tx, gateway_order_id: str, amount: int, role: CaptureRole) -> dict[str, Any] | None:
    """Record that the gateway captured ``amount`` on this transaction, and book it, once.

    A compare-and-set on the transaction's ``captured_at``: returns the payment row, or ``None`` when the
    capture was booked before (a duplicate notification, a poll racing a notification).
    """
    row = tx.execute(
        "UPDATE payments SET captured_at = now(), capture_role = %s, amount_idr = %s, updated_at = now()"
        " WHERE gateway_order_id = %s AND captured_at IS NULL RETURNING *",
        (role.value, amount, gateway_order_id),
    ).fetchone()
    if row is not None:
        _book(tx, row["order_id"], gateway_order_id, "captured", amount)
    return row


def open_refund(tx: Tx, payment: Mapping[str, Any], *, refund_key: str, reason: str) -> bool:
    """A pending refund of a captured transaction's full amount; False if it already has one."""
    if payment.get("captured_at") is None:
        raise IllegalTransition(f"transaction {payment['gateway_order_id']} was never captured")
    row = tx.execute(
        "INSERT INTO refunds (order_id, gateway_order_id, refund_key, amount_idr, status, reason)"
        " VALUES (%s, %s, %s, %s, 'pending', %s) ON CONFLICT (gateway_order_id) DO NOTHING"
        " RETURNING gateway_order_id",
        (str(payment["order_id"]), payment["gateway_order_id"], refund_key, payment["amount_idr"], reason),
    ).fetchone()
    return row is not None


def refund_transition(
    tx: Tx,
    gateway_order_id: str,
    source: RefundStatus,
    target: RefundStatus,
    *,
    changes: Mapping[str, Any] | None = None,
    changes_sql: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """Move one transaction's refund from ``source`` to ``target`` if it is still in ``source``, booking
    the ledger entry the move calls for. ``None`` when someone else moved it first."""
    key = (source, target)
    if key not in REFUND_TRANSITIONS:
        raise IllegalTransition(f"refund {source} -> {target} is not an allowed transition")
    params: dict[str, Any] = {"id": gateway_order_id, "source": source.value, "target": target.value}
    sets = [sql.SQL("status = %(target)s")]
    for i, (column, value) in enumerate((changes or {}).items()):
        sets.append(sql.SQL("{} = %({})s").format(sql.Identifier(column), sql.SQL(f"c{i}")))
        params[f"c{i}"] = value
    for column, expression in (changes_sql or {}).items():
        sets.append(sql.SQL("{} = {}").format(sql.Identifier(column), sql.SQL(expression)))
    query = sql.SQL("UPDATE refunds SET {} WHERE gateway_order_id = %(id)s AND status = %(source)s"
                    " RETURNING *").format(sql.SQL(", ").join(sets))
    row = tx.execute(query, params).fetchone()
    if row is None:
        return None
    kind = REFUND_LEDGER_KINDS.get(key)
    if kind is not None:
        _book(tx, row["order_id"], gateway_order_id, kind, row["amount_idr"])
    return row


# The reason on an order's first event (its INSERT, in shared/orders.py, is not a transition).
CREATED_REASON = "order accepted"
