"""The stand-in gateway keeps its state in its own PostgreSQL schema and survives being killed.

The stand-in runs here as the real process (``python -m shared.devtools.standin``), configured only by
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
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest
import requests
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from shared.devtools.services import free_port, port_accepts
from shared.payments.gateway import CircuitBreaker, MidtransGateway, verify_notification
from shared.devtools.standin.store import migrate
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
    """``python -m shared.devtools.standin`` on a fixed port, pointed at a schema by environment only."""

    def __init__(self, database_url: str, schema: str, notification_url: str, log_path: Path,
                 args: tuple[str, ...] = ("--notification-retry-delays", "0.3,0.5,1,2,4,8"),
                 **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.log_path = log_path
        self.env = {
            **os.environ,
            "DEVELOPMENT": "1",  # the stand-in is a sandbox: it starts on a development machine only
            # The stand-in's own store; DATABASE_URL points nowhere, so nothing else can be used.
            "STANDIN_DATABASE_URL": database_url,
            "STANDIN_SCHEMA": schema,
            "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nothing",
            "GATEWAY_SERVER_KEY": SERVER_KEY,
            "GATEWAY_URL": self.url,
            "NOTIFICATION_URL": notification_url,
            **env,
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shared.devtools.standin", "--port", str(self.port), *self.args],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_until(lambda: port_accepts(self.port) or self.proc.poll() is not None,
                   timeout=30, message="the stand-in to listen")
        assert self.proc.poll() is None, "the stand-in exited at start"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def standin(database_url: str, schema: str, receiver: tuple[Receiver, str],
            tmp_path: Path) -> Iterator[StandinProcess]:
    process = StandinProcess(database_url, schema, receiver[1], tmp_path / "standin.log")
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
    # The stand-in records the delivery after the receiver answered it: ask until it has.
    wait_until(lambda: _record(standin, "MTR-unsent")["notifications"][0]["delivered"] is True, timeout=10,
               message="the stand-in to record the delivery")
    [delivery] = _record(standin, "MTR-unsent")["notifications"]
    assert delivery["attempts"] >= 2
    assert verify_notification(notes.bodies[-1], SERVER_KEY)
    assert _sandbox(standin, "pay/MTR-open").status_code == 200  # still payable after the restart
    paid = gateway.get_status("MTR-open")
    assert paid is not None and paid.transaction_status == "settlement"


def test_standin_schema_is_its_own_and_migrated_once(database_url: str, schema: str) -> None:
    assert migrate(database_url, schema) == ["0001_standin.sql", "0002_captures.sql"]
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


def test_one_migration_runner_keeps_each_schemas_history_and_applies_each_file_once(
        database_url: str, schema: str) -> None:
    """meterai's migrations and the stand-in's go through one runner: runners racing on a fresh schema
    apply each of its files once, into that schema's own history, and meterai's history is not touched."""
    from concurrent.futures import ThreadPoolExecutor

    from shared.db.migrate import apply_migrations, migration_files

    standin = [name for name, _ in migration_files("shared.devtools.standin")]
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _: apply_migrations(database_url, package="shared.devtools.standin",
                                                        schema=schema), range(4)))

    assert sorted(name for run in runs for name in run) == standin
    assert apply_migrations(database_url) == []  # the session applied meterai's own; nothing new there
    with psycopg.connect(database_url) as conn:
        ours = [row[0] for row in conn.execute(f"SELECT name FROM {schema}.schema_migrations ORDER BY name")]
        core = [row[0] for row in conn.execute("SELECT name FROM public.schema_migrations ORDER BY name")]
    assert ours == standin
    assert core == [name for name, _ in migration_files()]


# --- a sandbox, and only a sandbox -----------------------------------------------------------------

def test_standin_refuses_to_start_unless_development(database_url: str, schema: str, tmp_path: Path) -> None:
    process = StandinProcess(database_url, schema, "http://127.0.0.1:9/none", tmp_path / "standin.log",
                             DEVELOPMENT="0")
    result = subprocess.run([sys.executable, "-m", "shared.devtools.standin", "--port", str(process.port)],
                            cwd=ROOT, env=process.env, capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert "starts only with DEVELOPMENT=1" in result.stderr
    assert not port_accepts(process.port)


def test_standin_app_must_be_asked_for_as_a_sandbox(database_url: str, schema: str) -> None:
    from shared.devtools.standin import NotASandbox, create_standin_app

    with pytest.raises(TypeError):
        create_standin_app(SERVER_KEY, "http://127.0.0.1:9/", "http://127.0.0.1:9",  # type: ignore[call-arg]
                           database_url=database_url, schema=schema)
    with pytest.raises(NotASandbox):
        create_standin_app(SERVER_KEY, "http://127.0.0.1:9/", "http://127.0.0.1:9", sandbox=False,
                           database_url=database_url, schema=schema)


# --- notification delivery ---------------------------------------------------------------------------

def test_notification_retry_schedule_is_a_setting(
    database_url: str, schema: str, receiver: tuple[Receiver, str], tmp_path: Path
) -> None:
    """Started like the Procfile starts it (no flag), the stand-in retries on the setting's schedule
    and says so when it gives up."""
    notes = receiver[0]
    notes.failing = True
    process = StandinProcess(database_url, schema, receiver[1], tmp_path / "standin.log", args=(),
                             STANDIN_NOTIFICATION_RETRY_DELAYS="0.1,0.1")
    process.start()
    try:
        gateway = MidtransGateway(process.url, SERVER_KEY, timeout=2.0, breaker=CircuitBreaker())
        gateway.create_transaction("MTR-schedule", PRICE, email="a@example.id", item_name="e-Meterai")
        assert _sandbox(process, "pay/MTR-schedule").status_code == 200
        wait_until(lambda: _record(process, "MTR-schedule")["notifications"][0]["delivered"] is False,
                   timeout=20, message="the stand-in to give up")
        [delivery] = _record(process, "MTR-schedule")["notifications"]
        assert delivery["attempts"] == 3 and delivery["last_http_status"] == 503  # first try + 2 retries
        wait_until(lambda: "standin_notification_gave_up" in process.log_path.read_text(), timeout=10,
                   message="the gave-up line, written after the record")
        assert 'notification_retry_delays="[0.1, 0.1]"' in process.log_path.read_text()
    finally:
        process.kill()


def test_delivery_goes_on_when_the_standins_own_database_write_fails(
    database_url: str, schema: str, receiver: tuple[Receiver, str], tmp_path: Path
) -> None:
    """The merchant must hear of a payment even while the stand-in can't record its attempts: the
    failure is logged at ERROR and the delivery keeps trying."""
    notes = receiver[0]
    notes.failing = True
    process = StandinProcess(database_url, schema, receiver[1], tmp_path / "standin.log",
                             args=("--notification-retry-delays", "0.2,1.5,1.5,1.5,1.5"))
    process.start()
    try:
        gateway = MidtransGateway(process.url, SERVER_KEY, timeout=2.0, breaker=CircuitBreaker())
        gateway.create_transaction("MTR-nodb", PRICE, email="a@example.id", item_name="e-Meterai")
        assert _sandbox(process, "pay/MTR-nodb").status_code == 200
        wait_until(lambda: _record(process, "MTR-nodb")["notifications"][0]["attempts"] >= 1,
                   message="a recorded failed attempt")
        with psycopg.connect(database_url, autocommit=True) as conn:  # its table goes away under it
            conn.execute(f"ALTER TABLE {schema}.notifications RENAME TO notifications_away")
        try:
            wait_until(lambda: "standin_delivery_not_recorded" in process.log_path.read_text(), timeout=10,
                       message="the failed database write, logged")
            notes.failing = False
            wait_until(lambda: notes.statuses("MTR-nodb") == ["settlement"], timeout=10,
                       message="the notification delivered anyway")
        finally:
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(f"ALTER TABLE {schema}.notifications_away RENAME TO notifications")
        assert verify_notification(notes.bodies[-1], SERVER_KEY)
        assert any(" ERROR " in line for line in process.log_path.read_text().splitlines()
                   if "standin_delivery_not_recorded" in line)
    finally:
        process.kill()
