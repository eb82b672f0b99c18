"""Database access: one connection pool per process and transactions that publish work after commit.

PostgreSQL is the source of truth. Anything a transaction makes due (a Celery task to run) is handed to
:meth:`Tx.after_commit` and only sent once the transaction has committed, as PyPI's Warehouse does: a
worker must never pick up a message for a row it cannot see yet, and a rolled-back transaction must not
leave a message behind. If sending fails (Redis away), the periodic redrive finds the work from the rows.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

_pools: dict[tuple[int, str], ConnectionPool] = {}
_pools_lock = threading.Lock()


def get_pool(conninfo: str, *, max_size: int = 10) -> ConnectionPool:
    """The pool for ``conninfo`` in this process.

    Keyed by pid as well, because Celery's prefork pool forks after import: a child must never reuse
    the parent's sockets.
    """
    key = (os.getpid(), conninfo)
    pool = _pools.get(key)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(key)
            if pool is None:
                pool = ConnectionPool(
                    conninfo,
                    min_size=1,
                    max_size=max_size,
                    # Autocommit: a plain read is one round trip, without the BEGIN and the COMMIT
                    # psycopg would wrap it in; :func:`transaction` opens an explicit transaction.
                    kwargs={"row_factory": dict_row, "autocommit": True},
                    open=True,
                    # Waiting longer than this for a connection means "overloaded": fail fast (the web
                    # answers 503 with Retry-After) instead of piling up requests.
                    timeout=10.0,
                    name=f"meterai-{os.getpid()}",
                )
                _pools[key] = pool
    return pool


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
    """Run a block in one transaction; publish its after-commit work only if it committed."""
    pool = get_pool(conninfo)
    with pool.connection() as conn:
        tx = Tx(conn)
        with conn.transaction():
            yield tx
    for callback in tx._after_commit:
        try:
            callback()
        except Exception:  # noqa: BLE001 - the row is committed; redrive will publish it later
            log.exception("event=after_commit_failed")
