"""A connection lost during COMMIT: the commit may have gone through, so its follow-ups are published.

A TCP proxy of our own sits between the pool and the real PostgreSQL and cuts the connection at a chosen
moment: after the server has answered the COMMIT, or a create's autocommit INSERT (committed, the answer
lost, as a pooler restarting or a network cut can do), or before a statement of the body reaches the
server (nothing committed).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis

from shared import jobs
from shared.broker import use_broker
from shared.db import close_pool, transaction
from shared.orders import NewOrder, create_order
from shared.store.filesystem import FilesystemStore
from tests.conftest import make_pdf
from tests.netfault import CuttingProxy
from workers.tasks.base import database_unavailable


@pytest.fixture
def cut(database_url) -> Iterator[tuple[CuttingProxy, str]]:
    proxy, url = CuttingProxy.in_front_of(database_url)
    table = f"commit_outcome_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    proxy.table = table  # type: ignore[attr-defined]
    try:
        yield proxy, url
    finally:
        close_pool(url)
        proxy.close()
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {table}")


def _rows(database_url: str, table: str) -> list[int]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return [row[0] for row in conn.execute(f"SELECT id FROM {table} ORDER BY id")]


def test_a_commit_whose_answer_was_lost_publishes_its_follow_ups_and_raises(cut, database_url, caplog) -> None:
    proxy, url = cut
    published: list[int] = []
    with transaction(url) as tx:  # the pool's connection made and vouched for through the proxy
        tx.execute("SELECT 1")
    proxy.mode = "commit_answer"
    with caplog.at_level(logging.WARNING, logger="shared.db"):
        with pytest.raises(psycopg.OperationalError):
            with transaction(url) as tx:
                tx.execute(f"INSERT INTO {proxy.table} VALUES (1)")
                tx.after_commit(lambda: published.append(1))
    assert proxy.cuts == 1
    # It did commit, and its follow-up went out although the caller was told it failed.
    assert _rows(database_url, proxy.table) == [1]
    assert published == [1]
    assert "event=commit_outcome_unknown" in caplog.text
    # The pool threw the broken connection away: the next transaction works.
    with transaction(url) as tx:
        tx.execute(f"INSERT INTO {proxy.table} VALUES (2)")
        tx.after_commit(lambda: published.append(2))
    assert _rows(database_url, proxy.table) == [1, 2] and published == [1, 2]


def test_a_connection_lost_before_the_commit_publishes_nothing(cut, database_url) -> None:
    proxy, url = cut
    published: list[int] = []
    with transaction(url) as tx:
        tx.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        with transaction(url) as tx:
            tx.execute(f"INSERT INTO {proxy.table} VALUES (1)")
            tx.after_commit(lambda: published.append(1))
            proxy.mode = "next_statement"
            tx.execute("SELECT 1")  # the body's statement fails: the transaction certainly did not commit
    assert proxy.cuts == 1
    assert _rows(database_url, proxy.table) == [] and published == []


def test_an_error_the_server_answers_at_commit_publishes_nothing(cut, database_url) -> None:
    """A serialization failure is an OperationalError too, raised here by the COMMIT itself (write skew
    between two serializable transactions, the other committed first), but the server answered it over
    an intact connection: the transaction certainly rolled back, so nothing is published."""
    proxy, url = cut
    published: list[int] = []
    body_ended = False
    with psycopg.connect(database_url, autocommit=True) as other:
        with pytest.raises(psycopg.errors.SerializationFailure) as raised:
            with transaction(url) as tx:
                tx.after_commit(lambda: published.append(1))
                tx.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                other.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
                tx.execute(f"SELECT count(*) FROM {proxy.table} WHERE id = 1")
                other.execute(f"SELECT count(*) FROM {proxy.table} WHERE id = 2")
                tx.execute(f"INSERT INTO {proxy.table} VALUES (2)")
                other.execute(f"INSERT INTO {proxy.table} VALUES (1)")
                other.execute("COMMIT")
                body_ended = True
    assert body_ended, "the failure must come from the COMMIT, not from a statement of the body"
    assert "commit" in str(raised.value.diag.message_detail or "").lower()
    assert published == [] and proxy.cuts == 0
    assert _rows(database_url, proxy.table) == [1]
    assert database_unavailable(raised.value)  # and a task runs it again (workers/tasks/base.py)


def test_a_create_whose_insert_answer_was_lost_queues_its_checkout_and_the_retry_finds_the_order(
        cut, system, tmp_path) -> None:
    """The create's INSERT is one autocommit statement: its answer lost, the order may exist. The
    checkout and the receipt are queued anyway (both read their rows first) and the buyer gets an error;
    their retry with the same Idempotency-Key finds the order and queues nothing twice."""
    proxy, url = cut
    prefix = f"meterai-commit-test-{uuid.uuid4().hex[:6]}:"  # no worker listens here: the messages stay
    settings = dataclasses.replace(system.settings, database_url=url, redis_key_prefix=prefix)
    previous = jobs._publisher
    publisher = use_broker(settings)  # this process's publisher, until the one before is put back below
    client = redis.Redis.from_url(settings.redis_url)
    queued = lambda name: [json.loads(m) for m in client.lrange(f"{prefix}{jobs.QUEUES[name]}", 0, -1)]  # noqa: E731
    new = NewOrder(idempotency_key=f"k-{uuid.uuid4().hex}", email="pelamar@example.id", page=1, x=0.5, y=0.5,
                   document=make_pdf(pages=1))
    store = FilesystemStore(tmp_path / "store")
    try:
        with transaction(url) as tx:  # the pool's connection made through the proxy
            tx.execute("SELECT 1")
        proxy.marker, proxy.mode = b"INSERT INTO orders", "commit_answer"
        with pytest.raises(psycopg.OperationalError):
            create_order(settings, store, new)
        assert proxy.cuts == 1
        with psycopg.connect(system.settings.database_url, autocommit=True) as conn:
            rows = conn.execute("SELECT id::text, status FROM orders WHERE idempotency_key = %s",
                                (new.idempotency_key,)).fetchall()
        assert len(rows) == 1 and rows[0][1] == "created"  # it did commit
        order_id = rows[0][0]
        assert [m["headers"]["argsrepr"] for m in queued(jobs.PREPARE_ORDER)] == [repr([order_id])]
        assert [m["headers"]["argsrepr"] for m in queued(jobs.SEND_MAIL)] == [repr([order_id, "receipt"])]

        again = create_order(settings, store, new)  # the buyer's retry
        assert not again.created and str(again.order["id"]) == order_id
        assert len(queued(jobs.PREPARE_ORDER)) == 1 and len(queued(jobs.SEND_MAIL)) == 1
    finally:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        client.close()
        jobs.set_publisher(previous)
        publisher.close()
        with psycopg.connect(system.settings.database_url, autocommit=True) as conn:
            ids = "SELECT id FROM orders WHERE idempotency_key = %(key)s"
            conn.execute(f"DELETE FROM order_events WHERE order_id IN ({ids})", {"key": new.idempotency_key})
            conn.execute(f"DELETE FROM mail_outbox WHERE order_id IN ({ids})", {"key": new.idempotency_key})
            conn.execute(f"DELETE FROM orders WHERE id IN ({ids})", {"key": new.idempotency_key})
