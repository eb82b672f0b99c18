"""End to end over HTTP: upload, pay at the stand-in gateway, stamp on a real worker, download.

Every test drives the real system (web over HTTP, stand-in gateway over HTTP, Celery worker processes,
PostgreSQL, Redis) and asserts the outcome in the database and in the delivered PDF.
"""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading

import pypdf
import pytest
import redis
import requests

from shared.payments.gateway import format_gross_amount, notification_signature
from shared.services import housekeeping
from tests.conftest import BOTH_STORES, ROOT, SERVER_KEY, make_pdf, wait_until
from tests.pdfcheck import page_texts, pink_pixels


def ledger(sys_, order_id: str) -> dict[str, int]:
    rows = sys_.query("SELECT kind, amount_idr FROM ledger_entries WHERE order_id = %s", (order_id,))
    return {row["kind"]: row["amount_idr"] for row in rows}


@BOTH_STORES
def test_order_is_paid_stamped_and_downloaded_over_http(sys_):
    document = make_pdf(pages=3)
    order_id, token, view = sys_.order_awaiting_payment(document, page=2, x=380, y=90)
    assert view["amount"] == 12500 and view["currency"] == "IDR"
    assert view["payment"]["redirect_url"].startswith(sys_.gateway_url)

    sys_.pay(view["payment"]["gateway_order_id"])
    done = sys_.wait_status(order_id, token, "stamped")

    serial = done["serial"]
    assert len(serial) == 22 and serial.isalnum() and serial.upper() == serial
    assert [e["status"] for e in done["events"]] == [
        "created", "awaiting_payment", "paid", "stamping", "stamped"]
    r = sys_.http.get(f"{sys_.web_url}/api/v1/orders/{order_id}/document",
                      headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/pdf"
    stamped = r.content

    texts = page_texts(stamped)
    assert len(texts) == 3
    for n, text in enumerate(texts, start=1):
        assert f"Surat Lamaran CPNS halaman {n}" in text  # original content kept
    assert "METERAI ELEKTRONIK" in texts[1] and serial in texts[1]
    assert "METERAI ELEKTRONIK" not in texts[0] and "METERAI ELEKTRONIK" not in texts[2]
    inside, outside = pink_pixels(stamped, 2, (380, 90, 480, 190))
    assert inside > 300 and outside == 0

    assert ledger(sys_, order_id) == {"captured": 12500, "revenue": 12500}
    serial_row = sys_.query("SELECT * FROM serials WHERE order_id = %s", (order_id,))
    assert [(s["serial"], s["status"]) for s in serial_row] == [(serial, "used")]
    verified = sys_.http.get(f"{sys_.web_url}/api/v1/verify/{serial}", timeout=10).json()
    assert verified["status"] == "used" and verified["document_sha256"]


def test_same_idempotency_key_twice_makes_one_order(sys_):
    document = make_pdf()
    first = sys_.create(document, key="cpns-key-1")
    second = sys_.create(document, key="cpns-key-1")
    assert first.status_code == 202
    assert second.status_code in (200, 202)
    assert second.json()["order_id"] == first.json()["order_id"]
    # Tokens are random and only hashed: the replay gets a fresh one, and both open the order.
    assert second.json()["access_token"] != first.json()["access_token"]
    for answer in (first, second):
        assert sys_.status(answer.json()["order_id"], answer.json()["access_token"])["order_id"]
    conflict = sys_.create(make_pdf(pages=1), key="cpns-key-1")
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_conflict"
    assert sys_.query("SELECT count(*) AS n FROM orders")[0]["n"] == 1


def test_idempotency_keys_belong_to_one_buyer_and_cannot_be_squatted(sys_):
    """Someone who learns a buyer's Idempotency-Key and uses it first makes their own order; the buyer's
    create under the same key still makes the buyer's order."""
    document = make_pdf()
    squatter = sys_.create(make_pdf(pages=1), key="cpns-key-squat", email="penyerobot@example.id")
    buyer = sys_.create(document, key="cpns-key-squat", email="Pelamar@Example.id")
    assert squatter.status_code == 202 and buyer.status_code == 202, buyer.text
    assert buyer.json()["order_id"] != squatter.json()["order_id"]
    again = sys_.create(document, key="cpns-key-squat", email="pelamar@example.id")  # same buyer
    assert again.json()["order_id"] == buyer.json()["order_id"]
    assert sys_.query("SELECT count(*) AS n FROM orders")[0]["n"] == 2


def test_concurrent_creates_with_one_key_make_one_order(sys_):
    document = make_pdf()
    results: list[requests.Response] = []

    def submit() -> None:
        results.append(sys_.create(document, key="cpns-race"))

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r.status_code for r in results} <= {200, 202}
    assert len({r.json()["order_id"] for r in results}) == 1
    assert sys_.query("SELECT count(*) AS n FROM orders")[0]["n"] == 1


def _notification(sys_, gateway_order_id: str, status: str = "settlement") -> dict:
    code = "200" if status in ("settlement", "capture") else "202"
    amount = format_gross_amount(12500)
    return {
        "transaction_status": status, "status_code": code, "order_id": gateway_order_id,
        "gross_amount": amount, "payment_type": "qris", "transaction_id": "tx-dup",
        "signature_key": notification_signature(gateway_order_id, code, amount, SERVER_KEY),
    }


def test_duplicate_notifications_capture_and_stamp_once(sys_):
    sys_.http.post(f"{sys_.gateway_url}/sandbox/faults", json={"duplicate_notifications": 3}, timeout=5)
    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    sys_.pay(gateway_order_id)
    sys_.wait_status(order_id, token, "stamped")
    sys_.http.post(f"{sys_.gateway_url}/sandbox/notify/{gateway_order_id}", timeout=5)
    # Every copy delivered (our endpoint answered), not only queued at the stand-in: the payment's and the
    # re-sent notification, each with 3 duplicates. Else the checks below could pass before they reached us.
    def all_delivered() -> bool:
        notes = sys_.gateway_record(gateway_order_id)["notifications"]
        return len(notes) >= 8 and all(n["delivered"] is True for n in notes)

    wait_until(all_delivered, message="duplicate notifications delivered")
    wait_until(lambda: not sys_.query(
        "SELECT 1 FROM payment_notifications WHERE processed_at IS NULL"), message="notifications processed")

    assert ledger(sys_, order_id) == {"captured": 12500, "revenue": 12500}
    assert sys_.query("SELECT count(*) AS n FROM serials")[0]["n"] == 1
    statuses = [e["to_status"] for e in sys_.events(order_id)]
    assert statuses.count("paid") == 1 and statuses.count("stamped") == 1


def test_forged_or_unsigned_notification_is_refused_and_changes_nothing(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    forged = _notification(sys_, view["payment"]["gateway_order_id"])
    forged["signature_key"] = "0" * 128
    r = sys_.http.post(f"{sys_.web_url}/api/v1/payments/notifications", json=forged, timeout=5)
    assert r.status_code == 403 and r.json()["error"]["code"] == "bad_signature"
    tampered = _notification(sys_, view["payment"]["gateway_order_id"])
    tampered["gross_amount"] = "1.00"
    r = sys_.http.post(f"{sys_.web_url}/api/v1/payments/notifications", json=tampered, timeout=5)
    assert r.status_code == 403
    unsigned = {k: v for k, v in forged.items() if k != "signature_key"}
    r = sys_.http.post(f"{sys_.web_url}/api/v1/payments/notifications", json=unsigned, timeout=5)
    assert r.status_code == 401
    # This order's only: a notification of an earlier test's the stand-in delivers late lands after the
    # tables were emptied (nothing ties it to an order row).
    assert sys_.query("SELECT count(*) AS n FROM payment_notifications WHERE gateway_order_id = %s",
                      (view["payment"]["gateway_order_id"],))[0]["n"] == 0
    assert sys_.status(order_id, token)["status"] == "awaiting_payment"
    assert ledger(sys_, order_id) == {}


def test_signed_notification_for_an_unpaid_order_is_confirmed_with_the_gateway(sys_):
    """A correctly signed "settlement" the gateway's status query never confirms moves no money."""
    order_id, token, view = sys_.order_awaiting_payment()
    body = _notification(sys_, view["payment"]["gateway_order_id"])
    r = sys_.http.post(f"{sys_.web_url}/api/v1/payments/notifications", json=body, timeout=5)
    assert r.status_code == 200
    wait_until(lambda: sys_.query("SELECT outcome FROM payment_notifications WHERE processed_at IS NOT NULL"
                                  " AND gateway_order_id = %s", (view["payment"]["gateway_order_id"],)),
               message="notification processed")
    assert sys_.status(order_id, token)["status"] == "awaiting_payment"
    assert ledger(sys_, order_id) == {}


def _break_stamped_store(sys_) -> None:
    """Make stamping fail at the store for real: on the filesystem the stamped folder is replaced by a
    file (writes fail with an OSError); SeaweedFS is stopped (reads and writes are refused)."""
    if sys_.seaweed is not None:
        sys_.seaweed.stop()
        return
    stamped = sys_.settings.documents_path / "stamped"
    if stamped.is_dir():
        for child in stamped.iterdir():
            child.unlink()
        stamped.rmdir()
    stamped.parent.mkdir(parents=True, exist_ok=True)
    stamped.write_bytes(b"not a folder")


def _repair_stamped_store(sys_) -> None:
    if sys_.seaweed is not None:
        sys_.seaweed.start()
        return
    stamped = sys_.settings.documents_path / "stamped"
    if stamped.is_file():
        stamped.unlink()


def _failed_attempts(sys_, order_id: str) -> int:
    return sum(1 for e in sys_.events(order_id) if e["reason"] == "attempt failed, will retry")


@BOTH_STORES
def test_stamping_failure_is_retried_then_succeeds(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    _break_stamped_store(sys_)
    try:
        sys_.pay(view["payment"]["gateway_order_id"])
        wait_until(lambda: _failed_attempts(sys_, order_id) >= 2, message="two failed stamping attempts")
    finally:
        _repair_stamped_store(sys_)
    done = sys_.wait_status(order_id, token, "stamped")
    row = sys_.order_row(order_id)
    assert row["stamp_attempts"] >= 3
    # Each attempt writes its own file; the order names the one its committing attempt wrote.
    assert row["stamped_document_key"] == f"stamped/{order_id}-{row['stamp_attempts']}.pdf"
    serials = sys_.query("SELECT serial, status FROM serials WHERE order_id = %s", (order_id,))
    assert serials == [{"serial": done["serial"], "status": "used"}]  # retries re-used one serial
    assert ledger(sys_, order_id) == {"captured": 12500, "revenue": 12500}


@BOTH_STORES
def test_stamping_that_keeps_failing_is_refunded_after_the_deadline(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    _break_stamped_store(sys_)
    try:
        sys_.pay(gateway_order_id)
        wait_until(lambda: _failed_attempts(sys_, order_id) >= 2, message="failed stamping attempts")
        # The deadline passes (we move it rather than wait hours); the sweep, not the worker, refunds.
        sys_.query("UPDATE orders SET refund_due_at = now() - interval '1 second' WHERE id = %s"
                   " RETURNING id", (order_id,))
        wait_until(lambda: housekeeping.sweep_refunds(sys_.settings) or
                   sys_.order_row(order_id)["status"] != "stamping", message="sweep to take the order")
        done = sys_.wait_status(order_id, token, "refunded")
    finally:
        _repair_stamped_store(sys_)
    assert done["refund"] == {"status": "succeeded", "amount": 12500}
    assert done["reason"]["code"] == "stamp_deadline"
    assert "dikembalikan penuh" in done["reason"]["message"]  # the buyer is told, in Bahasa Indonesia
    assert ledger(sys_, order_id) == {"captured": 12500, "refunded": 12500}
    assert [s["status"] for s in sys_.query("SELECT status FROM serials WHERE order_id = %s",
                                            (order_id,))] == ["voided"]
    assert len(sys_.gateway_record(gateway_order_id)["refunds"]) == 1
    r = sys_.http.get(f"{sys_.web_url}/api/v1/orders/{order_id}/document",
                      headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 409


@BOTH_STORES
def test_unreadable_document_is_refunded_without_retries(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    # The upload passed preflight, then was replaced in the store: the worker can no longer parse it.
    sys_.replace_upload(order_id, b"%PDF-1.7\n" + b"\x00garbage" * 100)
    sys_.pay(view["payment"]["gateway_order_id"])
    done = sys_.wait_status(order_id, token, "refunded")
    row = sys_.order_row(order_id)
    assert row["stamp_attempts"] == 1 and _failed_attempts(sys_, order_id) == 0
    assert row["reason_code"] == "unreadable"
    assert done["refund"]["amount"] == 12500
    assert ledger(sys_, order_id) == {"captured": 12500, "refunded": 12500}



def test_two_concurrent_sweeps_refund_each_order_exactly_once(sys_):
    ids = sys_.paid_orders_past_deadline(12)
    env = {**sys_.env, "SWEEP_BATCH_SIZE": "2"}
    sweeps = [subprocess.Popen([sys.executable, "-m", "shared.cli", "sweep-refunds"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in sweeps]
    assert all(p.returncode == 0 for p in sweeps), outputs
    moved = [int(out.strip().splitlines()[-1].split(":")[1].strip(" }")) for out, _ in outputs]
    assert sum(moved) == len(ids)
    wait_until(lambda: sys_.query("SELECT count(*) AS n FROM orders WHERE status = 'refunded'")[0]["n"]
               == len(ids), timeout=60, message="all refunded")
    assert sys_.query("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'refunded'")[0]["n"] == len(ids)
    totals = sys_.query("SELECT kind, sum(amount_idr) AS s FROM ledger_entries GROUP BY kind")
    by_kind = {row["kind"]: row["s"] for row in totals}
    assert by_kind == {"captured": 12500 * len(ids), "refunded": 12500 * len(ids)}
    for order_id in ids:
        gateway_order_id = sys_.query("SELECT gateway_order_id FROM payments WHERE order_id = %s",
                                      (order_id,))[0]["gateway_order_id"]
        assert len(sys_.gateway_record(gateway_order_id)["refunds"]) == 1
    assert housekeeping.sweep_refunds(sys_.settings) == 0  # a third run finds nothing


def _queued(sys_, queue: str, argument: object) -> bool:
    """Whether a task message with ``argument`` among its arguments waits in ``queue``: its Redis list
    under the system's key prefix, each message kombu's JSON whose base64 body is Celery's
    ``[args, kwargs, embed]``."""
    client = redis.Redis.from_url(sys_.settings.redis_url)
    try:
        return any(argument in json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
                   for raw in client.lrange(f"{sys_.settings.redis_key_prefix}{queue}", 0, -1))
    finally:
        client.close()


def test_paid_order_survives_redis_restarting_empty(sys_):
    sys_.stop("stamping")
    order_id, token, view = sys_.order_awaiting_payment()
    sys_.pay(view["payment"]["gateway_order_id"])
    sys_.wait_status(order_id, token, "paid")
    # The stamping message is published after the commit that made the order paid: wait until it is
    # queued, so the restart is what loses it (a publish retried into the new Redis would not be lost).
    wait_until(lambda: _queued(sys_, "stamping", order_id), message="the stamping message queued")
    sys_.redis.restart()  # no persistence: the queued stamping message is gone
    sys_.start("stamping")
    assert sys_.status(order_id, token)["status"] == "paid"
    counts = wait_until(lambda: housekeeping.redrive(sys_.settings)["meterai.stamping.stamp_order"],
                        message="redrive to find the order")
    assert counts >= 1
    done = sys_.wait_status(order_id, token, "stamped")
    assert ledger(sys_, order_id) == {"captured": 12500, "revenue": 12500}
    assert done["serial"]


def test_failed_stamp_paid_by_bank_transfer_goes_to_manual_refund(sys_):
    """Virtual-account payments can't be refunded by API: ops get a refund_manual order, not silence."""
    order_id, token, view = sys_.order_awaiting_payment()
    sys_.replace_upload(order_id, b"%PDF-1.7\n" + b"\x00garbage" * 100)
    sys_.pay(view["payment"]["gateway_order_id"], payment_type="bank_transfer")
    done = sys_.wait_status(order_id, token, "refund_manual")
    assert done["refund"] == {"status": "manual", "amount": 12500}
    assert ledger(sys_, order_id) == {"captured": 12500}  # still owed to the buyer: in flight
    assert sys_.gateway_record(view["payment"]["gateway_order_id"])["refunds"] == []


def test_redrive_recovers_a_notification_lost_with_redis(sys_):
    """Redis restarts empty while a notification waits to be processed: PostgreSQL alone recovers it."""
    order_id, token, view = sys_.order_awaiting_payment()
    sys_.stop("payments")  # nobody processes payments now
    sys_.pay(view["payment"]["gateway_order_id"])
    [stored] = wait_until(lambda: sys_.query("SELECT id FROM payment_notifications WHERE gateway_order_id = %s",
                                             (view["payment"]["gateway_order_id"],)), message="notification stored")
    wait_until(lambda: _queued(sys_, "payments", stored["id"]),  # published after the INSERT
               message="the notification's message queued")
    sys_.redis.restart()
    sys_.start("payments")
    assert sys_.status(order_id, token)["status"] == "awaiting_payment"
    assert housekeeping.redrive(sys_.settings)["meterai.payments.process_notification"] == 1
    sys_.wait_status(order_id, token, "stamped")
    assert ledger(sys_, order_id) == {"captured": 12500, "revenue": 12500}


def test_redrive_recovers_a_refund_lost_with_redis(sys_):
    """Redis restarts empty while a refund waits in its queue: the refund still happens, once."""
    [order_id] = sys_.paid_orders_past_deadline(1)
    sys_.stop("refunds")  # nobody runs refunds now
    sys_.sweep_one(order_id)  # publishes the refund task...
    sys_.redis.restart()  # ...which Redis then forgets
    sys_.start("refunds")
    assert sys_.order_row(order_id)["status"] == "refund_pending"
    assert housekeeping.redrive(sys_.settings)["meterai.refunds.refund_order"] == 1
    wait_until(lambda: sys_.order_row(order_id)["status"] == "refunded", message="refund after redrive")
    assert ledger(sys_, order_id) == {"captured": 12500, "refunded": 12500}
    gateway_order_id = sys_.query("SELECT gateway_order_id FROM refunds WHERE order_id = %s",
                                  (order_id,))[0]["gateway_order_id"]
    assert len(sys_.gateway_record(gateway_order_id)["refunds"]) == 1


def test_gateway_refusing_to_open_a_payment_rejects_the_order_without_charge(sys_):
    from shared.payments.gateway import MidtransGateway
    from shared.services.checkout import prepare_order
    from shared.store import store_from_settings

    sys_.stop("checkout")  # the order stays `created` for us to check out by hand
    r = sys_.create()
    order_id = r.json()["order_id"]
    wrong_key = MidtransGateway(sys_.gateway_url, "SB-Mid-server-wrong", timeout=3)
    outcome = prepare_order(sys_.settings, store_from_settings(sys_.settings), wrong_key, order_id)
    assert outcome == "rejected"
    view = sys_.status(order_id, r.json()["access_token"])
    assert view["status"] == "rejected" and view["reason"]["code"] == "payment_unavailable"
    assert ledger(sys_, order_id) == {}


def test_concurrent_checkouts_of_one_order_open_one_payable_transaction(sys_):
    from shared.payments.gateway import MidtransGateway
    from shared.services.checkout import prepare_order
    from shared.store import store_from_settings

    sys_.stop("checkout")  # we run the two racing checkouts ourselves
    r = sys_.create()
    order_id, token = r.json()["order_id"], r.json()["access_token"]
    outcomes: list[str] = []

    def checkout() -> None:
        gateway = MidtransGateway(sys_.gateway_url, SERVER_KEY, timeout=5)
        outcomes.append(prepare_order(sys_.settings, store_from_settings(sys_.settings), gateway, order_id))

    threads = [threading.Thread(target=checkout) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("awaiting_payment") == 1, outcomes
    payments = sys_.query("SELECT gateway_order_id, token FROM payments WHERE order_id = %s", (order_id,))
    shown = [p for p in payments if p["token"]]
    assert len(shown) == 1
    for extra in (p for p in payments if not p["token"]):
        record = sys_.http.get(f"{sys_.gateway_url}/sandbox/transactions/{extra['gateway_order_id']}",
                               timeout=5)
        if record.status_code == 200:  # opened at the gateway before losing the race: closed there
            assert record.json()["transaction_status"] in ("cancel", "expire")
    view = sys_.status(order_id, token)
    assert view["payment"]["gateway_order_id"] == shown[0]["gateway_order_id"]


def test_refund_the_gateway_already_made_is_booked_not_sent_to_manual_payout(sys_):
    from shared.payments.gateway import MidtransGateway

    [order_id] = sys_.paid_orders_past_deadline(1)
    gateway_order_id = sys_.query("SELECT gateway_order_id FROM payments WHERE order_id = %s"
                                  " AND captured_at IS NOT NULL", (order_id,))[0]["gateway_order_id"]
    # Someone (an earlier run whose answer was lost, an operator in the gateway's dashboard) already
    # refunded it under another key: our refund call is refused as "already refunded".
    gateway = MidtransGateway(sys_.gateway_url, SERVER_KEY, timeout=5)
    assert gateway.refund(gateway_order_id, refund_key="dashboard-1", amount=12500, reason="ops").refunded
    sys_.sweep_one(order_id)
    wait_until(lambda: sys_.order_row(order_id)["status"] in ("refunded", "refund_manual"),
               message="refund outcome")
    assert sys_.order_row(order_id)["status"] == "refunded"
    assert ledger(sys_, order_id) == {"captured": 12500, "refunded": 12500}
    assert len(sys_.gateway_record(gateway_order_id)["refunds"]) == 1


def test_a_capture_the_gateway_does_not_confirm_yet_is_retried_not_dropped(sys_):
    """The notification outruns the gateway's own status: we ask again instead of closing it."""
    sys_.http.post(f"{sys_.gateway_url}/sandbox/faults", json={"drop_notifications": True}, timeout=5)
    order_id, token, view = sys_.order_awaiting_payment()
    gateway_order_id = view["payment"]["gateway_order_id"]
    body = _notification(sys_, gateway_order_id)  # "settlement", signed, before the status says so
    assert sys_.http.post(f"{sys_.web_url}/api/v1/payments/notifications", json=body,
                          timeout=5).status_code == 200
    sys_.pay(gateway_order_id)  # the gateway's status catches up; its own notification is lost
    sys_.wait_status(order_id, token, "stamped")
    [row] = sys_.query("SELECT outcome FROM payment_notifications WHERE gateway_order_id = %s", (gateway_order_id,))
    assert row["outcome"] == "paid"
