"""What the stand-in gateway knows about a transaction, and how Midtrans shows it on the wire.

The records mirror the stand-in's tables (:mod:`.store`); :func:`describe` is the one place that turns a
transaction into Midtrans' status/notification body (``"12500.00"`` amounts, SHA512 ``signature_key``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from shared.payments.gateway import format_gross_amount, notification_signature

MERCHANT_ID = "M-STANDIN"
WIB = timezone(timedelta(hours=7), "WIB")
PAYMENT_TYPES = ("qris", "gopay", "shopeepay", "credit_card", "bank_transfer")
VA_BANKS = ("bca", "bni", "bri", "permata", "cimb")
PAID = ("settlement", "capture")
# Midtrans refunds settled money only: a card capture not settled yet is voided with /cancel instead.
REFUNDABLE = ("settlement", "partial_refund")
# What each merchant close may close: a pending transaction, and (cancel only) an unsettled capture.
CLOSABLE = {"expire": ("pending",), "cancel": ("pending", "capture")}
# Midtrans can't push money back into a virtual account; those refunds are paid out by hand.
NOT_REFUNDABLE_BY_API = ("bank_transfer",)
STATUS_CODES = {
    "pending": "201", "settlement": "200", "capture": "200", "refund": "200", "partial_refund": "200",
    "expire": "202", "cancel": "202", "deny": "202",
}
CANNOT_MODIFY = "Merchant cannot modify the status of the transaction"
NOT_FOUND = {"status_code": "404", "status_message": "Transaction doesn't exist."}


def now_text() -> str:
    return datetime.now(WIB).strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class RefundRecord:
    refund_key: str
    amount: int
    reason: str
    created_at: str
    response: dict[str, Any]


@dataclass
class Delivery:
    """One notification copy on its way to the merchant (its row is ``notifications.id``)."""

    id: int
    body: dict[str, Any]
    copy: int
    dropped: bool = False


@dataclass
class GatewayTransaction:
    order_id: str
    gross_amount: int
    email: str | None
    item_name: str | None
    token: str
    transaction_id: str
    transaction_time: str
    transaction_status: str = "pending"
    payment_type: str | None = None
    fraud_status: str | None = None
    settlement_time: str | None = None
    va_bank: str | None = None
    va_number: str | None = None
    refunds: list[RefundRecord] = field(default_factory=list)

    @property
    def refunded_amount(self) -> int:
        return sum(r.amount for r in self.refunds)


TRANSACTION_COLUMNS = (
    "order_id", "gross_amount", "email", "item_name", "token", "transaction_id", "transaction_time",
    "transaction_status", "payment_type", "fraud_status", "settlement_time", "va_bank", "va_number",
)


def describe(tx: GatewayTransaction, server_key: str, status: str, message: str) -> dict[str, Any]:
    """The Midtrans view of ``tx`` as if its status were ``status``, signed like a notification."""
    status_code = STATUS_CODES[status]
    gross = format_gross_amount(tx.gross_amount)
    body: dict[str, Any] = {
        "transaction_time": tx.transaction_time,
        "transaction_status": status,
        "transaction_id": tx.transaction_id,
        "status_message": message,
        "status_code": status_code,
        "signature_key": notification_signature(tx.order_id, status_code, gross, server_key),
        "payment_type": tx.payment_type,
        "order_id": tx.order_id,
        "merchant_id": MERCHANT_ID,
        "gross_amount": gross,
        "fraud_status": tx.fraud_status if status != "pending" else None,
        "currency": "IDR",
        "settlement_time": tx.settlement_time if status in PAID + ("refund", "partial_refund") else None,
    }
    if tx.va_number is not None:
        body["va_numbers"] = [{"bank": tx.va_bank or "bca", "va_number": tx.va_number}]
    if status in ("refund", "partial_refund") and tx.refunds:
        body["refund_amount"] = format_gross_amount(tx.refunded_amount)
        body["refunds"] = [
            {"refund_key": r.refund_key, "refund_amount": format_gross_amount(r.amount),
             "reason": r.reason, "created_at": r.created_at}
            for r in tx.refunds
        ]
    return {k: v for k, v in body.items() if v is not None}


def closed_answer(tx: GatewayTransaction, status_code: str, message: str) -> dict[str, Any]:
    """What Midtrans answers to a merchant's expire/cancel: the transaction's new status, unsigned."""
    body = {
        "status_code": status_code,
        "status_message": message,
        "transaction_id": tx.transaction_id,
        "order_id": tx.order_id,
        "payment_type": tx.payment_type,
        "transaction_time": tx.transaction_time,
        "transaction_status": tx.transaction_status,
        "gross_amount": format_gross_amount(tx.gross_amount),
    }
    return {k: v for k, v in body.items() if v is not None}
