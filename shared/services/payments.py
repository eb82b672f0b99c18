"""Payment notifications: verified at the door, stored raw, deduplicated, confirmed, then applied.

The web endpoint only checks the signature and stores what it knows of the body
(:func:`shared.services.notifications.accept_notification`); the worker confirms the status with a query to the gateway before any money moves
(:func:`process_notification`), because a notification is a hint, the status query is the truth.
Duplicates die at the unique fingerprint.

What a confirmed gateway status does to an order is data, declared once: :data:`GATEWAY_STATUS_ACTIONS`
says what each Midtrans status means for us (wait, captured, closed, reversed) and :data:`ORDER_MOVES`
which order status that action moves where. Anything not in the table changes nothing, which is how an
out-of-order or late notification can never undo a terminal state: ``pending`` after ``settlement`` is
"wait" (nothing), ``expire`` after ``paid`` has no move from ``paid``, and a capture for an order that
already expired moves it to ``refund_pending`` — the buyer gets the money back automatically.

Captures are applied per gateway transaction. The first capture an order's status has a move for is the
order's own (it becomes the stamp, or the order's refund); any other — the order was already paid by
another transaction, or is somewhere no payment belongs (rejected, still being checked) — is an *extra
capture*: booked, and refunded on its own (manual payout for a bank transfer), leaving the order's
status and outcome alone. :func:`apply_gateway_status` is shared by notifications, the watch of every
transaction we opened and the expiry of unpaid orders (:mod:`shared.services.reconcile`); it also
records whether the gateway called the transaction final (:data:`FINAL_STATUSES`), which bounds the
watch.
"""
from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any, Mapping

from shared import jobs
from shared.config import Settings
from shared.db import Tx, get_pool, transaction
from shared.errors import TransientError
from shared.lifecycle import NOW, CaptureRole, Status, after, book_capture, order_capture, transition
from shared.logs import adopt_request_id, log_event
from shared.payments.gateway import GatewayStatus, PaymentGateway
from shared.services.refunds import begin_refund, refund_extra_capture

log = logging.getLogger(__name__)


class GatewayAction(StrEnum):
    """What a gateway status means for the money."""

    WAIT = "wait"          # not decided yet: nothing to do
    CAPTURE = "capture"    # the buyer's money is ours
    CLOSE = "close"        # the payment failed or was closed: no money moved
    REVERSED = "reversed"  # money was taken and already given back at the gateway


# Midtrans transaction_status -> action. Unknown statuses wait (and are logged), never guess.
GATEWAY_STATUS_ACTIONS: Mapping[str, GatewayAction] = {
    "pending": GatewayAction.WAIT,
    "authorize": GatewayAction.WAIT,  # card authorised, not captured yet
    "capture": GatewayAction.CAPTURE,
    "settlement": GatewayAction.CAPTURE,
    "expire": GatewayAction.CLOSE,
    "cancel": GatewayAction.CLOSE,
    "deny": GatewayAction.CLOSE,
    "failure": GatewayAction.CLOSE,
    "refund": GatewayAction.REVERSED,
    "partial_refund": GatewayAction.REVERSED,
    "chargeback": GatewayAction.REVERSED,
    "partial_chargeback": GatewayAction.REVERSED,
}

# Statuses after which the gateway itself expects no change on its own: the watch of a transaction ends
# PAYMENT_WATCH_SECONDS after the first of these (a bank transfer can still settle after "expire").
# Not final: pending, authorize, and capture (a card capture settles, or is voided, later).
FINAL_STATUSES = frozenset({
    "settlement", "expire", "cancel", "deny", "failure", "refund", "partial_refund", "chargeback",
    "partial_chargeback",
})

# What the buyer reads when an unpaid order closes because of its payment (Bahasa Indonesia).
CLOSED_MESSAGES: Mapping[str, str] = {
    "payment_expire": "Batas waktu pembayaran telah habis. Anda tidak dikenai biaya.",
    "payment_cancel": "Pembayaran dibatalkan. Anda tidak dikenai biaya.",
    "payment_deny": "Pembayaran ditolak oleh penyedia pembayaran. Anda tidak dikenai biaya.",
    "payment_failure": "Pembayaran gagal diproses. Anda tidak dikenai biaya.",
}
DEFAULT_CLOSED_MESSAGE = "Pesanan ditutup tanpa pembayaran. Anda tidak dikenai biaya."

# A card capture counts only when the fraud check accepted it: "challenge" waits for review, "deny" is
# a failed payment. No fraud_status (QRIS, e-wallets, transfers) means no fraud check applies.
FRAUD_OVERRIDES: Mapping[str, GatewayAction] = {
    "challenge": GatewayAction.WAIT,
    "deny": GatewayAction.CLOSE,
}

# (action, order status now) -> order status next. Every pair not listed leaves the order alone.
ORDER_MOVES: Mapping[tuple[GatewayAction, Status], Status] = {
    (GatewayAction.CAPTURE, Status.AWAITING_PAYMENT): Status.PAID,
    # Paid after we gave up waiting: never kept, refunded in full without anyone asking.
    (GatewayAction.CAPTURE, Status.EXPIRED): Status.REFUND_PENDING,
    (GatewayAction.CLOSE, Status.AWAITING_PAYMENT): Status.EXPIRED,
    # Paid and given back at the gateway before we ever heard of it: nothing is held, the order is over.
    (GatewayAction.REVERSED, Status.AWAITING_PAYMENT): Status.EXPIRED,
}


def action_for(status: GatewayStatus) -> GatewayAction:
    """The action a confirmed gateway status calls for, from the tables above."""
    action = GATEWAY_STATUS_ACTIONS.get(status.transaction_status)
    if action is None:
        log_event(log, "gateway_status_unknown", logging.WARNING,
                  gateway_order_id=status.gateway_order_id, status=status.transaction_status)
        return GatewayAction.WAIT
    if action is GatewayAction.CAPTURE and status.fraud_status not in (None, "accept"):
        return FRAUD_OVERRIDES.get(status.fraud_status, GatewayAction.WAIT)
    return action


def _mark_processed(tx: Tx, notification_id: int, outcome: str) -> None:
    tx.execute(
        "UPDATE payment_notifications SET processed_at = now(), outcome = %s"
        " WHERE id = %s AND processed_at IS NULL",
        (outcome, notification_id),
    )


# What a notification claims when it says the buyer paid.
CAPTURE_CLAIMS = frozenset({"settlement", "capture"})


class ConfirmationLagging(TransientError):
    """The notification says "paid" but the status query doesn't (yet): gateways replicate their own
    state, and closing this notification now would leave a paid order waiting for reconciliation."""

    code = "confirmation_lagging"


def leave_notification(settings: Settings, notification_id: int, error: str) -> str:
    """Its retries ran out (the gateway stayed unavailable): the notification is closed as left to the
    payment watch, which asks the gateway about its transaction until the gateway calls it final. The
    redrive must not republish it for ever."""
    with transaction(settings.database_url) as tx:
        _mark_processed(tx, notification_id, "left_to_watch")
        # Whatever it said, the watch asks the gateway about its transaction again, from now, as if the
        # gateway had not called it final yet (even a watch that had ended starts again).
        tx.execute(
            "UPDATE payments SET next_poll_at = now(), polls = 0, final_at = NULL"
            " WHERE gateway_order_id = (SELECT gateway_order_id FROM payment_notifications WHERE id = %s)",
            (notification_id,))
    log_event(log, "notification_left_to_watch", logging.WARNING, notification_id=notification_id, error=error)
    return "left_to_watch"


def process_notification(settings: Settings, gateway: PaymentGateway, notification_id: int, *,
                         final_attempt: bool = False) -> str:
    """Confirm one stored notification with a status query and apply what the gateway says now.

    A :class:`~shared.payments.gateway.GatewayUnavailable` (timeout, 5xx, open circuit) propagates so
    the task retries; nothing was applied, so the retry starts clean. So does a capture the status
    query doesn't confirm yet (:class:`ConfirmationLagging`), until ``final_attempt``.
    """
    with get_pool(settings.database_url).connection() as conn:
        note = conn.execute(
            "SELECT * FROM payment_notifications WHERE id = %s", (notification_id,)
        ).fetchone()
        payment = conn.execute(
            "SELECT p.*, o.request_id AS order_request_id FROM payments p JOIN orders o ON o.id = p.order_id"
            " WHERE p.gateway_order_id = %s", (note["gateway_order_id"],)
        ).fetchone() if note else None
    if note is None or note["processed_at"] is not None:
        return "skipped"
    notification_request_id = adopt_request_id(payment["order_request_id"] if payment else None)
    if payment is None:
        with transaction(settings.database_url) as tx:
            _mark_processed(tx, notification_id, "unknown_order")
        log_event(log, "notification_unknown_order", logging.WARNING,
                  gateway_order_id=note["gateway_order_id"])
        return "unknown_order"
    confirmed = gateway.get_status(payment["gateway_order_id"])
    lagging = confirmed is None or confirmed.transaction_status == "pending"
    if note["transaction_status"] in CAPTURE_CLAIMS and lagging and not final_attempt:
        raise ConfirmationLagging(f"gateway does not confirm {note['transaction_status']} yet")
    with transaction(settings.database_url) as tx:
        outcome = apply_gateway_status(tx, settings, payment, confirmed) if confirmed else "not_found"
        _mark_processed(tx, notification_id, outcome)
    log_event(log, "notification_processed", order_id=str(payment["order_id"]),
              gateway_order_id=payment["gateway_order_id"], notified=note["transaction_status"],
              confirmed=confirmed.transaction_status if confirmed else None, outcome=outcome,
              notification_request_id=notification_request_id)
    return outcome


def _record_gateway_view(tx: Tx, payment: Mapping[str, Any], status: GatewayStatus) -> None:
    """What the gateway said, and since when it calls the transaction final (the watch's bound). A
    status that is not final (a card captured but not settled, say) starts that clock again."""
    tx.execute(
        "UPDATE payments SET gateway_status = %s, payment_type = COALESCE(%s, payment_type),"
        " transaction_id = COALESCE(%s, transaction_id), va_bank = COALESCE(%s, va_bank),"
        " va_number = COALESCE(%s, va_number),"
        " final_at = CASE WHEN %s THEN COALESCE(final_at, now()) ELSE NULL END,"
        " updated_at = now() WHERE gateway_order_id = %s",
        (status.transaction_status, status.payment_type, status.transaction_id, status.va_bank,
         status.va_number, status.transaction_status in FINAL_STATUSES, payment["gateway_order_id"]),
    )


def lock_for_apply(tx: Tx, gateway_order_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The transaction's order and payment rows, locked in the one order every money path uses (the
    order first), read again under the lock: a caller's copy may be older than a concurrent apply."""
    # A transaction's order never changes, so it is looked up inside the statement that locks the order.
    order = tx.execute("SELECT * FROM orders WHERE id = (SELECT order_id FROM payments WHERE gateway_order_id = %s)"
                       " FOR UPDATE", (gateway_order_id,)).fetchone()
    if order is None:
        return None
    payment = tx.execute("SELECT * FROM payments WHERE gateway_order_id = %s FOR UPDATE",
                         (gateway_order_id,)).fetchone()
    return order, payment


def apply_gateway_status(
    tx: Tx, settings: Settings, payment: Mapping[str, Any], status: GatewayStatus
) -> str:
    """Drive the order from the gateway's confirmed status. Safe to repeat and to see out of order.

    Returns what happened: ``paid``, ``late_payment_refund``, ``amount_mismatch``,
    ``extra_capture_refund`` (a further capture of an order, refunded on its own), ``expired``,
    ``duplicate`` (this capture was applied before), ``pending`` or ``no_change``.
    """
    order, payment = lock_for_apply(tx, payment["gateway_order_id"]) or (None, None)
    if order is None or payment is None:
        raise RuntimeError(f"no payment {status.gateway_order_id} to apply")
    order_id = str(order["id"])
    _record_gateway_view(tx, payment, status)
    action = action_for(status)
    if action is GatewayAction.WAIT:
        return "pending"
    current = Status(order["status"])
    target = ORDER_MOVES.get((action, current))
    if action is GatewayAction.CAPTURE:
        return _apply_capture(tx, settings, order, payment, status, target)
    if payment["captured_at"] is not None:
        _check_unbooked_reversal(tx, order, payment, status)
        return "no_change"
    if target is None or not payment.get("token"):
        # A payment attempt the buyer was never shown failed or closed: it says nothing about the
        # payment link they do have, so it must not expire the order.
        return "no_change"
    code = f"payment_{status.transaction_status}"
    moved = transition(tx, order_id, current, target,
                       changes={"reason_code": code,
                                "reason_message": CLOSED_MESSAGES.get(code, DEFAULT_CLOSED_MESSAGE)},
                       detail={"gateway_order_id": payment["gateway_order_id"],
                               "gateway_status": status.transaction_status})
    return "expired" if moved else "no_change"


def _check_unbooked_reversal(tx: Tx, order: Mapping[str, Any], payment: Mapping[str, Any],
                             status: GatewayStatus) -> None:
    """The gateway says a transaction we booked as captured is closed or reversed. If we refunded it,
    that is our own refund (or void) showing; if not (a dashboard refund, a chargeback, a void we didn't
    ask for), a person must look, because our books still say the money is held or earned."""
    refund = tx.execute("SELECT status FROM refunds WHERE gateway_order_id = %s",
                        (payment["gateway_order_id"],)).fetchone()
    if refund is not None and refund["status"] == "succeeded":
        return
    log_event(log, "gateway_reversal_unbooked", logging.WARNING if refund else logging.ERROR,
              order_id=str(order["id"]), gateway_order_id=payment["gateway_order_id"],
              status=status.transaction_status, refund=refund["status"] if refund else None)


def _apply_capture(
    tx: Tx, settings: Settings, order: Mapping[str, Any], payment: Mapping[str, Any],
    status: GatewayStatus, target: Status | None,
) -> str:
    """Book a confirmed capture once: awaiting_payment → paid (then stamp), expired → refund, or, for a
    capture that is not the order's own, its own refund."""
    order_id = str(order["id"])
    if payment["captured_at"] is not None:
        return "duplicate"
    if target is None or order_capture(tx, order_id) is not None:
        # Paid twice, or paid while the order is somewhere a payment can't be: this capture gets its own
        # refund, and the order keeps its status and outcome.
        extra = book_capture(tx, payment["gateway_order_id"], status.gross_amount, CaptureRole.EXTRA)
        assert extra is not None  # under the payment's row lock, captured_at was NULL
        refund_extra_capture(tx, extra)
        log_event(log, "extra_capture_refunded", logging.WARNING, order_id=order_id,
                  gateway_order_id=payment["gateway_order_id"], order_status=order["status"],
                  payment_type=status.payment_type)
        return "extra_capture_refund"
    capture = (payment["gateway_order_id"], status.gross_amount)
    if target is Status.REFUND_PENDING:
        begin_refund(tx, order_id, Status(order["status"]), reason="late_payment", capture=capture)
        return "late_payment_refund"
    moved = transition(
        tx, order_id, Status.AWAITING_PAYMENT, Status.PAID, capture=capture,
        changes={"paid_at": NOW, "refund_due_at": after(settings.stamp_deadline_seconds)},
        detail={"gateway_order_id": payment["gateway_order_id"], "payment_type": status.payment_type},
    )
    if moved is None:
        raise RuntimeError(f"order {order_id} left awaiting_payment under its row lock")
    if status.gross_amount != order["amount_idr"]:
        begin_refund(tx, order_id, Status.PAID, reason="amount_mismatch")
        return "amount_mismatch"
    jobs.enqueue_after_commit(tx, jobs.STAMP_ORDER, order_id)
    return "paid"
