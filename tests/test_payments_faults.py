"""Payments under every fault the stand-in gateway can inject, end to end over HTTP.

Each test drives the real system (web, stand-in gateway, Celery workers, PostgreSQL, Redis), makes the
gateway misbehave through its sandbox API, and asserts the final state in the database: no double
charge, no double refund, every captured payment stamped or refunded, and the ledger balanced — with
:func:`shared.services.ledger.ledger_report` (what ``meterai ledger-report`` runs) as the oracle.

This module runs its own checkout, payments, refunds and housekeeping workers with a 1-second
gateway timeout, so injected timeouts cost seconds, and a circuit breaker that won't open between tests
(consecutive failures from one test would otherwise open it for the next). The breaker has its own test
below, with a worker configured the production way against a gateway that never answers.
"""
from __future__ import annotations

import csv
import io
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from shared.payments.gateway import CircuitBreaker, MidtransGateway
from shared.services import housekeeping
from shared.services.ledger import LedgerReport, format_report, ledger_report
from shared.lifecycle import refund_key_for
from tests.conftest import ROOT, SERVER_KEY, make_pdf, wait_until
from tests.test_gateway import BlackHole

PRICE = 12_500


# --- helpers ---------------------------------------------------------------------------------------

BUT_STAMPING = ("checkout", "payments", "refunds", "housekeeping", "reconcile")


@contextmanager
def workers_but_stamping(system, **env: str) -> Iterator[None]:
    """Run every worker but stamping with ``env`` on top of its settings, then as before."""
    system.stop(*BUT_STAMPING)
    try:
        for name in BUT_STAMPING:
            system.launcher.start(name, env=env)
        system.launcher.wait_ready(BUT_STAMPING)
        yield
    finally:
        system.stop(*BUT_STAMPING)
        for name in BUT_STAMPING:
            system.launcher.start(name, env={})
        system.launcher.wait_ready(BUT_STAMPING)


@pytest.fixture(scope="module", autouse=True)
def quick_gateway_timeouts(system) -> Iterator[None]:
    with workers_but_stamping(system, GATEWAY_TIMEOUT_SECONDS="1", GATEWAY_BREAKER_THRESHOLD="1000"):
        yield


def balanced_ledger(sys_) -> LedgerReport:
    """The oracle: every order's money adds up (invariant 6)."""
    report = ledger_report(sys_.settings)
    assert report.balanced, format_report(report)
    return report


def ledger(sys_, order_id: str) -> dict[str, int]:
    rows = sys_.query("SELECT kind, amount_idr FROM ledger_entries WHERE order_id = %s", (order_id,))
    return {row["kind"]: row["amount_idr"] for row in rows}


def faults(sys_, **knobs: Any) -> dict[str, Any]:
    r = sys_.http.post(f"{sys_.gateway_url}/sandbox/faults", json=knobs, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def sandbox(sys_, path: str, body: dict[str, Any] | None = None) -> Any:
    return sys_.http.post(f"{sys_.gateway_url}/sandbox/{path}", json=body or {}, timeout=10)


def statuses(sys_, order_id: str) -> list[str]:
    return [e["to_status"] for e in sys_.events(order_id)]


def make_unstampable(sys_, order_id: str) -> None:
    """The upload turns out unreadable after preflight: stamping fails for good and the order is refunded."""
    sys_.replace_upload(order_id, b"%PDF-1.7\n" + b"\x00garbage" * 100)


def notifications_settled(sys_) -> bool:
    return not sys_.query("SELECT 1 FROM payment_notifications WHERE processed_at IS NULL")


def cli(sys_, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env=sys_.env,
                          capture_output=True, text=True, timeout=60)


# --- status confirmation ---------------------------------------------------------------------------

def test_latency_and_5xx_during_status_confirmation_are_retried_then_applied_once(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    faults(sys_, latency_ms=300, error_rate=1.0, endpoints=["status"], max_faults=3,
           duplicate_notifications=2)

    sys_.pay(gateway_order_id)
    done = sys_.wait_status(order_id, token, "stamped")

    injected = sys_.http.get(f"{sys_.gateway_url}/sandbox/faults", timeout=5).json()["injected"]
    assert injected == {"error": 3, "timeout": 0}  # the confirmation really failed three times
    [note] = sys_.query("SELECT outcome, processed_at FROM payment_notifications WHERE gateway_order_id = %s",
                        (gateway_order_id,))  # 3 copies, 1 stored
    assert note["outcome"] == "paid"
    assert statuses(sys_, order_id).count("paid") == 1 and done["serial"]
    assert ledger(sys_, order_id) == {"captured": PRICE, "revenue": PRICE}
    assert balanced_ledger(sys_).in_flight == 0


def test_stale_and_duplicate_notifications_after_settlement_change_nothing(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    faults(sys_, duplicate_notifications=2)
    sys_.pay(gateway_order_id)
    sys_.wait_status(order_id, token, "stamped")
    history = statuses(sys_, order_id)

    # Out of order: a "pending" and an "expire" from before the payment arrive after it.
    for stale in ("pending", "expire", "pending"):
        assert sandbox(sys_, f"notify/{gateway_order_id}", {"transaction_status": stale}).status_code == 202
    wait_until(lambda: len(sys_.gateway_record(gateway_order_id)["notifications"]) == 12
               and all(n["delivered"] for n in sys_.gateway_record(gateway_order_id)["notifications"]),
               message="every copy delivered")
    wait_until(lambda: notifications_settled(sys_), message="notifications processed")

    outcomes = sorted(r["outcome"] for r in sys_.query(
        "SELECT outcome FROM payment_notifications WHERE gateway_order_id = %s", (gateway_order_id,)))
    assert outcomes == ["duplicate", "duplicate", "paid"]  # each distinct body once; confirmed: settled
    assert statuses(sys_, order_id) == history
    assert sys_.status(order_id, token)["status"] == "stamped"
    assert ledger(sys_, order_id) == {"captured": PRICE, "revenue": PRICE}
    balanced_ledger(sys_)


def test_settlement_after_expire_is_refunded_automatically(sys_):
    """The gateway expired the transaction, then the bank settled it anyway: the money goes back."""
    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    assert sandbox(sys_, f"expire/{gateway_order_id}").status_code == 200
    expired = sys_.wait_status(order_id, token, "expired")
    assert sys_.order_row(order_id)["reason_code"] == "payment_expire" and ledger(sys_, order_id) == {}

    late = sandbox(sys_, f"pay/{gateway_order_id}", {"payment_type": "qris", "after_expiry": True})
    assert late.status_code == 200
    done = sys_.wait_status(order_id, token, "refunded")

    assert expired["status"] == "expired"
    assert statuses(sys_, order_id)[-3:] == ["expired", "refund_pending", "refunded"]
    assert sys_.order_row(order_id)["reason_code"] == "late_payment"
    assert done["refund"] == {"status": "succeeded", "amount": PRICE}
    assert [r["refund_key"] for r in sys_.gateway_record(gateway_order_id)["refunds"]] == [
        refund_key_for(gateway_order_id)]
    assert sys_.query("SELECT count(*) AS n FROM serials WHERE order_id = %s", (order_id,))[0]["n"] == 0
    assert ledger(sys_, order_id) == {"captured": PRICE, "refunded": PRICE}
    balanced_ledger(sys_)


# --- refunds ---------------------------------------------------------------------------------------

def test_timeouts_during_refund_still_refund_exactly_once(sys_):
    """The gateway refunds but answers too late: the retries reuse the refund key, or find it done."""
    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    make_unstampable(sys_, order_id)
    faults(sys_, timeout_rate=1.0, timeout_sleep_seconds=1.5, endpoints=["refund"], max_faults=2)

    sys_.pay(gateway_order_id)
    done = sys_.wait_status(order_id, token, "refunded")

    record = sys_.gateway_record(gateway_order_id)
    assert [r["refund_key"] for r in record["refunds"]] == [refund_key_for(gateway_order_id)]
    assert record["refunded_amount"] == PRICE and record["transaction_status"] == "refund"
    [refund] = sys_.query("SELECT * FROM refunds WHERE order_id = %s", (order_id,))
    # One or two timeouts, then the answer (or the status query showing the refund already made).
    assert refund["status"] == "succeeded" and refund["attempts"] in (2, 3)
    assert done["refund"] == {"status": "succeeded", "amount": PRICE}
    assert ledger(sys_, order_id) == {"captured": PRICE, "refunded": PRICE}
    balanced_ledger(sys_)


def test_refused_refunds_go_manual_then_finance_exports_and_pays_them_out(sys_, tmp_path):
    faults(sys_, refuse_refunds_for=["gopay"])
    refused, refused_token, refused_view = sys_.order_awaiting_payment(email="gopay@example.id")
    va, va_token, va_view = sys_.order_awaiting_payment(email="=HYPERLINK@example.id")
    for order_id in (refused, va):
        make_unstampable(sys_, order_id)
    sys_.pay(refused_view["payment"]["gateway_order_id"], payment_type="gopay")
    sys_.pay(va_view["payment"]["gateway_order_id"], payment_type="bank_transfer")
    sys_.wait_status(refused, refused_token, "refund_manual")
    sys_.wait_status(va, va_token, "refund_manual")
    assert balanced_ledger(sys_).in_flight == 2 * PRICE  # owed to the buyers, not lost

    export = tmp_path / "manual.csv"
    listed = cli(sys_, "manual-refunds", "--csv", str(export))
    assert listed.returncode == 0, listed.stderr
    rows = {row["order_id"]: row for row in csv.DictReader(io.StringIO(export.read_text()))}
    assert set(rows) == {refused, va}
    va_record = sys_.gateway_record(va_view["payment"]["gateway_order_id"])
    assert rows[va] | {"manual_since": ""} == {
        "order_id": va, "gateway_order_id": va_view["payment"]["gateway_order_id"],
        "payment_type": "bank_transfer", "amount_idr": str(PRICE),
        "buyer_email": "'=HYPERLINK@example.id",  # a spreadsheet shows it, never runs it
        "va_bank": "bca", "va_number": va_record["va_number"], "manual_since": "",
        "refund_reason": "unreadable", "why_manual": "Merchant cannot modify the status of the transaction",
    }
    assert (rows[refused]["payment_type"], rows[refused]["va_number"]) == ("gopay", "")
    assert rows[refused]["manual_since"] and rows[refused]["buyer_email"] == "gopay@example.id"

    paid = cli(sys_, "mark-refund-paid", refused, "--reference", "BCA-TRF-0001")
    assert paid.returncode == 0 and '"outcome": "refunded"' in paid.stdout, paid.stderr
    again = cli(sys_, "mark-refund-paid", refused, "--reference", "BCA-TRF-0001")
    assert again.returncode == 0 and '"outcome": "already_paid_out"' in again.stdout
    other = cli(sys_, "mark-refund-paid", refused, "--reference", "BCA-TRF-9999")
    assert other.returncode == 2 and "already paid out" in other.stderr
    assert cli(sys_, "mark-refund-paid", va, "--reference", "BNI-77").returncode == 0

    for order_id, reference in ((refused, "BCA-TRF-0001"), (va, "BNI-77")):
        assert sys_.status(order_id, refused_token if order_id == refused else va_token)["status"] == "refunded"
        [refund] = sys_.query("SELECT status, manual_reference FROM refunds WHERE order_id = %s", (order_id,))
        assert refund == {"status": "succeeded", "manual_reference": reference}
        assert ledger(sys_, order_id) == {"captured": PRICE, "refunded": PRICE}
        assert statuses(sys_, order_id)[-2:] == ["refund_manual", "refunded"]
    assert sys_.gateway_record(va_view["payment"]["gateway_order_id"])["refunds"] == []
    assert "0 manual refund(s)" in cli(sys_, "manual-refunds").stdout
    report = cli(sys_, "ledger-report")
    assert report.returncode == 0 and "Balanced" in report.stdout, report.stdout
    assert balanced_ledger(sys_).refunded == 2 * PRICE


def test_marking_an_order_that_is_not_manual_books_nothing(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    sys_.pay(view["payment"]["gateway_order_id"])
    sys_.wait_status(order_id, token, "stamped")

    result = cli(sys_, "mark-refund-paid", order_id, "--reference", "X-1")

    assert result.returncode == 2 and "not waiting for a manual refund" in result.stderr
    assert cli(sys_, "mark-refund-paid", str(uuid.uuid4()), "--reference", "X-1").returncode == 2
    assert ledger(sys_, order_id) == {"captured": PRICE, "revenue": PRICE}
    balanced_ledger(sys_)


# --- the gateway process itself ---------------------------------------------------------------------

def test_standin_restart_keeps_its_transactions(sys_):
    """The stand-in stops and a new one starts on its schema: pending, paid and refunded survive."""
    waiting, waiting_token, waiting_view = sys_.order_awaiting_payment()
    refunded, refunded_token, refunded_view = sys_.order_awaiting_payment()
    make_unstampable(sys_, refunded)
    sys_.pay(refunded_view["payment"]["gateway_order_id"])
    sys_.wait_status(refunded, refunded_token, "refunded")
    wait_until(lambda: notifications_settled(sys_), message="notifications processed")

    sys_.restart("gateway")

    waiting_record = sys_.gateway_record(waiting_view["payment"]["gateway_order_id"])
    assert waiting_record["transaction_status"] == "pending"
    refunded_gid = refunded_view["payment"]["gateway_order_id"]
    assert sys_.gateway_record(refunded_gid)["transaction_status"] == "refund"
    adapter = MidtransGateway(sys_.gateway_url, SERVER_KEY, timeout=3, breaker=CircuitBreaker())
    repeat = adapter.refund(refunded_gid, refund_key=refund_key_for(refunded_gid), amount=PRICE, reason="x")
    assert repeat.refunded and len(sys_.gateway_record(refunded_gid)["refunds"]) == 1
    page = sys_.http.get(waiting_view["payment"]["redirect_url"], timeout=5)
    assert page.status_code == 200 and "Bayar sekarang" in page.text  # the buyer's link still works

    sys_.pay(waiting_view["payment"]["gateway_order_id"])
    sys_.wait_status(waiting, waiting_token, "stamped")
    assert ledger(sys_, waiting) == {"captured": PRICE, "revenue": PRICE}
    balanced_ledger(sys_)



def test_dead_gateway_opens_the_breaker_without_eating_worker_slots(sys_):
    """A gateway that accepts connections and never answers: after a few timeouts per worker process
    the breaker fails every call at once, refunds wait (nothing booked), and the same workers keep
    serving other work; once the gateway is back, each refund happens exactly once."""
    ids = sys_.paid_orders_past_deadline(4)
    wait_until(lambda: notifications_settled(sys_), message="notifications processed")
    hole = BlackHole()
    try:
        with workers_but_stamping(sys_, GATEWAY_URL=hole.url, GATEWAY_TIMEOUT_SECONDS="1",
                                  GATEWAY_BREAKER_THRESHOLD="2", GATEWAY_BREAKER_COOLDOWN_SECONDS="600",
                                  REFUND_MAX_RETRIES="8"):
            assert housekeeping.sweep_refunds(sys_.settings) == 4
            # Meanwhile a buyer uploads a document that can't be stamped: checkout goes on.
            rejected = sys_.create(make_pdf(pages=2), page=5)
            assert rejected.status_code == 202
            body = rejected.json()
            sys_.wait_status(body["order_id"], body["access_token"], "rejected", timeout=15)

            def attempts() -> int:
                return sys_.query("SELECT coalesce(sum(attempts), 0) AS n FROM refunds")[0]["n"]

            wait_until(lambda: attempts() >= 4 * 9, timeout=60, message="every refund attempt made")
            errors = [r["last_error"] for r in sys_.query("SELECT last_error FROM refunds")]
            # 36 attempts, but at most threshold (2) per worker process (refunds has 1 or 2) ever reached the wire.
            assert len(hole.accepted) <= 4
            assert all("circuit is open" in (e or "") for e in errors), errors
            assert {sys_.order_row(o)["status"] for o in ids} == {"refund_pending"}
            assert sys_.query("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'refunded'")[0]["n"] == 0
    finally:
        hole.close()

    counts = housekeeping.redrive(sys_.settings)  # the gateway is back: refunds are due again
    assert counts["meterai.refunds.refund_order"] == 4
    wait_until(lambda: {sys_.order_row(o)["status"] for o in ids} == {"refunded"}, timeout=60,
               message="refunds after the gateway came back")
    for order_id in ids:
        gid = sys_.query("SELECT gateway_order_id FROM refunds WHERE order_id = %s", (order_id,))[0]
        assert len(sys_.gateway_record(gid["gateway_order_id"])["refunds"]) == 1
        assert ledger(sys_, order_id) == {"captured": PRICE, "refunded": PRICE}
    assert balanced_ledger(sys_).in_flight == 0
