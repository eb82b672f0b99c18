"""The stand-in gateway keeps its state in its own PostgreSQL schema and survives being killed.

The stand-in runs here as the real process (``python -m shared.payments.standin``), configured only by
environment like in the Procfile, and is killed with SIGKILL mid-delivery: what it knew before, it knows
after; a refund key it answered before is answered the same way; a notification it had not delivered yet
is delivered by the restarted process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from typing import Any, Iterator

import psycopg
import pytest
import requests
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from shared import devenv
from shared.payments.gateway import CircuitBreaker, MidtransGateway, verify_notification
from shared.payments.standin_db import migrate
from tests.conftest import ROOT, wait_until

SERVER_KEY = "SB-Mid-server-durable"
PRICE = 12_500


class Receiver:
    """Our notification endpoint, reduced to a list of bodies; it can be told to answer 503."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.failing = False
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if self.failing:
            return Response("down", status=503)(environ, start_response)
        with self.lock:
            self.bodies.append(json.loads(Request(environ).get_data()))
        return Response("OK")(environ, start_response)

    def statuses(self, order_id: str) -> list[str]:
        with self.lock:
            return [b["transaction_status"] for b in self.bodies if b["order_id"] == order_id]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    app = Receiver()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield app, f"http://127.0.0.1:{server.server_port}/notifications"
    server.shutdown()
    server.server_close()


@pytest.fixture
def schema(database_url: str) -> Iterator[str]:
    name = f"standin_d{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


class StandinProcess:
    """``python -m shared.payments.standin`` on a fixed port, pointed at a schema by environment only."""

    def __init__(self, database_url: str, schema: str, notification_url: str) -> None:
        self.port = devenv.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            # The stand-in's own store; DATABASE_URL points nowhere, so nothing else can be used.
            "STANDIN_DATABASE_URL": database_url,
            "STANDIN_SCHEMA": schema,
            "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nothing",
            "GATEWAY_SERVER_KEY": SERVER_KEY,
            "GATEWAY_URL": self.url,
            "NOTIFICATION_URL": notification_url,
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shared.payments.standin", "--port", str(self.port),
             "--notification-retry-delays", "0.3,0.5,1,2,4,8"],
            cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(lambda: devenv.port_accepts(self.port) or self.proc.poll() is not None,
                   timeout=30, message="the stand-in to listen")
        assert self.proc.poll() is None, "the stand-in exited at start"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def standin(database_url: str, schema: str, receiver: tuple[Receiver, str]) -> Iterator[StandinProcess]:
    process = StandinProcess(database_url, schema, receiver[1])
    process.start()
    yield process
    process.kill()


def _sandbox(process: StandinProcess, path: str, body: dict[str, Any] | None = None) -> requests.Response:
    return requests.post(f"{process.url}/sandbox/{path}", json=body or {}, timeout=5)


def _record(process: StandinProcess, order_id: str) -> dict[str, Any]:
    return requests.get(f"{process.url}/sandbox/transactions/{order_id}", timeout=5).json()


def test_standin_killed_mid_delivery_keeps_everything_and_finishes_delivering(
    standin: StandinProcess, receiver: tuple[Receiver, str]
) -> None:
    notes = receiver[0]
    gateway = MidtransGateway(standin.url, SERVER_KEY, timeout=2.0, breaker=CircuitBreaker())
    gateway.create_transaction("MTR-open", PRICE, email="a@example.id", item_name="e-Meterai")
    gateway.create_transaction("MTR-refunded", PRICE, email="b@example.id", item_name="e-Meterai")
    assert _sandbox(standin, "pay/MTR-refunded").status_code == 200
    first_refund = gateway.refund("MTR-refunded", refund_key="refund-1", amount=PRICE, reason="gagal")
    gateway.create_transaction("MTR-va", PRICE, email="c@example.id", item_name="e-Meterai")
    assert _sandbox(standin, "pay/MTR-va", {"payment_type": "bank_transfer"}).status_code == 200
    va_before = gateway.get_status("MTR-va")
    wait_until(lambda: notes.statuses("MTR-va") == ["settlement"], message="VA notification")
    # Our endpoint goes down; a payment's notification is still being retried when the gateway dies.
    notes.failing = True
    gateway.create_transaction("MTR-unsent", PRICE, email="d@example.id", item_name="e-Meterai")
    assert _sandbox(standin, "pay/MTR-unsent").status_code == 200
    wait_until(lambda: _record(standin, "MTR-unsent")["notifications"][0]["attempts"] >= 1,
               message="a failed delivery attempt")

    standin.kill()
    notes.failing = False
    standin.start()

    open_status = gateway.get_status("MTR-open")
    assert open_status is not None and open_status.transaction_status == "pending"
    again = gateway.refund("MTR-refunded", refund_key="refund-1", amount=PRICE, reason="gagal")
    assert again == first_refund and again.refunded
    assert [r["refund_key"] for r in _record(standin, "MTR-refunded")["refunds"]] == ["refund-1"]
    assert gateway.get_status("MTR-va") == va_before and va_before.va_number
    wait_until(lambda: notes.statuses("MTR-unsent") == ["settlement"], timeout=20,
               message="the undelivered notification, sent by the restarted stand-in")
    [delivery] = _record(standin, "MTR-unsent")["notifications"]
    assert delivery["delivered"] is True and delivery["attempts"] >= 2
    assert verify_notification(notes.bodies[-1], SERVER_KEY)
    assert _sandbox(standin, "pay/MTR-open").status_code == 200  # still payable after the restart
    paid = gateway.get_status("MTR-open")
    assert paid is not None and paid.transaction_status == "settlement"


def test_standin_schema_is_its_own_and_migrated_once(database_url: str, schema: str) -> None:
    assert migrate(database_url, schema) == ["0001_standin.sql"]
    assert migrate(database_url, schema) == []
    with psycopg.connect(database_url) as conn:
        tables = {row[0] for row in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,))}
        ours = {row[0] for row in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
    assert tables == {"schema_migrations", "transactions", "refunds", "notifications"}
    assert "orders" in ours and not ours & {"transactions", "notifications"}
    with pytest.raises(ValueError):
        migrate(database_url, "standin; DROP TABLE orders")
