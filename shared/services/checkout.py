"""Checkout: preflight the uploaded document on a worker, then open a payment at the gateway.

Preflight runs here, not in the web process, and inside a child process bounded in time and memory
(:mod:`shared.stamping.isolation`; one child serves many accepted documents): a hostile PDF costs at
most one child process and ends as a rejected order, never a killed worker whose message is redelivered
forever, and never a web thread. A document that can't be stamped is rejected before any charge exists.

A checkout that can't open a payment (the gateway stays down past every retry) ends: the order goes
``created → expired`` with a reason the buyer can read (:func:`give_up`), and so does any order still
``created`` after ``CHECKOUT_DEADLINE_SECONDS`` (:func:`shared.services.reconcile.expire_stalled_checkouts`, run by the expiry scan),
so a lost message can't leave a buyer's page saying "being checked" for ever.

The upload is read against the SHA-256 recorded at acceptance. Missing is transient (it was durable
before the 202, so this node's store is wrong; logged at ERROR and retried, then expired by the retry
bound like any checkout that can't proceed), never "the buyer sent nothing". Bytes that differ from the
record are not the buyer's: the order is rejected with nothing charged, named as our error. A gateway transaction
opened for such an order meanwhile is cancelled when possible; either way it stays under the watch of
every transaction (:mod:`shared.services.reconcile`), so a payment that slipped in is refunded.
"""
from __future__ import annotations

import logging
from typing import Any

from shared.config import Settings
from shared.db import get_pool, transaction
from shared.errors import DomainError
from shared.lifecycle import Status, transition
from shared.logs import log_event
from shared.payments.gateway import GatewayRejected, PaymentGateway
from shared.services.reconcile import expire_checkout
from shared.stamping import DocumentRejected
from shared.stamping.isolation import preflight_isolated
from shared.store import DocumentCorrupt, DocumentMissing, DocumentStore

log = logging.getLogger(__name__)

ITEM_NAME = "e-Meterai Rp10.000"


def _reject(settings: Settings, order_id: str, code: str, message: str) -> None:
    with transaction(settings.database_url) as tx:
        transition(
            tx, order_id, Status.CREATED, Status.REJECTED,
            changes={"reason_code": code, "reason_message": message}, detail={"code": code},
        )
    log_event(log, "order_rejected", order_id=order_id, code=code)


def _open_payment_row(settings: Settings, order: dict[str, Any]) -> str:
    """Record a new gateway transaction id before calling the gateway.

    If we crash after the gateway created the transaction but before we saved its token, the next
    attempt uses a fresh id instead of colliding with "order_id already taken".
    """
    with transaction(settings.database_url) as tx:
        tx.execute("SELECT id FROM orders WHERE id = %s FOR UPDATE", (str(order["id"]),))
        count = tx.execute(
            "SELECT count(*) AS n FROM payments WHERE order_id = %s", (str(order["id"]),)
        ).fetchone()["n"]
        gateway_order_id = f"MTR-{order['id'].hex}-{count + 1}"
        # Watched from the start: whatever becomes of the gateway call, the transaction is asked
        # about until the gateway calls it final (shared/services/reconcile.py).
        tx.execute(
            "INSERT INTO payments (gateway_order_id, order_id, amount_idr, next_poll_at)"
            " VALUES (%s, %s, %s, now() + make_interval(secs => %s))",
            (gateway_order_id, str(order["id"]), order["amount_idr"], settings.reconcile_after_seconds),
        )
    return gateway_order_id


def _close_extra_transaction(gateway: PaymentGateway, order_id: str, gateway_order_id: str) -> None:
    """Cancel a transaction the buyer was never shown (a concurrent run opened the order's payment
    first, or the checkout gave up) so it can't be paid. If cancelling fails, nobody holds its link, and
    the watch of every transaction cancels it later, or refunds a payment that slipped in."""
    try:
        gateway.cancel_transaction(gateway_order_id)
    except DomainError as exc:
        log_event(log, "extra_transaction_not_cancelled", logging.WARNING, order_id=order_id,
                  gateway_order_id=gateway_order_id, error=exc.code)
    else:
        log_event(log, "extra_transaction_cancelled", order_id=order_id, gateway_order_id=gateway_order_id)


def prepare_order(settings: Settings, store: DocumentStore, gateway: PaymentGateway, order_id: str) -> str:
    """created → awaiting_payment (payment opened) or → rejected (document can't be stamped)."""
    with get_pool(settings.database_url).connection() as conn:  # the order and its opened payment, if any
        order = conn.execute(
            "SELECT o.*, (SELECT gateway_order_id FROM payments WHERE order_id = o.id AND token IS NOT NULL"
            " LIMIT 1) AS meterai_opened FROM orders o WHERE o.id = %s", (order_id,)).fetchone()
    if order is None or order["status"] != Status.CREATED:
        return "skipped"
    opened = order.pop("meterai_opened")
    if opened is None:
        try:
            data = store.get(order["document_key"], sha256=order["document_sha256"])
        except DocumentMissing:
            log_event(log, "upload_missing_from_store", logging.ERROR, order_id=order_id, store=repr(store),
                      key=order["document_key"],
                      detail="accepted uploads are durable before the 202: this node's store is not the one "
                             "it was put in (DOCUMENT_STORE_URL, bucket, prefix) or it lags; retrying")
            raise
        except DocumentCorrupt:
            _reject(settings, order_id, "document_corrupt",
                    "Dokumen Anda di penyimpanan kami rusak. Ini kesalahan kami; Anda tidak dikenai biaya. "
                    "Silakan unggah ulang.")
            return "rejected"
        try:
            preflight_isolated(data, page=order["page"], x=order["x"], y=order["y"],
                               max_bytes=settings.max_document_bytes, max_pages=settings.max_pages,
                               size=settings.stamp_size, timeout_seconds=settings.preflight_timeout_seconds,
                               memory_bytes=settings.preflight_memory_bytes,
                               child_max_documents=settings.preflight_child_max_documents,
                               child_max_growth_bytes=settings.preflight_child_max_growth_bytes)
        except DocumentRejected as exc:
            _reject(settings, order_id, exc.code, exc.message)
            return "rejected"
        gateway_order_id = _open_payment_row(settings, order)
        try:
            created = gateway.create_transaction(
                gateway_order_id, order["amount_idr"], email=order["email"], item_name=ITEM_NAME
            )
        except GatewayRejected as exc:
            # Retrying can't help (bad request, refused credentials): answer the buyer, charge nothing.
            log_event(log, "payment_open_refused", logging.ERROR, order_id=order_id, error=exc.code)
            _reject(settings, order_id, "payment_unavailable",
                    "Pembayaran tidak dapat dibuat saat ini. Anda tidak dikenai biaya; silakan coba lagi nanti.")
            return "rejected"
        with transaction(settings.database_url) as tx:
            moved = transition(tx, order_id, Status.CREATED, Status.AWAITING_PAYMENT,
                               detail={"gateway_order_id": gateway_order_id})
            if moved is not None:  # only the run that opened the order's checkout shows its link
                tx.execute(
                    "UPDATE payments SET token = %s, redirect_url = %s, gateway_status = 'pending',"
                    " updated_at = now() WHERE gateway_order_id = %s",
                    (created.token, created.redirect_url, gateway_order_id),
                )
        if moved is None:
            _close_extra_transaction(gateway, order_id, gateway_order_id)
            return "lost_race"
    else:
        with transaction(settings.database_url) as tx:
            transition(tx, order_id, Status.CREATED, Status.AWAITING_PAYMENT, detail={"gateway_order_id": opened})
    log_event(log, "payment_opened", order_id=order_id)
    return "awaiting_payment"


def give_up(settings: Settings, gateway: PaymentGateway, order_id: str, error: str) -> str:
    """Checkout's retries ran out: ``created → expired`` (nothing was charged), then cancel at the
    gateway whatever transaction the attempts opened, best effort (the gateway is likely still down;
    the watch keeps asking about them and cancels or refunds what it finds)."""
    with transaction(settings.database_url) as tx:
        moved = expire_checkout(tx, order_id, f"retries exhausted: {error}")
    if not moved:
        return "skipped"
    log_event(log, "checkout_gave_up", logging.ERROR, order_id=order_id, error=error)
    with get_pool(settings.database_url).connection() as conn:
        opened = [row["gateway_order_id"] for row in conn.execute(
            "SELECT gateway_order_id FROM payments WHERE order_id = %s AND captured_at IS NULL",
            (order_id,))]
    for gateway_order_id in opened:
        _close_extra_transaction(gateway, order_id, gateway_order_id)
    return "expired"

