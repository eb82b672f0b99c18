"""E-mails to buyers (issue 14, point 3): a receipt with the order page's link when the order is made,
a message when it is stamped (the link to download) and when it is refunded or goes to manual payout,
and when it ends before payment (rejected, expired).

The system's mail workers send them to a real SMTP server (the session's aiosmtpd, conftest's
``mailbox``); the tests read what arrived and follow the links with the token from their fragment.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

import pytest
import redis
import requests

from conftest import ROOT, make_pdf, wait_until
from shared import jobs
from shared.devtools.services import free_port
from shared.devtools.smtp import body_text
from shared.lifecycle import Mail, insert_order
from shared.services import housekeeping, manual_refunds, observe
from shared.services import mail as mail_service
from shared.services.refunds import REFUND_MESSAGES


def _get(sys_, path: str, token: str) -> requests.Response:
    return sys_.http.get(f"{sys_.web_url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=10)


def _outbox(sys_, order_id: str) -> dict[str, dict]:
    return {row["kind"]: row for row in sys_.query("SELECT * FROM mail_outbox WHERE order_id = %s", (order_id,))}


def _quiet_order(sys_, email: str) -> str:
    """An order and its receipt's outbox row with no send published: the test sends it itself (the same
    rows a create writes; the mail workers never hear of it)."""
    order_id = str(uuid.uuid4())
    with sys_.db() as conn:
        insert_order(conn, {
            "id": order_id, "idempotency_key": uuid.uuid4().hex, "request_fingerprint": "-",
            "access_token_hashes": ["0" * 64], "email": email, "amount_idr": sys_.settings.price, "page": 1,
            "x": 400.0, "y": 80.0, "document_key": f"uploads/{order_id}.pdf", "document_sha256": "0" * 64,
            "document_bytes": 1})
    return order_id


def _attempt(settings, order_id: str, owner: str = "test-worker") -> str:
    """One run of the send task's service: its outcome, or "retry" when it asks for another attempt."""
    try:
        return mail_service.send_mail(settings, order_id, "receipt", owner)
    except mail_service.MailNotSent:
        return "retry"


def _cli(sys_, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env=sys_.env,
                          capture_output=True, text=True, timeout=120)


def _stamped_order(sys_) -> tuple[str, str]:
    order_id, token, view = sys_.order_awaiting_payment()
    sys_.pay(view["payment"]["gateway_order_id"])
    sys_.wait_status(order_id, token, "stamped")
    return order_id, token


def test_the_receipt_arrives_with_a_link_that_opens_the_order(sys_):
    r = sys_.create(email="pelamar.receipt@example.id")
    assert r.status_code == 202, r.text
    order_id = r.json()["order_id"]
    message = sys_.wait_mail(order_id, "receipt")

    assert message["To"] == "pelamar.receipt@example.id"
    assert message["From"] == "meterai <noreply@meterai.test>"
    assert message["Message-ID"] == f"<receipt.{order_id}@meterai.test>"
    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == ["text/plain", "text/html"]
    text = body_text(message)
    assert order_id in text and "Rp12.500" in text and "kapan saja" in text
    assert "Rp12.500" in body_text(message, "html")

    url, linked_order, token = sys_.mail_link(message)
    assert url.startswith(f"{sys_.web_url}/pesanan/{order_id}#t=") and "?" not in url
    assert linked_order == order_id and token != r.json()["access_token"]  # minted for the e-mail
    assert f'href="{url}"' in body_text(message, "html")
    answer = _get(sys_, f"/api/v1/orders/{order_id}", token)
    assert answer.status_code == 200 and answer.json()["order_id"] == order_id
    assert _get(sys_, f"/api/v1/orders/{order_id}", token + "x").status_code == 403
    # Marked sent after the server took it (the mailbox has it already): ask until it is.
    wait_until(lambda: _outbox(sys_, order_id)["receipt"]["status"] == "sent", message="the receipt marked sent")


def test_the_receipt_link_outlives_replays_of_the_create(sys_):
    """Replays of the create keep only the newest eight access tokens; the e-mail's link is kept apart."""
    document = make_pdf()
    r = sys_.create(document, key="replayed-key", email="replay@example.id")
    order_id, first_token = r.json()["order_id"], r.json()["access_token"]
    _, _, link_token = sys_.mail_link(sys_.wait_mail(order_id, "receipt"))
    assert _get(sys_, f"/api/v1/orders/{order_id}", link_token).status_code == 200  # cached with its hashes
    for _ in range(9):
        assert sys_.create(document, key="replayed-key", email="replay@example.id").status_code in (200, 202)
    # The download always asks the row (a cached status answer may still know a trimmed token briefly).
    assert _get(sys_, f"/api/v1/orders/{order_id}/document", first_token).status_code == 403  # trimmed away
    assert _get(sys_, f"/api/v1/orders/{order_id}/document", link_token).status_code == 409  # not stamped yet
    assert len(sys_.mails(order_id, "receipt")) == 1  # a replay is not a new order: no second receipt


def test_the_stamped_mail_links_to_the_download(sys_):
    order_id, _ = _stamped_order(sys_)
    message = sys_.wait_mail(order_id, "stamped")
    serial = sys_.order_row(order_id)["serial"]
    text = body_text(message)
    assert serial in text and "WIB" in text and f"{sys_.web_url}/verify/{serial}" in text

    _, _, token = sys_.mail_link(message)
    document = _get(sys_, f"/api/v1/orders/{order_id}/document", token)
    assert document.status_code == 200 and document.content.startswith(b"%PDF")
    assert _get(sys_, f"/api/v1/orders/{order_id}", token).json()["serial"] == serial
    wait_until(lambda: {kind: row["status"] for kind, row in _outbox(sys_, order_id).items()}
               == {"receipt": "sent", "stamped": "sent"}, message="both e-mails marked sent")


def test_a_refunded_order_gets_the_amount_the_reason_and_when(sys_):
    [order_id] = sys_.paid_orders_past_deadline(1)
    sys_.sweep_one(order_id)
    message = sys_.wait_mail(order_id, "refunded", timeout=40)
    text = body_text(message)
    assert "Rp12.500" in text and REFUND_MESSAGES["stamp_deadline"] in text and "WIB" in text
    refunded_at = sys_.query("SELECT completed_at FROM refunds WHERE order_id = %s", (order_id,))[0]["completed_at"]
    assert mail_service.wib(refunded_at) in text
    _, _, token = sys_.mail_link(message)
    assert _get(sys_, f"/api/v1/orders/{order_id}", token).json()["status"] == "refunded"
    assert sys_.mails(order_id, "stamped") == []


def test_a_manual_refund_is_announced_then_its_payout(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    sys_.replace_upload(order_id, b"%PDF-1.7\n" + b"\x00garbage" * 100)
    sys_.pay(view["payment"]["gateway_order_id"], payment_type="bank_transfer")
    sys_.wait_status(order_id, token, "refund_manual")
    manual = body_text(sys_.wait_mail(order_id, "refund_manual"))
    assert "Rp12.500" in manual and "manual" in manual and sys_.order_row(order_id)["reason_message"] in manual

    assert manual_refunds.mark_paid_out(sys_.settings, order_id, "BCA-REF-1") == "refunded"
    paid = body_text(sys_.wait_mail(order_id, "refunded"))
    assert "Rp12.500" in paid and "sudah dikembalikan" in paid


def test_a_rejected_document_is_told_by_mail_with_why_and_no_charge(sys_):
    """The buyer who closed the tab after the upload (the receipt said the document would be checked)
    learns from an e-mail that it can't be stamped, why, and that nothing was charged."""
    r = sys_.create(make_pdf(pages=1), page=3, email="pelamar.ditolak@example.id")
    assert r.status_code == 202, r.text
    order_id = r.json()["order_id"]
    sys_.wait_status(order_id, r.json()["access_token"], "rejected")
    message = sys_.wait_mail(order_id, "rejected")
    assert message["To"] == "pelamar.ditolak@example.id"
    assert message["Message-ID"] == f"<rejected.{order_id}@meterai.test>"
    text = body_text(message)
    reason = sys_.order_row(order_id)["reason_message"]
    assert reason == "Halaman 3 tidak ada; dokumen ini memiliki 1 halaman." and reason in text
    assert "tidak dikenai biaya" in text and order_id in text
    _, _, token = sys_.mail_link(message)
    assert _get(sys_, f"/api/v1/orders/{order_id}", token).json()["status"] == "rejected"
    wait_until(lambda: {kind: row["status"] for kind, row in _outbox(sys_, order_id).items()}
               == {"receipt": "sent", "rejected": "sent"}, message="both e-mails marked sent")


def test_a_rejection_of_ours_is_not_blamed_on_the_document(sys_):
    """The gateway refusing to open the payment rejects the order too (nothing charged), but the fault is
    ours: that e-mail says so and doesn't ask the buyer to fix a document that was fine."""
    from shared.payments.gateway import MidtransGateway
    from shared.services.checkout import prepare_order
    from shared.store import store_from_settings

    sys_.stop("checkout")  # the order stays `created` for us to check out by hand
    r = sys_.create(email="pelamar.gangguan@example.id")
    order_id = r.json()["order_id"]
    wrong_key = MidtransGateway(sys_.gateway_url, "SB-Mid-server-wrong", timeout=3)
    assert prepare_order(sys_.settings, store_from_settings(sys_.settings), wrong_key, order_id) == "rejected"
    text = body_text(sys_.wait_mail(order_id, "rejected"))
    assert "pihak kami, bukan karena dokumen Anda" in text and "tidak dikenai biaya" in text
    assert "perbaiki dokumennya" not in text and sys_.order_row(order_id)["reason_message"] in text


def test_a_checkout_that_never_opened_a_payment_is_told_as_ours_not_as_unpaid(sys_):
    """An order whose checkout never ran to a payment (checkout down past its deadline) expires: the buyer
    never saw a payment page, so its e-mail speaks of our fault, not of a payment not received."""
    from shared.services import reconcile

    sys_.stop("checkout")
    r = sys_.create(email="pelamar.tertunda@example.id")
    order_id = r.json()["order_id"]
    sys_.query("UPDATE orders SET created_at = now() - interval '2 hours' WHERE id = %s RETURNING id", (order_id,))
    assert reconcile.expire_stalled_checkouts(sys_.settings) == [order_id]
    text = body_text(sys_.wait_mail(order_id, "expired"))
    assert "pihak kami" in text and reconcile.CHECKOUT_FAILED_MESSAGE in text
    assert "pembayarannya tidak kami terima" not in text


def test_an_order_closed_unpaid_is_told_by_mail_and_a_late_payment_is_refunded_and_told_too(sys_):
    order_id, token, view = sys_.order_awaiting_payment(email="pelamar.kedaluwarsa@example.id")
    gateway_order_id = view["payment"]["gateway_order_id"]
    assert sys_.http.post(f"{sys_.gateway_url}/sandbox/expire/{gateway_order_id}", timeout=5).status_code == 200
    sys_.wait_status(order_id, token, "expired")
    message = sys_.wait_mail(order_id, "expired")
    text = body_text(message)
    assert sys_.order_row(order_id)["reason_message"] in text
    assert "pembayarannya tidak kami terima" in text and "dikembalikan penuh tanpa perlu diminta" in text
    assert "tidak dikenai biaya" in text  # said by the reason
    _, _, token_from_mail = sys_.mail_link(message)
    assert _get(sys_, f"/api/v1/orders/{order_id}", token_from_mail).json()["status"] == "expired"
    assert [m for kind in ("stamped", "rejected", "refunded") for m in sys_.mails(order_id, kind)] == []

    # The bank settles after all: as the expired e-mail promised, the money goes back and is told of.
    late = sys_.http.post(f"{sys_.gateway_url}/sandbox/pay/{gateway_order_id}",
                          json={"payment_type": "qris", "after_expiry": True}, timeout=10)
    assert late.status_code == 200, late.text
    sys_.wait_status(order_id, token, "refunded", timeout=60)
    refunded = body_text(sys_.wait_mail(order_id, "refunded"))
    assert "Rp12.500" in refunded and sys_.order_row(order_id)["reason_message"] in refunded
    assert len(sys_.mails(order_id, "expired")) == 1


def test_an_smtp_outage_delays_only_mail_and_then_each_mail_arrives_once(sys_):
    sys_.mailbox.stop()
    order_id, token, view = sys_.order_awaiting_payment()
    sys_.pay(view["payment"]["gateway_order_id"])
    sys_.wait_status(order_id, token, "stamped")  # stamping never waits for e-mail
    wait_until(lambda: all(row["attempts"] >= 1 and row["status"] in ("pending", "sending")
                           for row in _outbox(sys_, order_id).values()) and len(_outbox(sys_, order_id)) == 2,
               message="both e-mails tried and waiting")
    assert sys_.mails(order_id) == []

    sys_.mailbox.start()
    sys_.wait_mail(order_id, "receipt", timeout=40)
    sys_.wait_mail(order_id, "stamped", timeout=40)
    time.sleep(2)  # any duplicate retry would have arrived by now
    assert sorted(m["Message-ID"] for m in sys_.mails(order_id)) == sorted(
        [f"<receipt.{order_id}@meterai.test>", f"<stamped.{order_id}@meterai.test>"])
    outbox = _outbox(sys_, order_id)
    assert {row["status"] for row in outbox.values()} == {"sent"}
    # Each failed attempt certainly never reached a server: its link token was forgotten again.
    assert len(sys_.order_row(order_id)["link_token_hashes"]) == 2


def test_redelivered_send_tasks_send_one_mail(sys_):
    sys_.stop("mail")
    r = sys_.create()
    order_id = r.json()["order_id"]
    for _ in range(3):  # the create's own message plus three duplicates, all waiting together
        jobs.publish(jobs.SEND_MAIL, order_id, "receipt")
    sys_.start("mail")
    sys_.wait_mail(order_id, "receipt")
    jobs.publish(jobs.SEND_MAIL, order_id, "receipt")  # and once more after it was sent
    wait_until(lambda: sys_.query("SELECT count(*) AS n FROM mail_outbox WHERE status = 'sent'")[0]["n"] == 1)
    time.sleep(2)
    assert len(sys_.mails(order_id, "receipt")) == 1
    assert len(sys_.order_row(order_id)["link_token_hashes"]) == 1


def test_a_mail_whose_message_was_lost_is_redriven(sys_):
    sys_.stop("mail")
    r = sys_.create()
    order_id = r.json()["order_id"]
    client = redis.Redis.from_url(sys_.settings.redis_url)
    try:
        wait_until(lambda: client.llen(f"{sys_.settings.redis_key_prefix}mail") >= 1)
        client.delete(f"{sys_.settings.redis_key_prefix}mail")  # Redis lost it
    finally:
        client.close()
    sys_.start("mail")
    sys_.query("UPDATE mail_outbox SET updated_at = now() - interval '1 minute' WHERE order_id = %s"
               " RETURNING id", (order_id,))
    assert housekeeping.redrive(sys_.settings)[jobs.SEND_MAIL] == 1
    sys_.wait_mail(order_id, "receipt")


def test_retries_run_out_into_failed_never_pending_for_ever(sys_):
    sys_.stop("mail")
    order_id = sys_.create().json()["order_id"]
    closed = dataclasses.replace(sys_.settings, smtp_port=free_port(), mail_max_retries=1)
    outcomes = []
    for _ in range(2):
        try:
            outcomes.append(mail_service.send_mail(closed, order_id, "receipt", "test-worker"))
        except mail_service.MailNotSent:
            outcomes.append("retry")
    assert outcomes == ["retry", "failed"]
    row = _outbox(sys_, order_id)["receipt"]
    assert row["status"] == "failed" and row["attempts"] == 2 and "ConnectionRefused" in row["last_error"]
    assert sys_.order_row(order_id)["link_token_hashes"] == []  # nothing was sent: no token left behind
    assert mail_service.send_mail(sys_.settings, order_id, "receipt", "test-worker") == "skipped"
    assert housekeeping.redrive(sys_.settings)[jobs.SEND_MAIL] == 0  # failed is final
    assert sys_.mails(order_id) == []


def test_every_attempt_of_an_email_sends_the_one_link_minted_for_it(sys_):
    """A relay that takes the message but answers after our timeout (in doubt, so it is sent again), one
    that refuses for now, a worker that died holding the lease: every copy that arrived carries the same
    link, it works, and the order holds one link token per e-mail (retries never push a delivered one
    out)."""
    to = "pelamar.lambat@example.id"
    order_id = _quiet_order(sys_, to)
    fast = dataclasses.replace(sys_.settings, smtp_timeout_seconds=0.5)
    late = sys_.mailbox.fault("data", to=to, delay=1.5, times=3)  # taken, then answered too late
    outcomes = [_attempt(fast, order_id) for _ in range(3)]
    assert late.hits == 3 and _outbox(sys_, order_id)["receipt"]["maybe_delivered"]
    sys_.mailbox.fault("rcpt", to=to, reply="451 4.3.0 Try again later")
    outcomes.append(_attempt(fast, order_id))
    sys_.query("UPDATE mail_outbox SET status = 'sending', lease_owner = 'a-worker-that-died',"
               " lease_expires_at = now() - interval '1 second' WHERE order_id = %s RETURNING id", (order_id,))
    outcomes.append(_attempt(fast, order_id))  # the lease ran out: this claim takes the row over
    assert outcomes == ["retry", "retry", "retry", "retry", "sent"]

    copies = sys_.mails(order_id, "receipt")
    assert len(copies) == 4  # three answered late, the last one in time; one Message-ID for all
    assert {m["Message-ID"] for m in copies} == {f"<receipt.{order_id}@meterai.test>"}
    [token] = {sys_.mail_link(m)[2] for m in copies}
    assert _get(sys_, f"/api/v1/orders/{order_id}", token).status_code == 200
    assert len(sys_.order_row(order_id)["link_token_hashes"]) == len(_outbox(sys_, order_id)) == 1
    row = _outbox(sys_, order_id)["receipt"]
    assert row["status"] == "sent" and row["attempts"] == 5 and row["link_salt"] is None  # gone once sent


def test_a_non_ascii_address_is_refused_at_create_and_a_row_holding_one_fails_at_once(sys_):
    """smtplib speaks ASCII (we don't rely on SMTPUTF8): the API refuses such an address, and a row that
    holds one (made before) fails on its first attempt, named, instead of hanging in sending."""
    refused = sys_.create(email="josé@contoh.id")
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "invalid_email" and "ASCII" in refused.json()["error"]["message"]

    order_id = _quiet_order(sys_, "josé@contoh.id")
    assert _attempt(sys_.settings, order_id) == "failed"
    row = _outbox(sys_, order_id)["receipt"]
    assert row["status"] == "failed" and row["attempts"] == 1 and "non-ASCII" in row["last_error"]
    assert row["link_salt"] is None and sys_.order_row(order_id)["link_token_hashes"] == []
    assert housekeeping.redrive(sys_.settings)[jobs.SEND_MAIL] == 0
    assert sys_.mails(order_id) == []


@pytest.mark.parametrize("code, reply, for_good", [
    (550, b"5.1.1 <x@example.id>: Recipient address rejected: User unknown", True),
    (553, b"5.1.3 Bad recipient address syntax", True),
    (550, b"5.1.10 Recipient address has null MX", True),
    (550, b"Requested action not taken: mailbox unavailable", False),  # bare: retried, then failed
    (550, b"Authentication required", False),
    (553, b"sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)", False),
    (550, b"5.1.8 Sender address rejected: Domain not found", False),
    (554, b"5.7.1 <x@example.id>: Relay access denied", False),
    (550, b"5.7.1 Relaying denied", False),
    (552, b"5.2.2 Mailbox full", False),
    (554, b"Transaction failed", False),
    (451, b"4.3.0 Try again later", False),
    (421, b"4.7.0 Too many connections", False),
])
def test_only_a_refusal_of_the_mailbox_itself_is_for_good(code, reply, for_good):
    assert mail_service.refused_for_good(code, reply) is for_good


def test_a_relay_refusing_by_policy_is_retried_until_it_accepts(sys_):
    """"554 5.7.1 relaying denied" is a relay misconfigured (or an outage of its policy), not a bad
    mailbox: the system's mail worker retries until the relay accepts."""
    to = "pelamar.relay@example.id"
    denied = sys_.mailbox.fault("rcpt", to=to, reply=f"554 5.7.1 <{to}>: Relay access denied", times=3)
    order_id = sys_.create(email=to).json()["order_id"]
    message = sys_.wait_mail(order_id, "receipt")
    assert denied.hits == 3
    row = wait_until(lambda: (lambda r: r if r["status"] == "sent" else None)(_outbox(sys_, order_id)["receipt"]))
    assert row["attempts"] == 4
    assert _get(sys_, f"/api/v1/orders/{order_id}", sys_.mail_link(message)[2]).status_code == 200


def test_mail_retry_sends_failed_mails_again_and_the_scrape_counts_them(sys_):
    to = "pelamar.salah@example.id"
    sys_.mailbox.fault("rcpt", to=to, reply=f"550 5.1.1 <{to}>: Recipient address rejected: User unknown")
    order_id = _quiet_order(sys_, to)
    assert _attempt(sys_.settings, order_id) == "failed"  # the mailbox itself: for good, at once
    row = _outbox(sys_, order_id)["receipt"]
    assert row["attempts"] == 1 and "5.1.1" in row["last_error"] and row["link_salt"] is None
    assert sys_.order_row(order_id)["link_token_hashes"] == []  # refused at RCPT: never delivered
    mail = observe._database(sys_.settings)["mail"]
    assert mail["failed"] == mail["failed_last_hour"] == 1 and mail["pending"] == 0

    assert mail_service.requeue_failed(sys_.settings, kind="stamped") == []  # only the kind asked for
    # The mailbox was fixed (the fault was for one attempt): an operator sends what failed again.
    done = _cli(sys_, "mail-retry", "--kind", "receipt", "--since", "2024-01-01")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"requeued": 1, "mails": [{"order_id": order_id, "kind": "receipt"}]}
    message = sys_.wait_mail(order_id, "receipt")  # sent by the system's mail worker
    wait_until(lambda: _outbox(sys_, order_id)["receipt"]["status"] == "sent")
    assert _get(sys_, f"/api/v1/orders/{order_id}", sys_.mail_link(message)[2]).status_code == 200
    assert len(sys_.order_row(order_id)["link_token_hashes"]) == 1
    assert observe._database(sys_.settings)["mail"]["failed"] == 0


def test_a_stale_holders_failure_leaves_the_new_holders_claim_alone(sys_):
    """Worker A hangs on a slow server past its lease; B takes the row over. A's answer, a refusal for
    good or for now, must neither fail nor reset B's claim, nor forget the link B is sending."""
    to = "pelamar.basi@example.id"
    order_id = _quiet_order(sys_, to)
    for reply in (f"550 5.1.1 <{to}>: User unknown", "451 4.3.0 Try again later"):
        slow = sys_.mailbox.fault("rcpt", to=to, reply=reply, delay=1.0)
        outcome: dict[str, str] = {}
        worker_a = threading.Thread(target=lambda: outcome.update(a=_attempt(sys_.settings, order_id, "worker-a")))
        worker_a.start()
        wait_until(lambda: slow.hits, message="worker A waiting for the answer to RCPT")
        sys_.query("UPDATE mail_outbox SET lease_owner = 'worker-b', attempts = attempts + 1,"
                   " lease_expires_at = now() + interval '1 hour' WHERE order_id = %s RETURNING id", (order_id,))
        worker_a.join(timeout=20)
        assert outcome == {"a": "skipped"}, reply
        row = _outbox(sys_, order_id)["receipt"]
        assert (row["status"], row["lease_owner"], row["last_error"]) == ("sending", "worker-b", None), reply
        assert row["link_salt"] and len(sys_.order_row(order_id)["link_token_hashes"]) == 1
        sys_.query("UPDATE mail_outbox SET status = 'pending', lease_owner = NULL WHERE order_id = %s"
                   " RETURNING id", (order_id,))  # B is done with it: the next round's A claims it again
    assert sys_.mails(order_id) == []


def test_the_mail_worker_probes_its_smtp_server_as_it_starts(sys_):
    """A mail worker whose SMTP server can't be reached says so at ERROR as it starts, and still runs."""
    assert mail_service.probe(sys_.settings) is None
    assert "ConnectionRefused" in mail_service.probe(dataclasses.replace(sys_.settings, smtp_port=free_port()))
    wait_until(lambda: b"smtp_probe_ok" in sys_.process("mail").output())
    copy = sys_.launcher.start("mail", name="mail-no-server", env={"SMTP_PORT": str(free_port())})
    try:
        sys_.launcher.wait_ready(["mail-no-server"], timeout=90)
        line = wait_until(lambda: next((json.loads(line) for line in copy.output().splitlines()
                                        if b"smtp_probe_failed" in line), None), timeout=20)
        assert line["level"] == "error" and "ConnectionRefused" in line["error"] and copy.alive()
    finally:
        sys_.stop("mail-no-server")


def test_html_is_escaped_and_the_text_is_plain():
    facts = mail_service.Facts(
        order_id="1b4e28ba-2fa1-11d2-883f-0016d3cca427", email='"<b>x</b>"@example.id', amount=10500,
        link="https://meterai.example.id/pesanan/1b4e#t=a\"><script>alert(1)</script>",
        refund_amount=10500, reason="<script>alert('x')</script> & lain-lain",
        refunded_at=datetime(2024, 9, 5, 7, 3, tzinfo=timezone.utc))
    rendered = mail_service.render(Mail.REFUNDED, facts)
    assert "<script>" not in rendered.html and "<b>x</b>" not in rendered.html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; lain-lain" in rendered.html
    assert 'href="https://meterai.example.id/pesanan/1b4e#t=a&quot;&gt;&lt;script&gt;' in rendered.html
    assert "<script>alert('x')</script> & lain-lain" in rendered.text  # plain text is plain
    assert "Rp10.500" in rendered.text and "5 September 2024 pukul 14.03 WIB" in rendered.text


def test_the_development_mailbox_keeps_each_mail_as_a_file_and_says_so(tmp_path):
    """``./dev up``'s mailbox (Procfile.dev): a real SMTP server writing each message to DATA_DIR/mail."""
    import os
    import smtplib
    import subprocess
    import sys
    from email.message import EmailMessage

    from conftest import ROOT

    port = free_port()
    env = {**os.environ, "DEVELOPMENT": "1", "DATA_DIR": str(tmp_path), "SMTP_PORT": str(port),
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    command = [line.split(":", 1)[1] for line in (ROOT / "Procfile.dev").read_text().splitlines()
               if line.startswith("mailbox:")][0]
    log = tmp_path / "mailbox.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "development mailbox on" in log.read_text() or process.poll() is not None)
        assert process.poll() is None, log.read_text()
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "a@example.id", "b@example.id", "Coba"
        message.set_content("Buka http://127.0.0.1:8000/pesanan/abc#t=xyz\n")
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
            smtp.send_message(message)
        wait_until(lambda: list((tmp_path / "mail").glob("*.eml")))
        wait_until(lambda: "mail to b@example.id: Coba http://127.0.0.1:8000/pesanan/abc#t=xyz" in log.read_text())
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 15)
        process.wait(timeout=10)
    refused = subprocess.run([sys.executable, "-m", "shared.devtools.smtp"], cwd=ROOT, capture_output=True,
                             env={**env, "DEVELOPMENT": "0"}, timeout=30)
    assert refused.returncode == 2 and b"DEVELOPMENT=1" in refused.stderr


def test_no_bearer_token_is_kept_in_the_outbox(sys_):
    """A row waiting to be sent holds a salt, not its link's token: the token is made from it with
    SECRET_KEY, so a copy of the database alone opens no order."""
    to = "pelamar.garam@example.id"
    order_id = _quiet_order(sys_, to)
    sys_.mailbox.fault("rcpt", to=to, reply="451 4.3.0 Try again later")
    assert _attempt(sys_.settings, order_id, "worker-a") == "retry"
    row = _outbox(sys_, order_id)["receipt"]
    assert row["link_salt"]
    from shared.orders import link_token, token_hash

    token = link_token(sys_.settings, order_id, "receipt", row["link_salt"])
    assert token_hash(token) in sys_.order_row(order_id)["link_token_hashes"]
    assert token_hash(row["link_salt"]) not in sys_.order_row(order_id)["link_token_hashes"]
