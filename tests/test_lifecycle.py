"""The state machine against a real database: compare-and-set, events and ledger in one transaction."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from shared import jobs
from shared.db import transaction
from shared.lifecycle import (
    NOW,
    TRANSITIONS,
    CaptureRole,
    IllegalTransition,
    RefundStatus,
    Status,
    book_capture,
    open_refund,
    refund_transition,
    transition,
)

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


def _payment(conn, order_id: str, suffix: str = "1") -> str:
    gateway_order_id = f"MTR-{order_id}-{suffix}"
    conn.execute("INSERT INTO payments (gateway_order_id, order_id, amount_idr) VALUES (%s, %s, 12500)",
                 (gateway_order_id, order_id))
    return gateway_order_id


def test_a_capture_is_booked_once_per_transaction_with_the_order_move(sys_):
    with sys_.db() as conn:
        order_id = _insert_order(conn, "awaiting_payment")
        first, second = _payment(conn, order_id, "1"), _payment(conn, order_id, "2")
    paid = {"changes": {"refund_due_at": NOW}, "capture": (first, 12500)}
    with pytest.raises(IllegalTransition):  # the move says it books the order's capture: it needs it
        with transaction(sys_.settings.database_url) as tx:
            transition(tx, order_id, Status.AWAITING_PAYMENT, Status.PAID, changes={"refund_due_at": NOW})
    with pytest.raises(RuntimeError):
        with transaction(sys_.settings.database_url) as tx:
            transition(tx, order_id, Status.AWAITING_PAYMENT, Status.PAID, **paid)
            raise RuntimeError("crash before commit")
    assert sys_.order_row(order_id)["status"] == "awaiting_payment"
    assert sys_.query("SELECT * FROM ledger_entries WHERE order_id = %s", (order_id,)) == []
    with transaction(sys_.settings.database_url) as tx:
        assert transition(tx, order_id, Status.AWAITING_PAYMENT, Status.PAID, **paid) is not None
    with transaction(sys_.settings.database_url) as tx:  # a duplicate notification: booked before
        assert book_capture(tx, first, 12500, CaptureRole.ORDER) is None
        assert book_capture(tx, second, 12500, CaptureRole.EXTRA) is not None  # paid twice: its own row
    rows = sys_.query("SELECT gateway_order_id, kind, amount_idr FROM ledger_entries WHERE order_id = %s"
                      " ORDER BY id", (order_id,))
    assert rows == [{"gateway_order_id": first, "kind": "captured", "amount_idr": 12500},
                    {"gateway_order_id": second, "kind": "captured", "amount_idr": 12500}]


def test_revenue_is_booked_against_the_orders_own_capture(sys_):
    with sys_.db() as conn:
        order_id = _insert_order(conn, "awaiting_payment")
        own, extra = _payment(conn, order_id, "1"), _payment(conn, order_id, "2")
        conn.execute("UPDATE orders SET status = 'stamping', refund_due_at = now(), serial = %s,"
                     " stamped_document_key = 'k' WHERE id = %s", ("A" * 22, order_id))
        conn.execute("INSERT INTO serials (serial, order_id, status) VALUES (%s, %s, 'reserved')",
                     ("A" * 22, order_id))
    with transaction(sys_.settings.database_url) as tx:
        book_capture(tx, extra, 12500, CaptureRole.EXTRA)
        book_capture(tx, own, 12500, CaptureRole.ORDER)
        transition(tx, order_id, Status.STAMPING, Status.STAMPED, changes={"stamped_sha256": "0" * 64})
    [revenue] = sys_.query("SELECT gateway_order_id, amount_idr FROM ledger_entries WHERE kind = 'revenue'"
                           " AND order_id = %s", (order_id,))
    assert revenue == {"gateway_order_id": own, "amount_idr": 12500}


def test_a_refund_moves_through_its_own_table_and_books_once(sys_):
    with sys_.db() as conn:
        order_id = _insert_order(conn, "rejected")
        gateway_order_id = _payment(conn, order_id)
    with transaction(sys_.settings.database_url) as tx:
        payment = book_capture(tx, gateway_order_id, 12500, CaptureRole.EXTRA)
        assert open_refund(tx, payment, reason="duplicate_payment")
        assert not open_refund(tx, payment, reason="duplicate_payment")  # one per transaction
    with transaction(sys_.settings.database_url) as tx:
        assert refund_transition(tx, gateway_order_id, RefundStatus.PENDING, RefundStatus.MANUAL) is not None
        assert refund_transition(tx, gateway_order_id, RefundStatus.PENDING, RefundStatus.SUCCEEDED) is None
        assert refund_transition(tx, gateway_order_id, RefundStatus.MANUAL, RefundStatus.SUCCEEDED) is not None
    with pytest.raises(IllegalTransition):
        with transaction(sys_.settings.database_url) as tx:
            refund_transition(tx, gateway_order_id, RefundStatus.SUCCEEDED, RefundStatus.PENDING)
    kinds = [r["kind"] for r in sys_.query("SELECT kind FROM ledger_entries WHERE order_id = %s ORDER BY id",
                                           (order_id,))]
    assert kinds == ["captured", "refunded"]
    assert sys_.order_row(order_id)["status"] == "rejected"  # an extra capture's refund leaves the order alone


def test_a_checkout_that_cannot_open_a_payment_may_expire():
    assert (Status.CREATED, Status.EXPIRED) in TRANSITIONS


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
        gateway_order_id = _payment(conn, order_id)
        with pytest.raises(psycopg.errors.UniqueViolation):  # one capture per transaction
            conn.execute("INSERT INTO ledger_entries (order_id, gateway_order_id, kind, amount_idr) VALUES"
                         " (%s, %s, 'captured', 1), (%s, %s, 'captured', 1)",
                         (order_id, gateway_order_id, order_id, gateway_order_id))
        with pytest.raises(psycopg.errors.CheckViolation):  # every ledger row names its transaction
            conn.execute("INSERT INTO ledger_entries (order_id, kind, amount_idr) VALUES (%s, 'captured', 1)",
                         (order_id,))
        second = _payment(conn, order_id, "2")
        conn.execute("UPDATE payments SET captured_at = now(), capture_role = 'order' WHERE gateway_order_id = %s",
                     (gateway_order_id,))
        with pytest.raises(psycopg.errors.UniqueViolation):  # one capture is the order's own
            conn.execute("UPDATE payments SET captured_at = now(), capture_role = 'order'"
                         " WHERE gateway_order_id = %s", (second,))


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


def test_the_moves_say_what_happens_to_serials_leases_and_refunds():
    """What moves with an order is declared beside the move, once (and these are the rules the
    invariants rely on: a serial is reserved by the claim, used by the stamp, voided by a refund)."""
    from shared.lifecycle import Lease, Serial

    claims = {key: move for key, move in TRANSITIONS.items() if move.serial is Serial.RESERVE}
    assert set(claims) == {(Status.PAID, Status.STAMPING), (Status.STAMPING, Status.STAMPING)}
    assert all(move.lease is Lease.TAKE for move in claims.values())
    assert TRANSITIONS[(Status.STAMPING, Status.STAMPED)].serial is Serial.USE
    assert {key for key, move in TRANSITIONS.items() if move.capture} == {
        (Status.AWAITING_PAYMENT, Status.PAID), (Status.EXPIRED, Status.REFUND_PENDING)}
    into_refund = {key for key in TRANSITIONS if key[1] == Status.REFUND_PENDING}
    assert all(TRANSITIONS[key].refund == (None, RefundStatus.PENDING) for key in into_refund)
    assert all(TRANSITIONS[key].serial is Serial.VOID for key in into_refund if key[0] != Status.EXPIRED)


def test_a_claim_reserves_one_serial_that_retries_reuse_and_a_refund_voids(sys_):
    with sys_.db() as conn:
        order_id = _insert_order(conn, "awaiting_payment")
        conn.execute("UPDATE orders SET status = 'paid', refund_due_at = now() + interval '1 hour'"
                     " WHERE id = %s", (order_id,))
        gateway_order_id = _payment(conn, order_id)
    with transaction(sys_.settings.database_url) as tx:
        book_capture(tx, gateway_order_id, 12500, CaptureRole.ORDER)
        first = transition(tx, order_id, Status.PAID, Status.STAMPING, lease=("worker-a", 60))
    with sys_.db() as conn:
        conn.execute("UPDATE orders SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (order_id,))
    with transaction(sys_.settings.database_url) as tx:
        again = transition(tx, order_id, Status.STAMPING, Status.STAMPING, lease=("worker-b", 60))
    assert first["serial"] == again["serial"] and again["stamp_attempts"] == 2
    assert again["lease_owner"] == "worker-b"
    with transaction(sys_.settings.database_url) as tx:
        assert transition(tx, order_id, Status.STAMPING, Status.REFUND_PENDING, refund_reason="stamp_deadline")
    [serial] = sys_.query("SELECT status FROM serials WHERE order_id = %s", (order_id,))
    assert serial["status"] == "voided"
    [refund] = sys_.query("SELECT status, refund_key FROM refunds WHERE order_id = %s", (order_id,))
    assert refund == {"status": "pending", "refund_key": f"refund-{gateway_order_id}"}
    assert sys_.order_row(order_id)["lease_owner"] is None


def _paid_order_beside_one_holding(sys_, serial: str) -> tuple[str, str]:
    """(another order holding ``serial`` reserved, a paid order to claim)."""
    with sys_.db() as conn:
        other, order_id = _insert_order(conn), _insert_order(conn, "awaiting_payment")
        conn.execute("UPDATE orders SET status = 'paid', refund_due_at = now() + interval '1 hour'"
                     " WHERE id = %s", (order_id,))
        conn.execute("INSERT INTO serials (serial, order_id, status) VALUES (%s, %s, 'reserved')", (serial, other))
    return other, order_id


def test_a_drawn_serial_that_is_taken_already_is_drawn_again(sys_, monkeypatch):
    """The reservation is one statement that reserves nothing on a collision: the claim draws again and
    the order gets the second serial, the other order keeps its own."""
    from shared import lifecycle

    other, order_id = _paid_order_beside_one_holding(sys_, "TAKENTAKENTAKENTAKEN00")
    drawn = iter(["TAKENTAKENTAKENTAKEN00", "FRESHFRESHFRESHFRESH00"])
    monkeypatch.setattr(lifecycle, "new_serial", lambda: next(drawn))
    with transaction(sys_.settings.database_url) as tx:
        claimed = transition(tx, order_id, Status.PAID, Status.STAMPING, lease=("worker-a", 60))
    assert claimed["serial"] == "FRESHFRESHFRESHFRESH00" == sys_.order_row(order_id)["serial"]
    rows = sys_.query("SELECT serial, order_id::text AS order_id, status FROM serials WHERE order_id IN (%s, %s)"
                      " ORDER BY serial", (other, order_id))
    assert rows == [{"serial": "FRESHFRESHFRESHFRESH00", "order_id": order_id, "status": "reserved"},
                    {"serial": "TAKENTAKENTAKENTAKEN00", "order_id": other, "status": "reserved"}]


def test_a_serial_drawn_taken_every_time_fails_the_claim_instead_of_looping(sys_, monkeypatch):
    from shared import lifecycle

    _, order_id = _paid_order_beside_one_holding(sys_, "TAKENTAKENTAKENTAKEN11")
    monkeypatch.setattr(lifecycle, "new_serial", lambda: "TAKENTAKENTAKENTAKEN11")
    with pytest.raises(IllegalTransition, match="no free serial"):
        with transaction(sys_.settings.database_url) as tx:
            transition(tx, order_id, Status.PAID, Status.STAMPING, lease=("worker-a", 60))
    assert sys_.order_row(order_id)["status"] == "paid"  # nothing of the claim committed


def test_a_move_returns_the_order_row_and_writes_its_event_with_reason_and_detail(sys_):
    """The move and its event are one statement: the row handed back is the order's own columns, and
    the event says what the move said."""
    with sys_.db() as conn:
        order_id = _insert_order(conn)
        columns = [c.name for c in conn.execute("SELECT * FROM orders LIMIT 0").description]
    with transaction(sys_.settings.database_url) as tx:
        row = transition(tx, order_id, Status.CREATED, Status.AWAITING_PAYMENT, detail={"gateway_order_id": "G-1"})
        plain = transition(tx, order_id, Status.AWAITING_PAYMENT, Status.EXPIRED, reason="unpaid")
    assert list(row) == columns and row["status"] == "awaiting_payment" and plain["status"] == "expired"
    events = sys_.query("SELECT from_status, to_status, reason, detail FROM order_events WHERE order_id = %s"
                        " ORDER BY id", (order_id,))
    assert events == [
        {"from_status": "created", "to_status": "awaiting_payment",
         "reason": TRANSITIONS[(Status.CREATED, Status.AWAITING_PAYMENT)].meaning, "detail": {"gateway_order_id": "G-1"}},
        {"from_status": "awaiting_payment", "to_status": "expired", "reason": "unpaid", "detail": None}]


def test_the_orders_own_refund_moves_with_the_order_or_neither_moves(sys_):
    with sys_.db() as conn:
        order_id = _insert_order(conn, "expired")
        gateway_order_id = _payment(conn, order_id)
    with transaction(sys_.settings.database_url) as tx:
        transition(tx, order_id, Status.EXPIRED, Status.REFUND_PENDING, refund_reason="late_payment",
                   capture=(gateway_order_id, 12500))
    with sys_.db() as conn:  # the refund went to manual payout behind the order's back
        conn.execute("UPDATE refunds SET status = 'manual' WHERE gateway_order_id = %s", (gateway_order_id,))
    with pytest.raises(IllegalTransition):
        with transaction(sys_.settings.database_url) as tx:
            transition(tx, order_id, Status.REFUND_PENDING, Status.REFUNDED)
    assert sys_.order_row(order_id)["status"] == "refund_pending"  # rolled back, nothing booked
    assert not sys_.query("SELECT 1 FROM ledger_entries WHERE kind = 'refunded'")


def test_callers_pass_values_not_sql(sys_):
    with sys_.db() as conn:
        order_id = _insert_order(conn)
    with transaction(sys_.settings.database_url) as tx:
        row = transition(tx, order_id, Status.CREATED, Status.REJECTED,
                         changes={"reason_code": "now()", "reason_message": "x'; DROP TABLE orders; --"})
    assert row["reason_code"] == "now()"  # a value, stored as given
    assert sys_.query("SELECT count(*) AS n FROM orders")[0]["n"] == 1


def test_no_production_module_writes_what_lifecycle_owns():
    """Events, serials, refund statuses and captures are written in shared/lifecycle.py alone."""
    import re

    owned = re.compile(r"INTO order_events|UPDATE serials|INTO serials|UPDATE refunds SET status|"
                       r"INTO refunds|SET captured_at|INTO ledger_entries")  # SQL, as this codebase writes it
    offenders = []
    for folder in ("shared", "web", "workers"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "lifecycle.py" or "devtools" in path.parts or "standin" in path.name:
                continue
            if owned.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
