"""Refunds: every captured rupiah that doesn't become a stamp goes back, in full, without a request.

:func:`begin_refund` moves an order to ``refund_pending`` in the caller's transaction, voids its serial
(never re-issued) and records the refund with an idempotency key, so the gateway refunds at most once
however often :func:`refund_order` runs.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from shared import jobs
from shared.config import Settings
from shared.db import Tx, get_pool, transaction
from shared.lifecycle import Guard, Status, transition
from shared.logs import log_event
from shared.payments.gateway import GatewayRejected, PaymentGateway

log = logging.getLogger(__name__)


def refund_key_for(order_id: str) -> str:
    return f"refund-{order_id}"


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


def begin_refund(
    tx: Tx, order_id: str, source: Status, *, reason: str, guards: tuple[Guard, ...] = (),
    message: str | None = None,
) -> bool:
    """``source`` → refund_pending, with the serial voided and the refund row written. False if the
    order was no longer in ``source`` (someone else moved it). ``message`` is what the buyer reads."""
    payment = tx.execute(
        "SELECT gateway_order_id, amount_idr FROM payments"
        " WHERE order_id = %s AND captured_at IS NOT NULL",
        (order_id,),
    ).fetchone()
    if payment is None:
        raise RuntimeError(f"order {order_id} has no captured payment to refund")
    changes_sql = {"lease_owner": "NULL", "lease_expires_at": "NULL"}
    row = transition(
        tx, order_id, source, Status.REFUND_PENDING,
        changes={"reason_code": reason,
                 "reason_message": message or REFUND_MESSAGES.get(reason, DEFAULT_REFUND_MESSAGE)},
        changes_sql=changes_sql, guards=guards,
        reason=reason, amount=payment["amount_idr"],
    )
    if row is None:
        return False
    tx.execute(
        "UPDATE serials SET status = 'voided', voided_at = now()"
        " WHERE order_id = %s AND status = 'reserved'",
        (order_id,),
    )
    tx.execute(
        "INSERT INTO refunds (order_id, gateway_order_id, refund_key, amount_idr, status, reason)"
        " VALUES (%s, %s, %s, %s, 'pending', %s)",
        (order_id, payment["gateway_order_id"], refund_key_for(order_id), payment["amount_idr"], reason),
    )
    jobs.enqueue_after_commit(tx, jobs.REFUND_ORDER, order_id)
    return True


def _load(settings: Settings, order_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    with get_pool(settings.database_url).connection() as conn:
        order = conn.execute("SELECT status FROM orders WHERE id = %s", (order_id,)).fetchone()
        refund = conn.execute("SELECT * FROM refunds WHERE order_id = %s", (order_id,)).fetchone()
    return order, refund


def _note_attempt(settings: Settings, order_id: str, error: str | None) -> None:
    with transaction(settings.database_url) as tx:
        tx.execute(
            "UPDATE refunds SET attempts = attempts + 1, last_error = %s WHERE order_id = %s",
            (error, order_id),
        )


def refund_order(settings: Settings, gateway: PaymentGateway, order_id: str) -> str:
    """refund_pending → refunded (gateway refunded) or → refund_manual (gateway can't)."""
    order, refund = _load(settings, order_id)
    if order is None or refund is None or order["status"] != Status.REFUND_PENDING:
        return "skipped"
    try:
        result = gateway.refund(
            refund["gateway_order_id"], refund_key=refund["refund_key"],
            amount=refund["amount_idr"], reason="e-Meterai tidak dapat diterbitkan",
        )
    except GatewayRejected as exc:
        _note_attempt(settings, order_id, exc.message)
        if exc.code == "gateway_auth_failed":
            # Our credentials are wrong: a configuration fault, not a refusal of this refund. The order
            # stays refund_pending and the redrive tries again once the key is fixed.
            raise
        return _manual_unless_refunded(settings, gateway, order_id, refund, {"error": exc.message})
    except Exception as exc:
        _note_attempt(settings, order_id, str(exc)[:500])
        raise
    response = {"status_code": result.status_code, "message": result.message}
    if not result.refunded:
        _note_attempt(settings, order_id, result.message)
        return _manual_unless_refunded(settings, gateway, order_id, refund, response)
    return _book_refunded(settings, order_id, refund, response)


def _manual_unless_refunded(settings: Settings, gateway: PaymentGateway, order_id: str,
                            refund: dict[str, Any], response: dict[str, Any]) -> str:
    """Before asking a person to pay out, ask the gateway whether the money already went back (a
    concurrent run's refund, or one whose answer we lost): finance must never pay a buyer twice."""
    status = gateway.get_status(refund["gateway_order_id"])
    if status is not None and status.transaction_status == "refund":
        return _book_refunded(settings, order_id, refund, {**response, "confirmed_by": "status"})
    return _to_manual(settings, order_id, response)


def _book_refunded(settings: Settings, order_id: str, refund: dict[str, Any],
                   response: dict[str, Any]) -> str:
    with transaction(settings.database_url) as tx:
        tx.execute(
            "UPDATE refunds SET status = 'succeeded', completed_at = now(), attempts = attempts + 1,"
            " gateway_response = %s WHERE order_id = %s AND status IN ('pending', 'manual')",
            (json.dumps(response), order_id),
        )
        # A concurrent run may have sent the order to manual payout just before: the gateway's
        # refund settles it, so nobody pays it out a second time.
        moved = transition(tx, order_id, Status.REFUND_PENDING, Status.REFUNDED,
                           amount=refund["amount_idr"]) or transition(
            tx, order_id, Status.REFUND_MANUAL, Status.REFUNDED, amount=refund["amount_idr"],
            reason="refunded by the gateway")
    log_event(log, "refunded" if moved else "refund_already_done", order_id=order_id,
              amount=refund["amount_idr"])
    return "refunded"


def _to_manual(settings: Settings, order_id: str, response: dict[str, Any]) -> str:
    with transaction(settings.database_url) as tx:
        tx.execute(
            "UPDATE refunds SET status = 'manual', gateway_response = %s WHERE order_id = %s"
            " AND status = 'pending'",
            (json.dumps(response), order_id),
        )
        transition(tx, order_id, Status.REFUND_PENDING, Status.REFUND_MANUAL, detail=response)
    log_event(log, "refund_manual", logging.WARNING, order_id=order_id)
    return "refund_manual"
