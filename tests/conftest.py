"""The test system: a real PostgreSQL database, a private Redis, and the processes the Procfile names,
run by the one launcher (:mod:`shared.devtools.launcher`) exactly as ``./dev up`` runs them.

Each session creates its own database (and drops it), starts its own redis-server on a free port (so a
test may restart it empty), and runs web under gunicorn, one Celery worker per Procfile group
(checkout, payments, refunds, stamping, housekeeping) and the stand-in gateway of ``Procfile.dev``, with
restarts off, so a test can stop or kill any one of them (stamping stops while payments still flow) or
start a copy of one with settings of its own. Beat stays off: tests run the periodic jobs themselves.

E-mail: the mail workers send to one session-wide SMTP server in this process (:func:`mailbox`, a real
aiosmtpd, :mod:`shared.devtools.smtp`); a test reads what arrived with ``sys_.mails(order_id)`` and
``sys_.wait_mail(order_id, kind)``, and the order page link in a message with ``order_link(message)``
(``sys_.mail_link(message)`` splits it into order id and token). A test may stop the mailbox (an SMTP
outage) or make it refuse or answer late (``sys_.mailbox.fault``); ``sys_`` starts it again, well behaved.

The document store: the session system keeps documents on the filesystem. Tests marked
:data:`BOTH_STORES` run twice, the second time on a second system (its own database, Redis prefix and
processes, started at the first such test) whose store is a private SeaweedFS (a real S3-compatible
server, :func:`seaweedfs`).
"""
from __future__ import annotations

import io
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Callable

import psycopg
import pytest
import requests
from psycopg.rows import dict_row
from reportlab.lib.pagesizes import A4
from reportlab.pdfgen import canvas
from werkzeug.serving import make_server

from shared import statuscache
from shared.broker import use_broker
from shared.config import Settings, load_settings
from shared.db import close_pools
from shared.db.migrate import apply_migrations
from shared.devtools.launcher import Launcher, Process
from shared.devtools.pki import ensure_dev_pki
from shared.devtools.services import (RedisHandle, SeaweedHandle, free_port, postgres_answers,
                                      start_private_postgres, start_private_redis, start_seaweedfs)
from shared.devtools.smtp import Mailbox, order_link
from shared.jobs import set_publisher
from shared.store import DocumentStore, store_from_settings

# Every process a test starts counts its metrics under one scratch folder, whichever test runs first (the
# first import of shared.metrics, which none of the imports above makes, would otherwise decide, and a
# test that inspects a node's data folder would find metrics files there when run on its own).
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="meterai-test-metrics-"))

ROOT = Path(__file__).resolve().parents[1]
SERVER_KEY = "SB-Mid-server-test-key"
# The Procfile's worker groups, and every process of the session's system (beat stays off).
WORKERS = ("checkout", "payments", "refunds", "stamping", "housekeeping", "reconcile", "mail")
PROCESSES = ("web", *WORKERS, "gateway")
STORES = ("fs", "s3")
# Run a test against both document stores: the filesystem and a real S3-compatible server (SeaweedFS).
BOTH_STORES = pytest.mark.parametrize("store", STORES)


def make_pdf(pages: int = 2, text: str = "Surat Lamaran CPNS", size=A4) -> bytes:
    """A plain text PDF like the ones applicants upload."""
    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=size)
    for n in range(1, pages + 1):
        c.setFont("Helvetica", 14)
        c.drawString(72, size[1] - 100, f"{text} halaman {n}")
        c.drawString(72, size[1] - 130, "Yang bertanda tangan di bawah ini menyatakan dengan sebenarnya.")
        c.showPage()
    c.save()
    return buf.getvalue()


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1,
               message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class ServerThread:
    """A WSGI app a test builds with settings of its own, served over real HTTP from a background thread
    (the system's web runs under gunicorn, see :func:`system`)."""

    def __init__(self, app, port: int) -> None:
        self.app = app
        self.server = make_server("127.0.0.1", port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()  # free the port, so a restarted server can bind it again


@dataclass
class System:
    settings: Settings
    web_url: str
    gateway_url: str
    redis: RedisHandle
    launcher: Launcher
    env: dict[str, str]
    tmp: Path
    store_kind: str = "fs"
    seaweed: SeaweedHandle | None = None
    publisher: Any = None
    mailbox: Mailbox | None = None
    http: requests.Session = field(default_factory=requests.Session)

    @property
    def store(self) -> DocumentStore:
        """The system's document store, as its processes see it (tests put and read through it)."""
        if not hasattr(self, "_store"):
            self._store = store_from_settings(self.settings)
        return self._store

    def paid_orders_past_deadline(self, count: int) -> list[str]:
        """Orders that were paid but never stamped, now past their deadline. Stamping is stopped while
        they are paid so the test, not a race, decides their state (``sys_`` starts it again)."""
        self.stop("stamping")
        ids = []
        for _ in range(count):
            order_id, token, view = self.order_awaiting_payment()
            self.pay(view["payment"]["gateway_order_id"])
            self.wait_status(order_id, token, "paid")
            ids.append(order_id)
        # Every notification applied first: an apply holds its order's row, which a sweep then skips.
        wait_until(lambda: not self.query("SELECT 1 FROM payment_notifications WHERE processed_at IS NULL"),
                   message="the payment notifications applied")
        self.query("UPDATE orders SET refund_due_at = now() - interval '1 second'"
                   " WHERE status = 'paid' RETURNING id")
        return ids

    def sweep_one(self, order_id: str) -> None:
        """Sweep until the sweep has taken ``order_id`` (judged by its status): a sweep skips a row another
        transaction holds (``SKIP LOCKED``), and a gateway notification's apply (a settlement, a repeated
        copy of the capture) can hold the order's row just then; the next sweep takes it."""
        from shared.services import housekeeping

        def taken() -> bool:
            housekeeping.sweep_refunds(self.settings)
            return self.order_row(order_id)["status"] not in ("paid", "stamping")

        wait_until(taken, timeout=10, interval=0.05, message=f"the sweep to take {order_id}")
        assert self.order_row(order_id)["status"] not in ("paid", "stamping")

    def replace_upload(self, order_id: str, data: bytes) -> None:
        """Swap an order's upload for ``data`` after preflight, as if the buyer had sent it (its digest is
        recorded too, so the worker meets these bytes, not a store that lost the buyer's)."""
        import hashlib

        self.store.put(self.order_row(order_id)["document_key"], data)
        self.query("UPDATE orders SET document_sha256 = %s WHERE id = %s RETURNING id",
                   (hashlib.sha256(data).hexdigest(), order_id))

    def stored_keys(self, prefix: str) -> list[str]:
        """Keys in the store that start with ``prefix`` (e.g. ``stamped/<order>``)."""
        if self.seaweed is None:
            folder, _, start = prefix.rpartition("/")
            return sorted(f"{folder}/{p.name}" for p in (self.settings.documents_path / folder).glob(f"{start}*"))
        listed = self.seaweed.client().list_objects_v2(Bucket=self.seaweed.bucket, Prefix=prefix)
        return sorted(item["Key"] for item in listed.get("Contents", []))

    # -- e-mail (the session's mailbox: what the mail workers sent) ----------------------------------
    def mails(self, order_id: str | None = None, kind: str | None = None) -> list[EmailMessage]:
        """Messages received for ``order_id`` (of ``kind``: a :class:`shared.lifecycle.Mail` value),
        oldest first; every send of one (order, kind) carries the Message-ID ``<kind.order_id@…>``."""
        assert self.mailbox is not None

        def matches(message: EmailMessage) -> bool:
            sent_kind, _, rest = (message["Message-ID"] or "").strip("<>").partition(".")
            return (order_id is None or rest.split("@")[0] == order_id) and kind in (None, sent_kind)

        return [m for m in self.mailbox.messages() if matches(m)]

    def wait_mail(self, order_id: str, kind: str, timeout: float = 30) -> EmailMessage:
        """The first message of ``kind`` for the order, once it has arrived."""
        return wait_until(lambda: (self.mails(order_id, kind) or [None])[0], timeout=timeout,
                          message=f"the {kind} e-mail of order {order_id}")

    @staticmethod
    def mail_link(message: EmailMessage) -> tuple[str, str, str]:
        """(order page URL, order id, token) of the link in ``message`` (``…/pesanan/<id>#t=<token>``)."""
        url = order_link(message)
        page, _, fragment = url.partition("#")
        assert fragment.startswith("t="), url
        return url, page.rsplit("/", 1)[1], fragment[2:]

    def adopt(self) -> None:
        """Make this system the test process's: its broker to publish to, its status cache to drop."""
        set_publisher(self.publisher)
        statuscache.configure(self.settings)

    # -- processes (the Procfile's names: web, checkout, payments, refunds, stamping, housekeeping, gateway)
    def process(self, name: str) -> Process:
        return self.launcher.processes[name]

    def start(self, *names: str) -> None:
        """Start the named processes that aren't running, and wait until they are up."""
        for name in names:
            if not self.launcher.processes[name].alive():
                self.launcher.start(name)
        self.launcher.wait_ready(names, timeout=90)

    def stop(self, *names: str) -> None:
        """Stop them (SIGTERM, then SIGKILL after the grace period); they stay down until started."""
        self.launcher.stop(*names)

    def restart(self, *names: str) -> None:
        self.stop(*names)
        self.start(*names)

    # -- database -------------------------------------------------------------------------------
    def db(self) -> psycopg.Connection:
        return psycopg.connect(self.settings.database_url, row_factory=dict_row, autocommit=True)

    def query(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        with self.db() as conn:
            return conn.execute(sql, params).fetchall()

    def order_row(self, order_id: str) -> dict[str, Any]:
        return self.query("SELECT * FROM orders WHERE id = %s", (order_id,))[0]

    # -- buyer API --------------------------------------------------------------------------------
    def create(self, document: bytes | None = None, *, page: int = 1, x: float = 400, y: float = 80,
               key: str | None = None, email: str = "pelamar@example.id") -> requests.Response:
        return self.http.post(
            f"{self.web_url}/api/v1/orders",
            headers={"Idempotency-Key": key or uuid.uuid4().hex},
            data={"page": str(page), "x": str(x), "y": str(y), "email": email},
            files={"document": ("surat.pdf", document if document is not None else make_pdf(),
                                "application/pdf")},
            timeout=10,
        )

    def status(self, order_id: str, token: str) -> dict[str, Any]:
        r = self.http.get(f"{self.web_url}/api/v1/orders/{order_id}",
                          headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_status(self, order_id: str, token: str, *statuses: str, timeout: float = 40) -> dict:
        last: dict[str, Any] = {}

        def reached() -> dict | None:
            nonlocal last
            last = self.status(order_id, token)
            return last if last["status"] in statuses else None

        try:
            return wait_until(reached, timeout=timeout, interval=0.2)
        except AssertionError:
            raise AssertionError(f"order {order_id} stuck in {last.get('status')}, wanted {statuses}: "
                                 f"{last}") from None

    def pay(self, gateway_order_id: str, payment_type: str = "qris") -> None:
        r = self.http.post(f"{self.gateway_url}/sandbox/pay/{gateway_order_id}",
                           json={"payment_type": payment_type}, timeout=10)
        assert r.status_code == 200, r.text

    def order_awaiting_payment(self, document: bytes | None = None, **kwargs: Any) -> tuple[str, str, dict]:
        r = self.create(document, **kwargs)
        assert r.status_code == 202, r.text
        body = r.json()
        view = self.wait_status(body["order_id"], body["access_token"], "awaiting_payment")
        return body["order_id"], body["access_token"], view

    def gateway_record(self, gateway_order_id: str) -> dict[str, Any]:
        r = self.http.get(f"{self.gateway_url}/sandbox/transactions/{gateway_order_id}", timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def events(self, order_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM order_events WHERE order_id = %s ORDER BY id", (order_id,))


def _admin_url(tmp: Path, env: Any = None) -> tuple[str, Any]:
    """A PostgreSQL server to create the test database on: DATABASE_URL's, or a private one (when that
    doesn't answer, or PRIVATE_SERVICES=1)."""
    env = os.environ if env is None else env
    configured = env.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    admin = psycopg.conninfo.make_conninfo(configured, dbname="postgres")
    if not load_settings(env).private_services and postgres_answers(admin):
        return admin, None
    handle = start_private_postgres(tmp / "postgres")
    return handle.url, handle


@pytest.fixture(scope="session")
def postgres_admin(tmp_path_factory) -> Any:
    admin, handle = _admin_url(tmp_path_factory.mktemp("pg"))
    yield admin
    close_pools()
    if handle is not None:
        handle.stop()


def _test_database(admin: str) -> Any:
    """A fresh, migrated database on ``admin``'s server, dropped afterwards."""
    name = f"meterai_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(admin, dbname=name)
    apply_migrations(url)
    yield url
    close_pools()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url(postgres_admin) -> Any:
    yield from _test_database(postgres_admin)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    handle = start_private_redis(tmp_path_factory.mktemp("redis"))
    yield handle
    handle.stop()


def _run_system(database_url: str, redis_server: RedisHandle, tmp: Path, *, prefix: str,
                store_env: dict[str, str], store_kind: str, seaweed: SeaweedHandle | None = None,
                mailbox: Mailbox) -> Any:
    web_port, gateway_port = free_port(), free_port()
    web_url, gateway_url = f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{gateway_port}"
    env_settings = {
        "DEVELOPMENT": "1",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_server.url,
        "REDIS_KEY_PREFIX": prefix,
        "DATA_DIR": str(tmp / "data"),
        "PUBLIC_BASE_URL": web_url,
        "GATEWAY_URL": gateway_url,
        "GATEWAY_SERVER_KEY": SERVER_KEY,
        "GATEWAY_TIMEOUT_SECONDS": "3",
        "NOTIFICATION_URL": f"{web_url}/api/v1/payments/notifications",
        "RETRY_BASE_SECONDS": "0.2",
        "RETRY_MAX_SECONDS": "1",
        "STAMP_MAX_RETRIES": "50",
        "LEASE_SECONDS": "60",
        "STAMP_DEADLINE_SECONDS": "3600",
        "REDRIVE_GRACE_SECONDS": "0",
        "TASK_TIME_LIMIT_SECONDS": "50",
        "SECRET_KEY": "test-secret",
        # The shared test system is never throttled; tests of throttling build their own app.
        "ADMISSION_PER_MINUTE": "1000000",
        "ADMISSION_BURST": "1000000",
        "RATE_LIMIT_CREATE": "1000000/60",
        "RATE_LIMIT_VERIFY": "1000000/60",
        "RATE_LIMIT_NOTIFICATIONS": "1000000/60",
        # A genuine document's check takes well under a second, but on a loaded 2-core box with two test
        # workers one took over 5 s (the default) once; the timeout's own tests set theirs (test_sandbox).
        "VERIFY_TIMEOUT_SECONDS": "20",
        "DOCUMENT_STORE_URL": "",  # the filesystem unless store_env says otherwise, whatever the shell has
        # E-mail to the session's mailbox; retries outlast a test's SMTP outage (each waits at most 1 s).
        **mailbox.env(),
        "MAIL_FROM": "meterai <noreply@meterai.test>",
        "MAIL_MAX_RETRIES": "60",
        "SMTP_TIMEOUT_SECONDS": "3",
        **store_env,
    }
    settings = load_settings(env_settings)
    # The tests call services in this process too: like every process that changes orders, it publishes
    # through the broker and drops cached status answers (System.adopt switches between systems).
    publisher = use_broker(settings)
    statuscache.configure(settings)
    ensure_dev_pki(settings)  # the development CA, made before any process that signs or verifies starts
    # The stand-in keeps its state in its own schema ("standin") of the test database.
    env = {**os.environ, **env_settings, "PORT": str(web_port), "GATEWAY_PORT": str(gateway_port),
           "PYTHONUNBUFFERED": "1"}
    launcher = Launcher(env, logs=tmp / "logs")
    try:
        launcher.start_all(PROCESSES)
        launcher.wait_ready(timeout=120)
        yield System(settings, web_url, gateway_url, redis_server, launcher, launcher.env, tmp,
                     store_kind=store_kind, seaweed=seaweed, publisher=publisher, mailbox=mailbox)
    finally:
        launcher.stop_all()


@pytest.fixture(scope="session")
def mailbox() -> Any:
    """The session's SMTP server (aiosmtpd on a free loopback port), keeping every message it receives."""
    box = Mailbox(free_port()).start()
    yield box
    box.stop()


@pytest.fixture(scope="session")
def system(database_url, redis_server, mailbox, tmp_path_factory) -> Any:
    yield from _run_system(database_url, redis_server, tmp_path_factory.mktemp("system"),
                           prefix="meterai-test:", store_env={}, store_kind="fs", mailbox=mailbox)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory) -> Any:
    """A private SeaweedFS for the session: S3 on a free loopback port, one bucket, signed requests."""
    handle = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def system_s3(postgres_admin, redis_server, seaweedfs, mailbox, tmp_path_factory) -> Any:
    """A second system like :func:`system` whose documents live in SeaweedFS (its own database and
    Redis prefix, so the two never see each other's orders or messages)."""
    for database_url in _test_database(postgres_admin):
        yield from _run_system(database_url, redis_server, tmp_path_factory.mktemp("system-s3"),
                               prefix="meterai-test-s3:", store_env=seaweedfs.env(), store_kind="s3",
                               seaweed=seaweedfs, mailbox=mailbox)


TABLES = "mail_outbox, ledger_entries, refunds, payment_notifications, payments, serials, order_events, orders"


@pytest.fixture
def store() -> str:
    """The document store a test's system uses: "fs" unless the test is marked :data:`BOTH_STORES`."""
    return "fs"


@pytest.fixture
def sys_(request, store: str) -> System:
    """The running system with empty tables and every process up (a test may have stopped some), on
    the filesystem store, or on SeaweedFS for the "s3" run of a test marked :data:`BOTH_STORES`."""
    if store not in STORES:
        raise ValueError(f"unknown document store {store!r}")
    system: System = request.getfixturevalue("system" if store == "fs" else "system_s3")
    if system.seaweed is not None and system.seaweed.process is None:
        system.seaweed.start()  # a test took the store away and did not bring it back
    if system.mailbox is not None:
        system.mailbox.clear_faults()  # a test made it refuse or answer late
        if not system.mailbox.running:
            system.mailbox.start()  # a test stopped the SMTP server
    system.adopt()
    system.start(*PROCESSES)
    for attempt in range(10):  # a worker may still be finishing the last test's work on these rows
        try:
            with system.db() as conn:
                conn.execute(f"TRUNCATE {TABLES}")
            break
        except psycopg.errors.DeadlockDetected:
            time.sleep(0.2 * (attempt + 1))
    else:
        raise RuntimeError("could not empty the tables: workers kept deadlocking with TRUNCATE")
    system.http.delete(f"{system.gateway_url}/sandbox/faults", timeout=5)
    return system
