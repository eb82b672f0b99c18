"""The stand-in payment gateway: a separate process that speaks the Midtrans Core/Snap protocol.

Why it exists: tests, load drills and the demo need a gateway that behaves like Midtrans on the wire
(HTTP Basic with the server key, ``"12500.00"`` amounts, SHA512-signed notifications, refunds idempotent
by ``refund_key``, virtual accounts that can't be refunded by API) *and* that can be made to misbehave
on demand: latency, 500s, timeouts, dropped, duplicated and out-of-order notifications, refused refunds.
Our adapter (:mod:`shared.payments.gateway`) can't tell it from the real thing except by ``GATEWAY_URL``.

Run it with ``python -m shared.payments.standin`` (only with ``DEVELOPMENT=1``: it is a free-stamps
machine if it ever faces buyers, so it refuses to start otherwise, and :func:`create_standin_app` wants
``sandbox=True``): it listens on ``GATEWAY_PORT``, posts notifications to ``NOTIFICATION_URL`` and retries
each delivery after ``STANDIN_NOTIFICATION_RETRY_DELAYS`` seconds.

Protocol endpoints (HTTP Basic, server key as username): ``POST /snap/v1/transactions``,
``GET /v2/<order_id>/status``, ``POST /v2/<order_id>/refund``, ``POST /v2/<order_id>/expire``,
``POST /v2/<order_id>/cancel``. Like Midtrans' v2 API, refusals are HTTP 200 with ``status_code: "412"``
in the body; unknown orders get HTTP 404 with ``status_code: "404"`` (so does an id no real order can
have, e.g. one with a NUL byte); a merchant expiry answers ``status_code: "407"``. A card payment is
``capture`` until it settles (``card_settlement_seconds`` later, a day by default, or at once with
``POST /sandbox/settle/<order_id>``): like Midtrans, a capture can't be refunded, only voided with
``/cancel``, and a settled payment can't be voided, only refunded. ``GET /sandbox/captures?from=&to=``
(HTTP Basic too: it is the merchant's report) lists every transaction whose money was taken in a period,
what Midtrans offers only as a settlement report file.

Sandbox endpoints (no auth; they stand for the buyer, the banks and the test harness): ``GET
/snap/v2/vtweb/<token>`` (pay page), ``POST /sandbox/pay/<order_id>`` (``{"payment_type": …,
"after_expiry": true}`` is a bank settling after the gateway expired the transaction), ``POST
/sandbox/expire/<order_id>`` (the gateway's own expiry), ``POST /sandbox/notify/<order_id>`` (re-send;
``{"transaction_status": "pending"}`` sends a stale one, for out-of-order drills), ``GET|POST|DELETE
/sandbox/faults``, ``GET /sandbox/transactions/<order_id>``, ``POST /sandbox/settle/<order_id>``.

State is durable: transactions, refunds and every notification copy live in the stand-in's own
PostgreSQL schema (:mod:`shared.payments.standin_db`), so a restarted stand-in still knows every
transaction, still answers a repeated ``refund_key`` with the first answer, and resumes notifications it
had not delivered yet. Fault knobs are per process and start cleared: a restart is a healthy gateway.
"""
from __future__ import annotations

import argparse
import copy
import sys
import hmac
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import wraps
from typing import Any, Callable, Sequence

import psycopg
import requests
from flask import Flask, Response, jsonify, request
from markupsafe import escape

from shared.logs import log_event
from shared.payments.gateway import format_gross_amount, notification_signature
from shared.payments.standin_db import DEFAULT_SCHEMA, migrate, open_pool

log = logging.getLogger(__name__)

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
# Protocol endpoints, by the names the ``endpoints`` fault knob uses.
ENDPOINTS = ("create", "status", "refund", "expire", "cancel")

DEFAULT_FAULTS: dict[str, Any] = {
    "latency_ms": 0,
    "error_rate": 0.0,
    "timeout_rate": 0.0,
    "timeout_sleep_seconds": 10.0,
    "endpoints": list(ENDPOINTS),
    "max_faults": None,
    "drop_notifications": False,
    "duplicate_notifications": 0,
    "notification_jitter_ms": 0,
    "refuse_refunds_for": [],
    "seed": None,
    # Not a fault: how long a card capture stays "capture" before it settles (Midtrans: the next day).
    "card_settlement_seconds": 86400,
}


# --- fault knobs -----------------------------------------------------------------------------------

def _number(low: float, high: float | None = None) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be a number")
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be between {low} and {high}" if high is not None else f"must be >= {low}")
        return value
    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
        raise ValueError("must be an integer from 0 to 20")
    return value


def _payment_types(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of payment types")
    return value


def _endpoints(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(v in ENDPOINTS for v in value):
        raise ValueError(f"must be a list of endpoint names from {', '.join(ENDPOINTS)}")
    return value


def _optional_budget(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError("must be a non-negative integer or null")
    return value


def _seed(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError("must be an integer or null")
    return value


FAULT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "latency_ms": _number(0),
    "error_rate": _number(0, 1),
    "timeout_rate": _number(0, 1),
    "timeout_sleep_seconds": _number(0),
    "endpoints": _endpoints,
    "max_faults": _optional_budget,
    "drop_notifications": _boolean,
    "duplicate_notifications": _count,
    "notification_jitter_ms": _number(0),
    "refuse_refunds_for": _payment_types,
    "seed": _seed,
    "card_settlement_seconds": _number(0),
}


def validate_faults(knobs: Any) -> dict[str, Any]:
    """Checked copy of ``knobs``; ValueError names the first bad knob."""
    if not isinstance(knobs, dict):
        raise ValueError("faults must be a JSON object")
    checked: dict[str, Any] = {}
    for name, value in knobs.items():
        if name not in FAULT_CHECKS:
            raise ValueError(f"unknown fault knob: {name}")
        try:
            checked[name] = FAULT_CHECKS[name](value)
        except ValueError as exc:
            raise ValueError(f"{name} {exc}") from None
    return checked


# --- records ---------------------------------------------------------------------------------------

def _now_text() -> str:
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


_TRANSACTION_COLUMNS = (
    "order_id", "gross_amount", "email", "item_name", "token", "transaction_id", "transaction_time",
    "transaction_status", "payment_type", "fraud_status", "settlement_time", "va_bank", "va_number",
)


def _describe(tx: GatewayTransaction, server_key: str, status: str, message: str) -> dict[str, Any]:
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


def _closed_answer(tx: GatewayTransaction, status_code: str, message: str) -> dict[str, Any]:
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


# --- the gateway's behaviour (no Flask here) -------------------------------------------------------

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
        self.retry_delays = tuple(notification_retry_delays)
        self.notification_timeout = notification_timeout
        self.schema = schema
        migrate(database_url, schema)
        self.pool = open_pool(database_url, schema)
        self.lock = threading.Lock()  # guards the fault knobs and the random source
        self.faults: dict[str, Any] = copy.deepcopy(DEFAULT_FAULTS)
        self.injected = {"error": 0, "timeout": 0}
        self.random = random.Random(seed)
        self.faults["seed"] = seed
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
        self.closed = True
        self._stopping.set()
        if self._settler is not None:
            self._settler.join(timeout=5)
        self.pool.close()

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        with self.pool.connection() as conn:
            with conn.transaction():
                yield conn

    # faults

    def _faults_view(self) -> dict[str, Any]:
        return copy.deepcopy(self.faults) | {"injected": dict(self.injected)}

    def set_faults(self, knobs: dict[str, Any]) -> dict[str, Any]:
        checked = validate_faults(knobs)
        with self.lock:
            self.faults.update(checked)
            if "seed" in checked:
                self.random.seed(checked["seed"])
            if "max_faults" in checked:
                self.injected = {"error": 0, "timeout": 0}
            return self._faults_view()

    def reset_faults(self) -> dict[str, Any]:
        with self.lock:
            self.faults = copy.deepcopy(DEFAULT_FAULTS)
            self.injected = {"error": 0, "timeout": 0}
            return self._faults_view()

    def get_faults(self) -> dict[str, Any]:
        with self.lock:
            return self._faults_view()

    def draw_fault(self, endpoint: str) -> tuple[float, str | None]:
        """Decide one protocol request's fate: seconds to sleep first, then "error", "timeout" or None.

        Only endpoints named in the ``endpoints`` knob are affected, and at most ``max_faults`` errors
        and timeouts are injected in all (then the gateway is healthy again), so a drill can say "the
        next three status queries fail" and nothing else.
        """
        with self.lock:
            if endpoint not in self.faults["endpoints"]:
                return 0.0, None
            latency = self.faults["latency_ms"] / 1000.0
            budget = self.faults["max_faults"]
            error = self.random.random() < self.faults["error_rate"]
            timeout = self.random.random() < self.faults["timeout_rate"]
            if budget is not None and sum(self.injected.values()) >= budget:
                return latency, None
            if error:
                self.injected["error"] += 1
                return latency, "error"
            if timeout:
                self.injected["timeout"] += 1
                return latency + self.faults["timeout_sleep_seconds"], "timeout"
            return latency, None

    # reading

    def _load(self, conn: psycopg.Connection, order_id: str, *, lock: bool = False) -> GatewayTransaction | None:
        query = "SELECT * FROM transactions WHERE order_id = %s" + (" FOR UPDATE" if lock else "")
        row = conn.execute(query, (order_id,)).fetchone()
        if row is None:
            return None
        tx = GatewayTransaction(**{name: row[name] for name in _TRANSACTION_COLUMNS})
        tx.refunds = [
            RefundRecord(r["refund_key"], r["amount"], r["reason"], r["created_at"], r["response"])
            for r in conn.execute(
                "SELECT * FROM refunds WHERE order_id = %s ORDER BY seq", (order_id,)
            ).fetchall()
        ]
        return tx

    def _save_status(self, conn: psycopg.Connection, tx: GatewayTransaction) -> None:
        conn.execute(
            "UPDATE transactions SET transaction_status = %s, payment_type = %s, fraud_status = %s,"
            " settlement_time = %s, va_bank = %s, va_number = %s, updated_at = now() WHERE order_id = %s",
            (tx.transaction_status, tx.payment_type, tx.fraud_status, tx.settlement_time, tx.va_bank,
             tx.va_number, tx.order_id),
        )

    def _status_body(self, tx: GatewayTransaction) -> dict[str, Any]:
        return _describe(tx, self.server_key, tx.transaction_status, "Success, transaction is found")

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
                 _now_text()),
            ).fetchone()
            tx = self._load(conn, order_id) if row is not None else None
        if tx is not None:
            log_event(log, "standin_transaction_created", gateway_order_id=order_id, amount=gross_amount)
        return tx

    def redirect_url(self, tx: GatewayTransaction) -> str:
        return f"{self.public_url}/snap/v2/vtweb/{tx.token}"

    def status(self, order_id: str) -> dict[str, Any] | None:
        with self._transaction() as conn:
            tx = self._load(conn, order_id)
        return None if tx is None else self._status_body(tx)

    def refund(
        self, order_id: str, refund_key: str, amount: int | None, reason: str
    ) -> tuple[int, dict[str, Any], list[Delivery]]:
        """(HTTP status, body, notifications). The same ``refund_key`` returns the first answer again."""
        with self._transaction() as conn:
            tx = self._load(conn, order_id, lock=True)
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
            deliveries = self._queue_notification(conn, tx, tx.transaction_status)
        log_event(log, "standin_refunded", gateway_order_id=order_id, amount=refund_amount)
        return 200, copy.deepcopy(response), deliveries

    def _refund_refusal(self, tx: GatewayTransaction, amount: int | None) -> str | None:
        with self.lock:
            refused = set(NOT_REFUNDABLE_BY_API) | set(self.faults["refuse_refunds_for"])
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
        record = RefundRecord(refund_key, amount, reason, _now_text(), response)
        conn.execute(
            "INSERT INTO refunds (order_id, refund_key, seq, amount, reason, created_at, response)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (tx.order_id, refund_key, seq, amount, reason, record.created_at, json.dumps(response)),
        )
        tx.refunds.append(record)
        self._save_status(conn, tx)
        return response

    def close_transaction(self, order_id: str, how: str) -> tuple[int, dict[str, Any], list[Delivery]]:
        """The merchant closes an unpaid transaction: ``how`` is "expire" or "cancel" (Midtrans'
        ``POST /v2/<id>/expire`` and ``/cancel``). A pending transaction can be closed either way, and a
        card capture not settled yet can be cancelled (voided); anything else (settled, already closed)
        is refused with 412 and changes nothing."""
        with self._transaction() as conn:
            tx = self._load(conn, order_id, lock=True)
            if tx is None:
                return 404, dict(NOT_FOUND), []
            if tx.transaction_status not in CLOSABLE[how]:
                return 200, {"status_code": "412", "status_message": CANNOT_MODIFY, "order_id": order_id}, []
            voided = tx.transaction_status == "capture"
            tx.transaction_status = how
            self._save_status(conn, tx)
            deliveries = self._queue_notification(conn, tx, how)
        log_event(log, "standin_closed", gateway_order_id=order_id, how=how, voided_capture=voided or None)
        if how == "expire":
            return 200, _closed_answer(tx, "407", "Success, transaction has expired"), deliveries
        return 200, _closed_answer(tx, "200", "Success, transaction is canceled"), deliveries

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
            tx = self._load(conn, order_id, lock=True)
            if tx is None:
                return "not_found", None, []
            if tx.transaction_status not in payable:
                return "not_pending", self._status_body(tx), []
            tx.payment_type = payment_type
            tx.transaction_status = "capture" if payment_type == "credit_card" else "settlement"
            tx.fraud_status = "accept"
            tx.settlement_time = _now_text()
            if payment_type == "bank_transfer":
                with self.lock:
                    tx.va_bank, tx.va_number = bank, f"{self.random.randrange(10**10, 10**11)}"
            self._save_status(conn, tx)
            conn.execute("UPDATE transactions SET captured_at = now() WHERE order_id = %s", (order_id,))
            deliveries = self._queue_notification(conn, tx, tx.transaction_status)
            body = self._status_body(tx)
        log_event(log, "standin_paid", gateway_order_id=order_id, payment_type=payment_type,
                  late=after_expiry or None)
        return "ok", body, deliveries

    def expire(self, order_id: str) -> tuple[str, dict[str, Any] | None, list[Delivery]]:
        """The gateway's own expiry of a pending transaction (its payment window ran out)."""
        with self._transaction() as conn:
            tx = self._load(conn, order_id, lock=True)
            if tx is None:
                return "not_found", None, []
            if tx.transaction_status != "pending":
                return "not_pending", self._status_body(tx), []
            tx.transaction_status = "expire"
            self._save_status(conn, tx)
            deliveries = self._queue_notification(conn, tx, "expire")
            return "ok", self._status_body(tx), deliveries

    def settle(self, order_id: str) -> tuple[str, dict[str, Any] | None, list[Delivery]]:
        """A card capture settles now ("ok"), or "not_found" / "not_capture"."""
        with self._transaction() as conn:
            tx = self._load(conn, order_id, lock=True)
            if tx is None:
                return "not_found", None, []
            if tx.transaction_status != "capture":
                return "not_capture", self._status_body(tx), []
            deliveries = self._settle(conn, tx)
            return "ok", self._status_body(tx), deliveries

    def _settle(self, conn: psycopg.Connection, tx: GatewayTransaction) -> list[Delivery]:
        tx.transaction_status = "settlement"
        tx.settlement_time = _now_text()
        self._save_status(conn, tx)
        log_event(log, "standin_settled", gateway_order_id=tx.order_id)
        return self._queue_notification(conn, tx, "settlement")

    def settle_due(self) -> int:
        """Settle every card capture older than ``card_settlement_seconds``; how many settled."""
        with self.lock:
            after = float(self.faults["card_settlement_seconds"])
        deliveries: list[Delivery] = []
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT order_id FROM transactions WHERE transaction_status = 'capture'"
                " AND captured_at <= now() - make_interval(secs => %s)"
                " ORDER BY captured_at LIMIT 200 FOR UPDATE SKIP LOCKED", (after,),
            ).fetchall()
            for row in rows:
                tx = self._load(conn, row["order_id"])
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
            tx = self._load(conn, order_id, lock=True)
            if tx is None:
                return "not_found", []
            return "ok", self._queue_notification(conn, tx, status or tx.transaction_status)

    def record(self, order_id: str) -> dict[str, Any] | None:
        """Everything the gateway holds about one transaction, notifications and refunds included."""
        with self._transaction() as conn:
            tx = self._load(conn, order_id)
            if tx is None:
                return None
            notes = conn.execute(
                "SELECT id, body, copy, dropped, attempts, delivered, last_http_status, last_error"
                " FROM notifications WHERE order_id = %s ORDER BY id", (order_id,),
            ).fetchall()
        view = {name: getattr(tx, name) for name in _TRANSACTION_COLUMNS}
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
            return None if row is None else self._load(conn, row["order_id"])

    # notifications

    def _queue_notification(
        self, conn: psycopg.Connection, tx: GatewayTransaction, status: str
    ) -> list[Delivery]:
        """Record the notification copies for ``tx`` in the caller's transaction."""
        body = _describe(tx, self.server_key, status, "midtrans payment notification")
        with self.lock:
            dropped = bool(self.faults["drop_notifications"])
            copies = 1 + int(self.faults["duplicate_notifications"])
        deliveries = []
        for n in range(copies):
            row = conn.execute(
                "INSERT INTO notifications (order_id, copy, body, dropped) VALUES (%s, %s, %s, %s)"
                " RETURNING id",
                (tx.order_id, n, json.dumps(body), dropped),
            ).fetchone()
            deliveries.append(Delivery(id=row["id"], body=copy.deepcopy(body), copy=n, dropped=dropped))
        return deliveries

    def send(self, deliveries: list[Delivery]) -> None:
        """Deliver each copy on its own daemon thread; the request that caused it doesn't wait."""
        for delivery in deliveries:
            if delivery.dropped:
                log_event(log, "standin_notification_dropped", gateway_order_id=delivery.body["order_id"])
                continue
            with self.lock:
                jitter = self.random.uniform(0, self.faults["notification_jitter_ms"]) / 1000.0
            threading.Thread(target=self._deliver, args=(delivery, jitter), daemon=True,
                             name="standin-notify").start()

    def resume_deliveries(self) -> int:
        """Send again every notification a previous run of the stand-in had not finished delivering."""
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT id, body, copy FROM notifications WHERE delivered IS NULL AND NOT dropped ORDER BY id"
            ).fetchall()
        self.send([Delivery(id=r["id"], body=r["body"], copy=r["copy"]) for r in rows])
        if rows:
            log_event(log, "standin_notifications_resumed", count=len(rows))
        return len(rows)

    def _deliver(self, delivery: Delivery, delay: float) -> None:
        """POST until the merchant answers 2xx, retrying after each of ``retry_delays``.

        Recording an attempt in our own database may fail (the database is restarting): that is logged
        at ERROR and delivery goes on, because the merchant must hear of the payment either way; a
        delivery we could not record as done is sent again by a restarted stand-in, which the merchant
        deduplicates."""
        order_id = delivery.body.get("order_id")
        for pause in (delay, *self.retry_delays):
            time.sleep(pause)
            if self.closed:
                return
            status, error = self._post(delivery.body)
            delivered = status is not None and 200 <= status < 300
            self._record(delivery, status, error, True if delivered else None)
            if delivered:
                return
        self._record(delivery, None, None, False, attempt=False)
        log_event(log, "standin_notification_gave_up", logging.WARNING, gateway_order_id=order_id,
                  attempts=1 + len(self.retry_delays))

    def _record(self, delivery: Delivery, status: int | None, error: str | None, delivered: bool | None,
                *, attempt: bool = True) -> None:
        try:
            self._note_attempt(delivery, status, error, delivered, attempt=attempt)
        except Exception as exc:  # noqa: BLE001 - keep delivering; say loudly that the record is behind
            if not self.closed:
                log_event(log, "standin_delivery_not_recorded", logging.ERROR,
                          gateway_order_id=delivery.body.get("order_id"), notification=delivery.id,
                          delivered=delivered, error=f"{type(exc).__name__}: {exc}"[:300])

    def _note_attempt(
        self, delivery: Delivery, status: int | None, error: str | None, delivered: bool | None,
        *, attempt: bool = True,
    ) -> None:
        with self._transaction() as conn:
            if attempt:
                conn.execute(
                    "UPDATE notifications SET attempts = attempts + 1, last_http_status = %s,"
                    " last_error = %s, delivered = %s WHERE id = %s",
                    (status, error, delivered, delivery.id),
                )
            else:
                conn.execute("UPDATE notifications SET delivered = %s WHERE id = %s", (delivered, delivery.id))

    def _post(self, body: dict[str, Any]) -> tuple[int | None, str | None]:
        try:
            response = requests.post(self.notification_url, json=body, timeout=self.notification_timeout)
        except requests.RequestException as exc:
            return None, type(exc).__name__
        return response.status_code, None


# --- HTTP ------------------------------------------------------------------------------------------

def _json_error(status: int, message: str) -> Response:
    response = jsonify({"status_code": str(status), "status_message": message, "error_messages": [message]})
    response.status_code = status
    return response


def _protocol(gateway: StandinGateway, endpoint: str) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """Wrap a protocol endpoint: injected faults first (an outage happens before auth), then HTTP Basic
    with the server key. A "timeout" sleeps past the client's patience and then still does the work,
    like a real gateway that was slow rather than down."""
    def decorate(view: Callable[..., Response]) -> Callable[..., Response]:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Response:
            pause, fault = gateway.draw_fault(endpoint)
            if pause:
                time.sleep(pause)
            if fault == "error":
                return _json_error(500, "Sorry, we encountered internal server error. We will fix this soon.")
            if not _authorized(gateway.server_key):
                return _json_error(401, "Unknown Merchant server_key/id")
            return view(*args, **kwargs)
        return wrapped
    return decorate


def storable_text(value: str) -> bool:
    """Text PostgreSQL can hold: no NUL byte, nothing UTF-8 can't encode (a lone surrogate)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Midtrans' order_id: at most 50 characters, letters, digits and - _ ~ .
_ORDER_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_~.")


def _authorized(server_key: str) -> bool:
    auth = request.authorization
    if auth is None or auth.type != "basic" or auth.username is None:
        return False
    return hmac.compare_digest(auth.username.encode("utf-8"), server_key.encode("utf-8"))


def _snap_request(body: Any) -> tuple[str, int, str | None, str | None]:
    """(order_id, gross_amount, email, item_name) from a Snap create body; ValueError says what's wrong."""
    details = body.get("transaction_details") if isinstance(body, dict) else None
    if not isinstance(details, dict):
        raise ValueError("transaction_details is required")
    order_id, gross = details.get("order_id"), details.get("gross_amount")
    if not isinstance(order_id, str) or not order_id or len(order_id) > 50:
        raise ValueError("transaction_details.order_id is required (at most 50 characters)")
    if not set(order_id) <= _ORDER_ID_CHARS:
        raise ValueError("transaction_details.order_id may hold only letters, digits and - _ ~ .")
    if isinstance(gross, bool) or not isinstance(gross, (int, float)) or gross != int(gross) or gross < 1:
        raise ValueError("transaction_details.gross_amount must be a positive whole number")
    items = body.get("item_details")
    if items is not None:
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ValueError("item_details must be a list of objects")
        try:
            total = sum(int(i.get("price") or 0) * int(i.get("quantity") or 0) for i in items)
        except (TypeError, ValueError):
            raise ValueError("item_details price and quantity must be numbers") from None
        if total != gross:
            raise ValueError("transaction_details.gross_amount is not equal to the sum of item_details")
    customer = body.get("customer_details") or {}
    email = customer.get("email") if isinstance(customer, dict) else None
    item_name = items[0].get("name") if items else None
    for name, value in (("customer_details.email", email), ("item_details.name", item_name)):
        if value is not None and (not isinstance(value, str) or not storable_text(value)):
            raise ValueError(f"{name} must be text without NUL bytes")
    return order_id, int(gross), email, item_name


def _answer(http_status: int, body: dict[str, Any]) -> Response:
    response = jsonify(body)
    response.status_code = http_status
    return response


def _register_protocol(app: Flask, gateway: StandinGateway) -> None:
    @app.before_request
    def unknown_unless_storable() -> Response | None:
        """An id no transaction can have (a NUL byte, a lone surrogate) names nothing: 404, as for any
        unknown order, instead of an error from the database."""
        if any(isinstance(v, str) and not storable_text(v) for v in (request.view_args or {}).values()):
            return _json_error(404, NOT_FOUND["status_message"])
        return None

    @app.post("/snap/v1/transactions")
    @_protocol(gateway, "create")
    def snap_create() -> Response:
        try:
            order_id, gross, email, item_name = _snap_request(request.get_json(silent=True))
        except ValueError as exc:
            return _json_error(400, str(exc))
        tx = gateway.create(order_id, gross, email, item_name)
        if tx is None:
            return _json_error(409, "transaction_details.order_id has already been taken")
        return _answer(201, {"token": tx.token, "redirect_url": gateway.redirect_url(tx)})

    @app.get("/v2/<order_id>/status")
    @_protocol(gateway, "status")
    def status(order_id: str) -> Response:
        body = gateway.status(order_id)
        if body is None:
            return _json_error(404, NOT_FOUND["status_message"])
        return jsonify(body)

    @app.post("/v2/<order_id>/refund")
    @_protocol(gateway, "refund")
    def refund(order_id: str) -> Response:
        body = request.get_json(silent=True) or {}
        amount = body.get("amount")
        if amount is not None and (isinstance(amount, bool) or not isinstance(amount, int)):
            return _json_error(400, "amount must be a whole number of rupiah")
        refund_key = str(body.get("refund_key") or uuid.uuid4())
        reason = str(body.get("reason") or "")
        if not (storable_text(refund_key) and storable_text(reason)) or len(refund_key) > 100:
            return _json_error(400, "refund_key (at most 100 characters) and reason must be text without NUL bytes")
        http_status, answer, deliveries = gateway.refund(order_id, refund_key, amount, reason)
        gateway.send(deliveries)
        return _answer(http_status, answer)

    @app.post("/v2/<order_id>/expire")
    @_protocol(gateway, "expire")
    def merchant_expire(order_id: str) -> Response:
        http_status, answer, deliveries = gateway.close_transaction(order_id, "expire")
        gateway.send(deliveries)
        return _answer(http_status, answer)

    @app.post("/v2/<order_id>/cancel")
    @_protocol(gateway, "cancel")
    def merchant_cancel(order_id: str) -> Response:
        http_status, answer, deliveries = gateway.close_transaction(order_id, "cancel")
        gateway.send(deliveries)
        return _answer(http_status, answer)


PAY_PAGE = """<!doctype html>
<html lang="id"><head><meta charset="utf-8"><title>Pembayaran (simulasi)</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; max-width: 28rem; margin: 2rem auto">
<h1>Pembayaran e-Meterai</h1>
<p><small>Gateway simulasi untuk demo &mdash; tidak ada uang sungguhan yang berpindah.</small></p>
<p>Nomor pesanan: <code>{order_id}</code><br>Total: <strong>{amount}</strong><br>Status: {status}</p>
{form}
</body></html>"""

PAY_FORM = """<form method="post" action="/sandbox/pay/{order_id}">
<label>Metode pembayaran
<select name="payment_type">
<option value="qris">QRIS</option><option value="gopay">GoPay</option>
<option value="shopeepay">ShopeePay</option>
<option value="credit_card">Kartu kredit</option><option value="bank_transfer">Transfer bank (VA)</option>
</select></label>
<button type="submit">Bayar sekarang</button>
</form>"""

STATUS_WORDS = {
    "pending": "menunggu pembayaran", "settlement": "lunas", "capture": "lunas", "expire": "kedaluwarsa",
    "refund": "dana dikembalikan", "partial_refund": "dana dikembalikan sebagian",
    "cancel": "dibatalkan", "deny": "ditolak",
}


def _rupiah(amount: int) -> str:
    return "Rp" + f"{amount:,}".replace(",", ".")


def _html(text: str, status: int = 200) -> Response:
    return Response(text, status=status, mimetype="text/html")


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"))


def _register_sandbox(app: Flask, gateway: StandinGateway) -> None:
    @app.get("/snap/v2/vtweb/<token>")
    def pay_page(token: str) -> Response:
        tx = gateway.order_for_token(token)
        if tx is None:
            return _html("<p>Tautan pembayaran tidak ditemukan.</p>", 404)
        form = PAY_FORM.format(order_id=escape(tx.order_id)) if tx.transaction_status == "pending" else ""
        return _html(PAY_PAGE.format(
            order_id=escape(tx.order_id), amount=_rupiah(tx.gross_amount),
            status=STATUS_WORDS.get(tx.transaction_status, tx.transaction_status), form=form,
        ))

    @app.post("/sandbox/pay/<order_id>")
    def sandbox_pay(order_id: str) -> Response:
        from_form = not request.is_json
        body = request.form if from_form else (request.get_json(silent=True) or {})
        payment_type = body.get("payment_type") or "qris"
        if payment_type not in PAYMENT_TYPES:
            return _json_error(400, f"payment_type must be one of {', '.join(PAYMENT_TYPES)}")
        bank = body.get("bank") or "bca"
        if bank not in VA_BANKS:
            return _json_error(400, f"bank must be one of {', '.join(VA_BANKS)}")
        outcome, status_body, deliveries = gateway.pay(
            order_id, payment_type, bank=bank, after_expiry=_truthy(body.get("after_expiry")))
        gateway.send(deliveries)
        if from_form:
            return _pay_outcome_page(outcome)
        return _sandbox_answer(outcome, status_body)

    @app.post("/sandbox/expire/<order_id>")
    def sandbox_expire(order_id: str) -> Response:
        outcome, status_body, deliveries = gateway.expire(order_id)
        gateway.send(deliveries)
        return _sandbox_answer(outcome, status_body)

    @app.post("/sandbox/notify/<order_id>")
    def sandbox_notify(order_id: str) -> Response:
        status = (request.get_json(silent=True) or {}).get("transaction_status")
        outcome, deliveries = gateway.renotify(order_id, status)
        if outcome == "bad_status":
            return _json_error(400, f"unknown transaction_status: {status}")
        gateway.send(deliveries)
        if outcome == "not_found":
            return _json_error(404, NOT_FOUND["status_message"])
        first = deliveries[0].body if deliveries else None
        return _answer(202, {"queued": len(deliveries), "notification": first})

    @app.post("/sandbox/settle/<order_id>")
    def sandbox_settle(order_id: str) -> Response:
        outcome, status_body, deliveries = gateway.settle(order_id)
        gateway.send(deliveries)
        return _sandbox_answer(outcome, status_body)

    @app.get("/sandbox/captures")
    def sandbox_captures() -> Response:
        if not _authorized(gateway.server_key):
            return _json_error(401, "Unknown Merchant server_key/id")
        try:
            start, end = (_moment(request.args.get(name, "")) for name in ("from", "to"))
        except ValueError:
            return _json_error(400, "from and to must be ISO 8601 date-times with an offset")
        if end <= start:
            return _json_error(400, "to must be later than from")
        return jsonify({"status_code": "200", "captures": gateway.captures(start, end)})

    @app.route("/sandbox/faults", methods=["GET", "POST", "DELETE"])
    def sandbox_faults() -> Response:
        if request.method == "DELETE":
            return jsonify(gateway.reset_faults())
        if request.method == "GET":
            return jsonify(gateway.get_faults())
        try:
            return jsonify(gateway.set_faults(request.get_json(silent=True)))
        except ValueError as exc:
            return _json_error(400, str(exc))

    @app.get("/sandbox/transactions/<order_id>")
    def sandbox_transaction(order_id: str) -> Response:
        record = gateway.record(order_id)
        if record is None:
            return _json_error(404, NOT_FOUND["status_message"])
        return jsonify(record)


def _moment(text: str) -> datetime:
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        raise ValueError("no offset")
    return moment


def _sandbox_answer(outcome: str, status_body: dict[str, Any] | None) -> Response:
    if outcome == "not_found":
        return _json_error(404, NOT_FOUND["status_message"])
    return _answer(200 if outcome == "ok" else 409, status_body or {})


def _pay_outcome_page(outcome: str) -> Response:
    if outcome == "ok":
        return _html("<p>Pembayaran berhasil. Silakan kembali ke halaman pesanan Anda.</p>")
    if outcome == "not_pending":
        return _html("<p>Transaksi ini tidak lagi menunggu pembayaran.</p>", 409)
    return _html("<p>Transaksi tidak ditemukan.</p>", 404)


class NotASandbox(RuntimeError):
    """The stand-in was asked to start without being configured as a sandbox."""


def create_standin_app(
    server_key: str,
    notification_url: str,
    public_url: str,
    *,
    sandbox: bool,
    database_url: str,
    schema: str = DEFAULT_SCHEMA,
    seed: int | None = None,
    notification_retry_delays: Sequence[float] = (0.5, 2.0, 5.0),
    notification_timeout: float = 5.0,
) -> Flask:
    """The stand-in gateway as a Flask app, its state in ``schema`` of ``database_url`` (created and
    migrated here). ``public_url`` is where buyers' browsers reach it (used in ``redirect_url``);
    ``seed`` makes injected faults reproducible. Notifications a previous run left undelivered are
    sent again. ``app.extensions["standin_gateway"].close()`` releases the database.

    ``sandbox=True`` is required, and says the caller knows what this is: its sandbox endpoints let
    anyone "pay" for stamps, and read buyers' e-mails, virtual-account numbers and signed notifications.
    """
    if sandbox is not True:
        raise NotASandbox("the stand-in gateway starts only as a sandbox (sandbox=True): its sandbox "
                          "endpoints take no money and hand out paid stamps")
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    gateway = StandinGateway(
        server_key, notification_url, public_url, database_url=database_url, schema=schema, seed=seed,
        notification_retry_delays=notification_retry_delays, notification_timeout=notification_timeout,
    )
    app.extensions["standin_gateway"] = gateway
    _register_protocol(app, gateway)
    _register_sandbox(app, gateway)
    gateway.resume_deliveries()
    gateway.start_settling()
    return app


def parse_delays(text: str) -> tuple[float, ...]:
    """``"0.5,2,5"`` -> ``(0.5, 2.0, 5.0)``: seconds before each further delivery attempt."""
    delays = tuple(float(part) for part in text.split(",") if part.strip())
    if not delays or any(d < 0 or d != d for d in delays):
        raise ValueError(f"not a list of non-negative seconds: {text!r}")
    return delays


REFUSAL = ("The stand-in payment gateway is a sandbox: it takes no money, and its sandbox endpoints let "
           "anyone pay for stamps and read buyers' details. It starts only with DEVELOPMENT=1 (a "
           "development machine, tests, drills); production uses the real gateway (GATEWAY_URL).")


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the stand-in with werkzeug's threaded server, configured like every other process."""
    from shared.config import get_settings
    from werkzeug.serving import run_simple

    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not settings.development:
        log_event(log, "standin_refused", logging.ERROR, reason="DEVELOPMENT is not 1")
        print(f"python -m shared.payments.standin: {REFUSAL}", file=sys.stderr)
        raise SystemExit(2)
    parser = argparse.ArgumentParser(prog="python -m shared.payments.standin",
                                     description="Stand-in Midtrans payment gateway (a sandbox).")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=settings.gateway_port)
    parser.add_argument("--seed", type=int, default=None, help="seed for injected faults")
    parser.add_argument("--notification-retry-delays", type=parse_delays, default=None,
                        help="seconds between notification delivery attempts, comma-separated "
                             "(default STANDIN_NOTIFICATION_RETRY_DELAYS)")
    args = parser.parse_args(argv)
    try:
        delays = args.notification_retry_delays or parse_delays(settings.standin_notification_retry_delays)
    except ValueError as exc:
        parser.error(f"STANDIN_NOTIFICATION_RETRY_DELAYS: {exc}")
    app = create_standin_app(
        settings.gateway_server_key, settings.notification_url, settings.gateway_url, sandbox=True,
        database_url=settings.standin_database_url or settings.database_url,
        schema=settings.standin_schema, seed=args.seed, notification_retry_delays=delays,
    )
    log_event(log, "standin_listening", host=args.host, port=args.port, notify=settings.notification_url,
              schema=settings.standin_schema, notification_retry_delays=list(delays))
    run_simple(args.host, args.port, app, threaded=True)


if __name__ == "__main__":
    main()
