"""The order state machine: every status change of an order, and of what moves with it, happens here.

The allowed moves are data (:data:`TRANSITIONS`), declared once, each with what it does besides the
status: the serial it reserves, uses or voids, the stamping lease it takes or clears, the order's own
refund it opens or moves, the ledger entry it books. :func:`transition` carries a move out as one
compare-and-set ``UPDATE … WHERE id = %s AND status = <expected>`` (plus guards such as "the lease is
mine", which are made here too) with every side record in the same database transaction. A move that
finds another status did not happen and returns ``None``: the caller treats that as "someone else
already did it", never as an error. Callers pass values, never SQL; :data:`NOW`, :func:`after` and
:data:`INCREMENT` stand for the few expressions a value can be.

Money is booked per gateway transaction, because one order can be paid twice: :func:`book_capture`
records a capture (the order's own, or an extra one), and a refund — one per captured transaction — moves
through its own small state machine (:data:`REFUND_TRANSITIONS`): the order's own refund moves with the
order, an extra capture's refund by :func:`refund_transition` alone.

Every event row of an order is written here: its first (:func:`insert_order`), each move's, and the one
event that changes no status (:func:`release_lease`). So is every e-mail the buyer is owed: the receipt
with the order's first row, and the message a move declares (:class:`Mail`) with the move, as a row of the
``mail_outbox`` (one per order and kind) whose send task is published once the transaction commits
(:mod:`shared.services.mail` sends it; the redrive re-publishes what a lost message left unsent). Whoever needs to know an order changed — the
status cache — listens (:func:`add_listener`) and hears the event ids once the transaction commits.
"""
from __future__ import annotations

import json
import logging
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Mapping
from uuid import UUID

from psycopg import sql

from shared import jobs
from shared.db import Tx
from shared.logs import current_request_id

log = logging.getLogger(__name__)


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


class RefundStatus(StrEnum):
    PENDING = "pending"
    MANUAL = "manual"
    SUCCEEDED = "succeeded"


class CaptureRole(StrEnum):
    """What a captured gateway transaction is to its order."""

    ORDER = "order"  # the order's own: it becomes the stamp, or the order's refund
    EXTRA = "extra"  # any further capture of the same order: refunded on its own


class Serial(StrEnum):
    """What a move does to the order's serial."""

    RESERVE = "reserved"  # the claim: the order's reserved serial, or a new one (retries re-use it)
    USE = "used"          # the stamp: the reserved serial is on the delivered document
    VOID = "voided"       # the refund: a reserved serial is never issued again


class Mail(StrEnum):
    """The e-mails a buyer gets: one of each kind per order at most (``mail_outbox``)."""

    RECEIPT = "receipt"              # the order was made: its page's link, what happens next
    STAMPED = "stamped"              # the document is stamped: the serial, the link to download it
    REFUND_MANUAL = "refund_manual"  # the gateway can't refund it: finance pays it out by hand
    REFUNDED = "refunded"            # the money went back: amount, reason, when
    REJECTED = "rejected"            # the document can't be stamped: why; nothing was charged
    EXPIRED = "expired"              # closed unpaid (not paid in time, or the payment never opened): why


class Lease(StrEnum):
    TAKE = "take"    # lease_owner and lease_expires_at set, stamp_attempts counted
    CLEAR = "clear"  # no lease any more


@dataclass(frozen=True)
class Move:
    """One allowed move and everything it does besides the status."""

    meaning: str
    capture: bool = False  # books the order's own capture (the payment that pays for this order)
    serial: Serial | None = None
    lease: Lease | None = None
    # The order's own refund: (None, PENDING) opens it; any other pair moves it along.
    refund: tuple[RefundStatus | None, RefundStatus] | None = None
    ledger: str | None = None  # the kind of money movement booked on the order's capture
    mail: Mail | None = None  # the e-mail the buyer is owed for this move (queued in the same transaction)


_OPEN_REFUND = (None, RefundStatus.PENDING)

# (from, to) -> the move. Anything not listed is refused before it reaches SQL.
TRANSITIONS: Mapping[tuple[Status, Status], Move] = {
    (Status.CREATED, Status.AWAITING_PAYMENT): Move("preflight passed, payment opened"),
    # The buyer who closed the tab after the upload hears why from the e-mail, not only from the page.
    (Status.CREATED, Status.REJECTED): Move("document cannot be stamped", mail=Mail.REJECTED),
    # Checkout's retries ran out (gateway down for long) or it never ran: nothing was charged.
    (Status.CREATED, Status.EXPIRED): Move("payment could not be opened", mail=Mail.EXPIRED),
    (Status.AWAITING_PAYMENT, Status.PAID): Move("payment captured", capture=True),
    (Status.AWAITING_PAYMENT, Status.EXPIRED): Move("unpaid too long or payment failed", mail=Mail.EXPIRED),
    # A capture that arrives after the order expired is refunded, never kept.
    (Status.EXPIRED, Status.REFUND_PENDING): Move("late payment for an expired order", capture=True,
                                                  refund=_OPEN_REFUND),
    (Status.PAID, Status.STAMPING): Move("claimed by a stamping worker", serial=Serial.RESERVE,
                                         lease=Lease.TAKE),
    # Re-claiming an order whose lease expired (the worker died or gave up this attempt).
    (Status.STAMPING, Status.STAMPING): Move("re-claimed after the lease expired", serial=Serial.RESERVE,
                                             lease=Lease.TAKE),
    (Status.STAMPING, Status.STAMPED): Move("stamp affixed", serial=Serial.USE, lease=Lease.CLEAR,
                                            ledger="revenue", mail=Mail.STAMPED),
    (Status.PAID, Status.REFUND_PENDING): Move("not stamped before the deadline", serial=Serial.VOID,
                                               lease=Lease.CLEAR, refund=_OPEN_REFUND),
    (Status.STAMPING, Status.REFUND_PENDING): Move("stamping failed for good or past the deadline",
                                                   serial=Serial.VOID, lease=Lease.CLEAR, refund=_OPEN_REFUND),
    (Status.REFUND_PENDING, Status.REFUNDED): Move("refunded by the gateway",
                                                  refund=(RefundStatus.PENDING, RefundStatus.SUCCEEDED),
                                                  mail=Mail.REFUNDED),
    # The buyer learns the money comes back by hand (and later, with REFUNDED, that it did).
    (Status.REFUND_PENDING, Status.REFUND_MANUAL): Move("gateway cannot refund; ops pays out",
                                                       refund=(RefundStatus.PENDING, RefundStatus.MANUAL),
                                                       mail=Mail.REFUND_MANUAL),
    (Status.REFUND_MANUAL, Status.REFUNDED): Move("paid out manually",
                                                 refund=(RefundStatus.MANUAL, RefundStatus.SUCCEEDED),
                                                 mail=Mail.REFUNDED),
}

# A refund (one per captured transaction): (from, to) -> the ledger entry it books, if any.
REFUND_TRANSITIONS: Mapping[tuple[RefundStatus, RefundStatus], str | None] = {
    (RefundStatus.PENDING, RefundStatus.SUCCEEDED): "refunded",
    (RefundStatus.PENDING, RefundStatus.MANUAL): None,
    # Paid out by finance, or (found on a later look) refunded by the gateway after all.
    (RefundStatus.MANUAL, RefundStatus.SUCCEEDED): "refunded",
}

CREATED_REASON = "order accepted"
LEASE_RELEASED_REASON = "attempt failed, will retry"


class IllegalTransition(Exception):
    """A programming error: code asked for a move the state machine does not allow."""


# --- values a caller may pass for a column ------------------------------------------------------------

class _Now:
    def __repr__(self) -> str:
        return "NOW"


class _Increment:
    def __repr__(self) -> str:
        return "INCREMENT"


NOW: Any = _Now()
INCREMENT: Any = _Increment()


@dataclass(frozen=True)
class After:
    """``seconds`` from now."""

    seconds: float


def after(seconds: float) -> After:
    return After(float(seconds))


def _assignments(changes: Mapping[str, Any], params: dict[str, Any]) -> list[sql.Composable]:
    sets: list[sql.Composable] = []
    for i, (column, value) in enumerate(changes.items()):
        name, slot = sql.Identifier(column), f"c{i}"
        if value is NOW:
            sets.append(sql.SQL("{} = now()").format(name))
        elif value is INCREMENT:
            sets.append(sql.SQL("{} = {} + 1").format(name, name))
        elif isinstance(value, After):
            sets.append(sql.SQL("{} = now() + make_interval(secs => {})").format(name, sql.Placeholder(slot)))
            params[slot] = value.seconds
        else:
            sets.append(sql.SQL("{} = {}").format(name, sql.Placeholder(slot)))
            params[slot] = value
    return sets


# --- guards -----------------------------------------------------------------------------------------

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


# --- who hears about committed changes --------------------------------------------------------------

_listeners: list[Callable[[Mapping[str, int]], None]] = []
_unheard: list[bool] = []


def add_listener(listener: Callable[[Mapping[str, int]], None]) -> None:
    """``listener({order_id: newest event id})`` runs once per committed transaction that changed orders
    (the status cache drops their answers), and once per transaction whose COMMIT's outcome is unknown
    (an answer dropped for nothing costs one read). Registering the same listener twice is a no-op."""
    if listener not in _listeners:
        _listeners.append(listener)


def _changed(tx: Tx, order_id: UUID | str, event_id: int) -> None:
    pending: dict[str, int] | None = getattr(tx, "_lifecycle_changed", None)
    if pending is None:
        pending = {}
        tx._lifecycle_changed = pending  # type: ignore[attr-defined]
        tx.after_commit(lambda: _announce(pending))
    key = str(order_id)
    pending[key] = max(event_id, pending.get(key, 0))


def _announce(versions: Mapping[str, int]) -> None:
    if not _listeners and not _unheard:
        _unheard.append(True)  # once per process: every process that changes orders configures the cache
        log.warning("event=order_changes_unheard hint=no status cache configured in this process: cached "
                    "answers of the orders it changes stay until they expire")
    for listener in list(_listeners):
        listener(versions)


def _event(tx: Tx, order_id: UUID | str, source: Status | None, target: Status, reason: str,
           detail: Mapping[str, Any] | None) -> None:
    # Under the order's row lock (every caller changed the row first), so the event ids of one order keep
    # the order of its changes: the status cache's versions rely on it.
    event = tx.execute(
        "INSERT INTO order_events (order_id, from_status, to_status, reason, detail)"
        " VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (str(order_id), source.value if source else None, target.value, reason,
         json.dumps(detail) if detail else None),
    ).fetchone()
    _changed(tx, order_id, event["id"])


# --- the order --------------------------------------------------------------------------------------

_INSERT_ORDER = """
WITH o AS (
    INSERT INTO orders (id, idempotency_key, request_fingerprint, access_token_hashes, email, status,
                        amount_idr, page, x, y, document_key, document_sha256, document_bytes, request_id)
    VALUES (%(id)s, %(idempotency_key)s, %(request_fingerprint)s, %(access_token_hashes)s, %(email)s,
            'created', %(amount_idr)s, %(page)s, %(x)s, %(y)s, %(document_key)s, %(document_sha256)s,
            %(document_bytes)s, %(request_id)s)
    ON CONFLICT ((lower(email)), idempotency_key) DO NOTHING
    RETURNING *
), e AS (
    INSERT INTO order_events (order_id, from_status, to_status, reason)
    SELECT id, NULL, status, %(reason)s FROM o
), m AS (
    INSERT INTO mail_outbox (order_id, kind) SELECT id, 'receipt' FROM o
)
SELECT * FROM o
"""


def insert_order(conn: Any, values: Mapping[str, Any]) -> dict[str, Any] | None:
    """A new ``created`` order, its first event and its receipt's outbox row, in one statement (one round
    trip, atomic on an autocommit connection); ``None`` when the buyer already has an order under this
    Idempotency-Key. The caller publishes the receipt's send (:data:`jobs.SEND_MAIL`) once it returns:
    the statement has committed by then (or when the connection was lost with it, may have)."""
    # The create's request id, kept so later work on the order (a notification, a sweep) can carry it.
    return conn.execute(_INSERT_ORDER, {"request_id": current_request_id(), **values,
                                        "reason": CREATED_REASON}).fetchone()


def transition(
    tx: Tx,
    order_id: UUID | str,
    source: Status,
    target: Status,
    *,
    changes: Mapping[str, Any] | None = None,
    guards: tuple[Guard, ...] = (),
    reason: str | None = None,
    detail: Mapping[str, Any] | None = None,
    lease: tuple[str, float] | None = None,
    capture: tuple[str, int] | None = None,
    refund_reason: str | None = None,
    refund_changes: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Move one order from ``source`` to ``target`` if (and only if) it is still in ``source``, with
    everything the move declares.

    ``changes`` are column values set in the same UPDATE (a value, ``None``, :data:`NOW`, :func:`after`
    or :data:`INCREMENT`). A move that takes the lease needs ``lease=(owner, seconds)``; one that books
    the order's capture, ``capture=(gateway_order_id, amount)``; one that opens the order's refund,
    ``refund_reason``; one that moves it may pass ``refund_changes`` for the refund row. Returns the updated order row (with ``serial`` set by a claim), or ``None`` when the order was
    not in ``source`` or a guard failed: someone else already moved it.
    """
    move = TRANSITIONS.get((source, target))
    if move is None:
        raise IllegalTransition(f"{source} -> {target} is not an allowed transition")
    if move.capture and capture is None:
        raise IllegalTransition(f"{source} -> {target} books the order's capture: pass capture=(id, amount)")
    values: dict[str, Any] = dict(changes or {})
    if move.lease is Lease.TAKE:
        if lease is None:
            raise IllegalTransition(f"{source} -> {target} takes the lease: pass lease=(owner, seconds)")
        owner, seconds = lease
        values.update(lease_owner=owner, lease_expires_at=after(seconds), stamp_attempts=INCREMENT)
    elif move.lease is Lease.CLEAR:
        values.update(lease_owner=None, lease_expires_at=None)
    params: dict[str, Any] = {"id": str(order_id), "source": source.value, "target": target.value}
    sets = [sql.SQL("status = %(target)s"), sql.SQL("updated_at = now()"), *_assignments(values, params)]
    where = [sql.SQL("id = %(id)s"), sql.SQL("status = %(source)s")]
    for guard in guards:
        where.append(guard.clause)
        params.update(guard.params)
    # The move and its event in one statement (one round trip of the ~100 an order takes): the event is
    # inserted only from the row the UPDATE moved, so it still comes after the order's row lock, and
    # the event ids of one order keep the order of its changes (the status cache's versions rely on it).
    params.update(event_reason=reason or move.meaning, event_detail=json.dumps(detail) if detail else None)
    query = sql.SQL(
        "WITH moved AS (UPDATE orders SET {} WHERE {} RETURNING *),"
        " event AS (INSERT INTO order_events (order_id, from_status, to_status, reason, detail)"
        " SELECT id, %(source)s, %(target)s, %(event_reason)s, %(event_detail)s::jsonb FROM moved RETURNING id)"
        " SELECT moved.*, (SELECT id FROM event) AS meterai_event_id FROM moved"
    ).format(sql.SQL(", ").join(sets), sql.SQL(" AND ").join(where))
    row = tx.execute(query, params).fetchone()
    if row is None:
        return None
    event_id = row.pop("meterai_event_id")
    if event_id is None:  # the order moved without its event: never commit that (the caller's tx rolls back)
        raise IllegalTransition(f"{source} -> {target} of order {order_id} wrote no event")
    _changed(tx, order_id, event_id)
    if move.capture:
        gateway_order_id, amount = capture  # type: ignore[misc]
        if book_capture(tx, gateway_order_id, amount, CaptureRole.ORDER) is None:
            raise IllegalTransition(f"capture {gateway_order_id} was booked before")
    if move.serial is not None:
        _change_serial(tx, row, move.serial)
    if move.refund is not None:
        _move_order_refund(tx, row, move.refund, refund_reason, refund_changes)
    if move.ledger is not None:
        capture = order_capture(tx, order_id)
        if capture is None:
            raise IllegalTransition(f"{source} -> {target} books {move.ledger}, but order {order_id} has no "
                                    "capture")
        _book(tx, order_id, capture["gateway_order_id"], move.ledger, row["amount_idr"])
    if move.mail is not None:
        _queue_mail(tx, order_id, move.mail)
    return row


def _queue_mail(tx: Tx, order_id: UUID | str, kind: Mail) -> None:
    """The buyer's e-mail for this move, in the outbox with the move; its send is published after commit.
    A kind the order already has (REFUNDED after a manual payout found refunded) is not queued again."""
    queued = tx.execute(
        "INSERT INTO mail_outbox (order_id, kind) VALUES (%s, %s) ON CONFLICT (order_id, kind) DO NOTHING"
        " RETURNING id", (str(order_id), kind.value),
    ).fetchone()
    if queued is not None:
        jobs.enqueue_after_commit(tx, jobs.SEND_MAIL, str(order_id), kind.value)


def release_lease(tx: Tx, order_id: UUID | str, owner: str, error: str) -> bool:
    """Give a stamping lease back after a transient failure, so the retry (or the redrive) can claim
    again at once: the one event that changes no status. False when the lease wasn't ``owner``'s."""
    held = tx.execute(
        "UPDATE orders SET lease_expires_at = now() - interval '1 second', updated_at = now()"
        " WHERE id = %s AND status = 'stamping' AND lease_owner = %s RETURNING id",
        (str(order_id), owner),
    ).fetchone()
    if held is None:
        return False
    _event(tx, order_id, Status.STAMPING, Status.STAMPING, LEASE_RELEASED_REASON, {"error": error[:300]})
    return True


# --- serials ----------------------------------------------------------------------------------------

SERIAL_ALPHABET = string.digits + string.ascii_uppercase
SERIAL_LENGTH = 22


def new_serial() -> str:
    return "".join(secrets.choice(SERIAL_ALPHABET) for _ in range(SERIAL_LENGTH))


def _change_serial(tx: Tx, order: dict[str, Any], change: Serial) -> None:
    order_id = str(order["id"])
    if change is Serial.RESERVE:
        order["serial"] = _reserve_serial(tx, order_id)
    elif change is Serial.USE:
        used = tx.execute(
            "UPDATE serials SET status = 'used', used_at = now(), document_sha256 = %s"
            " WHERE serial = %s AND order_id = %s AND status = 'reserved' RETURNING serial",
            (order["stamped_sha256"], order["serial"], order_id),
        ).fetchone()
        if used is None:
            raise IllegalTransition(f"order {order_id} is stamped without its reserved serial")
    else:
        tx.execute("UPDATE serials SET status = 'voided', voided_at = now()"
                   " WHERE order_id = %s AND status = 'reserved'", (order_id,))


# The order's reserved serial, or a new one drawn for it, written on the order: one statement. A drawn
# serial that is taken already (a vanishingly rare collision) reserves nothing, and another is drawn.
# Run under the order's row lock (the claim moved the row first), so no other reservation of the order
# can slip in between the look and the insert.
_RESERVE_SERIAL = """
WITH existing AS (
    SELECT serial FROM serials WHERE order_id = %(order_id)s AND status = 'reserved'
), drawn AS (
    INSERT INTO serials (serial, order_id, status)
    SELECT %(serial)s, %(order_id)s, 'reserved' WHERE NOT EXISTS (SELECT 1 FROM existing)
    ON CONFLICT (serial) DO NOTHING
    RETURNING serial
), chosen AS (
    SELECT serial FROM existing UNION ALL SELECT serial FROM drawn
)
UPDATE orders SET serial = chosen.serial FROM chosen WHERE orders.id = %(order_id)s RETURNING orders.serial
"""


SERIAL_DRAWS = 10  # a 22-character random serial taken ten times in a row is not bad luck


def _reserve_serial(tx: Tx, order_id: str) -> str:
    for _ in range(SERIAL_DRAWS):
        row = tx.execute(_RESERVE_SERIAL, {"order_id": order_id, "serial": new_serial()}).fetchone()
        if row is not None:
            return row["serial"]
    raise IllegalTransition(f"no free serial for order {order_id} in {SERIAL_DRAWS} draws")


# --- money ------------------------------------------------------------------------------------------

def refund_key_for(gateway_order_id: str) -> str:
    """The idempotency key of a transaction's refund: one transaction, one refund."""
    return f"refund-{gateway_order_id}"


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
    """Record that the gateway captured ``amount`` on this transaction, and book it, once. The order's
    own capture is booked by the move it pays for (:data:`TRANSITIONS`); call this alone for an extra
    capture, which changes no order.

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


def open_refund(tx: Tx, payment: Mapping[str, Any], *, reason: str) -> bool:
    """A pending refund of a captured transaction's full amount; False if it already has one."""
    if payment.get("captured_at") is None:
        raise IllegalTransition(f"transaction {payment['gateway_order_id']} was never captured")
    row = tx.execute(
        "INSERT INTO refunds (order_id, gateway_order_id, refund_key, amount_idr, status, reason)"
        " VALUES (%s, %s, %s, %s, 'pending', %s) ON CONFLICT (gateway_order_id) DO NOTHING"
        " RETURNING gateway_order_id",
        (str(payment["order_id"]), payment["gateway_order_id"], refund_key_for(payment["gateway_order_id"]),
         payment["amount_idr"], reason),
    ).fetchone()
    return row is not None


def _move_order_refund(tx: Tx, order: Mapping[str, Any], refund: tuple[RefundStatus | None, RefundStatus],
                       reason: str | None, changes: Mapping[str, Any] | None) -> None:
    """The order's own refund moves with the order, or the order's move doesn't happen at all."""
    capture = order_capture(tx, order["id"])
    if capture is None:
        raise IllegalTransition(f"order {order['id']} has no captured payment to refund")
    source, target = refund
    if source is None:
        if reason is None:
            raise IllegalTransition("opening a refund needs refund_reason")
        if not open_refund(tx, capture, reason=reason):
            raise IllegalTransition(f"order {order['id']}'s capture {capture['gateway_order_id']} already has "
                                    "a refund")
    elif refund_transition(tx, capture["gateway_order_id"], source, target, changes=changes) is None:
        raise IllegalTransition(f"order {order['id']} moved, but its refund was not {source}")


def refund_transition(
    tx: Tx,
    gateway_order_id: str,
    source: RefundStatus,
    target: RefundStatus,
    *,
    changes: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Move one transaction's refund from ``source`` to ``target`` if it is still in ``source``, booking
    the ledger entry the move calls for. ``None`` when someone else moved it first. The order's own
    refund moves with the order (:func:`transition`); call this alone for an extra capture's refund."""
    key = (source, target)
    if key not in REFUND_TRANSITIONS:
        raise IllegalTransition(f"refund {source} -> {target} is not an allowed transition")
    params: dict[str, Any] = {"id": gateway_order_id, "source": source.value, "target": target.value}
    sets = [sql.SQL("status = %(target)s"), *_assignments(dict(changes or {}), params)]
    query = sql.SQL("UPDATE refunds SET {} WHERE gateway_order_id = %(id)s AND status = %(source)s"
                    " RETURNING *").format(sql.SQL(", ").join(sets))
    row = tx.execute(query, params).fetchone()
    if row is None:
        return None
    kind = REFUND_TRANSITIONS[key]
    if kind is not None:
        _book(tx, row["order_id"], gateway_order_id, kind, row["amount_idr"])
    return row
