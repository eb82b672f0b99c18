"""Database access: one connection pool per process and transactions that publish work after commit.

PostgreSQL is the source of truth. Anything a transaction makes due (a Celery task to run) is handed to
:meth:`Tx.after_commit` and only sent once the transaction has committed, as PyPI's Warehouse does: a
worker must never pick up a message for a row it cannot see yet, and a rolled-back transaction must not
leave a message behind. (A COMMIT whose answer never came may or may not have committed: its messages go
out then too, see :func:`transaction`.) If sending fails (Redis away), the periodic redrive finds the work
from the rows.
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from shared.logs import log_event

if TYPE_CHECKING:
    from shared.config import Settings

log = logging.getLogger(__name__)

_pools: dict[tuple[int, str], ConnectionPool] = {}
_pools_lock = threading.Lock()


# The defaults of DATABASE_MAX_IDLE_SECONDS and DATABASE_MAX_LIFETIME_SECONDS (shared/config.py says why).
POOL_MAX_IDLE_SECONDS = 300.0
POOL_MAX_LIFETIME_SECONDS = 30 * 60.0
# psycopg's own default: a query run this many times on one connection is prepared there.
PREPARE_THRESHOLD = 5


@dataclass(frozen=True)
class ConnectionOptions:
    """How this process connects: the same for its pools and its one-off connections."""

    # None: never prepare (behind a transaction-mode pooler, see DATABASE_POOLED).
    prepare_threshold: int | None = PREPARE_THRESHOLD
    max_lifetime: float = POOL_MAX_LIFETIME_SECONDS
    max_idle: float = POOL_MAX_IDLE_SECONDS
    timeout: float = 3.0
    # A host that stopped answering (see DATABASE_TCP_USER_TIMEOUT_SECONDS in shared/config.py).
    connect_timeout: int = 5
    tcp_user_timeout: float = 10.0

    @classmethod
    def from_settings(cls, settings: "Settings") -> "ConnectionOptions":
        return cls(prepare_threshold=None if settings.database_pooled else PREPARE_THRESHOLD,
                   max_lifetime=settings.database_max_lifetime_seconds,
                   max_idle=settings.database_max_idle_seconds,
                   timeout=settings.database_pool_timeout_seconds,
                   connect_timeout=settings.database_connect_timeout_seconds,
                   tcp_user_timeout=settings.database_tcp_user_timeout_seconds)

    def socket_bounds(self, conninfo: str) -> dict[str, object]:
        """libpq's parameters that bound a silent host, less those ``conninfo`` names itself (an
        operator's URL wins). libpq ignores them on a Unix socket, and tcp_user_timeout where the
        system has no TCP_USER_TIMEOUT."""
        named = psycopg.conninfo.conninfo_to_dict(conninfo)
        bounds = {"connect_timeout": self.connect_timeout,
                  "tcp_user_timeout": int(self.tcp_user_timeout * 1000),
                  # An idle pooled connection's dead peer found after 30 s idle plus a probe or two (with
                  # TCP_USER_TIMEOUT set, Linux gives up on unanswered probes after that timeout).
                  "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 5, "keepalives_count": 3}
        return {key: value for key, value in bounds.items() if key not in named}


_configured: ConnectionOptions | None = None


def configure(settings: "Settings | None") -> None:
    """Connect as ``settings`` say from now on (None: as the environment says); pools made earlier keep
    their options."""
    global _configured
    _configured = None if settings is None else ConnectionOptions.from_settings(settings)


def connection_options() -> ConnectionOptions:
    """What :func:`configure` set, else what this process's environment says (``get_settings()``): web,
    workers and the CLI all read DATABASE_POOLED from there, so no process can forget to set it."""
    if _configured is not None:
        return _configured
    from shared.config import get_settings

    return ConnectionOptions.from_settings(get_settings())


def connect(conninfo: str, **kwargs) -> psycopg.Connection:
    """A one-off connection (outside the pool) with this process's options: never prepared when pooled."""
    options = connection_options()
    kwargs.setdefault("prepare_threshold", options.prepare_threshold)
    return psycopg.connect(conninfo, **{**options.socket_bounds(conninfo), **kwargs})


# How long after it was last known alive (its check, or the COMMIT of a transaction it ran answered) a
# connection is handed out again without a check's round trip (see _checker).
RECHECK_AFTER_SECONDS = 0.25

# When each pooled connection last answered a round trip we can vouch for: a check, or a COMMIT in
# :func:`transaction`. Only get and set, each atomic under the GIL; a connection that goes is forgotten.
_known_alive: "weakref.WeakKeyDictionary[psycopg.Connection, float]" = weakref.WeakKeyDictionary()


def _quiet(conn: psycopg.Connection) -> bool:
    """An open connection whose idle socket has nothing to read (no FIN, no message from the server)."""
    if conn.closed or conn.broken:
        return False
    try:
        poller = select.poll()  # not select(): a process may hold more than 1,024 descriptors
        poller.register(conn.fileno(), select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def _checker() -> tuple[Callable[[psycopg.Connection], None], Callable[[ConnectionPool], None]]:
    """A ``check`` for the pool that tests every connection it hands out, and a way to tell it its pool.

    Why: after PostgreSQL restarts, every idle connection in the pool is dead, and without a check each
    would fail one request (a retry, or a 503). With ``ConnectionPool.check_connection`` alone the pool
    finds them one by one, sleeping 0, 1, 2, 4... seconds between the attempts, so a pool with a handful of
    idle connections makes the first request wait several seconds or time out. So when one check fails,
    this one first has the pool test all its idle connections at once (``pool.check()``: dead ones are
    dropped and replaced in the background); the request then gets a fresh connection.
    """
    owner: list[ConnectionPool] = []

    def check(conn: psycopg.Connection) -> None:
        # A connection known alive less than RECHECK_AFTER_SECONDS ago (checked, or its transaction's
        # COMMIT answered: the next transaction of the same task or request, a busy pool's next request)
        # is not asked again with a round trip, which was a fifth of PostgreSQL's transactions per order
        # and 14 of the 72 statements an order sends (loadtests/bench/e2e.py), as long as its socket has
        # nothing to read: a server, PgBouncer or proxy that closed it since (a restart, a kill) sent a FIN
        # or a FATAL message, which makes an idle socket readable. One that broke while in use was marked
        # broken by psycopg and discarded on its return. What the socket can't show (a host gone without
        # a word, an address taken over by a failover's new primary) costs at most the one statement that
        # finds it, on a connection that answered within the last quarter second: the request or task
        # fails as on any lost connection and is retried (after at most DATABASE_TCP_USER_TIMEOUT_SECONDS
        # when nothing answers at all: ConnectionOptions.socket_bounds). Being given back is not enough: a connection
        # held through a slow gateway call without a statement vouches for nothing.
        now = time.monotonic()
        if now - _known_alive.get(conn, -RECHECK_AFTER_SECONDS) < RECHECK_AFTER_SECONDS and _quiet(conn):
            return
        try:
            ConnectionPool.check_connection(conn)
            _known_alive[conn] = now
        except Exception:
            if owner:
                log_event(log, "db_pool_dead_connection", logging.WARNING, pool=owner[0].name,
                          checking_idle_connections=1)
                owner[0].check()
            raise

    return check, owner.append


def get_pool(conninfo: str, *, max_size: int = 10, options: ConnectionOptions | None = None) -> ConnectionPool:
    """The pool for ``conninfo`` in this process, made with ``options`` (default :func:`connection_options`).

    Keyed by pid as well, because Celery's prefork pool forks after import: a child must never reuse
    the parent's sockets. Connections are checked as they are handed out (see :func:`_checker`): the pool
    only looks at ``max_lifetime`` when a connection comes back (psycopg-pool#584), so a connection the
    server, the pooler or something in between dropped while idle would otherwise be handed out dead.
    No connection keeps session state across transactions (nothing is SET, LISTENed, locked for the
    session or prepared when pooled), so any of them may be any server connection behind a pooler.
    """
    key = (os.getpid(), conninfo)
    pool = _pools.get(key)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(key)
            if pool is None:
                options = options or connection_options()
                check, set_owner = _checker()
                pool = ConnectionPool(
                    conninfo,
                    min_size=1,
                    max_size=max_size,
                    # Autocommit: a plain read is one round trip, without the BEGIN and the COMMIT
                    # psycopg would wrap it in; :func:`transaction` opens an explicit transaction.
                    kwargs={"row_factory": dict_row, "autocommit": True,
                            "prepare_threshold": options.prepare_threshold, **options.socket_bounds(conninfo)},
                    open=False,
                    # Waiting longer than this for a connection means "overloaded": fail fast (the web
                    # answers 503 with Retry-After) instead of piling up requests (DATABASE_POOL_TIMEOUT_SECONDS).
                    timeout=options.timeout,
                    check=check,
                    max_idle=options.max_idle,
                    max_lifetime=options.max_lifetime,
                    name=f"meterai-{os.getpid()}",
                )
                set_owner(pool)
                pool.open()
                _pools[key] = pool
    return pool


def close_pool(conninfo: str) -> None:
    """Close this process's pool for ``conninfo``, if it has one (the next :func:`get_pool` makes a new one)."""
    with _pools_lock:
        pool = _pools.pop((os.getpid(), conninfo), None)
    if pool is not None:
        pool.close()


def close_pools() -> None:
    with _pools_lock:
        for key, pool in list(_pools.items()):
            if key[0] == os.getpid():
                pool.close()
            del _pools[key]


@dataclass
class Tx:
    """An open transaction plus the callbacks to run once it has committed."""

    conn: psycopg.Connection
    _after_commit: list[Callable[[], None]] = field(default_factory=list)

    def after_commit(self, callback: Callable[[], None]) -> None:
        self._after_commit.append(callback)

    def execute(self, query, params=None) -> psycopg.Cursor:
        return self.conn.execute(query, params)


@contextmanager
def transaction(conninfo: str) -> Iterator[Tx]:
    """Run a block in one transaction; publish its after-commit work only if it committed, or if whether
    it did can't be known.

    A connection lost *during* the COMMIT (a pooler or server restart, a network cut) leaves the outcome
    unknown: the server may have committed and the answer been lost. The work it made due is published
    then too, and the error raised: every follow-up task reads its rows first and does nothing when they
    don't say it is due (an order not paid isn't stamped, an e-mail not in the outbox isn't sent), so a
    message too many is harmless, while a commit that went through without its message would wait for the
    redrive (a payment captured, its stamping a minute late). The caller sees the error and retries
    (a task) or answers 503 (the web): repeating a step is safe, every step being idempotent.
    """
    pool = get_pool(conninfo)
    with pool.connection() as conn:
        tx = Tx(conn)
        body_done = False
        try:
            with conn.transaction():
                yield tx
                body_done = True
        except psycopg.OperationalError as exc:
            if body_done and conn.broken:
                log_event(log, "commit_outcome_unknown", logging.WARNING, error=type(exc).__name__,
                          follow_ups=len(tx._after_commit))
                _run_after_commit(tx)
            raise
        # Not a pool reset callback: with one, psycopg_pool gives every connection back from a worker
        # thread, and a busy process's next request finds none and grows the pool to its maximum.
        _known_alive[conn] = time.monotonic()  # its COMMIT has just answered
    _run_after_commit(tx)


def _run_after_commit(tx: Tx) -> None:
    for callback in tx._after_commit:
        try:
            callback()
        except Exception:  # noqa: BLE001 - the row is committed; redrive will publish it later
            log.exception("event=after_commit_failed")
