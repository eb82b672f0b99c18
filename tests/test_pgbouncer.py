"""PostgreSQL behind a real PgBouncer (Debian 12's 1.18) in transaction mode, as production may run it.

A system of its own (web under gunicorn, every Celery worker group, the stand-in gateway) whose
DATABASE_URL leads through a private PgBouncer with DATABASE_POOLED=1: the order flow stamps, delivers and
refunds through it; PgBouncer restarted mid-flow cuts every connection and nothing is lost; the setting is
what keeps prepared statements away from the pooler; migrations leave no session state behind.
"""
from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest

from shared import db
from shared.config import load_settings
from shared.db import ConnectionOptions, PREPARE_THRESHOLD, close_pool, connect, get_pool
from shared.db.migrate import apply_migrations, migration_database_url, migration_files
from shared.devtools.pgbouncer import PgBouncerHandle, start_pgbouncer
from shared.services import housekeeping, reconcile
from shared.services.ledger import ledger_report
from tests.conftest import _run_system, _test_database, make_pdf, wait_until
from tests.pdfcheck import page_texts

POOLED = ConnectionOptions.from_settings(load_settings({"DATABASE_POOLED": "1"}))


@pytest.fixture(scope="module")
def pgbouncer(postgres_admin, tmp_path_factory) -> Iterator[PgBouncerHandle]:
    handle = start_pgbouncer(tmp_path_factory.mktemp("pgbouncer"), postgres_admin)
    yield handle
    handle.stop()


def through(handle: PgBouncerHandle, database_url: str) -> str:
    """``database_url``'s database, reached through PgBouncer."""
    return psycopg.conninfo.make_conninfo(handle.url, dbname=psycopg.conninfo.conninfo_to_dict(database_url)["dbname"])


@pytest.fixture(scope="module")
def pooled_system(postgres_admin, redis_server, pgbouncer, mailbox, tmp_path_factory) -> Iterator[Any]:
    """The whole system with DATABASE_URL through PgBouncer. The stand-in gateway (development tooling)
    keeps its state over a direct connection: it sets its schema with a startup option PgBouncer refuses."""
    for direct_url in _test_database(postgres_admin):
        env = {"DATABASE_POOLED": "1", "STANDIN_DATABASE_URL": direct_url}
        for system in _run_system(through(pgbouncer, direct_url), redis_server, tmp_path_factory.mktemp("pooled"),
                                  prefix=f"meterai-test-pgb-{uuid.uuid4().hex[:6]}:", store_env=env,
                                  store_kind="fs", mailbox=mailbox):
            system.adopt()
            db.configure(system.settings)  # this process calls services through PgBouncer too
            try:
                yield system
            finally:
                db.configure(None)


def ledger(system, order_id: str) -> dict[str, int]:
    rows = system.query("SELECT kind, amount_idr FROM ledger_entries WHERE order_id = %s", (order_id,))
    return {row["kind"]: row["amount_idr"] for row in rows}


def transactions_through(handle: PgBouncerHandle, dbname: str) -> int:
    """How many transactions PgBouncer has carried to ``dbname`` (its admin console's SHOW STATS)."""
    with psycopg.connect(handle.admin_url, autocommit=True, prepare_threshold=None) as conn:
        cursor = conn.execute("SHOW STATS")
        names = [c.name for c in cursor.description]
        rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    return sum(int(row["total_xact_count"]) for row in rows if row["database"] == dbname)


def stamp_and_download(system, document: bytes) -> tuple[str, dict]:
    order_id, token, view = system.order_awaiting_payment(document)
    system.pay(view["payment"]["gateway_order_id"])
    done = system.wait_status(order_id, token, "stamped", timeout=60)
    r = system.http.get(f"{system.web_url}/api/v1/orders/{order_id}/document",
                        headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/pdf"
    assert done["serial"] in page_texts(r.content)[0]
    assert ledger(system, order_id) == {"captured": 12500, "revenue": 12500}
    return order_id, done


def test_order_flow_stamps_downloads_and_refunds_through_pgbouncer(pooled_system, pgbouncer) -> None:
    system = pooled_system
    dbname = psycopg.conninfo.conninfo_to_dict(system.settings.database_url)["dbname"]
    assert system.settings.database_pooled == 1
    before = transactions_through(pgbouncer, dbname)

    _, done = stamp_and_download(system, make_pdf(pages=2))
    assert [e["status"] for e in done["events"]] == [
        "created", "awaiting_payment", "paid", "stamping", "stamped"]

    # A refund: the upload is replaced in the store after preflight, so stamping can't read it.
    refund_id, token, view = system.order_awaiting_payment()
    system.replace_upload(refund_id, b"%PDF-1.7\n" + b"\x00garbage" * 100)
    system.pay(view["payment"]["gateway_order_id"])
    done = system.wait_status(refund_id, token, "refunded", timeout=60)
    assert done["refund"] == {"status": "succeeded", "amount": 12500}
    assert ledger(system, refund_id) == {"captured": 12500, "refunded": 12500}

    # The ledger report streams through a server-side cursor, which lives in its transaction: fine here.
    report = ledger_report(system.settings)
    assert report.balanced and report.refunded >= 12500 and report.revenue >= 12500
    # Web and workers really went through the pooler (not around it).
    assert transactions_through(pgbouncer, dbname) > before + 10


def test_pgbouncer_restarting_mid_flow_loses_nothing(pooled_system, pgbouncer) -> None:
    system = pooled_system
    waiting = [system.order_awaiting_payment() for _ in range(2)]
    # Every process's pool now holds connections to PgBouncer; the restart cuts them all.
    pgbouncer.restart()

    # The very next requests succeed: each pool's check throws its dead connections away.
    for order_id, token, _ in waiting:
        assert system.status(order_id, token)["status"] == "awaiting_payment"
    fresh = system.order_awaiting_payment()
    for _, _, view in [*waiting, fresh]:
        system.pay(view["payment"]["gateway_order_id"])
    pgbouncer.restart()  # again, while notifications and stamping are under way
    # A task that meets the pooler down retries, and a COMMIT cut off publishes its follow-ups anyway (the
    # tests below and tests/test_commit_outcome.py). What is left to beat in production (a notification the gateway sends again later,
    # the web's autocommit statements whose answer was lost) is done here as beat would: the watch's
    # clock moved and the redrive's grace shortened instead of waited for (this system runs no beat).
    ids = [order_id for order_id, _, _ in [*waiting, fresh]]

    def all_stamped() -> bool:
        if system.query("SELECT count(*) AS n FROM orders WHERE id = ANY(%s) AND status = 'stamped'",
                        (ids,))[0]["n"] == len(ids):
            return True
        system.query("UPDATE payments SET next_poll_at = now() WHERE order_id = ANY(%s) AND captured_at IS NULL"
                     " RETURNING 1", (ids,))
        reconcile.schedule_watch(system.settings)
        housekeeping.redrive(system.settings, grace_seconds=2)
        return False

    wait_until(all_stamped, timeout=90, interval=1.0, message="every paid order stamped")
    for order_id, token, _ in [*waiting, fresh]:
        assert system.status(order_id, token)["status"] == "stamped"
        assert ledger(system, order_id) == {"captured": 12500, "revenue": 12500}
    assert system.query("SELECT count(*) AS n FROM serials WHERE order_id = ANY(%s) AND status = 'used'",
                        (ids,))[0]["n"] == 3
    logs = "".join(path.read_text(errors="replace") for path in Path(system.tmp / "logs").glob("*.log"))
    assert "db_pool_dead_connection" in logs  # the check found them, rather than a request
    stamp_and_download(system, make_pdf(pages=1))  # and afterwards new orders flow


def _notified_while_the_pooler_is_down(system, pgbouncer, *, worker: str = "payments",
                                       env: dict[str, str] | None = None) -> tuple[str, str, list[str], Any]:
    """An order's payment notification stored and its task queued, then PgBouncer stopped and a payments
    worker (``worker``: the Procfile's, or a copy of it under that name with ``env``) started to take it.
    Returns the order id, its token, the notifications' ids (as the task lines show them) and the worker,
    once its task has met the database away. PgBouncer stays down."""
    order_id, token, view = system.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    system.stop("payments")
    system.pay(gateway_order_id)
    notes = wait_until(lambda: [str(row["id"]) for row in system.query(
        "SELECT id FROM payment_notifications WHERE gateway_order_id = %s", (gateway_order_id,))],
        timeout=30, message="the notification stored, its task queued")
    pgbouncer.stop()
    if worker == "payments":
        system.start("payments")
    else:
        system.launcher.start("payments", name=worker, env=env)
        system.launcher.wait_ready([worker], timeout=90)
    process = system.process(worker)

    def retried() -> bool:
        return any(line.get("outcome") == "retry" and line.get("error") in ("PoolTimeout", "OperationalError")
                   for line in task_lines(process, notes))

    wait_until(retried, timeout=60, interval=0.2, message="the task retrying while the database is away")
    return order_id, token, notes, process


def test_a_task_that_meets_the_database_away_retries_and_finishes_once_it_is_back(pooled_system, pgbouncer) -> None:
    """The payments task takes its notification while PgBouncer is down: the lost database is retried
    with backoff like any dependency away (not a failed message left for the redrive a minute later), and
    once the pooler is back the same message's retry books the payment and the order is stamped. This
    system runs no beat: neither the redrive nor the payment watch can do it instead."""
    system = pooled_system
    try:
        order_id, token, notes, worker = _notified_while_the_pooler_is_down(system, pgbouncer)
    finally:
        _as_before(system, pgbouncer)
    done = system.wait_status(order_id, token, "stamped", timeout=60)
    assert [e["status"] for e in done["events"]] == [
        "created", "awaiting_payment", "paid", "stamping", "stamped"]
    assert ledger(system, order_id) == {"captured": 12500, "revenue": 12500}
    outcomes = [line["outcome"] for line in task_lines(worker, notes)]
    assert "paid" in outcomes and set(outcomes) <= {"retry", "paid", "duplicate", "skipped"}, outcomes
    assert outcomes[:outcomes.index("paid")] and set(outcomes[:outcomes.index("paid")]) == {"retry"}, outcomes


def test_the_database_away_past_the_retries_leaves_the_work_to_the_redrive_not_to_the_final_outcome(
        pooled_system, pgbouncer) -> None:
    """Its retries spent while the database is still away, the task ends as ``database_unavailable``
    and does not take its final outcome (for a notification: closed as left to the payment watch, which
    would need the database too, and says the gateway failed, which it didn't): the notification is still
    unprocessed, so the redrive sends it again once PostgreSQL answers, and the order is stamped."""
    system = pooled_system
    try:
        order_id, token, notes, worker = _notified_while_the_pooler_is_down(
            system, pgbouncer, worker="payments-few", env={"NOTIFICATION_MAX_RETRIES": "1"})
        wait_until(lambda: any(line["outcome"] == "database_unavailable" for line in task_lines(worker, notes)),
                   timeout=60, interval=0.2, message="the retries spent while the database is away")
        pgbouncer.start()
        rows = system.query("SELECT processed_at, outcome FROM payment_notifications WHERE id = ANY(%s)",
                            ([int(n) for n in notes],))
        assert rows and all(row["processed_at"] is None and row["outcome"] is None for row in rows), rows
        assert system.status(order_id, token)["status"] == "awaiting_payment"
        assert "event=notification_left_to_watch" not in worker.output().decode(errors="replace")
        assert '"notification_left_to_watch"' not in worker.output().decode(errors="replace")
        housekeeping.redrive(system.settings, grace_seconds=0)  # what beat's next redrive does
        system.wait_status(order_id, token, "stamped", timeout=60)
    finally:
        _as_before(system, pgbouncer)


def _as_before(system, pgbouncer) -> None:
    """PgBouncer up, the Procfile's payments worker running and no copy of it: whatever a test above
    stopped or started, and wherever it failed, the module's later tests find the system as it was."""
    if pgbouncer.process is None:
        pgbouncer.start()
    copy = system.launcher.processes.get("payments-few")
    if copy is not None and copy.alive():
        system.stop("payments-few")
    system.start("payments")


def task_lines(process, args: list[str] | None = None) -> list[dict[str, Any]]:
    """The process's ``event=task`` log lines since its start (JSON lines), of tasks run with one of
    ``args`` if given."""
    lines = []
    for text in process.output().decode(errors="replace").splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("event") == "task" and (args is None or line.get("args") in args):
            lines.append(line)
    return lines


def _interleave(open_connection) -> None:
    """One client runs a query often enough for psycopg to prepare it (on the server connection PgBouncer
    lent it), then runs it again while another client holds that server connection in a transaction, so
    PgBouncer lends the first one a different server connection."""
    with open_connection() as first, open_connection() as second:
        for n in range(PREPARE_THRESHOLD + 3):
            assert _one(first.execute("SELECT %s::int + 1", (n,))) == n + 1
        with second.transaction():
            second.execute("SELECT 1")  # holds the server connection the first client's statements are on
            for n in range(3):
                assert _one(first.execute("SELECT %s::int + 1", (n,))) == n + 1


def _one(cursor) -> Any:
    row = cursor.fetchone()  # a tuple, or a dict from the pool's connections
    return next(iter(row.values())) if isinstance(row, dict) else row[0]


def test_statements_are_never_prepared_when_pooled(pgbouncer) -> None:
    url = pgbouncer.url  # the maintenance database: no other client shares its server connections
    # psycopg's default prepares, and PgBouncer 1.18 sends the next use to a server that never saw it.
    with pytest.raises(psycopg.errors.InvalidSqlStatementName, match="does not exist"):
        _interleave(lambda: psycopg.connect(url, autocommit=True))
    # DATABASE_POOLED=1 turns preparing off, for one-off connections and for the pool alike.
    assert POOLED.prepare_threshold is None
    _interleave(lambda: connect(url, autocommit=True, prepare_threshold=POOLED.prepare_threshold))
    pool_url = psycopg.conninfo.make_conninfo(url, application_name="meterai_pool_test")  # a pool of its own
    try:
        pool = get_pool(pool_url, options=POOLED)
        assert pool.kwargs["prepare_threshold"] is None
        _interleave(pool.connection)
    finally:
        close_pool(pool_url)


def test_pool_settings_come_from_the_environment() -> None:
    options = ConnectionOptions.from_settings(load_settings({
        "DATABASE_MAX_LIFETIME_SECONDS": "600", "DATABASE_MAX_IDLE_SECONDS": "120"}))
    assert options == ConnectionOptions(prepare_threshold=PREPARE_THRESHOLD, max_lifetime=600.0, max_idle=120.0)
    with pytest.raises(ValueError, match="DATABASE_MAX_IDLE_SECONDS"):
        load_settings({"DATABASE_MAX_LIFETIME_SECONDS": "60", "DATABASE_MAX_IDLE_SECONDS": "300"})
    direct = "postgresql://postgres@10.0.0.5:5432/meterai"
    assert migration_database_url(load_settings({"DATABASE_URL": "postgresql://postgres@pgbouncer:6432/meterai",
                                                 "MIGRATE_DATABASE_URL": direct})) == direct
    assert migration_database_url(load_settings({"DATABASE_URL": direct})) == direct


def test_migrations_through_pgbouncer_apply_once_and_leave_no_lock_behind(postgres_admin, pgbouncer) -> None:
    name = f"meterai_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = psycopg.conninfo.make_conninfo(pgbouncer.url, dbname=name)
        applied: list[list[str]] = []
        runners = [threading.Thread(target=lambda: applied.append(apply_migrations(url))) for _ in range(2)]
        for runner in runners:
            runner.start()
        for runner in runners:
            runner.join()
        everything = [file for file, _ in migration_files()]
        assert sorted(applied[0] + applied[1]) == everything  # two at once: each file once
        assert apply_migrations(url) == []
        direct = psycopg.conninfo.make_conninfo(postgres_admin, dbname=name)
        with psycopg.connect(direct, autocommit=True) as conn:
            held = conn.execute("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                                " WHERE l.locktype = 'advisory' AND d.datname = %s", (name,)).fetchone()[0]
            assert held == 0
            # The search path was set for each transaction only: the server connections kept none of it.
            assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(everything)
    finally:
        with psycopg.connect(postgres_admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_postgresql_that_stops_answering_behind_pgbouncer_fails_the_statement_instead_of_holding_it(
        postgres_admin, tmp_path_factory) -> None:
    """Behind PgBouncer our own TCP bounds see only PgBouncer, which acknowledges every statement itself;
    a PostgreSQL gone without a word must be found by PgBouncer's bounds (the private PgBouncer's, as
    docs/deploy.md's pgbouncer.ini has them: tcp_user_timeout 10 s). The statement in flight fails, and
    the client's next connection works once the server answers again. Without them it would still be
    waiting after the 60 s this test gives it (TCP's retransmissions take about 15 minutes)."""
    from tests.netfault import CuttingProxy, in_thread, need_iptables, silent

    need_iptables()

    proxy, behind = CuttingProxy.in_front_of(postgres_admin)
    handle = start_pgbouncer(tmp_path_factory.mktemp("pgbouncer-silent"), behind)
    try:
        with psycopg.connect(handle.url, autocommit=True, prepare_threshold=None) as conn:
            conn.execute("SELECT 1")  # PgBouncer's server connection, made through the proxy
            with silent(proxy.port):
                outcome = in_thread(lambda: conn.execute("SELECT 1"), wait=60)
                assert outcome, "a statement still waiting on a PostgreSQL that stopped answering"
                assert isinstance(outcome.get("error"), psycopg.OperationalError), outcome
        with psycopg.connect(handle.url, autocommit=True, prepare_threshold=None) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        handle.stop()
        proxy.close()
