"""Reconciliation (the watch of every gateway transaction) and expiry of unpaid orders, over HTTP
against the stand-in gateway.

Time is moved by back-dating (as the sweep tests move deadlines): when a transaction is next due for a
look, when an order started waiting for payment. So the real settings apply: RECONCILE_AFTER_SECONDS
(10 minutes), PAYMENT_TIMEOUT_SECONDS (24 hours), PAYMENT_WATCH_SECONDS (48 hours). The scans run as the
beat tasks and the ``meterai`` commands run them; the per-row work runs on the real workers, or inline
with ``--inline``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import timedelta

from shared import jobs
from shared.config import load_settings
from shared.lifecycle import Status
from shared.payments.gateway import CircuitBreaker, GatewayStatus, MidtransGateway
from shared.services import reconcile
from shared.services.ledger import format_report, ledger_report
from shared.services.payments import GATEWAY_STATUS_ACTIONS, ORDER_MOVES, GatewayAction, action_for
from workers.celery_app import beat_schedule
from tests.conftest import ROOT, SERVER_KEY, wait_until

PRICE = 12_500


def due_now(sys_, gateway_order_id: str) -> None:
    """The transaction's next look at the gateway is due (as if its interval had passed)."""
    sys_.query("UPDATE payments SET next_poll_at = now() - interval '1 second' WHERE gateway_order_id = %s"
               " RETURNING gateway_order_id", (gateway_order_id,))


def waiting_since(sys_, order_id: str, ago: timedelta) -> None:
    sys_.query("UPDATE orders SET updated_at = now() - %s WHERE id = %s RETURNING id", (ago, order_id))


def cli(sys_, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env=sys_.env,
                          capture_output=True, text=True, timeout=60)


def assert_balanced(sys_) -> None:
    report = ledger_report(sys_.settings)
    assert report.balanced, format_report(report)


def faults(sys_, **knobs) -> None:
    assert sys_.http.post(f"{sys_.gateway_url}/sandbox/faults", json=knobs, timeout=5).status_code == 200


def ledger(sys_, order_id: str) -> dict[str, int]:
    rows = sys_.query("SELECT kind, amount_idr FROM ledger_entries WHERE order_id = %s", (order_id,))
    return {row["kind"]: row["amount_idr"] for row in rows}


# --- the status table ------------------------------------------------------------------------------

def _status(transaction_status: str, fraud_status: str | None = None) -> GatewayStatus:
    return GatewayStatus("MTR-x", transaction_status, "200", PRICE, "credit_card", "t", fraud_status)


def test_every_midtrans_status_is_declared_once_as_data():
    assert {s: GATEWAY_STATUS_ACTIONS[s] for s in
            ("pending", "settlement", "capture", "expire", "cancel", "deny", "refund")} == {
        "pending": GatewayAction.WAIT, "settlement": GatewayAction.CAPTURE, "capture": GatewayAction.CAPTURE,
        "expire": GatewayAction.CLOSE, "cancel": GatewayAction.CLOSE, "deny": GatewayAction.CLOSE,
        "refund": GatewayAction.REVERSED,
    }
    assert action_for(_status("capture", "challenge")) is GatewayAction.WAIT
    assert action_for(_status("capture", "deny")) is GatewayAction.CLOSE
    assert action_for(_status("something_new")) is GatewayAction.WAIT
    # No gateway status can move an order out of a terminal state except a late capture into a refund.
    terminal_moves = {(a, s): t for (a, s), t in ORDER_MOVES.items()
                      if s in (Status.STAMPED, Status.REFUNDED, Status.EXPIRED, Status.REJECTED)}
    assert terminal_moves == {(GatewayAction.CAPTURE, Status.EXPIRED): Status.REFUND_PENDING}


def test_beat_runs_both_scans_on_housekeeping_and_their_work_on_its_own_queue():
    schedule = beat_schedule(load_settings({}))
    assert schedule["reconcile-payments"]["task"] == jobs.RECONCILE_PAYMENTS
    assert schedule["expire-unpaid"]["task"] == jobs.EXPIRE_UNPAID
    assert {jobs.QUEUES[jobs.RECONCILE_PAYMENTS], jobs.QUEUES[jobs.EXPIRE_UNPAID]} == {"housekeeping"}
    # Polling unpaid orders never shares a queue with confirming paid ones.
    assert {jobs.QUEUES[jobs.POLL_PAYMENT], jobs.QUEUES[jobs.EXPIRE_ORDER]} == {"reconcile"}
    assert jobs.QUEUES[jobs.PROCESS_NOTIFICATION] == "payments"


# --- the watch of every transaction -----------------------------------------------------------------

def test_dropped_notification_is_picked_up_by_reconcile(sys_):
    faults(sys_, drop_notifications=True)
    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    sys_.pay(gateway_order_id)
    assert reconcile.schedule_watch(sys_.settings) == 0  # too early: the notification may come
    assert sys_.status(order_id, token)["status"] == "awaiting_payment"

    due_now(sys_, gateway_order_id)
    result = cli(sys_, "reconcile")  # what beat runs: queue one task per transaction on "reconcile"

    assert result.returncode == 0 and json.loads(result.stdout) == {"queued": 1}, result.stderr
    sys_.wait_status(order_id, token, "stamped")
    assert sys_.query("SELECT count(*) AS n FROM payment_notifications WHERE gateway_order_id = %s",
                      (gateway_order_id,))[0]["n"] == 0  # none ever came
    assert ledger(sys_, order_id) == {"captured": PRICE, "revenue": PRICE}
    [payment] = sys_.query("SELECT polls, final_at FROM payments WHERE gateway_order_id = %s", (gateway_order_id,))
    assert payment["polls"] == 1 and payment["final_at"] is not None  # settlement is final
    assert reconcile.schedule_watch(sys_.settings) == 0
    assert_balanced(sys_)


def _watch(sys_, gateway_order_id: str) -> dict:
    return sys_.query("SELECT polls, final_at, next_poll_at - now() AS wait FROM payments"
                      " WHERE gateway_order_id = %s", (gateway_order_id,))[0]


def test_each_transaction_is_asked_about_after_doubling_intervals_until_final_and_a_while_after(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    opened = _watch(sys_, gateway_order_id)
    assert opened["polls"] == 0 and timedelta(minutes=9) < opened["wait"] <= timedelta(minutes=10)

    due_now(sys_, gateway_order_id)
    claimed = cli(sys_, "reconcile", "--inline")
    assert json.loads(claimed.stdout) == {"checked": 1, "outcomes": {"pending": 1}}, claimed.stderr
    assert reconcile.claim_for_watch(sys_.settings) == []  # claimed until its next look
    first = _watch(sys_, gateway_order_id)
    assert first["polls"] == 1 and first["final_at"] is None
    assert timedelta(minutes=9) < first["wait"] <= timedelta(minutes=10)

    due_now(sys_, gateway_order_id)
    assert reconcile.claim_for_watch(sys_.settings) == [gateway_order_id]
    second = _watch(sys_, gateway_order_id)
    assert second["polls"] == 2 and timedelta(minutes=19) < second["wait"] <= timedelta(minutes=20)
    # Not final yet: never more than RECONCILE_MAX_INTERVAL_SECONDS (1 hour) between looks.
    sys_.query("UPDATE payments SET polls = 12, next_poll_at = now() RETURNING polls")
    reconcile.claim_for_watch(sys_.settings)
    assert timedelta(minutes=59) < _watch(sys_, gateway_order_id)["wait"] <= timedelta(hours=1)

    # Final (the gateway expired it): looked at less often, up to PAYMENT_WATCH_MAX_INTERVAL_SECONDS...
    assert sys_.http.post(f"{sys_.gateway_url}/sandbox/expire/{gateway_order_id}", timeout=5).status_code == 200
    sys_.wait_status(order_id, token, "expired")
    assert _watch(sys_, gateway_order_id)["final_at"] is not None
    sys_.query("UPDATE payments SET next_poll_at = now() RETURNING polls")
    reconcile.claim_for_watch(sys_.settings)
    assert timedelta(hours=23, minutes=59) < _watch(sys_, gateway_order_id)["wait"] <= timedelta(hours=24)
    # ...until PAYMENT_WATCH_SECONDS (48 hours) after it became final: then the watch ends.
    sys_.query("UPDATE payments SET next_poll_at = now(), final_at = now() - interval '47 hours' RETURNING polls")
    assert json.loads(cli(sys_, "reconcile", "--inline").stdout)["checked"] == 1
    assert _watch(sys_, gateway_order_id)["wait"] is not None
    sys_.query("UPDATE payments SET next_poll_at = now(), final_at = now() - interval '49 hours' RETURNING polls")
    assert json.loads(cli(sys_, "reconcile", "--inline").stdout)["checked"] == 1
    assert _watch(sys_, gateway_order_id)["wait"] is None
    assert reconcile.claim_for_watch(sys_.settings) == []


def test_not_found_is_final_only_once_the_order_takes_no_payment(sys_):
    """Midtrans answers 404 for a Snap transaction until the buyer picks a way to pay: that must not
    start the watch's end (a bank transfer paid after its expiry would then go unwatched)."""
    from shared.payments.gateway import gateway_from_settings

    order_id, token, view = sys_.order_awaiting_payment()
    unknown = f"MTR-{uuid.uuid4().hex}-9"  # a transaction of this order the gateway never heard of
    sys_.query("INSERT INTO payments (gateway_order_id, order_id, amount_idr, next_poll_at)"
               " VALUES (%s, %s, %s, now()) RETURNING 1", (unknown, order_id, PRICE))
    gateway = gateway_from_settings(sys_.settings)
    assert reconcile.poll_payment(sys_.settings, gateway, unknown) == "not_found"
    assert _watch(sys_, unknown)["final_at"] is None  # the order may still be paid
    sys_.query("UPDATE orders SET status = 'expired' WHERE id = %s RETURNING 1", (order_id,))
    assert reconcile.poll_payment(sys_.settings, gateway, unknown) == "not_found"
    assert _watch(sys_, unknown)["final_at"] is not None


def test_a_status_that_is_not_final_starts_the_watch_clock_again(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    sys_.query("UPDATE payments SET final_at = now() - interval '47 hours' WHERE gateway_order_id = %s"
               " RETURNING 1", (gateway_order_id,))
    from shared.payments.gateway import gateway_from_settings

    assert reconcile.poll_payment(sys_.settings, gateway_from_settings(sys_.settings), gateway_order_id) == "pending"
    assert _watch(sys_, gateway_order_id)["final_at"] is None


def test_reconcile_during_a_gateway_outage_changes_nothing_and_tries_again_later(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    faults(sys_, drop_notifications=True)
    sys_.pay(gateway_order_id)
    due_now(sys_, gateway_order_id)
    faults(sys_, error_rate=1.0, endpoints=["status"], max_faults=1)

    result = cli(sys_, "reconcile", "--inline")

    assert json.loads(result.stdout) == {"checked": 1, "outcomes": {"unavailable": 1}}
    assert sys_.status(order_id, token)["status"] == "awaiting_payment" and ledger(sys_, order_id) == {}
    due_now(sys_, gateway_order_id)
    assert json.loads(cli(sys_, "reconcile", "--inline").stdout)["outcomes"] == {"paid": 1}
    sys_.wait_status(order_id, token, "stamped")
    assert_balanced(sys_)


# --- expire unpaid ---------------------------------------------------------------------------------

def test_unpaid_order_is_expired_at_the_gateway_first(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    waiting_since(sys_, order_id, timedelta(hours=23))
    assert reconcile.claim_for_expiry(sys_.settings) == []  # not yet

    waiting_since(sys_, order_id, timedelta(hours=25))
    result = cli(sys_, "expire-unpaid", "--inline")

    # The gateway also notifies its expiry, and the payments worker may apply that first: then this
    # run finds the order moved already ("no_change"). Either way it is expired once, as below.
    summary = json.loads(result.stdout)
    assert summary in ({"checked": 1, "outcomes": {"expired": 1}, "checkouts_expired": 0},
                       {"checked": 1, "outcomes": {"no_change": 1}, "checkouts_expired": 0}), result.stderr
    view = sys_.status(order_id, token)
    assert view["status"] == "expired" and view["reason"]["code"] == "payment_expire"
    assert "Anda tidak dikenai biaya" in view["reason"]["message"]
    assert sys_.gateway_record(gateway_order_id)["transaction_status"] == "expire"
    late = sys_.http.post(f"{sys_.gateway_url}/sandbox/pay/{gateway_order_id}", json={}, timeout=5)
    assert late.status_code == 409  # the link is dead: nobody can pay for an expired order
    wait_until(lambda: sys_.query("SELECT outcome FROM payment_notifications WHERE processed_at IS NOT NULL"
                                  " AND gateway_order_id = %s", (gateway_order_id,)),
               message="the gateway's expire notification processed")
    assert [e["to_status"] for e in sys_.events(order_id)].count("expired") == 1
    assert ledger(sys_, order_id) == {}
    assert_balanced(sys_)


def test_payment_that_arrived_before_the_expiry_is_applied_not_thrown_away(sys_):
    """The buyer paid at the last second and the notification was lost: the gateway refuses to expire
    the transaction, and the status it reports instead is applied."""
    faults(sys_, drop_notifications=True)
    order_id, token, view = sys_.order_awaiting_payment()
    sys_.pay(view["payment"]["gateway_order_id"])
    waiting_since(sys_, order_id, timedelta(hours=25))

    assert reconcile.schedule_expiry(sys_.settings) == 1  # the beat job; the worker does the rest

    sys_.wait_status(order_id, token, "stamped")
    assert sys_.gateway_record(view["payment"]["gateway_order_id"])["transaction_status"] == "settlement"
    assert ledger(sys_, order_id) == {"captured": PRICE, "revenue": PRICE}
    assert_balanced(sys_)


def test_order_the_gateway_never_heard_of_expires_here(sys_):
    order_id, token, _ = sys_.order_awaiting_payment()
    sys_.query("UPDATE payments SET gateway_order_id = %s WHERE order_id = %s RETURNING order_id",
               (f"MTR-ghost-{uuid.uuid4().hex[:8]}", order_id))
    waiting_since(sys_, order_id, timedelta(hours=25))
    gateway = MidtransGateway(sys_.gateway_url, SERVER_KEY, timeout=3, breaker=CircuitBreaker())
    [claimed] = reconcile.claim_for_expiry(sys_.settings)

    assert reconcile.expire_order(sys_.settings, gateway, claimed) == "expired"
    assert reconcile.expire_order(sys_.settings, gateway, claimed) == "skipped"  # idempotent
    assert sys_.order_row(order_id)["reason_code"] == "payment_timeout"


def test_two_concurrent_expiry_runs_expire_each_order_exactly_once(sys_):
    orders = [sys_.order_awaiting_payment() for _ in range(8)]
    sys_.query("UPDATE orders SET updated_at = now() - interval '25 hours' RETURNING id")

    runs = [subprocess.Popen([sys.executable, "-m", "shared.cli", "expire-unpaid", "--inline", "--limit", "5"],
                             cwd=ROOT, env=sys_.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    checked = [json.loads(out)["checked"] for out, _ in outputs]
    assert sum(checked) == 8 and max(checked) <= 5  # disjoint batches: no order handed out twice

    for order_id, token, view in orders:
        assert sys_.status(order_id, token)["status"] == "expired"
        assert [e["to_status"] for e in sys_.events(order_id)].count("expired") == 1
        notes = sys_.gateway_record(view["payment"]["gateway_order_id"])["notifications"]
        assert [n["body"]["transaction_status"] for n in notes] == ["expire"]  # closed once at the gateway
    assert json.loads(cli(sys_, "expire-unpaid", "--inline").stdout)["checked"] == 0
    assert_balanced(sys_)


def _here(**values):
    row = {"order_id": "o-1", "capture_role": "order", "captured_at": None, "order_status": "expired",
           "refund_due_at": None, "booked": None, "refund_status": None, "refund_requested_at": None,
           "manual_since": None, "manual_reference": None}
    return {**row, **values}


def test_gateway_reconcile_flags_a_refund_paid_by_hand_and_at_the_gateway():
    from datetime import datetime, timezone

    from shared.payments.gateway import GatewayCapture
    from shared.services.gateway_reconcile import check_capture

    now = datetime.now(timezone.utc)
    paid_twice = check_capture(GatewayCapture("MTR-x-1", PRICE, "refund", refunded=PRICE),
                               _here(captured_at=now, booked=PRICE, refund_status="succeeded",
                                     manual_reference="BCA-123"))
    assert paid_twice.problem and "twice" in paid_twice.detail
    by_hand = check_capture(GatewayCapture("MTR-x-1", PRICE, "settlement"),
                            _here(captured_at=now, booked=PRICE, refund_status="succeeded",
                                  manual_reference="BCA-123"))
    assert not by_hand.problem and by_hand.outcome == "refunded_by_hand"


def test_gateway_reconcile_closes_a_capture_the_gateway_returned_before_we_booked_it():
    from shared.payments.gateway import GatewayCapture
    from shared.services.gateway_reconcile import check_capture

    voided = check_capture(GatewayCapture("MTR-x-2", PRICE, "cancel"), _here())
    assert not voided.problem and voided.outcome == "returned_unbooked"
    held = check_capture(GatewayCapture("MTR-x-2", PRICE, "settlement"), _here())
    assert held.problem  # the money is still at the gateway and nothing here says whose it is


def test_a_partly_refunded_payment_goes_to_a_person_not_to_another_full_refund():
    from shared.services.refunds import RefundMove, refund_move

    assert refund_move(_status("partial_refund")) is RefundMove.MANUAL
    assert refund_move(_status("settlement")) is RefundMove.REFUND
    assert refund_move(_status("capture")) is RefundMove.CANCEL


def test_a_notification_left_after_its_retries_makes_the_watch_look_again(sys_):
    """Even a transaction whose watch had ended is asked about again: the notification said something
    happened, and nothing else may ever ask."""
    from shared.payments.gateway import format_gross_amount, notification_signature
    from shared.services.notifications import accept_notification
    from shared.services.payments import leave_notification

    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    sys_.query("UPDATE payments SET next_poll_at = NULL, final_at = now() - interval '3 days'"
               " WHERE gateway_order_id = %s RETURNING 1", (gateway_order_id,))
    amount = format_gross_amount(PRICE)
    accept_notification(sys_.settings, {
        "order_id": gateway_order_id, "status_code": "200", "gross_amount": amount,
        "transaction_status": "settlement", "transaction_id": "t-late",
        "signature_key": notification_signature(gateway_order_id, "200", amount, SERVER_KEY)})
    [note] = sys_.query("SELECT id FROM payment_notifications WHERE gateway_order_id = %s", (gateway_order_id,))
    assert leave_notification(sys_.settings, note["id"], "gateway_unavailable") == "left_to_watch"
    watch = _watch(sys_, gateway_order_id)
    assert watch["final_at"] is None and watch["wait"] is not None and watch["wait"] <= timedelta(seconds=1)
