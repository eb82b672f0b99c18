"""The stand-in gateway's behaviour, without HTTP: Midtrans transactions, refunds, payments and settlement.

Every method that changes a transaction does so in one database transaction holding the transaction's
row lock (so two refunds with one key, or a payment racing an expiry, serialize) and returns the
notification copies it recorded; the caller sends them after the commit, so a slow merchant endpoint
never holds a lock. The HTTP endpoints that call these are in :mod:`.protocol` and :mod:`.sandbox`.
"""
from __future__ import annotations

import copy
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Sequence

import psycopg

from shared.devtools.standin.delivery import Notifier
from shared.devtools.standin.faults import Faults
from shared.devtools.standin.records import (
    CANNOT_MODIFY, CLOSABLE, NOT_FOUND, NOT_REFUNDABLE_BY_API, REFUNDABLE, STATUS_CODES, TRANSACTION_COLUMNS,
    Delivery, GatewayTransaction, RefundRecord, closed_answer, describe, now_text,
)
from shared.devtools.standin.store import DEFAULT_SCHEMA, load_transaction, migrate, open_pool, save_status
from shared.logs import log_event
from shared.payments.gateway import format_gross_amount

log = logging.getLogger(__name__)


class StandinGateway:
    """Transactions in PostgreSQL, fault knobs in memory, notification delivery on threads.

    Every method that changes a transaction does so in one database transaction holding the
    transaction's row lock (so two refunds with one key, or a payment racing an expiry, serialize), and
    returns the notification copies it recorded; the caller sends them after the commit, so a slow
    merchant endpoint never holds a lock.
    """

    def __init__(
        self,
        server_key: str,
        notification_url: str,
        public_url: str,
        *,
        database_url: str,
        schema: str = DEFAULT_SCHEMA,
        seed: int | None = None,
        notification_retry_delays: Sequence[float] = (0.5, 2.0, 5.0),
        notification_timeout: float = 5.0,
    ) -> None:
        self.server_key = server_key
        self.notification_url = notification_url
        self.public_url = public_url.rstrip("/")
        self.schema = schema
        migrate(database_url, schema)
        self.pool = open_pool(database_url, schema)
        self.faults = Faults(seed)
        self.notifier = Notifier(self.pool, self.faults, server_key, notification_url,
                                 retry_delays=notification_retry_delays, timeout=notification_timeout)
        self.closed = False
        self._stopping = threading.Event()
        self._settler: threading.Thread | None = None

    def start_settling(self, interval: float = 1.0) -> None:
        """Settle card captures whose time has come, on a thread of their own, as the banks do."""
        self._settler = threading.Thread(target=self._settle_loop, args=(interval,), daemon=True,
                                         name="standin-settle")
        self._settler.start()

    def close(self) -> None:
        """Stop using the database (delivery threads still running give up quietly)."""
        self.closed = self.notifier.closed = True
        self._stopping.set()
        if self._settler is not None:
            self._settler.join(timeout=5)
        self.pool.close()

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        with self.pool.connection() as conn:
            with conn.transaction():
                yield conn

    def send(self, deliveries: list[Delivery]) -> None:
        """Send notification copies recorded by a committed change (see :class:`.delivery.Notifier`)."""
        self.notifier.send(deliveries)

    def resume_deliveries(self) -> int:
        return self.notifier.resume()

    # reading

    def _status_body(self, tx: GatewayTransaction) -> dict[str, Any]:
        return describe(tx, self.server_key, tx.transaction_status, "Success, transaction is found")

    # protocol

    def create(
        self, order_id: str, gross_amount: int, email: str | None, item_name: str | None
    ) -> GatewayTransaction | None:
        """A new pending transaction, or None if the order id is taken."""
        with self._transaction() as conn:
            row = conn.execute(
                "INSERT INTO transactions (order_id, gross_amount, email, item_name, token, transaction_id,"
                " transaction_time, transaction_status) VALUES (%s, %s, %s, %s, %s, %s, %s, 'pending')"
                " ON CONFLICT (order_id) DO NOTHING RETURNING order_id",
                (order_id, gross_amount, email, item_name, str(uuid.uuid4()), str(uuid.uuid4()),
                 now_text()),
            ).fetchone()
            tx = load_transaction(conn, order_id) if row is not None else None
        if tx is not None:
            log_event(log, "standin_transaction_created", gateway_order_id=order_id, amount=gross_amount)
        return tx

    def redirect_url(self, tx: GatewayTransaction) -> str:
        return f"{self.public_url}/snap/v2/vtweb/{tx.token}"

    def status(self, order_id: str) -> dict[str, Any] | None:
        with self._transaction() as conn:
            tx = load_transaction(conn, order_id)
        return None if tx is None else self._status_body(tx)

    def refund(
        self, order_id: str, refund_key: str, amount: int | None, reason: str
    ) -> tuple[int, dict[str, Any], list[Delivery]]:
        """(HTTP status, body, notifications). The same ``refund_key`` returns the first answer again."""
        with self._transaction() as conn:
            tx = load_transaction(conn, order_id, lock=True)
            if tx is None:
                return 404, dict(NOT_FOUND), []
            earlier = next((r for r in tx.refunds if r.refund_key == refund_key), None)
            if earlier is not None:
                return 200, copy.deepcopy(earlier.response), []
            refusal = self._refund_refusal(tx, amount)
            if refusal is not None:
                return 200, {"status_code": "412", "status_message": refusal, "order_id": order_id}, []
            refund_amount = amount if amount is not None else tx.gross_amount - tx.refunded_amount
            response = self._record_refund(conn, tx, refund_key, refund_amount, reason)
            deliveries = self.notifier.queue(conn, tx, tx.transaction_status)
        log_event(log, "standin_refunded", gateway_order_id=order_id, amount=refund_amount)
        return 200, copy.deepcopy(response), deliveries

    def _refund_refusal(self, tx: GatewayTransaction, amount: int | None) -> str | None:
        refused = set(NOT_REFUNDABLE_BY_API) | set(self.faults.get("refuse_refunds_for"))
        if tx.payment_type in refused or tx.transaction_status not in REFUNDABLE:
            return CANNOT_MODIFY
        remaining = tx.gross_amount - tx.refunded_amount
        if amount is not None and not 0 < amount <= remaining:
            return f"Refund amount must be between 1 and the refundable {remaining}"
        return None

    def _record_refund(
        self, conn: psycopg.Connection, tx: GatewayTransaction, refund_key: str, amount: int, reason: str
    ) -> dict[str, Any]:
        full = tx.refunded_amount + amount == tx.gross_amount
        tx.transaction_status = "refund" if full else "partial_refund"
        seq = len(tx.refunds) + 1
        response = {
            "status_code": "200",
            "status_message": "Success, refund request is approved",
            "transaction_id": tx.transaction_id,
            "order_id": tx.order_id,
            "gross_amount": format_gross_amount(tx.gross_amount),
            "currency": "IDR",
            "payment_type": tx.payment_type,
            "transaction_time": tx.transaction_time,
            "transaction_status": tx.transaction_status,
            "refund_chargeback_id": seq,
            "refund_amount": format_gross_amount(amount),
            "refund_key": refund_key,
        }
        record = RefundRecord(refund_key, amount, reason, now_text(), response)
        conn.execute(
            "INSERT INTO refunds (order_id, refund_key, seq, amount, reason, created_at, response)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (tx.order_id, refund_key, seq, amount, reason, record.created_at, json.dumps(response)),
        )
        tx.refunds.append(record)
        save_status(conn, tx)
        return response

    def close_transaction(self, order_id: str, how: str) -> tuple[int, dict[str, Any], list[Delivery]]:
        """The merchant closes an unpaid transaction: ``how`` is "expire" or "cancel" (Midtrans'
        ``POST /v2/<id>/expire`` and ``/cancel``). A pending transaction can be closed either way, and a
        card capture not settled yet can be cancelled (voided); anything else (settled, already closed)
        is refused with 412 and changes nothing."""
        with self._transaction() as conn:
            tx = load_transaction(conn, order_id, lock=True)
            if tx is None:
                return 404, dict(NOT_FOUND), []
            if tx.transaction_status not in CLOSABLE[how]:
                return 200, {"status_code": "412", "status_message": CANNOT_MODIFY, "order_id": order_id}, []
            voided = tx.transaction_status == "capture"
            tx.transaction_status = how
            save_status(conn, tx)
            deliveries = self.notifier.queue(conn, tx, how)
        log_event(log, "standin_closed", gateway_order_id=order_id, how=how, voided_capture=voided or None)
        if how == "expire":
            return 200, closed_answer(tx, "407", "Success, transaction has expired"), deliveries
        return 200, closed_answer(tx, "200", "Success, transaction is canceled"), deliveries

    # sandbox

    def pay(
        self, order_id: str, payment_type: str, *, bank: str = "bca", after_expiry: bool = False
    ) -> tuple[str, dict[str, Any] | None, list[Delivery]]:
        """("ok" | "not_found" | "not_pending", status body, notifications).

        ``after_expiry`` lets a payment land on a transaction the gateway already expired, as a bank
        transfer that settles late does: the merchant then sees ``settlement`` after ``expire``.
        """
        payable = ("pending", "expire") if after_expiry else ("pending",)
        with self._transaction() as conn:
            tx = load_transaction(conn, order_id, lock=True)
            if tx is None:
                return "not_found", None, []
            if tx.transaction_status not in payable:
                return "not_pending", self._status_body(tx), []
            tx.payment_type = payment_type
            tx.transaction_status = "capture" if payment_type == "credit_card" else "settlement"
            tx.fraud_status = "accept"
            tx.settlement_time = now_text()
            if payment_type == "bank_transfer":
                tx.va_bank, tx.va_number = bank, self.faults.va_number()
            save_status(conn, tx)
            conn.execute("UPDATE transactions SET captured_at = now() WHERE order_id = %s", (order_id,))
            deliveries = self.notifier.queue(conn, tx, tx.transaction_status)
            body = self._status_body(tx)
        log_event(log, "standin_paid", gateway_order_id=order_id, payment_type=payment_type,
                  late=after_expiry or None)
        return "ok", body, deliveries

    def expire(self, order_id: str) -> tuple[str, dict[str, Any] | None, list[Delivery]]:
        """The gateway's own expiry of a pending transaction (its payment window ran out)."""
        with self._transaction() as conn:
            tx = load_transaction(conn, order_id, lock=True)
            if tx is None:
                return "not_found", None, []
            if tx.transaction_status != "pending":
                return "not_pending", self._status_body(tx), []
            tx.transaction_status = "expire"
            save_status(conn, tx)
            deliveries = self.notifier.queue(conn, tx, "expire")
            return "ok", self._status_body(tx), deliveries

    def settle(self, order_id: str) -> tuple[str, dict[str, Any] | None, list[Delivery]]:
        """A card capture settles now ("ok"), or "not_found" / "not_capture"."""
        with self._transaction() as conn:
            tx = load_transaction(conn, order_id, lock=True)
            if tx is None:
                return "not_found", None, []
            if tx.transaction_status != "capture":
                return "not_capture", self._status_body(tx), []
            deliveries = self._settle(conn, tx)
            return "ok", self._status_body(tx), deliveries

    def _settle(self, conn: psycopg.Connection, tx: GatewayTransaction) -> list[Delivery]:
        tx.transaction_status = "settlement"
        tx.settlement_time = now_text()
        save_status(conn, tx)
        log_event(log, "standin_settled", gateway_order_id=tx.order_id)
        return self.notifier.queue(conn, tx, "settlement")

    def settle_due(self) -> int:
        """Settle every card capture older than ``card_settlement_seconds``; how many settled."""
        after = float(self.faults.get("card_settlement_seconds"))
        deliveries: list[Delivery] = []
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT order_id FROM transactions WHERE transaction_status = 'capture'"
                " AND captured_at <= now() - make_interval(secs => %s)"
                " ORDER BY captured_at LIMIT 200 FOR UPDATE SKIP LOCKED", (after,),
            ).fetchall()
            for row in rows:
                tx = load_transaction(conn, row["order_id"])
                if tx is not None:
                    deliveries.extend(self._settle(conn, tx))
        self.send(deliveries)
        return len(rows)

    def _settle_loop(self, interval: float) -> None:
        while not self._stopping.wait(interval):
            try:
                self.settle_due()
            except Exception as exc:  # noqa: BLE001 - a database blip: try again next round
                if not self.closed:
                    log_event(log, "standin_settle_failed", logging.ERROR, error=type(exc).__name__)

    def captures(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Every transaction whose money was taken in ``[start, end)``, with its status now: the
        merchant's list to reconcile against (Midtrans has it only as a settlement report)."""
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT t.order_id, t.transaction_id, t.payment_type, t.transaction_status, t.gross_amount,"
                " t.transaction_time, t.settlement_time, t.captured_at,"
                " coalesce((SELECT sum(r.amount) FROM refunds r WHERE r.order_id = t.order_id), 0) AS refunded"
                " FROM transactions t WHERE t.captured_at >= %s AND t.captured_at < %s"
                " ORDER BY t.captured_at, t.order_id", (start, end),
            ).fetchall()
        return [{"order_id": r["order_id"], "transaction_id": r["transaction_id"],
                 "payment_type": r["payment_type"], "transaction_status": r["transaction_status"],
                 "gross_amount": format_gross_amount(r["gross_amount"]),
                 "refund_amount": format_gross_amount(int(r["refunded"])),
                 "transaction_time": r["transaction_time"], "settlement_time": r["settlement_time"],
                 "captured_at": r["captured_at"].isoformat()} for r in rows]

    def renotify(self, order_id: str, status: str | None) -> tuple[str, list[Delivery]]:
        """Send the current notification again, or a stale one for ``status`` (out-of-order drills)."""
        if status is not None and status not in STATUS_CODES:
            return "bad_status", []
        with self._transaction() as conn:
            tx = load_transaction(conn, order_id, lock=True)
            if tx is None:
                return "not_found", []
            return "ok", self.notifier.queue(conn, tx, status or tx.transaction_status)

    def record(self, order_id: str) -> dict[str, Any] | None:
        """Everything the gateway holds about one transaction, notifications and refunds included."""
        with self._transaction() as conn:
            tx = load_transaction(conn, order_id)
            if tx is None:
                return None
            notes = conn.execute(
                "SELECT id, body, copy, dropped, attempts, delivered, last_http_status, last_error"
                " FROM notifications WHERE order_id = %s ORDER BY id", (order_id,),
            ).fetchall()
        view = {name: getattr(tx, name) for name in TRANSACTION_COLUMNS}
        view["refunds"] = [
            {"refund_key": r.refund_key, "amount": r.amount, "reason": r.reason,
             "created_at": r.created_at, "response": r.response}
            for r in tx.refunds
        ]
        view["notifications"] = [dict(n) for n in notes]
        view["refunded_amount"] = tx.refunded_amount
        return view

    def order_for_token(self, token: str) -> GatewayTransaction | None:
        with self._transaction() as conn:
            row = conn.execute("SELECT order_id FROM transactions WHERE token = %s", (token,)).fetchone()
            return None if row is None else load_transaction(conn, row["order_id"])
