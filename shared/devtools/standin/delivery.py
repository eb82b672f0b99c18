"""Notification delivery: the stand-in tells the merchant, as Midtrans does, and keeps trying.

Each notification copy is recorded in the caller's database transaction (:meth:`Notifier.queue`) and sent
after the commit on a thread of its own, retried after each of the configured delays until the merchant
answers 2xx. Undelivered copies survive a restart: a new stand-in sends them again (:meth:`Notifier.resume`).
"""
from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Sequence

import psycopg
import requests
from psycopg_pool import ConnectionPool

from shared.devtools.standin.faults import Faults
from shared.devtools.standin.records import Delivery, GatewayTransaction, describe
from shared.logs import log_event

log = logging.getLogger(__name__)


class Notifier:
    """Records, sends and re-sends notification copies; ``closed`` makes running deliveries give up quietly."""

    def __init__(self, pool: ConnectionPool, faults: Faults, server_key: str, notification_url: str, *,
                 retry_delays: Sequence[float], timeout: float) -> None:
        self.pool = pool
        self.faults = faults
        self.server_key = server_key
        self.notification_url = notification_url
        self.retry_delays = tuple(retry_delays)
        self.notification_timeout = timeout
        self.closed = False

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        with self.pool.connection() as conn:
            with conn.transaction():
                yield conn

    def queue(self, conn: psycopg.Connection, tx: GatewayTransaction, status: str) -> list[Delivery]:
        """Record the notification copies for ``tx`` in the caller's transaction (one, more when the
        ``duplicate_notifications`` knob says so, marked dropped when ``drop_notifications`` does)."""
        body = describe(tx, self.server_key, status, "midtrans payment notification")
        dropped = bool(self.faults.get("drop_notifications"))
        copies = 1 + int(self.faults.get("duplicate_notifications"))
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
            jitter = self.faults.notification_jitter()
            threading.Thread(target=self._deliver, args=(delivery, jitter), daemon=True,
                             name="standin-notify").start()

    def resume(self) -> int:
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
