"""The connection pool against a real PostgreSQL restarted under it: idle connections die with the server,
and the pool must not hand them out."""
from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from psycopg_pool import PoolTimeout

from conftest import wait_until
from shared.db import POOL_MAX_IDLE_SECONDS, POOL_MAX_LIFETIME_SECONDS, close_pool, get_pool, transaction
from shared.devtools.services import PostgresHandle, start_private_postgres

IDLE = 8  # more dead connections than psycopg_pool's back-off between failed checks gets through in 10 s


class Server:
    """A private PostgreSQL of our own, to stop and start again on the same port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.handle: PostgresHandle = start_private_postgres(folder)
        self.url = self.handle.url

    def stop(self) -> None:
        self.handle.stop()  # pg_ctl stop -m fast: every backend is terminated

    def restart(self) -> None:
        port = self.handle.port
        self.stop()
        self.handle = start_private_postgres(self.folder, port=port)
        assert self.handle.owned and self.handle.url == self.url


@pytest.fixture
def postgres() -> Iterator[Server]:
    folder = Path(tempfile.mkdtemp(prefix="meterai-pool-", dir="/tmp"))  # the postgres user can't enter tmp_path
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
    server = Server(folder)
    try:
        yield server
    finally:
        close_pool(server.url)
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def fill_with_idle_connections(conninfo: str, count: int) -> None:
    pool = get_pool(conninfo)
    held = [pool.getconn() for _ in range(count)]
    for conn in held:
        pool.putconn(conn)
    wait_until(lambda: pool.get_stats()["pool_available"] >= count, message=f"{count} idle connections")


def test_first_request_after_a_postgres_restart_succeeds(postgres: Server) -> None:
    fill_with_idle_connections(postgres.url, IDLE)

    postgres.restart()

    pool = get_pool(postgres.url)
    with pool.connection() as conn:  # the very first request after the restart
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
    for n in range(2 * IDLE):  # and every later one: no dead connection is left to hand out
        with transaction(postgres.url) as tx:
            assert tx.execute("SELECT %s::int AS n", (n,)).fetchone() == {"n": n}


def _cut_checked_connections(url: str, count: int) -> None:
    """``count`` pooled connections, each just checked, then killed by the server. The pool is made
    with room for exactly ``count``: one that may grow makes a connection more in the background while
    they are taken (seen once on a clean-clone run), and that live one would be handed out instead."""
    import psycopg

    pool = get_pool(url, max_size=count)
    held = [pool.getconn() for _ in range(count)]
    pids = [conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"] for conn in held]
    for conn in held:
        pool.putconn(conn)
    wait_until(lambda: pool.get_stats()["pool_available"] >= count)
    for _ in range(count):
        with pool.connection() as conn:
            conn.execute("SELECT 1")
    with psycopg.connect(url, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_until(lambda: not any(admin_pid_alive(url, pid) for pid in pids), message="backends gone")


def admin_pid_alive(url: str, pid: int) -> bool:
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        return admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() is not None


def test_a_connection_cut_right_after_its_check_is_not_handed_out(postgres: Server, monkeypatch) -> None:
    """A connection checked less than RECHECK_AFTER_SECONDS ago is handed out without the check's
    round trip, but not once the server cut it (a restart, PgBouncer going away): its socket is
    readable then. The window is stretched to a minute so every hand-out below is inside it."""
    import psycopg

    import shared.db

    monkeypatch.setattr(shared.db, "RECHECK_AFTER_SECONDS", 60.0)
    # Without the socket's look, a cut connection is handed out and the request fails: the test can fail.
    monkeypatch.setattr(shared.db, "_quiet", lambda conn: True)
    _cut_checked_connections(postgres.url, 3)
    with pytest.raises(psycopg.OperationalError):
        with transaction(postgres.url) as tx:
            tx.execute("SELECT 1")
    monkeypatch.undo()
    monkeypatch.setattr(shared.db, "RECHECK_AFTER_SECONDS", 60.0)
    close_pool(postgres.url)
    _cut_checked_connections(postgres.url, 3)
    for n in range(6):
        with transaction(postgres.url) as tx:
            assert tx.execute("SELECT %s::int AS n", (n,)).fetchone() == {"n": n}


def test_a_connection_whose_commit_just_answered_is_handed_out_again_without_a_round_trip(postgres: Server, monkeypatch) -> None:
    """A COMMIT that answered vouches for the connection as a check does: a task whose transaction
    outlasts the window (a claim, a stamp) and starts its next one right after pays no check's round trip.
    Being given back is not enough (a read held through a slow call said nothing since its start), and
    past the window from the last answer the check comes back."""
    import shared.db
    from psycopg_pool import ConnectionPool

    checks: list[int] = []
    real = ConnectionPool.check_connection
    monkeypatch.setattr(ConnectionPool, "check_connection",
                        staticmethod(lambda conn: (checks.append(1), real(conn))[1]))
    monkeypatch.setattr(shared.db, "RECHECK_AFTER_SECONDS", 0.5)
    pool = get_pool(postgres.url, max_size=1)
    with transaction(postgres.url) as tx:  # handed out: checked
        tx.execute("SELECT 1")
        time.sleep(0.7)  # longer than the window since that check
        tx.execute("SELECT 1")
    assert len(checks) == 1
    with transaction(postgres.url) as tx:  # its COMMIT answered a moment ago: no check
        tx.execute("SELECT 1")
    assert len(checks) == 1
    with pool.connection() as conn:  # an autocommit read, then a slow call holding the connection
        conn.execute("SELECT 1")
        time.sleep(0.7)
    with transaction(postgres.url) as tx:  # the read's answer is older than the window: checked
        tx.execute("SELECT 1")
    assert len(checks) == 2
    time.sleep(0.7)  # past the window since the last COMMIT: checked again
    with transaction(postgres.url) as tx:
        tx.execute("SELECT 1")
    assert len(checks) == 3
    with pytest.raises(RuntimeError):  # a transaction that outlasts the window and fails (rolled back)...
        with transaction(postgres.url) as tx:
            tx.execute("SELECT 1")
            time.sleep(0.7)
            raise RuntimeError("the caller's own failure")
    assert len(checks) == 3
    with transaction(postgres.url) as tx:  # ...vouches for nothing: its check is older than the window
        tx.execute("SELECT 1")
    assert len(checks) == 4


def test_a_server_that_stays_down_times_out_instead_of_hanging(postgres: Server) -> None:
    fill_with_idle_connections(postgres.url, 2)
    postgres.stop()
    with pytest.raises(PoolTimeout):  # the web turns this into 503 with Retry-After
        with get_pool(postgres.url).connection(timeout=2) as conn:
            conn.execute("SELECT 1")


def test_pool_closes_idle_connections_before_the_network_does_and_renews_old_ones(postgres: Server) -> None:
    """Shorter than the idle cut-offs of NATs and load balancers in between (350 s and up)."""
    pool = get_pool(postgres.url)
    assert pool.max_idle == POOL_MAX_IDLE_SECONDS < 350
    assert pool.max_lifetime == POOL_MAX_LIFETIME_SECONDS > POOL_MAX_IDLE_SECONDS


def test_waiting_for_a_connection_is_bounded_by_a_setting(postgres: Server) -> None:
    """A request that can't get a connection is told to come back in seconds (DATABASE_POOL_TIMEOUT_SECONDS,
    3 by default), not held for as long as the proxy would wait; the pool is made with that bound."""
    from shared.config import load_settings
    from shared.db import ConnectionOptions

    assert load_settings({}).database_pool_timeout_seconds == 3.0
    with pytest.raises(ValueError, match="DATABASE_POOL_TIMEOUT_SECONDS"):
        load_settings({"DATABASE_POOL_TIMEOUT_SECONDS": "60"})
    options = ConnectionOptions.from_settings(load_settings({"DATABASE_POOL_TIMEOUT_SECONDS": "1.5"}))
    import psycopg

    url = psycopg.conninfo.make_conninfo(postgres.url, application_name="pool-timeout")  # a pool of its own
    try:
        pool = get_pool(url, max_size=1, options=options)
        assert pool.timeout == 1.5
        with pool.connection():
            with pytest.raises(PoolTimeout):  # the one connection is taken: the second waiter gives up
                with pool.connection() as conn:
                    conn.execute("SELECT 1")
    finally:
        close_pool(url)


def test_a_database_host_that_stops_answering_fails_the_work_instead_of_holding_it(database_url) -> None:
    """A host gone without a word (no refusal, no reset: packets dropped, as when a failover takes the
    address away) must cost a request or a task a bounded wait, then an error it retries or answers 503
    with, not TCP's minutes of retransmissions: a statement on a pooled connection fails within
    DATABASE_TCP_USER_TIMEOUT_SECONDS (here 1 s), a new connection within DATABASE_CONNECT_TIMEOUT_SECONDS.
    Without the bounds both would still be waiting after the 60 s this test gives them."""
    import psycopg

    from shared.db import ConnectionOptions, connect, configure
    from shared.config import load_settings
    from tests.netfault import CuttingProxy, in_thread, need_iptables, silent

    need_iptables()

    for name, value in (("DATABASE_CONNECT_TIMEOUT_SECONDS", "1"), ("DATABASE_TCP_USER_TIMEOUT_SECONDS", "0"),
                        ("DATABASE_TCP_USER_TIMEOUT_SECONDS", "60")):
        with pytest.raises(ValueError, match=name):
            load_settings({name: value})
    defaults = ConnectionOptions.from_settings(load_settings({}))
    assert defaults.socket_bounds("host=db dbname=meterai") == {
        "connect_timeout": 5, "tcp_user_timeout": 10000,
        "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 5, "keepalives_count": 3}
    # What DATABASE_URL names itself stays as named.
    assert "tcp_user_timeout" not in defaults.socket_bounds("postgresql://db/meterai?tcp_user_timeout=500")

    proxy, url = CuttingProxy.in_front_of(database_url)
    settings = load_settings({"DATABASE_TCP_USER_TIMEOUT_SECONDS": "1", "DATABASE_CONNECT_TIMEOUT_SECONDS": "2",
                              "DATABASE_POOL_TIMEOUT_SECONDS": "3"})
    options = ConnectionOptions.from_settings(settings)
    pool = get_pool(url, max_size=1, options=options)
    pool.wait()
    with pool.connection() as conn:
        assert conn.info.get_parameters()["tcp_user_timeout"] == "1000"  # what libpq was given
        conn.execute("SELECT 1")
    configure(settings)

    def statement() -> None:
        with pool.connection() as conn:
            conn.execute("SELECT 1")

    try:
        held = pool.getconn()  # taken before the silence: the statement below is sent on it, no check first
        with silent(proxy.port):
            outcome = in_thread(lambda: held.execute("SELECT 1"), wait=60)
            assert outcome, "a statement still waiting on a host that stopped answering"
            error = outcome.get("error")
            # TCP gave up on the unanswered bytes (tcp_user_timeout), not a pool's wait for a connection.
            assert isinstance(error, psycopg.OperationalError) and not isinstance(error, PoolTimeout), outcome
            assert held.broken
            pool.putconn(held)  # broken: the pool drops it
            outcome = in_thread(lambda: connect(url, autocommit=True).close(), wait=60)
            assert outcome, "a connection attempt still waiting on a host that stopped answering"
            # Given up by connect_timeout, or first by tcp_user_timeout, which Linux applies to the SYNs too.
            assert isinstance(outcome.get("error"), psycopg.OperationalError), outcome
        # The host answers again: the pool makes a new connection and the work goes on.
        wait_until(lambda: in_thread(statement, wait=10).get("value", "no") is None, timeout=30,
                   message="the pool connected again")
    finally:
        configure(None)
        proxy.close()
        close_pool(url)


def test_what_a_task_retries_as_the_database_away_and_what_it_does_not(database_url) -> None:
    """Real errors from a real server, sorted by the task policy (workers/tasks/base.py): no connection to
    be had, a lost one, a terminated backend are the database away (retried, then left to the redrive);
    a statement_timeout repeats on every attempt and a constraint violation is the data's: not retried."""
    import socket

    import psycopg

    from shared.db import ConnectionOptions
    from workers.tasks.base import database_unavailable

    def raised(call) -> BaseException:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - what the test sorts
            return exc
        raise AssertionError("no error")

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    nowhere = f"host=127.0.0.1 port={free} dbname=x connect_timeout=2"
    assert database_unavailable(raised(lambda: psycopg.connect(nowhere)))  # refused: no SQLSTATE
    pool = get_pool(nowhere, max_size=1, options=ConnectionOptions(timeout=0.5))
    try:
        assert isinstance(error := raised(lambda: pool.getconn()), PoolTimeout) and database_unavailable(error)
    finally:
        close_pool(nowhere)

    with (psycopg.connect(database_url, autocommit=True) as conn,
          psycopg.connect(database_url, autocommit=True) as admin):
        admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        assert database_unavailable(raised(lambda: conn.execute("SELECT 1")))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET statement_timeout = '20ms'")
        error = raised(lambda: conn.execute("SELECT pg_sleep(1)"))
        assert isinstance(error, psycopg.errors.QueryCanceled) and not database_unavailable(error)
        conn.execute("SET statement_timeout = 0")
        conn.execute("CREATE TEMP TABLE once (id int PRIMARY KEY)")
        conn.execute("INSERT INTO once VALUES (1)")
        error = raised(lambda: conn.execute("INSERT INTO once VALUES (1)"))
        assert isinstance(error, psycopg.errors.UniqueViolation) and not database_unavailable(error)
    assert not database_unavailable(ValueError("not the database"))
