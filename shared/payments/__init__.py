"""Payments: the gateway adapter (:mod:`shared.payments.gateway`).

The stand-in gateway server that speaks the same Midtrans protocol for tests, drills and the demo is
development tooling (:mod:`shared.devtools.standin`): production never imports it. Only the adapter's
interface is re-exported here.
"""
from shared.payments.gateway import (
    CloseResult,
    GatewayCapture,
    GatewayRejected,
    GatewayStatus,
    GatewayUnavailable,
    MidtransGateway,
    PaymentGateway,
    RefundResult,
    Transaction,
    format_gross_amount,
    gateway_from_settings,
    notification_signature,
    parse_gross_amount,
    require_rupiah,
    verify_notification,
)

__all__ = [
    "CloseResult",
    "GatewayCapture",
    "GatewayRejected",
    "GatewayStatus",
    "GatewayUnavailable",
    "MidtransGateway",
    "PaymentGateway",
    "RefundResult",
    "Transaction",
    "format_gross_amount",
    "gateway_from_settings",
    "notification_signature",
    "parse_gross_amount",
    "require_rupiah",
    "verify_notification",
]
