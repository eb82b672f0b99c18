"""What meterai needs from a payment gateway, and what it answers: records, errors, the protocol.

Everything else in meterai talks to a :class:`PaymentGateway` (a ``typing.Protocol``), so services and
tests never depend on how the gateway is reached (:mod:`shared.payments.gateway` is the Midtrans adapter).

Why the error split matters: workers retry a :class:`GatewayUnavailable` (timeout, connection refused,
5xx, 429) with backoff and never retry a :class:`GatewayRejected` (bad request, wrong server key). A
refund the gateway *cannot* perform by API (a bank-transfer virtual account) is neither: it is an answer,
``RefundResult(refunded=False)``, and the caller routes the order to ``refund_manual``.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from shared.errors import PermanentError, TransientError


@dataclass(frozen=True)
class Transaction:
    """A Snap transaction: send the buyer to ``redirect_url`` to pay."""

    gateway_order_id: str
    token: str
    redirect_url: str


@dataclass(frozen=True)
class GatewayStatus:
    """What the gateway says about one order right now (the answer to a status query)."""

    gateway_order_id: str
    transaction_status: str
    status_code: str
    gross_amount: int
    payment_type: str | None
    transaction_id: str | None
    fraud_status: str | None
    # For bank-transfer payments: which bank's virtual account, and its number (ops need them to pay a
    # manual refund out).
    va_bank: str | None = None
    va_number: str | None = None


@dataclass(frozen=True)
class RefundResult:
    """``refunded=False`` means the gateway can't refund this by API (e.g. a bank-transfer virtual
    account): the caller sends the order to ``refund_manual`` instead of retrying."""

    refunded: bool
    refund_key: str
    status_code: str
    message: str


@dataclass(frozen=True)
class CloseResult:
    """The answer to closing an unpaid transaction (expire or cancel). ``closed=False`` with status code
    ``"412"`` means the gateway would not (it was paid meanwhile, or is already closed) and ``"404"``
    that it never heard of the order: either way, ask :meth:`PaymentGateway.get_status` what is true."""

    closed: bool
    status_code: str
    message: str
    transaction_status: str | None = None


@dataclass(frozen=True)
class GatewayCapture:
    """One transaction whose money the gateway took, as its own records show it now (a line of its
    settlement report): ``transaction_status`` says where the money is now (settlement, capture, refund,
    cancel for a voided capture, ...), ``refunded`` how much of it went back."""

    gateway_order_id: str
    gross_amount: int
    transaction_status: str
    payment_type: str | None = None
    transaction_id: str | None = None
    captured_at: datetime | None = None
    refunded: int = 0


class GatewayUnavailable(TransientError):
    """Timeout, connection error, 5xx or 429: the same call may well succeed later."""

    code = "gateway_unavailable"


class GatewayRejected(PermanentError):
    """A 4xx that retrying can't fix: a malformed request, a wrong server key, a taken order id."""

    code = "gateway_rejected"


class PaymentGateway(Protocol):
    """What meterai needs from a payment gateway. Implementations must be safe to call again after a
    timeout: creating uses a fresh order id per attempt, refunding is idempotent by ``refund_key``."""

    def create_transaction(
        self, gateway_order_id: str, amount: int, *, email: str, item_name: str
    ) -> Transaction: ...

    def get_status(self, gateway_order_id: str) -> GatewayStatus | None: ...

    def refund(self, gateway_order_id: str, *, refund_key: str, amount: int, reason: str) -> RefundResult: ...

    def expire_transaction(self, gateway_order_id: str) -> CloseResult: ...

    def cancel_transaction(self, gateway_order_id: str) -> CloseResult: ...

    def list_captures(self, start: datetime, end: datetime) -> list[GatewayCapture]: ...
