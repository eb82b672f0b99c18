"""Refunds: every captured rupiah that doesn't become a stamp goes back, in full, without a request.

A refund belongs to one captured gateway transaction, because an order can be paid twice: the order's
own capture is refunded when the order can't be stamped (:func:`begin_refund`, which also moves the
order to ``refund_pending`` and voids its serial), and any further capture of the same order is refunded
on its own, whatever the order's status (:func:`refund_extra_capture`). Each refund has its own
idempotency key, so the gateway gives the money back at most once however often :func:`refund_payment`
runs.

How the money goes back depends on where it is at the gateway, so :func:`refund_payment` asks first
(:data:`REFUND_MOVES`): a settled payment is refunded (``POST /v2/<id>/refund``); a card payment still in
``capture`` (not settled yet) can't be refunded at Midtrans and is voided instead (``POST /v2/<id>/cancel``),
and if the void is refused because it settled meanwhile, it is refunded; money the gateway already gave
back is booked; anything else (a bank transfer the gateway can't refund by API, a status we don't
expect) goes to a person (``refund_manual``), never guessed.
"""
from __future__ import annotations

import json
import logging
from enum import StrEnum
from typing import Any, Mapping

from shared import jobs
from shared.config import Settings
from shared.db import Tx, get_pool, transaction
from shared.errors import TransientError
from shared.lifecycle import (
    INCREMENT,
    NOW,
    CaptureRole,
    Guard,
    RefundStatus,
    Status,
    open_refund,
    order_capture,
    refund_transition,
    transition,
)
from shared.logs import log_event
from shared.payments.gateway import GatewayRejected, GatewayStatus, PaymentGateway

log = logging.getLogger(__name__)


# What the buyer reads (Bahasa Indonesia) for each refund reason we name ourselves.
REFUND_MESSAGES: dict[str, str] = {
    "stamp_deadline": "Meterai tidak dapat dibubuhkan sebelum batas waktu. Dana Anda dikembalikan penuh "
                      "secara otomatis.",
    "late_payment": "Pembayaran diterima setelah pesanan kedaluwarsa. Dana Anda dikembalikan penuh secara "
                    "otomatis.",
    "amount_mismatch": "Jumlah pembayaran tidak sesuai dengan harga. Dana Anda dikembalikan penuh secara "
                       "otomatis.",
}
DEFAULT_REFUND_MESSAGE = ("Meterai tidak dapat dibubuhkan pada dokumen Anda. Dana Anda dikembalikan penuh "
                          "secara otomatis.")
# The reason recorded on the refund of a capture that is not the order's own.
EXTRA_CAPTURE_REASON = "duplicate_payment"


class RefundMove(StrEnum):
    """How a refund proceeds from what the gateway says about the transaction now."""

    REFUND = "refund"  # settled: refund it
    CANCEL = "cancel"  # captured, not settled yet (card): void it; Midtrans refuses a refund here
    BOOK = "book"      # the money is already back (refunded, or voided): book it
    MANUAL = "manual"  # nothing the API can take back, or a status we don't expect: a person looks


# Midtrans transaction_status -> move. Anything not listed (pending, expire, deny, chargeback, a
# transaction the gateway doesn't know) goes to a person: our books say captured and the gateway doesn't.
REFUND_MOVES: Mapping[str, RefundMove] = {
    "settlement": RefundMove.REFUND,
    # Someone refunded part of it at the gateway (not us: we refund in full): how much is still owed is a
    # person's call, never a guess, so it goes to manual payout without another refund request.
    "capture": RefundMove.CANCEL,
    "refund": RefundMove.BOOK,
    "cancel": RefundMove.BOOK,  # a capture voided before settlement: nothing was ever paid out
}


def refund_move(status: GatewayStatus | None) -> RefundMove:
    if status is None:
        return RefundMove.MANUAL
    return REFUND_MOVES.get(status.transaction_status, RefundMove.MANUAL)


class RefundNotDone(TransientError):
    """The gateway refused to void a capture that is still not settled: try again later (it settles
    within a day, and is then refunded)."""

    code = "refund_not_done"


def begin_refund(
    tx: Tx, order_id: str, source: Status, *, reason: str, guards: tuple[Guard, ...] = (),
    message: str | None = None, capture: tuple[str, int] | None = None,
) -> bool:
    """``source`` → refund_pending, with the serial voided and the refund of the order's own capture
    opened (``capture=(gateway_order_id, amount)`` when the move books it: a late payment). False if the
    order was no longer in ``source`` (someone else moved it). ``message`` is what the buyer reads."""
    if capture is not None:
        gateway_order_id = capture[0]
    else:
        payment = order_capture(tx, order_id)
        if payment is None:
            raise RuntimeError(f"order {order_id} has no captured payment to refund")
        gateway_order_id = payment["gateway_order_id"]
    row = transition(
        tx, order_id, source, Status.REFUND_PENDING,
        changes={"reason_code": reason,
                 "reason_message": message or REFUND_MESSAGES.get(reason, DEFAULT_REFUND_MESSAGE)},
        guards=guards, reason=reason, refund_reason=reason, capture=capture,
        detail={"gateway_order_id": gateway_order_id},
    )
    if row is None:
        return False
    jobs.enqueue_after_commit(tx, jobs.REFUND_ORDER, gateway_order_id)
    return True


def refund_extra_capture(tx: Tx, payment: Mapping[str, Any], *, reason: str = EXTRA_CAPTURE_REASON) -> bool:
    """Refund a capture that is not the order's own, leaving the order's status and outcome alone."""
    opened = open_refund(tx, payment, reason=reason)
    if opened:
        jobs.enqueue_after_commit(tx, jobs.REFUND_ORDER, payment["gateway_order_id"])
    return opened


_REFUND = """
    SELECT r.*, p.capture_role, o.status AS order_status
    FROM refunds r JOIN payments p ON p.gateway_order_id = r.gateway_order_id
    JOIN orders o ON o.id = r.order_id
    WHERE r.gateway_order_id = %s
"""


def _load(settings: Settings, gateway_order_id: str) -> dict[str, Any] | None:
    with get_pool(settings.database_url).connection() as conn:
        return conn.execute(_REFUND, (gateway_order_id,)).fetchone()


def _note_attempt(settings: Settings, refund: Mapping[str, Any], error: str | None) -> None:
    with transaction(settings.database_url) as tx:
        tx.execute(
            "UPDATE refunds SET attempts = attempts + 1, last_error = %s WHERE gateway_order_id = %s",
            (error, refund["gateway_order_id"]),
        )


def refund_payment(settings: Settings, gateway: PaymentGateway, gateway_order_id: str) -> str:
    """Give one transaction's money back: ``refunded``, ``refund_manual`` or ``skipped`` (nothing
    pending). A :class:`~shared.payments.gateway.GatewayUnavailable` propagates, so the task retries with
    the same key; nothing was booked."""
    refund = _load(settings, gateway_order_id)
    if refund is None or refund["status"] != RefundStatus.PENDING:
        return "skipped"
    try:
        status = gateway.get_status(gateway_order_id)
        move = refund_move(status)
        if move is RefundMove.BOOK:
            return _book_refunded(settings, refund, _confirmed(status))
        if move is RefundMove.CANCEL:
            return _void_capture(settings, gateway, refund)
        if move is RefundMove.REFUND:
            return _refund_settled(settings, gateway, refund)
    except GatewayRejected as exc:
        _note_attempt(settings, refund, exc.message)
        if exc.code == "gateway_auth_failed":
            # Our credentials are wrong: a configuration fault, not a refusal of this refund. It stays
            # pending and the redrive tries again once the key is fixed.
            raise
        return _manual_unless_refunded(settings, gateway, refund, {"error": exc.message})
    except Exception as exc:
        _note_attempt(settings, refund, str(exc)[:500])
        raise
    seen = status.transaction_status if status is not None else "not found"
    log_event(log, "refund_unexpected_gateway_status", logging.ERROR, order_id=str(refund["order_id"]),
              gateway_order_id=gateway_order_id, status=seen)
    return _to_manual(settings, refund, {"error": f"the gateway reports this payment as {seen}"})


def _confirmed(status: GatewayStatus | None) -> dict[str, Any]:
    return {"confirmed_by": "status", "transaction_status": status.transaction_status if status else None}


def _void_capture(settings: Settings, gateway: PaymentGateway, refund: Mapping[str, Any]) -> str:
    """A card capture not settled yet is voided (Midtrans refuses to refund it). If the gateway refuses
    the void, it settled meanwhile (or the bank's window for voids passed): look again and refund."""
    gateway_order_id = refund["gateway_order_id"]
    result = gateway.cancel_transaction(gateway_order_id)
    if result.closed:
        return _book_refunded(settings, refund, {"voided": True, "status_code": result.status_code,
                                                 "message": result.message})
    again = gateway.get_status(gateway_order_id)
    move = refund_move(again)
    if move is RefundMove.REFUND:
        return _refund_settled(settings, gateway, refund)
    if move is RefundMove.BOOK:
        return _book_refunded(settings, refund, _confirmed(again))
    raise RefundNotDone(f"the gateway refused to void {gateway_order_id} ({result.status_code}) and it is "
                        f"{again.transaction_status if again else 'not found'}")


def _refund_settled(settings: Settings, gateway: PaymentGateway, refund: Mapping[str, Any]) -> str:
    result = gateway.refund(
        refund["gateway_order_id"], refund_key=refund["refund_key"],
        amount=refund["amount_idr"], reason="e-Meterai tidak dapat diterbitkan",
    )
    response = {"status_code": result.status_code, "message": result.message}
    if not result.refunded:
        _note_attempt(settings, refund, result.message)
        return _manual_unless_refunded(settings, gateway, refund, response)
    return _book_refunded(settings, refund, response)


def _manual_unless_refunded(settings: Settings, gateway: PaymentGateway, refund: Mapping[str, Any],
                            response: dict[str, Any]) -> str:
    """Before asking a person to pay out, ask the gateway whether the money already went back (a
    concurrent run's refund, or one whose answer we lost): finance must never pay a buyer twice."""
    status = gateway.get_status(refund["gateway_order_id"])
    if refund_move(status) is RefundMove.BOOK:
        return _book_refunded(settings, refund, {**response, **_confirmed(status)})
    return _to_manual(settings, refund, response)


def _lock_order(tx: Tx, refund: Mapping[str, Any]) -> None:
    """Every path that changes an order and its money locks the order's row first (then payments and
    refunds), so two of them on one order wait for each other instead of deadlocking."""
    tx.execute("SELECT id FROM orders WHERE id = %s FOR UPDATE", (str(refund["order_id"]),))


def _book_refunded(settings: Settings, refund: Mapping[str, Any], response: dict[str, Any]) -> str:
    gateway_order_id, order_id = refund["gateway_order_id"], str(refund["order_id"])
    with transaction(settings.database_url) as tx:
        _lock_order(tx, refund)
        done = {"gateway_response": json.dumps(response), "completed_at": NOW, "attempts": INCREMENT}
        # A concurrent run may have sent the refund to manual payout just before: the gateway's refund
        # settles it, so nobody pays it out a second time. The order's own refund moves with the order.
        if refund["capture_role"] == CaptureRole.ORDER:
            detail = {"gateway_order_id": gateway_order_id}
            booked = transition(tx, order_id, Status.REFUND_PENDING, Status.REFUNDED, refund_changes=done,
                                detail=detail) or transition(
                tx, order_id, Status.REFUND_MANUAL, Status.REFUNDED, refund_changes=done,
                reason="refunded by the gateway", detail=detail)
        else:
            booked = refund_transition(tx, gateway_order_id, RefundStatus.PENDING, RefundStatus.SUCCEEDED,
                                       changes=done) or refund_transition(
                tx, gateway_order_id, RefundStatus.MANUAL, RefundStatus.SUCCEEDED, changes=done)
    log_event(log, "refunded" if booked else "refund_already_done", order_id=order_id,
              gateway_order_id=gateway_order_id, amount=refund["amount_idr"], role=refund["capture_role"])
    return "refunded"


def _to_manual(settings: Settings, refund: Mapping[str, Any], response: dict[str, Any]) -> str:
    gateway_order_id, order_id = refund["gateway_order_id"], str(refund["order_id"])
    with transaction(settings.database_url) as tx:
        _lock_order(tx, refund)
        changes = {"gateway_response": json.dumps(response), "manual_since": NOW}
        if refund["capture_role"] == CaptureRole.ORDER:
            transition(tx, order_id, Status.REFUND_PENDING, Status.REFUND_MANUAL, refund_changes=changes,
                       detail=response)
        else:
            refund_transition(tx, gateway_order_id, RefundStatus.PENDING, RefundStatus.MANUAL, changes=changes)
    log_event(log, "refund_manual", logging.WARNING, order_id=order_id, gateway_order_id=gateway_order_id,
              role=refund["capture_role"])
    return "refund_manual"


def pending_refunds_of(settings: Settings, order_id: str) -> list[str]:
    """The transactions of an order whose refund is still pending."""
    with get_pool(settings.database_url).connection() as conn:
        rows = conn.execute(
            "SELECT gateway_order_id FROM refunds WHERE order_id = %s AND status = 'pending'"
            " ORDER BY requested_at", (order_id,),
        ).fetchall()
    return [row["gateway_order_id"] for row in rows]
