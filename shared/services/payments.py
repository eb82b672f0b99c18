"""Payment notifications: verified at the door, stored raw, deduplicated, confirmed, then applied.

The web endpoint only checks the signature and stores the body (:func:`accept_notification`); the
worker confirms the status with a query to the gateway before any money moves
(:func:`process_notification`), because a notification is a hint, the status query is the truth.
Duplicates die at the unique fingerprint; out-of-order ones find the order no longer in the status they
would move it from, which the state machine treats as "already done".
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Mapping

from shared import jobs
from shared.config import Settings
from shared.db import Tx, get_pool, transaction
from shared.lifecycle import Status, transition
from shared.logs import log_event
from shared.payments.gateway import GatewayStatus, PaymentGateway
from shared.services.refunds import begin_refund

log = logging.getLogger(__name__)

CAPTURED = frozenset({"settlement", "capture"})
FAILED = frozenset({"expire", "cancel", "deny", "failure"})


def notification_fingerprint(body: Mapping[str, Any]) -> str:
    parts = [str(body.get(k, "")) for k in
             ("order_id", "transaction_status", "status_code", "transaction_id", "gross_amount",
              "fraud_status")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def accept_notification(settings: Settings, body: Mapping[str, Any]) -> bool:
    """Store a verified notification and queue its processing; False if it is a duplicate."""
    with transaction(settings.database_url) as tx:
        row = tx.execute(
            """
            INSERT INTO payment_notifications
                (gateway_order_id, transaction_status, status_code, transaction_id, fingerprint, body)
            VALUES (%s, %s, %s, %s, %s, %s)
            ON CONFLICT (fingerprint) DO NOTHING
            RETURNING id
            """,
            (str(body.get("order_id", "")), str(body.get("transaction_status", "")),
             str(body.get("status_code", "")), body.get("transaction_id"),
             notification_fingerprint(body), json.dumps(dict(body))),
        ).fetchone()
        if row is not None:
            jobs.enqueue_after_commit(tx, jobs.PROCESS_NOTIFICATION, row["id"])
    return row is not None


def _mark_processed(tx: Tx, notification_id: int, outcome: str) -> None:
    tx.execute(
        "UPDATE payment_notifications SET processed_at = now(), outcome = %s"
        " WHERE id = %s AND processed_at IS NULL",
        (outcome, notification_id),
    )


def process_notification(settings: Settings, gateway: PaymentGateway, notification_id: int) -> str:
    with get_pool(settings.database_url).connection() as conn:
        note = conn.execute(
            "SELECT * FROM payment_notifications WHERE id = %s", (notification_id,)
        ).fetchone()
        payment = conn.execute(
            "SELECT * FROM payments WHERE gateway_order_id = %s", (note["gateway_order_id"],)
        ).fetchone() if note else None
    if note is None or note["processed_at"] is not None:
        return "skipped"
    if payment is None:
        with transaction(settings.database_url) as tx:
            _mark_processed(tx, notification_id, "unknown_order")
        log_event(log, "notification_unknown_order", logging.WARNING,
                  gateway_order_id=note["gateway_order_id"])
        return "unknown_order"
    confirmed = gateway.get_status(payment["gateway_order_id"])
    with transaction(settings.database_url) as tx:
        outcome = apply_gateway_status(tx, settings, payment, confirmed) if confirmed else "not_found"
        _mark_processed(tx, notification_id, outcome)
    log_event(log, "notification_processed", order_id=str(payment["order_id"]),
              gateway_order_id=payment["gateway_order_id"], outcome=outcome)
    return outcome


def apply_gateway_status(
    tx: Tx, settings: Settings, payment: dict[str, Any], status: GatewayStatus
) -> str:
    """Drive the order from the gateway's confirmed status. Safe to repeat and to see out of order."""
    order_id = str(payment["order_id"])
    order = tx.execute("SELECT * FROM orders WHERE id = %s FOR UPDATE", (order_id,)).fetchone()
    tx.execute(
        "UPDATE payments SET gateway_status = %s, payment_type = COALESCE(%s, payment_type),"
        " transaction_id = COALESCE(%s, transaction_id), updated_at = now()"
        " WHERE gateway_order_id = %s",
        (status.transaction_status, status.payment_type, status.transaction_id,
         payment["gateway_order_id"]),
    )
    captured = status.transaction_status in CAPTURED and status.fraud_status in (None, "accept")
    if captured:
        return _apply_capture(tx, settings, order, payment, status)
    if status.transaction_status in FAILED:
        moved = transition(tx, order_id, Status.AWAITING_PAYMENT, Status.EXPIRED,
                           changes={"reason_code": f"payment_{status.transaction_status}"})
        return "expired" if moved else "ignored"
    return "ignored"


def _apply_capture(
    tx: Tx, settings: Settings, order: dict[str, Any], payment: dict[str, Any], status: GatewayStatus
) -> str:
    order_id = str(order["id"])
    already = tx.execute(
        "SELECT gateway_order_id FROM payments WHERE order_id = %s AND captured_at IS NOT NULL",
        (order_id,),
    ).fetchone()
    if already is not None:
        if already["gateway_order_id"] != payment["gateway_order_id"]:
            # A second capture for one order: it needs a person; never stamp or refund it twice.
            log_event(log, "double_capture", logging.ERROR, order_id=order_id,
                      gateway_order_id=payment["gateway_order_id"])
            return "double_capture"
        return "duplicate"
    tx.execute(
        "UPDATE payments SET captured_at = now(), amount_idr = %s WHERE gateway_order_id = %s",
        (status.gross_amount, payment["gateway_order_id"]),
    )
    if order["status"] == Status.AWAITING_PAYMENT:
        moved = transition(
            tx, order_id, Status.AWAITING_PAYMENT, Status.PAID,
            changes_sql={"paid_at": "now()",
                         "refund_due_at": f"now() + interval '{int(settings.stamp_deadline_seconds)} seconds'"},
            amount=status.gross_amount,
            detail={"gateway_order_id": payment["gateway_order_id"],
                    "payment_type": status.payment_type},
        )
        if moved is None:
            return "ignored"
        if status.gross_amount != order["amount_idr"]:
            begin_refund(tx, order_id, Status.PAID, reason="amount_mismatch")
            return "amount_mismatch"
        jobs.enqueue_after_commit(tx, jobs.STAMP_ORDER, order_id)
        return "paid"
    if order["status"] == Status.EXPIRED:
        begin_refund(tx, order_id, Status.EXPIRED, reason="late_payment")
        return "late_payment_refund"
    return "ignored"

