"""Payments: the gateway adapter (:mod:`shared.payments.gateway`) and the stand-in gateway server
(:mod:`shared.payments.standin`) that speaks the same Midtrans protocol for tests, drills and the demo.

Only the adapter's interface is re-exported here; the stand-in is a separate process and is imported
explicitly by whoever runs it, so importing payments never pulls in Flask.
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
