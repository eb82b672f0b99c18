"""Every capture has exactly one outcome, whatever the gateway does and whatever notification is lost.

End to end on the real system (web, stand-in gateway, Celery workers, PostgreSQL, Redis): a checkout
whose payment can't be opened ends instead of waiting for ever; an order paid twice gets its second
capture refunded on its own; an unsettled card capture is voided, a settled one refunded; a capture
that lands after the order expired, with every notification dropped, is still found by the watch of
every transaction and refunded. The oracles: ``ledger_report`` (our books add up, and a capture without
an outcome is flagged) and ``meterai gateway-reconcile`` (every capture the gateway made has its outcome
here).

Like tests/test_payments_faults.py, this module runs its own checkout, payments, refunds and
housekeeping workers with a 1-second gateway timeout and a breaker that won't open between tests.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from shared.lifecycle import refund_key_for
from shared.payments.gateway import CircuitBreaker, MidtransGateway
from shared.services import housekeeping, refunds
from shared.services.ledger import LedgerReport, format_report, ledger_report
from tests.conftest import ROOT, SERVER_KEY, wait_until
from tests.test_payments_faults import make_unstampable, workers_but_stamping

PRICE = 12_500


@pytest.fixture(scope="module", autouse=True)
def quick_gateway_timeouts(system) -> Iterator[None]:
    with workers_but_stamping(system, GATEWAY_TIMEOUT_SECONDS="1", GATEWAY_BREAKER_THRESHOLD="1000"):
        yield


# --- helpers ---------------------------------------------------------------------------------------

def cli(sys_, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env={**sys_.env, **env},
                          capture_output=True, text=True, timeout=120)


def faults(sys_, **knobs: Any) -> None:
    r = sys_.http.post(f"{sys_.gateway_url}/sandbox/faults", json=knobs, timeout=5)
    assert r.status_code == 200, r.text


def sandbox(sys_, path: str, body: dict[str, Any] | None = None) -> requests.Response:
    return sys_.http.post(f"{sys_.gateway_url}/sandbox/{path}", json=body or {}, timeout=10)


def adapter(sys_) -> MidtransGateway:
    return MidtransGateway(sys_.gateway_url, SERVER_KEY, timeout=5, breaker=CircuitBreaker())


def balanced(sys_) -> LedgerReport:
    report = ledger_report(sys_.settings)
    assert report.balanced, format_report(report)
    return report


def entries(sys_, order_id: str) -> list[tuple[str, str, int]]:
    return [(r["gateway_order_id"], r["kind"], r["amount_idr"]) for r in sys_.query(
        "SELECT gateway_order_id, kind, amount_idr FROM ledger_entries WHERE order_id = %s ORDER BY id",
        (order_id,))]


def refund_rows(sys_, order_id: str) -> dict[str, dict[str, Any]]:
    return {r["gateway_order_id"]: r for r in sys_.query("SELECT * FROM refunds WHERE order_id = %s", (order_id,))}


def since(sys_) -> str:
    """A period start for gateway-reconcile: now (the stand-in keeps earlier tests' captures)."""
    return sys_.query("SELECT now()::text AS t")[0]["t"].replace(" ", "T")


def until(sys_) -> str:
    return sys_.query("SELECT (now() + interval '1 hour')::text AS t")[0]["t"].replace(" ", "T")


def gateway_reconcile(sys_, start: str, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(sys_, "gateway-reconcile", "--from", start, "--to", until(sys_), *args)


def due_now(sys_, gateway_order_id: str) -> None:
    sys_.query("UPDATE payments SET next_poll_at = now() - interval '1 second' WHERE gateway_order_id = %s"
               " RETURNING gateway_order_id", (gateway_order_id,))


def second_transaction(sys_, order_id: str) -> str:
    """Open another payable gateway transaction for an order, the way checkout opens one (a buyer with
    two tabs, a retried checkout whose first link reached the buyer anyway)."""
    from shared.services.checkout import ITEM_NAME, _open_payment_row

    order = sys_.order_row(order_id)
    gateway_order_id = _open_payment_row(sys_.settings, order)
    created = adapter(sys_).create_transaction(gateway_order_id, order["amount_idr"], email=order["email"],
                                               item_name=ITEM_NAME)
    sys_.query("UPDATE payments SET token = %s, redirect_url = %s WHERE gateway_order_id = %s RETURNING 1",
               (created.token, created.redirect_url, gateway_order_id))
    return gateway_order_id


def settled_notifications(sys_) -> bool:
    return not sys_.query("SELECT 1 FROM payment_notifications WHERE processed_at IS NULL")


# --- point 2: a checkout that can't open a payment ends ------------------------------------------------

def test_checkout_that_cannot_open_a_payment_expires_with_a_reason_and_no_charge(sys_):
    faults(sys_, error_rate=1.0, endpoints=["create"])
    r = sys_.create()
    assert r.status_code == 202
    order_id, token = r.json()["order_id"], r.json()["access_token"]

    view = sys_.wait_status(order_id, token, "expired", timeout=90)

    assert view["reason"]["code"] == "payment_not_opened"
    assert "Anda tidak dikenai biaya" in view["reason"]["message"] and "payment" not in view
    assert [e["to_status"] for e in sys_.events(order_id)] == ["created", "expired"]
    assert entries(sys_, order_id) == []
    attempts = sys_.query("SELECT next_poll_at FROM payments WHERE order_id = %s", (order_id,))
    assert len(attempts) == 11 and all(a["next_poll_at"] for a in attempts)  # every attempt stays watched
    assert housekeeping.redrive(sys_.settings)["meterai.checkout.prepare_order"] == 0
    balanced(sys_)


def test_checkout_whose_message_was_lost_is_not_redriven_past_its_deadline_but_expired(sys_):
    sys_.stop("checkout")  # nobody checks the order out: as if its message had been lost
    try:
        r = sys_.create()
        order_id, token = r.json()["order_id"], r.json()["access_token"]
        sys_.query("UPDATE orders SET created_at = now() - interval '59 minutes',"
                   " updated_at = now() - interval '59 minutes' WHERE id = %s RETURNING id", (order_id,))
        assert housekeeping.redrive(sys_.settings)["meterai.checkout.prepare_order"] == 1  # still in time
        sys_.query("UPDATE orders SET created_at = now() - interval '61 minutes' WHERE id = %s RETURNING id",
                   (order_id,))
        assert housekeeping.redrive(sys_.settings)["meterai.checkout.prepare_order"] == 0  # never again

        result = cli(sys_, "expire-unpaid")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"queued": 0, "checkouts_expired": 1}
    finally:
        sys_.start("checkout")
    view = sys_.status(order_id, token)
    assert view["status"] == "expired" and view["reason"]["code"] == "payment_not_opened"
    assert json.loads(cli(sys_, "expire-unpaid").stdout)["checkouts_expired"] == 0
    wait_until(lambda: sys_.query("SELECT count(*) AS n FROM payments WHERE order_id = %s", (order_id,))[0]["n"]
               == 0 and sys_.status(order_id, token)["status"] == "expired", message="checkout skipped")
    balanced(sys_)


def test_a_payment_that_slips_into_a_failing_checkout_is_refunded_and_the_rest_cancelled(sys_):
    """The gateway creates each transaction but answers too late, so checkout retries until it gives up;
    meanwhile one of those transactions gets paid. That capture is refunded, every other transaction is
    cancelled at the gateway, and the order expires without a charge."""
    faults(sys_, timeout_rate=1.0, timeout_sleep_seconds=1.5, endpoints=["create"])
    r = sys_.create()
    order_id, token = r.json()["order_id"], r.json()["access_token"]

    def opened_at_gateway() -> str | None:
        for row in sys_.query("SELECT gateway_order_id FROM payments WHERE order_id = %s", (order_id,)):
            record = sys_.http.get(f"{sys_.gateway_url}/sandbox/transactions/{row['gateway_order_id']}", timeout=5)
            if record.status_code == 200 and record.json()["transaction_status"] == "pending":
                return row["gateway_order_id"]
        return None

    slipped = wait_until(opened_at_gateway, timeout=30, message="a transaction opened at the gateway")
    sys_.pay(slipped)
    view = sys_.wait_status(order_id, token, "expired", timeout=120)
    wait_until(lambda: refund_rows(sys_, order_id).get(slipped, {}).get("status") == "succeeded",
               timeout=60, message="the slipped-in payment refunded")

    assert view["reason"]["code"] == "payment_not_opened"
    assert sys_.gateway_record(slipped)["transaction_status"] == "refund"
    others = [row["gateway_order_id"] for row in sys_.query(
        "SELECT gateway_order_id FROM payments WHERE order_id = %s AND gateway_order_id <> %s", (order_id, slipped))]
    # A timed-out create may land at the gateway after checkout cancelled what it knew of: the watch
    # finds it still payable and cancels it (as it would at its next look; here, now). Every create the
    # stand-in was sent does land (a "timeout" sleeps, then does the work): wait for all of them, so
    # none lands after the watch has looked.
    def landed(gateway_order_id: str) -> bool:
        return sys_.http.get(f"{sys_.gateway_url}/sandbox/transactions/{gateway_order_id}",
                             timeout=5).status_code == 200
    wait_until(lambda: all(landed(g) for g in others), timeout=30, message="every create landed at the gateway")
    for gateway_order_id in others:
        due_now(sys_, gateway_order_id)
    assert cli(sys_, "reconcile", "--inline").returncode == 0
    for gateway_order_id in others:
        record = sys_.http.get(f"{sys_.gateway_url}/sandbox/transactions/{gateway_order_id}", timeout=5)
        assert record.json()["transaction_status"] == "cancel", gateway_order_id  # no longer payable
    assert entries(sys_, order_id) == [(slipped, "captured", PRICE), (slipped, "refunded", PRICE)]
    assert sys_.status(order_id, token)["status"] == "expired"
    balanced(sys_)


def test_the_watch_cancels_a_payable_transaction_of_an_order_that_takes_no_payment(sys_):
    sys_.stop("checkout")  # the order takes no payment: nobody checks it out
    try:
        r = sys_.create()
        order_id, token = r.json()["order_id"], r.json()["access_token"]
        gateway_order_id = second_transaction(sys_, order_id)  # a checkout attempt whose answer was lost
        sys_.query("UPDATE payments SET token = NULL WHERE gateway_order_id = %s RETURNING 1", (gateway_order_id,))
        sys_.query("UPDATE orders SET created_at = now() - interval '2 hours' WHERE id = %s RETURNING id",
                   (order_id,))
        assert json.loads(cli(sys_, "expire-unpaid").stdout)["checkouts_expired"] == 1
    finally:
        sys_.start("checkout")
    due_now(sys_, gateway_order_id)

    polled = cli(sys_, "reconcile", "--inline")

    assert json.loads(polled.stdout) == {"checked": 1, "outcomes": {"cancelled": 1}}, polled.stderr
    assert sys_.gateway_record(gateway_order_id)["transaction_status"] == "cancel"
    assert sandbox(sys_, f"pay/{gateway_order_id}").status_code == 409
    assert sys_.status(order_id, token)["status"] == "expired"
    balanced(sys_)


# --- point 3: two captures of one order ------------------------------------------------------------------

def test_second_capture_of_a_stamped_order_is_refunded_on_its_own(sys_):
    start = since(sys_)
    order_id, token, view = sys_.order_awaiting_payment()
    first = view["payment"]["gateway_order_id"]
    second = second_transaction(sys_, order_id)
    sys_.pay(first)
    sys_.wait_status(order_id, token, "stamped")

    sys_.pay(second)  # the buyer pays again, in the other tab
    wait_until(lambda: refund_rows(sys_, order_id).get(second, {}).get("status") == "succeeded",
               message="the second capture refunded")

    done = sys_.status(order_id, token)
    assert done["status"] == "stamped" and "refund" not in done  # the order's own outcome is untouched
    [refund] = refund_rows(sys_, order_id).values()
    assert (refund["gateway_order_id"], refund["reason"], refund["refund_key"]) == (
        second, "duplicate_payment", refund_key_for(second))
    assert sorted(entries(sys_, order_id)) == sorted([
        (first, "captured", PRICE), (first, "revenue", PRICE),
        (second, "captured", PRICE), (second, "refunded", PRICE)])
    assert sys_.gateway_record(second)["transaction_status"] == "refund"
    assert sys_.gateway_record(first)["refunds"] == []
    report = balanced(sys_)
    assert (report.extra_captures, report.extra_refunded, report.in_flight) == (1, PRICE, 0)
    ledger_cli = cli(sys_, "ledger-report")
    assert ledger_cli.returncode == 0 and "extra captures    1" in ledger_cli.stdout, ledger_cli.stdout
    proof = gateway_reconcile(sys_, start, "--json")
    assert proof.returncode == 0, proof.stdout
    outcomes = {c["gateway_order_id"]: c["outcome"] for c in json.loads(proof.stdout)["checks"]}
    assert outcomes == {first: "revenue", second: "refunded"}


def test_second_capture_by_bank_transfer_waits_for_a_manual_payout_then_is_booked_once(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    first = view["payment"]["gateway_order_id"]
    second = second_transaction(sys_, order_id)
    sys_.pay(first)
    sys_.wait_status(order_id, token, "stamped")
    sys_.pay(second, payment_type="bank_transfer")
    wait_until(lambda: refund_rows(sys_, order_id).get(second, {}).get("status") == "manual",
               message="the second capture sent to a manual payout")
    assert balanced(sys_).in_flight == PRICE  # owed to the buyer, not lost

    listed = cli(sys_, "manual-refunds", "--csv", "-")
    rows = list(csv.DictReader(listed.stdout.splitlines()))
    assert [(r["order_id"], r["gateway_order_id"], r["refund_reason"]) for r in rows] == [
        (order_id, second, "duplicate_payment")]
    assert rows[0]["va_number"] == sys_.gateway_record(second)["va_number"]

    paid = cli(sys_, "mark-refund-paid", order_id, "--reference", "BCA-TRF-42")
    assert paid.returncode == 0 and '"outcome": "refunded"' in paid.stdout, paid.stderr
    again = cli(sys_, "mark-refund-paid", second, "--reference", "BCA-TRF-42")
    assert again.returncode == 0 and '"outcome": "already_paid_out"' in again.stdout, again.stderr

    assert sys_.status(order_id, token)["status"] == "stamped"
    assert refund_rows(sys_, order_id)[second]["manual_reference"] == "BCA-TRF-42"
    assert sorted(entries(sys_, order_id)) == sorted([
        (first, "captured", PRICE), (first, "revenue", PRICE),
        (second, "captured", PRICE), (second, "refunded", PRICE)])
    assert balanced(sys_).in_flight == 0


def test_both_captures_of_an_order_that_cannot_be_stamped_are_refunded_each_once(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    first = view["payment"]["gateway_order_id"]
    second = second_transaction(sys_, order_id)
    make_unstampable(sys_, order_id)
    sys_.pay(first)
    sys_.pay(second)

    done = sys_.wait_status(order_id, token, "refunded")
    wait_until(lambda: {r["status"] for r in refund_rows(sys_, order_id).values()} == {"succeeded"}
               and len(refund_rows(sys_, order_id)) == 2, message="both refunds")

    assert done["refund"] == {"status": "succeeded", "amount": PRICE}  # the order's own refund, once
    rows = refund_rows(sys_, order_id)
    assert {r["refund_key"] for r in rows.values()} == {refund_key_for(first), refund_key_for(second)}
    for gateway_order_id in (first, second):
        assert len(sys_.gateway_record(gateway_order_id)["refunds"]) == 1
    assert sorted(k for _, k, _ in entries(sys_, order_id)) == ["captured", "captured", "refunded", "refunded"]
    balanced(sys_)


# --- point 4: a card capture is voided, a settlement refunded ---------------------------------------------

def test_refund_of_an_unsettled_card_capture_voids_it(sys_):
    start = since(sys_)
    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    make_unstampable(sys_, order_id)

    sys_.pay(gateway_order_id, payment_type="credit_card")
    done = sys_.wait_status(order_id, token, "refunded")

    record = sys_.gateway_record(gateway_order_id)
    assert record["transaction_status"] == "cancel" and record["refunds"] == []  # voided, never "refunded"
    [refund] = refund_rows(sys_, order_id).values()
    assert refund["status"] == "succeeded" and refund["gateway_response"]["voided"] is True
    assert done["refund"] == {"status": "succeeded", "amount": PRICE}
    balanced(sys_)
    proof = gateway_reconcile(sys_, start)
    assert proof.returncode == 0 and "refunded" in proof.stdout, proof.stdout


def _paid_and_held(sys_, payment_type: str, *, settle: bool = False) -> tuple[str, str, str]:
    """A paid order that stamping will not reach (its worker is stopped), its deadline passed (after the
    bank settled it, with ``settle``)."""
    sys_.stop("stamping")
    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    sys_.pay(gateway_order_id, payment_type=payment_type)
    sys_.wait_status(order_id, token, "paid")
    if settle:
        assert sandbox(sys_, f"settle/{gateway_order_id}").status_code == 200
    sys_.query("UPDATE orders SET refund_due_at = now() - interval '1 second' WHERE id = %s RETURNING id",
               (order_id,))
    return order_id, token, gateway_order_id


def test_refund_of_a_settled_card_payment_refunds_it(sys_):
    order_id, token, gateway_order_id = _paid_and_held(sys_, "credit_card", settle=True)

    sys_.sweep_one(order_id)  # the settlement's notification may hold the order's row a moment
    sys_.wait_status(order_id, token, "refunded")

    record = sys_.gateway_record(gateway_order_id)
    assert record["transaction_status"] == "refund"
    assert [r["refund_key"] for r in record["refunds"]] == [refund_key_for(gateway_order_id)]
    balanced(sys_)


class SettlesJustBeforeTheVoid(MidtransGateway):
    """The real adapter, against the real stand-in, except that the bank settles the capture in the
    instant between our status query and our void: the race the refund path must survive."""

    def cancel_transaction(self, gateway_order_id: str):  # type: ignore[no-untyped-def]
        settled = requests.post(f"{self.base_url}/sandbox/settle/{gateway_order_id}", timeout=5)
        assert settled.status_code == 200, settled.text
        return super().cancel_transaction(gateway_order_id)


def test_a_void_refused_because_the_capture_settled_meanwhile_becomes_a_refund(sys_):
    order_id, token, gateway_order_id = _paid_and_held(sys_, "credit_card")
    sys_.stop("refunds")  # we run the refund ourselves
    try:
        sys_.sweep_one(order_id)
        racing = SettlesJustBeforeTheVoid(sys_.gateway_url, SERVER_KEY, timeout=5, breaker=CircuitBreaker())
        assert refunds.refund_payment(sys_.settings, racing, gateway_order_id) == "refunded"
        assert refunds.refund_payment(sys_.settings, racing, gateway_order_id) == "skipped"
    finally:
        sys_.start("refunds")
    record = sys_.gateway_record(gateway_order_id)
    assert record["transaction_status"] == "refund" and len(record["refunds"]) == 1
    assert sys_.status(order_id, token)["status"] == "refunded"
    balanced(sys_)


# --- point 5: a late capture whose notification is lost --------------------------------------------------

@pytest.mark.parametrize("payment_type, outcome, at_gateway", [
    ("qris", "refunded", "refund"),
    ("credit_card", "refunded", "cancel"),
    ("bank_transfer", "refund_manual", "settlement"),
])
def test_capture_after_expiry_with_every_notification_dropped_is_found_and_refunded(
    sys_, payment_type: str, outcome: str, at_gateway: str
):
    start = since(sys_)
    faults(sys_, drop_notifications=True)
    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    sys_.query("UPDATE orders SET updated_at = now() - interval '25 hours' WHERE id = %s RETURNING id", (order_id,))
    assert json.loads(cli(sys_, "expire-unpaid", "--inline").stdout)["outcomes"] == {"expired": 1}
    assert sys_.status(order_id, token)["status"] == "expired"
    # The bank settles after the gateway expired it; its notification is dropped like every other.
    late = sandbox(sys_, f"pay/{gateway_order_id}", {"payment_type": payment_type, "after_expiry": True})
    assert late.status_code == 200, late.text
    assert sys_.query("SELECT count(*) AS n FROM payment_notifications WHERE gateway_order_id = %s",
                      (gateway_order_id,))[0]["n"] == 0

    # Our tables alone can't see it; the gateway's list of captures can.
    unknown = gateway_reconcile(sys_, start)
    assert unknown.returncode == 1, unknown.stdout
    assert gateway_order_id in unknown.stdout and "nothing booked here" in unknown.stdout

    due_now(sys_, gateway_order_id)  # the watch's next look at the transaction comes round
    assert json.loads(cli(sys_, "reconcile").stdout) == {"queued": 1}
    done = sys_.wait_status(order_id, token, outcome, timeout=60)

    assert done["reason"]["code"] == "late_payment"
    assert sys_.gateway_record(gateway_order_id)["transaction_status"] == at_gateway
    booked = dict(((k, a) for _, k, a in entries(sys_, order_id)))
    assert booked == ({"captured": PRICE, "refunded": PRICE} if outcome == "refunded" else {"captured": PRICE})
    balanced(sys_)
    proof = gateway_reconcile(sys_, start)
    assert proof.returncode == 0, proof.stdout


# --- gateway-reconcile against a settlement report ------------------------------------------------------

def test_gateway_reconcile_reads_a_settlement_report_and_names_captures_without_an_outcome(sys_, tmp_path: Path):
    order_id, token, view = sys_.order_awaiting_payment()
    stamped = view["payment"]["gateway_order_id"]
    sys_.pay(stamped)
    sys_.wait_status(order_id, token, "stamped")
    stranger = f"MTR-{uuid.uuid4().hex}-1"
    report = tmp_path / "settlement.csv"
    report.write_text(
        "Order ID,Transaction ID,Payment Type,Transaction Status,Amount,Settlement Time\n"
        f"{stamped},t1,qris,settlement,12500.00,2024-09-10 10:00:00\n"
        f"{stranger},t2,gopay,settlement,12500,2024-09-10 11:00:00\n"
        f"MTR-pending,t3,qris,pending,12500,2024-09-10 12:00:00\n"
        f"{stranger}-x,t4,qris,settlement,12500,2024-10-01 00:00:00\n", encoding="utf-8")

    result = cli(sys_, "gateway-reconcile", "--from", "2024-09-01", "--to", "2024-09-30", "--report", str(report))

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{stranger} Rp12.500" in result.stdout and "not a transaction we opened" in result.stdout
    assert "Gateway captures" in result.stdout and ": 2, Rp25.000" in result.stdout  # pending, October: skipped
    lines = report.read_text().splitlines()
    report.write_text("\n".join(line for line in lines if stranger not in line) + "\n", encoding="utf-8")
    clean = cli(sys_, "gateway-reconcile", "--from", "2024-09-01", "--to", "2024-09-30", "--report", str(report),
                "--json")
    assert clean.returncode == 0, clean.stdout
    assert json.loads(clean.stdout)["by_outcome"] == {"revenue": {"count": 1, "amount": PRICE}}

    report.write_text("order_id,gross_amount,transaction_status\nMTR-1,12500.50,settlement\n", encoding="utf-8")
    bad = cli(sys_, "gateway-reconcile", "--from", "2024-09-01", "--to", "2024-09-30", "--report", str(report))
    assert bad.returncode == 2 and "line 2" in bad.stderr


def test_gateway_reconcile_in_production_needs_the_settlement_report(sys_):
    result = cli(sys_, "gateway-reconcile", "--from", "2024-09-01", "--to", "2024-09-30", DEVELOPMENT="0")
    assert result.returncode == 2 and "--report FILE" in result.stderr


# --- the drills' database audit -----------------------------------------------------------------------

def test_drill_invariants_accept_a_refunded_second_capture_and_a_voided_card_and_flag_an_unbooked_one(sys_):
    from psycopg import sql

    from loadtests import invariants, slo

    def gateway_problems(*gateway_order_ids: str) -> list[str]:
        query = sql.SQL("SELECT * FROM ({}) audit WHERE gateway_order_id = ANY(%s)").format(
            sql.SQL(invariants.GATEWAY_SQL.replace("LIMIT 20", "")).format(schema=sql.Identifier("standin")))
        return [r["gateway_order_id"] for r in sys_.query(query, (list(gateway_order_ids),))]

    order_id, token, view = sys_.order_awaiting_payment()
    first = view["payment"]["gateway_order_id"]
    second = second_transaction(sys_, order_id)
    sys_.pay(first)
    sys_.wait_status(order_id, token, "stamped")
    sys_.pay(second)
    wait_until(lambda: refund_rows(sys_, order_id).get(second, {}).get("status") == "succeeded",
               message="the second capture refunded")
    card_order, card_token, card_view = sys_.order_awaiting_payment()
    card = card_view["payment"]["gateway_order_id"]
    make_unstampable(sys_, card_order)
    sys_.pay(card, payment_type="credit_card")
    sys_.wait_status(card_order, card_token, "refunded")
    wait_until(lambda: settled_notifications(sys_), message="notifications processed")

    report = invariants.read_invariants(sys_.settings.database_url)
    assert slo.ledger_problems(report.ledger) == (0, [])
    assert {r.order_id for r in report.ledger} == {order_id, f"{order_id}/{second}", card_order}
    assert gateway_problems(first, second, card) == []
    with psycopg.connect(sys_.settings.database_url, autocommit=True) as conn:
        assert invariants.work_left(conn) == 0

    # A capture the gateway made and nothing here booked is work left, and a problem once drained.
    faults(sys_, drop_notifications=True)
    late_order, late_token, late_view = sys_.order_awaiting_payment()
    late = late_view["payment"]["gateway_order_id"]
    sys_.pay(late)
    with psycopg.connect(sys_.settings.database_url, autocommit=True) as conn:
        assert invariants.work_left(conn) == 1
    assert gateway_problems(late) == [late]
