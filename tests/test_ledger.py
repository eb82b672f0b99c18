"""The ledger report and its per-order balance rule (invariant 6 of DESIGN.md).

The rule is a pure function, tested on every order shape without services; the report is tested on
real rows in PostgreSQL, and ``meterai ledger-report`` as the process finance runs, by its exit code.
"""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import datetime, timedelta

import pytest

from shared.services.ledger import (
    WIB,
    LedgerReport,
    OrderMoney,
    TransactionMoney,
    format_report,
    ledger_report,
    order_problems,
    parse_bound,
)
from tests.conftest import ROOT

PRICE = 12_500


def own(captured: int | None = PRICE, **kinds: int | str | None) -> TransactionMoney:
    """The order's own capture: booked ``captured``, confirmed ``payment_captured`` (default equal)."""
    kinds.setdefault("payment_captured", captured)
    return TransactionMoney("MTR-own", role="order", captured=captured, **kinds)  # type: ignore[arg-type]


def extra(refund_status: str | None = "pending", **kinds: int | str | None) -> TransactionMoney:
    kinds.setdefault("payment_captured", PRICE)
    kinds.setdefault("captured", PRICE)
    return TransactionMoney("MTR-extra", role="extra", refund_status=refund_status, **kinds)  # type: ignore[arg-type]


def money(status: str, *transactions: TransactionMoney) -> OrderMoney:
    return OrderMoney(order_id="o", status=status, amount_idr=PRICE, transactions=transactions)


BALANCED = [
    money("created"),
    money("awaiting_payment"),
    money("expired"),
    money("rejected"),
    money("awaiting_payment", TransactionMoney("MTR-open", gateway_status="pending")),
    money("paid", own()),
    money("stamping", own()),
    money("refund_pending", own(refund_status="pending")),
    money("refund_manual", own(refund_status="manual")),
    money("stamped", own(revenue=PRICE)),
    money("refunded", own(refunded=PRICE, refund_status="succeeded")),
    # Paid twice: the second capture is refunded on its own, whatever became of the order.
    money("stamped", own(revenue=PRICE), extra("pending")),
    money("stamped", own(revenue=PRICE), extra("manual")),
    money("stamped", own(revenue=PRICE), extra("succeeded", refunded=PRICE)),
    money("refunded", own(refunded=PRICE, refund_status="succeeded"), extra("succeeded", refunded=PRICE)),
    money("rejected", extra("succeeded", refunded=PRICE)),
]


@pytest.mark.parametrize("shape", BALANCED, ids=lambda m: f"{m.status}-{len(m.transactions)}")
def test_every_legal_shape_of_an_orders_money_balances(shape: OrderMoney) -> None:
    assert order_problems(shape) == []
    report = LedgerReport(None, None)
    report.add(shape)
    assert report.totals_balance


@pytest.mark.parametrize("shape, complaint", [
    (money("stamped", own(revenue=PRICE, refunded=PRICE)), "both revenue and a refund"),
    (money("refunded", own(refunded=PRICE - 1, refund_status="succeeded")),
     "refunded 12499 differs from captured 12500"),
    (money("refunded", own(refunded=PRICE, refund_status="manual")), "refund record is manual"),
    (money("stamped", own()), "revenue None differs"),
    (money("stamped"), "no capture booked"),
    (money("expired", own()), "expired order has a capture of its own"),
    (money("awaiting_payment", TransactionMoney("MTR-x", role="order", payment_captured=PRICE)),
     "captured payment of 12500 not booked"),
    (money("paid", own(revenue=PRICE)), "already has an outcome"),
    (money("paid", own(payment_captured=None)), "confirmed payment is None"),
    # A capture without an outcome: paid twice and no refund of the second, or a capture the gateway
    # reported that nothing here booked.
    (money("stamped", own(revenue=PRICE), extra(None)), "extra capture of 12500 has no refund"),
    (money("stamped", own(revenue=PRICE), extra("succeeded")), "extra capture refunded None"),
    (money("stamped", own(revenue=PRICE), extra("pending", revenue=PRICE)), "extra capture has revenue"),
    (money("expired", TransactionMoney("MTR-late", gateway_status="settlement")),
     "reported it settlement, nothing booked"),
    (money("stamped", own(revenue=PRICE), TransactionMoney(None, captured=PRICE)), "name no gateway transaction"),
    (money("stamped", own(revenue=PRICE), own(revenue=PRICE)), "each booked as the order's own"),
])
def test_an_imbalanced_order_is_named_with_what_is_wrong(shape: OrderMoney, complaint: str) -> None:
    problems = order_problems(shape)
    assert problems and any(complaint in p for p in problems), problems


def test_period_bounds_are_whole_days_in_jakarta_time() -> None:
    assert parse_bound("2024-09-01") == datetime(2024, 9, 1, tzinfo=WIB)
    assert parse_bound("2024-09-30", end=True) == datetime(2024, 10, 1, tzinfo=WIB)
    assert parse_bound("2024-09-01T08:30") == datetime(2024, 9, 1, 8, 30, tzinfo=WIB)
    assert parse_bound("2024-09-01T08:30+00:00").utcoffset() == timedelta(0)
    with pytest.raises(ValueError):
        parse_bound("1 September")


# --- against the database --------------------------------------------------------------------------

def _order(conn, status: str, created_at: datetime | None = None) -> str:
    order_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO orders (id, idempotency_key, request_fingerprint, access_token_hashes, email, status,"
        " amount_idr, page, x, y, document_key, document_sha256, document_bytes, refund_due_at,"
        " serial, stamped_document_key, created_at)"
        " VALUES (%s, %s, 'f', ARRAY['h'], 'a@b.id', %s, %s, 1, 1, 1, 'uploads/x.pdf', %s, 10, now(), %s, %s,"
        " coalesce(%s, now()))",
        (order_id, uuid.uuid4().hex, status, PRICE, "0" * 64,
         "A" * 22 if status == "stamped" else None, "stamped/x.pdf" if status == "stamped" else None,
         created_at),
    )
    return order_id


def _captured(conn, order_id: str, *kinds: str, role: str = "order", suffix: str = "") -> str:
    gateway_order_id = f"MTR-{order_id}{suffix}"
    conn.execute(
        "INSERT INTO payments (gateway_order_id, order_id, amount_idr, captured_at, capture_role)"
        " VALUES (%s, %s, %s, now(), %s)",
        (gateway_order_id, order_id, PRICE, role),
    )
    for kind in ("captured", *kinds):
        conn.execute("INSERT INTO ledger_entries (order_id, gateway_order_id, kind, amount_idr)"
                     " VALUES (%s, %s, %s, %s)", (order_id, gateway_order_id, kind, PRICE))
    return gateway_order_id


def _ledger_cli(sys_, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", "ledger-report", *args], cwd=ROOT,
                          env=sys_.env, capture_output=True, text=True, timeout=60)


def test_report_totals_a_period_and_passes_when_every_order_balances(sys_):
    with sys_.db() as conn:
        stamped = _order(conn, "stamped")
        _captured(conn, stamped, "revenue")
        in_flight = _order(conn, "paid")
        _captured(conn, in_flight)
        _order(conn, "expired")
        old = _order(conn, "stamped", datetime(2020, 1, 15, tzinfo=WIB))
        _captured(conn, old, "revenue")

    report = ledger_report(sys_.settings, parse_bound("2021-01-01"), None)

    assert report.balanced, format_report(report)
    assert (report.orders, report.captured, report.revenue, report.refunded, report.in_flight) == (
        3, 2 * PRICE, PRICE, 0, PRICE)
    everything = _ledger_cli(sys_, "--json")
    assert everything.returncode == 0, everything.stderr
    assert json.loads(everything.stdout)["orders"] == 4
    january = _ledger_cli(sys_, "--from", "2020-01-01", "--to", "2020-01-31")
    assert january.returncode == 0 and "orders            1" in january.stdout
    assert "Balanced" in january.stdout


def test_report_exits_non_zero_and_lists_every_offending_order(sys_):
    with sys_.db() as conn:
        good = _order(conn, "stamped")
        _captured(conn, good, "revenue")
        both = _order(conn, "stamped")
        _captured(conn, both, "revenue")
        conn.execute("INSERT INTO refunds (order_id, gateway_order_id, refund_key, amount_idr, status, reason)"
                     " VALUES (%s, %s, %s, %s, 'succeeded', 'test')", (both, f"MTR-{both}", f"r-{both}", PRICE))
        conn.execute("INSERT INTO ledger_entries (order_id, gateway_order_id, kind, amount_idr)"
                     " VALUES (%s, %s, 'refunded', %s)", (both, f"MTR-{both}", PRICE))
        unbooked = _order(conn, "refunded")  # says refunded, but no money was ever booked
        twice = _order(conn, "stamped")  # paid twice, and nobody refunded the second capture
        _captured(conn, twice, "revenue")
        _captured(conn, twice, role="extra", suffix="-2")

    report = ledger_report(sys_.settings)
    assert not report.balanced
    assert {m.order_id for m, _ in report.imbalances} == {both, unbooked, twice}
    assert (report.extra_captures, report.extra_in_flight) == (1, PRICE)

    result = _ledger_cli(sys_)
    assert result.returncode == 1
    assert "IMBALANCED: 3 order(s)" in result.stdout and "extra captures    1" in result.stdout
    assert both in result.stdout and unbooked in result.stdout and good not in result.stdout
    assert f"MTR-{twice}-2: an extra capture of 12500 has no refund" in result.stdout

    with sys_.db() as conn:  # its refund is opened: in flight, and the books balance again for it
        conn.execute("INSERT INTO refunds (order_id, gateway_order_id, refund_key, amount_idr, status, reason)"
                     " VALUES (%s, %s, 'r2', %s, 'pending', 'duplicate_payment')", (twice, f"MTR-{twice}-2", PRICE))
    assert {m.order_id for m, _ in ledger_report(sys_.settings).imbalances} == {both, unbooked}
