"""The state machine against a real database: compare-and-set, events and ledger in one transaction."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from shared import jobs
from shared.db import transaction
from shared.lifecycle import TRANSITIONS, IllegalTransition, Status, transition

ROOT = Path(__file__).resolve().parents[1]


def _insert_order(conn, status: str = "created") -> str:
    order_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO orders (id, idempotency_key, request_fingerprint, access_token_hashes, email, status,"
        " amount_idr, page, x, y, document_key, document_sha256, document_bytes)"
        " VALUES (%s, %s, 'f', ARRAY['h'], 'a@b.id', %s, 12500, 1, 1, 1, 'uploads/x.pdf', %s, 10)",
        (order_id, uuid.uuid4().hex, status, "0" * 64),
    )
    return order_id


def test_transition_is_compare_and_set_with_one_event(sys_):
    with sys_.db() as conn:
        order_id = _insert_order(conn)
    with transaction(sys_.settings.database_url) as tx:
        assert transition(tx, order_id, Status.CREATED, Status.AWAITING_PAYMENT) is not None
    with transaction(sys_.settings.database_url) as tx:  # second time: someone else already did it
        assert transition(tx, order_id, Status.CREATED, Status.AWAITING_PAYMENT) is None
    events = sys_.query("SELECT from_status, to_status FROM order_events WHERE order_id = %s", (order_id,))
    assert events == [{"from_status": "created", "to_status": "awaiting_payment"}]


def test_money_moving_transition_books_the_ledger_in_the_same_transaction(sys_):
    with sys_.db() as conn:
        order_id = _insert_order(conn, "awaiting_payment")
    with pytest.raises(RuntimeError):
        with transaction(sys_.settings.database_url) as tx:
            transition(tx, order_id, Status.AWAITING_PAYMENT, Status.PAID,
                       changes_sql={"refund_due_at": "now()"})
            raise RuntimeError("crash before commit")
    assert sys_.order_row(order_id)["status"] == "awaiting_payment"
    assert sys_.query("SELECT * FROM ledger_entries WHERE order_id = %s", (order_id,)) == []
    with transaction(sys_.settings.database_url) as tx:
        transition(tx, order_id, Status.AWAITING_PAYMENT, Status.PAID, changes_sql={"refund_due_at": "now()"})
    rows = sys_.query("SELECT kind, amount_idr FROM ledger_entries WHERE order_id = %s", (order_id,))
    assert rows == [{"kind": "captured", "amount_idr": 12500}]


def test_transitions_not_in_the_table_are_refused(sys_):
    with sys_.db() as conn:
        order_id = _insert_order(conn, "created")
    with pytest.raises(IllegalTransition):  # no skipping payment
        with transaction(sys_.settings.database_url) as tx:
            transition(tx, order_id, Status.CREATED, Status.STAMPED)
    assert sys_.order_row(order_id)["status"] == "created"
    assert (Status.REFUNDED, Status.STAMPED) not in TRANSITIONS


def test_database_refuses_unknown_status_and_fractional_money(sys_):
    import psycopg

    with sys_.db() as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            _insert_order(conn, "lost")
        order_id = _insert_order(conn)
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO ledger_entries (order_id, kind, amount_idr) VALUES"
                         " (%s, 'captured', 1), (%s, 'captured', 1)", (order_id, order_id))


def test_after_commit_work_is_not_published_on_rollback(sys_):
    published: list[tuple] = []

    class Recorder:
        def send_task(self, name, args=(), queue=None, **options):
            published.append((name, tuple(args), queue))

    previous = jobs._publisher
    jobs.set_publisher(Recorder())
    try:
        with pytest.raises(RuntimeError):
            with transaction(sys_.settings.database_url) as tx:
                jobs.enqueue_after_commit(tx, jobs.STAMP_ORDER, "o1")
                raise RuntimeError("rollback")
        assert published == []
        with transaction(sys_.settings.database_url) as tx:
            jobs.enqueue_after_commit(tx, jobs.STAMP_ORDER, "o2")
        assert published == [(jobs.STAMP_ORDER, ("o2",), "stamping")]
    finally:
        jobs.set_publisher(previous)


def test_procfile_workers_consume_exactly_the_queues_the_code_routes_to():
    consumed: set[str] = set()
    for line in (ROOT / "Procfile").read_text().splitlines():
        if "celery" in line and " worker " in line:
            queues = line.split("--queues", 1)[1].split()[0]
            consumed |= set(queues.split(","))
    assert consumed == set(jobs.ALL_QUEUES)
