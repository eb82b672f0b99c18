"""E-mails to buyers: the receipt with the order page's link, and a message when the document is stamped,
when its refund goes to manual payout, when the money is back, and when the order ends before payment
(rejected: its document can't be stamped, or we couldn't open the payment; expired: closed unpaid).

What to send is decided with the order's change: :mod:`shared.lifecycle` writes a ``mail_outbox`` row
(one per order and kind) in the transaction that makes the order or moves it, and publishes the send
once that commits; the redrive re-publishes any row a lost message left unsent. This module sends one
row (:func:`send_mail`, run by the ``mail`` worker group on its own queue, so an SMTP server that is
slow or down delays only e-mail):

* **Only an unsent row is acted on, by one worker at a time.** The send claims the row first
  (``pending → sending`` with a lease, a compare-and-set like every state change of ours); a sent or
  failed row, or one another worker holds, is left alone, so redelivered or duplicated messages send
  nothing more.
* **Each e-mail's link carries one token, made for it once** (:func:`shared.orders.link_token`): the
  row's first claim draws a random salt, commits the token's hash with the claim (the link works the
  moment the e-mail arrives) and keeps only the salt on the row (``mail_outbox.link_salt``); the token is
  the salt signed with SECRET_KEY, so no plaintext token sits in the database, its WAL or its backups.
  Every attempt of the row sends that same link: retries, an attempt whose outcome was in doubt, a worker
  that died holding the lease, a redelivery. An order so holds one link token per kind of e-mail at most
  (six: :class:`shared.lifecycle.Mail`), and none is ever trimmed. The salt leaves the row once it is
  sent; a row that fails with no attempt that may have reached a server forgets it (hash too), one that
  may have been delivered keeps it for ``meterai mail-retry``.
* **SMTP gives at-least-once, and that is the best there is.** The server takes the message when it
  answers the final ``.`` of DATA; if the connection (or this process) dies between that answer and our
  marking the row sent, nothing can tell whether it was taken, and the only way not to lose the e-mail is
  to send it again. SMTP has no idempotency key, so the duplicate is made recognisable instead: every
  send of one (order, kind) carries the same ``Message-ID`` (:func:`message_id`), which mail stores and
  clients use to fold duplicates, and the first copy's link keeps working (a send whose outcome was in
  doubt keeps its token). The window is one SMTP reply wide.
* **Bounded retries, then a named final state.** A failed attempt puts the row back to ``pending`` and
  the task retries with the base task's backoff; once the row has used its attempts (``MAIL_MAX_RETRIES``
  after the first, counted on the row so redeliveries share them) or the recipient is refused for good
  (:func:`refused_for_good`: the mailbox itself, 5.1.x; a relay's policy refusal such as "554 5.7.1
  relaying denied" is retried), the row is ``failed`` and that is logged at ERROR. It never waits for
  ever; ``meterai mail-retry`` (:func:`requeue_failed`) sends failed rows again once the cause is fixed.
* **Every write after the claim is a compare-and-set on the claim** (owner and attempt): a worker whose
  lease was taken over (it hung past the lease) can't reset, fail or mark sent the new holder's claim.

The texts are Bahasa Indonesia, as plain text and simple HTML (``multipart/alternative``), rendered by
pure functions (:func:`render`) that escape every value in the HTML.
"""
from __future__ import annotations

import base64
import html
import logging
import os
import re
import secrets
import smtplib
import ssl
import sys
import threading
import time
from functools import lru_cache
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email import policy
from email.header import Header
from email.utils import format_datetime, formataddr, parseaddr
from typing import Any

from shared import jobs
from shared.config import Settings
from shared.db import transaction
from shared.errors import TransientError
from shared.lifecycle import Mail
from shared.logs import log_event
from shared.orders import add_link_token, drop_link_token, link_token, order_page_url

log = logging.getLogger(__name__)

# Western Indonesian Time (UTC+7, no daylight saving): the buyers' clock, whatever the server's zone.
WIB = timezone(timedelta(hours=7), "WIB")

_MONTHS = ("Januari", "Februari", "Maret", "April", "Mei", "Juni", "Juli", "Agustus", "September",
           "Oktober", "November", "Desember")


class MailNotSent(TransientError):
    """This attempt did not hand the e-mail to the SMTP server: the task retries."""

    code = "mail_not_sent"


# --- what the e-mails say (pure) ----------------------------------------------------------------------

def rupiah(amount: int) -> str:
    """``Rp10.500``: the way the checkout page writes a price."""
    return f"Rp{amount:,}".replace(",", ".")


def wib(moment: datetime | None) -> str:
    """``5 September 2024 pukul 14.03 WIB``."""
    if moment is None:
        return "-"
    local = moment.astimezone(WIB)
    return f"{local.day} {_MONTHS[local.month - 1]} {local.year} pukul {local:%H.%M} WIB"


@dataclass(frozen=True)
class Facts:
    """What an e-mail tells, read from the database when it is sent."""

    order_id: str
    email: str
    amount: int
    link: str
    serial: str | None = None
    stamped_at: datetime | None = None
    verify_link: str | None = None
    refund_amount: int | None = None
    reason: str | None = None
    reason_code: str | None = None
    refunded_at: datetime | None = None
    manual_since: datetime | None = None


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str


# Orders that ended before payment through our fault, not the document's or the payment's: rejected
# because the gateway refused to open the payment or the stored upload was damaged on our side
# (shared/services/checkout.py), expired because checkout never opened a payment (shared/services/
# reconcile.py). Their e-mail must not ask the buyer to fix a document that was fine, nor speak of a
# payment page they never saw.
ENDED_BY_US = frozenset({"payment_unavailable", "document_corrupt", "payment_not_opened"})

_KEEP_LINK = ("Simpan e-mail ini: tautan di atas membawa Anda kembali ke pesanan ini kapan saja. Jangan "
              "bagikan tautan ini; siapa pun yang memegangnya dapat melihat pesanan dan mengunduh dokumen Anda.")


def _paragraphs(facts: Facts, kind: Mail) -> tuple[str, list[str], list[tuple[str, str]], str]:
    """(subject, paragraphs before the link, (label, value) rows, link label) of one kind of e-mail."""
    rows = [("Nomor pesanan", facts.order_id)]
    if kind is Mail.RECEIPT:
        rows.append(("Jumlah", f"{rupiah(facts.amount)} (meterai Rp10.000 + biaya layanan)"))
        return ("Pesanan e-Meterai Anda diterima", [
            "Terima kasih. Pesanan e-Meterai Anda sudah kami terima.",
            "Langkah berikutnya: kami memeriksa dokumen Anda, lalu halaman pesanan menampilkan tombol "
            "pembayaran. Setelah pembayaran diterima, meterai dibubuhkan dan dokumen bermeterai dapat "
            "diunduh di halaman yang sama. Bila meterai tidak dapat dibubuhkan, dana Anda dikembalikan "
            "penuh secara otomatis, tanpa perlu diminta.",
        ], rows, "Buka halaman pesanan")
    if kind is Mail.STAMPED:
        rows += [("Nomor seri meterai", facts.serial or "-"), ("Dibubuhkan", wib(facts.stamped_at))]
        if facts.verify_link:
            rows.append(("Periksa keaslian", facts.verify_link))
        return ("Dokumen Anda sudah bermeterai", [
            "Meterai elektronik sudah dibubuhkan pada dokumen Anda dan tanda tangan digitalnya sudah "
            "kami periksa. Unduh dokumen bermeterai melalui halaman pesanan.",
        ], rows, "Unduh dokumen bermeterai")
    if kind in (Mail.REJECTED, Mail.EXPIRED) and facts.reason_code in ENDED_BY_US:
        rows.append(("Alasan", facts.reason or "-"))
        return ("Pesanan e-Meterai Anda tidak dapat diproses", [
            "Pesanan ini tidak dapat kami proses karena gangguan di pihak kami, bukan karena dokumen Anda, "
            "sehingga pesanan ini kami tutup sebelum pembayaran. Anda tidak dikenai biaya apa pun.",
            "Mohon maaf atas ketidaknyamanannya. Silakan buat pesanan baru beberapa saat lagi.",
        ], rows, "Lihat pesanan")
    if kind is Mail.REJECTED:
        rows.append(("Alasan", facts.reason or "-"))
        return ("Dokumen Anda tidak dapat dibubuhi meterai", [
            "Dokumen yang Anda unggah tidak dapat kami bubuhi meterai elektronik, sehingga pesanan ini kami "
            "tutup sebelum pembayaran. Anda tidak dikenai biaya apa pun.",
            "Alasannya tertulis di bawah. Bila Anda masih memerlukan meterai, sesuaikan dokumen, halaman, "
            "atau letak meterainya menurut alasan itu, lalu buat pesanan baru.",
        ], rows, "Lihat pesanan")
    if kind is Mail.EXPIRED:
        # Every reason an unpaid order closes with says already that nothing was charged.
        rows.append(("Alasan", facts.reason or "-"))
        return ("Pesanan e-Meterai Anda kedaluwarsa", [
            "Pesanan ini kami tutup karena pembayarannya tidak kami terima.",
            "Bila ternyata pembayaran Anda tetap terdebit, dana dikembalikan penuh tanpa perlu diminta; "
            "statusnya terlihat di halaman pesanan. Bila Anda masih memerlukan meterai, silakan buat "
            "pesanan baru.",
        ], rows, "Lihat pesanan")
    amount = rupiah(facts.refund_amount if facts.refund_amount is not None else facts.amount)
    if kind is Mail.REFUND_MANUAL:
        rows += [("Jumlah pengembalian", amount), ("Alasan", facts.reason or "-"),
                 ("Diproses manual sejak", wib(facts.manual_since))]
        return ("Pengembalian dana Anda diproses manual", [
            "Dana Anda akan dikembalikan penuh, tetapi metode pembayaran Anda (misalnya transfer bank / "
            "virtual account) tidak dapat dikembalikan secara otomatis oleh penyedia pembayaran.",
            "Tim keuangan kami akan mentransfer dana Anda secara manual. Bila kami memerlukan rekening "
            "tujuan, kami menghubungi Anda melalui alamat e-mail ini. Anda akan menerima e-mail lagi begitu "
            "dana dikirim; statusnya juga terlihat di halaman pesanan.",
        ], rows, "Lihat status pesanan")
    rows += [("Jumlah dikembalikan", amount), ("Alasan", facts.reason or "-"),
             ("Dikembalikan pada", wib(facts.refunded_at))]
    return ("Dana Anda sudah dikembalikan", [
        "Dana pembayaran pesanan e-Meterai Anda sudah dikembalikan penuh.",
        "Dana biasanya terlihat di rekening atau dompet digital Anda dalam beberapa hari kerja, tergantung "
        "bank atau penyedia pembayaran Anda.",
    ], rows, "Lihat status pesanan")


def render(kind: Mail, facts: Facts) -> Rendered:
    """The subject, plain text and HTML of one e-mail (every value escaped in the HTML)."""
    subject, paragraphs, rows, link_label = _paragraphs(facts, kind)
    width = max(len(label) for label, _ in rows)
    text = "\n".join([
        "Halo,", "",
        *[line for p in paragraphs for line in (p, "")],
        *[f"{label.ljust(width)} : {value}" for label, value in rows], "",
        f"{link_label}:", facts.link, "",
        _KEEP_LINK, "",
        "Salam,", "meterai", "",
        f"E-mail ini dikirim otomatis ke {facts.email} untuk pesanan Anda; mohon tidak membalasnya.",
    ]) + "\n"
    e = html.escape
    body = "\n".join([
        "<!doctype html>",
        '<html lang="id"><head><meta charset="utf-8"><title>' + e(subject) + "</title></head>",
        '<body style="font-family: sans-serif; line-height: 1.5; color: #222">',
        "<p>Halo,</p>",
        *[f"<p>{e(p)}</p>" for p in paragraphs],
        "<table>",
        *[f'<tr><th align="left" style="padding-right: 1em">{e(label)}</th><td>{e(value)}</td></tr>'
          for label, value in rows],
        "</table>",
        f'<p><a href="{e(facts.link, quote=True)}" style="font-weight: bold">{e(link_label)}</a></p>',
        f"<p>{e(_KEEP_LINK)}</p>",
        "<p>Salam,<br>meterai</p>",
        f'<p style="color: #777; font-size: small">E-mail ini dikirim otomatis ke {e(facts.email)} untuk '
        "pesanan Anda; mohon tidak membalasnya.</p>",
        "</body></html>",
    ]) + "\n"
    return Rendered(f"{subject} ({facts.order_id[:8]})", text, body)


def message_id(settings: Settings, order_id: str, kind: Mail | str) -> str:
    """The same ``Message-ID`` for every send of one order's e-mail of one kind, so a resend after a
    crash is recognisably the same message."""
    domain = parseaddr(settings.mail_sender)[1].rpartition("@")[2] or "meterai.invalid"
    return f"<{Mail(kind).value}.{order_id}@{domain}>"


@dataclass(frozen=True)
class Outgoing:
    """One e-mail ready for SMTP: the envelope recipient, its Message-ID and the message's bytes."""

    to: str
    message_id: str
    content: bytes


def _header_value(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("a header value holds a line break")
    return value


@lru_cache(maxsize=4)
def _from_header(mail_sender: str) -> str:
    """MAIL_FROM as the From header's value, folded and RFC 2047-encoded by the standard library's SMTP
    policy as EmailMessage did (a setting: made once)."""
    name, address = parseaddr(mail_sender)
    address.encode("ascii")
    return policy.SMTP.fold("From", formataddr((name, address)))[len("From: "):].rstrip("\r\n")


def _base64_body(text: str) -> bytes:
    return base64.encodebytes(text.encode("utf-8")).replace(b"\n", b"\r\n")


def compose(settings: Settings, kind: Mail, facts: Facts) -> Outgoing:
    """The e-mail as SMTP bytes: multipart/alternative, a UTF-8 text part and an HTML part, each base64.

    Built by hand rather than with ``email.message.EmailMessage``: the standard library's header registry
    and generator took 3 ms of CPU per e-mail, a fifth of what the mail worker spent per order
    (loadtests/bench/e2e.py --py-spy). Every header here is ours, bounded and ASCII after RFC 2047
    encoding (Subject, the sender's display name), and the recipient must be ASCII (the API refuses
    others; :func:`deliver` refuses them for good), so the general machinery buys nothing.
    tests/test_mail.py parses what the mailbox received with the standard library's parser."""
    rendered = render(kind, facts)
    to = _header_value(facts.email)
    to.encode("ascii")  # UnicodeEncodeError: not sendable (see _unsendable)
    sender = _from_header(_header_value(settings.mail_sender))
    identifier = message_id(settings, facts.order_id, kind)
    boundary = "=_meterai_" + secrets.token_hex(12)
    subject = Header(_header_value(rendered.subject), "utf-8" if not rendered.subject.isascii() else "us-ascii",
                     header_name="Subject").encode(linesep="\r\n")
    head = "\r\n".join([
        f"Subject: {subject}", f"From: {sender}", f"To: {to}",
        f"Date: {format_datetime(datetime.now(timezone.utc))}", f"Message-ID: {identifier}",
        "Content-Language: id", "Auto-Submitted: auto-generated",  # RFC 3834: no vacation replies to it
        "MIME-Version: 1.0", f'Content-Type: multipart/alternative; boundary="{boundary}"', "", ""])
    parts = []
    for subtype, body in (("plain", rendered.text), ("html", rendered.html)):
        parts.append(f'--{boundary}\r\nContent-Type: text/{subtype}; charset="utf-8"\r\n'
                     "Content-Transfer-Encoding: base64\r\n\r\n".encode("ascii") + _base64_body(body))
    content = head.encode("ascii") + b"".join(parts) + f"--{boundary}--\r\n".encode("ascii")
    return Outgoing(to=to, message_id=identifier, content=content)


# --- sending one row ----------------------------------------------------------------------------------

# A claim takes a pending row, or a sending one whose holder's lease ran out (it died or hung mid-send:
# what it sent is unknown, so the row may have been delivered). attempts counts claims, and with the
# owner it names this claim: every later write of the row is a compare-and-set on both (_HELD).
#
# The claim also reads what the e-mail tells (the facts_ columns, :func:`_facts`) in the same statement:
# one round trip fewer per e-mail. The facts are read as of the statement's start (before any wait for
# the outbox row's lock), which is enough: the change that queued an e-mail committed its facts with the
# outbox row, so a claim that sees the row sees them.
_CLAIM = """
WITH claimed AS (
    UPDATE mail_outbox SET status = 'sending', attempts = attempts + 1, lease_owner = %(owner)s,
           lease_expires_at = now() + make_interval(secs => %(lease)s), updated_at = now(),
           maybe_delivered = maybe_delivered OR status = 'sending'
    WHERE order_id = %(order_id)s AND kind = %(kind)s
      AND (status = 'pending' OR (status = 'sending' AND lease_expires_at < now()))
    RETURNING *
)
SELECT claimed.*, o.id::text AS facts_order_id, o.email AS facts_email, o.amount_idr AS facts_amount_idr,
       o.serial AS facts_serial, o.stamped_at AS facts_stamped_at, o.reason_message AS facts_reason_message,
       o.reason_code AS facts_reason_code,
       r.amount_idr AS facts_refund_amount, r.completed_at AS facts_refunded_at, r.manual_since AS facts_manual_since
FROM claimed
JOIN orders o ON o.id = claimed.order_id
LEFT JOIN LATERAL (  -- the refund of the order's own capture
    SELECT rf.amount_idr, rf.completed_at, rf.manual_since FROM refunds rf
    JOIN payments p ON p.gateway_order_id = rf.gateway_order_id AND p.capture_role = 'order'
    WHERE rf.order_id = o.id
) r ON true
"""
# This claim still holds the row: nobody took its lease over since.
_HELD = "id = %(id)s AND status = 'sending' AND lease_owner = %(owner)s AND attempts = %(attempts)s"

def lease_seconds(settings: Settings) -> float:
    """Longer than one attempt can take, so a live send is never claimed by a second worker (which would
    send the e-mail twice). The SMTP steps are each bounded by the timeout, but there are a dozen waits or
    more (a kept session's unanswered MAIL, connect, greeting, EHLO, STARTTLS, AUTH's exchanges, MAIL,
    RCPT, DATA's three answers) and a trickling server can stretch each: the bound is the task's hard time
    limit, past which the watchdog ends the attempt's process within seconds (workers/watchdog.py)."""
    return settings.task_time_limit_seconds + 30


def _facts(settings: Settings, row: dict[str, Any], link: str) -> Facts:
    """What the e-mail tells, from the claim's facts_ columns."""
    serial = row["facts_serial"] if row["facts_stamped_at"] else None
    base = settings.public_base_url.rstrip("/")
    return Facts(
        order_id=row["facts_order_id"], email=row["facts_email"], amount=row["facts_amount_idr"], link=link,
        serial=serial, stamped_at=row["facts_stamped_at"], verify_link=f"{base}/verify/{serial}" if serial else None,
        refund_amount=row["facts_refund_amount"], reason=row["facts_reason_message"],
        reason_code=row["facts_reason_code"],
        refunded_at=row["facts_refunded_at"], manual_since=row["facts_manual_since"],
    )


def _held(row: dict[str, Any], owner: str) -> dict[str, Any]:
    return {"id": row["id"], "owner": owner, "attempts": row["attempts"]}


def send_mail(settings: Settings, order_id: str, kind: str, owner: str) -> str:
    """Send the order's e-mail of ``kind`` if it is still unsent: ``sent``, ``skipped`` (sent already,
    failed, being sent by another worker, or our lease was taken over) or ``failed`` (out of attempts,
    or refused for good). Raises :class:`MailNotSent` when this attempt failed and another may follow."""
    mail = Mail(kind)
    with transaction(settings.database_url) as tx:
        row = tx.execute(_CLAIM, {"owner": owner, "lease": lease_seconds(settings), "order_id": order_id,
                                  "kind": mail.value}).fetchone()
        if row is None:
            return "skipped"
        if row["attempts"] > settings.mail_max_retries + 1:
            _fail(settings, tx, row, row["last_error"] or "attempts used up", owner=owner)
            return "failed"
        salt = row["link_salt"]
        if salt is None:  # the row's first claim (or its first after a re-queue): one token per e-mail
            salt = secrets.token_hex(16)
            # Committed before the e-mail leaves: the link works at once.
            add_link_token(tx, order_id, link_token(settings, order_id, mail.value, salt))
            tx.execute("UPDATE mail_outbox SET link_salt = %s WHERE id = %s", (salt, row["id"]))
        token = link_token(settings, order_id, mail.value, salt)
    try:
        message = compose(settings, mail, _facts(settings, row, order_page_url(settings, order_id, token)))
        deliver(settings, message)
    except SmtpFailure as failure:
        return _after_failure(settings, row, owner, failure)
    except (UnicodeError, ValueError) as exc:  # an address or header no SMTP server can be sent
        return _after_failure(settings, row, owner, _unsendable(exc))
    with transaction(settings.database_url) as tx:
        marked = tx.execute(
            "UPDATE mail_outbox SET status = 'sent', sent_at = now(), updated_at = now(), last_error = NULL,"
            f" lease_owner = NULL, lease_expires_at = NULL, link_salt = NULL WHERE {_HELD} RETURNING id",
            _held(row, owner)).fetchone()
    log_event(log, "mail_sent", order_id=order_id, kind=mail.value, attempt=row["attempts"],
              message_id=message.message_id, lease_kept=marked is not None)
    return "sent"


def _unsendable(exc: Exception) -> "SmtpFailure":
    return SmtpFailure(f"address can't be sent over SMTP (non-ASCII or malformed): {type(exc).__name__}: "
                       f"{exc}"[:300], permanent=True)


def _fail(settings: Settings, tx: Any, row: dict[str, Any], error: str, *, owner: str | None,
          in_doubt: bool = False) -> bool:
    """Leave the row ``failed`` (logged at ERROR), if it is still ours: held by this claim (``owner``),
    or, with ``owner=None``, pending (nobody holds it). Its link token is forgotten unless some attempt
    may have delivered the e-mail; then the token stays on the row, so a re-queue sends the same link.
    False when someone else holds the row now: it is theirs, untouched."""
    if owner is None:
        condition, params = "id = %(id)s AND status = 'pending'", {"id": row["id"]}
    else:
        condition, params = _HELD, _held(row, owner)
    held = tx.execute(f"SELECT link_salt, maybe_delivered FROM mail_outbox WHERE {condition} FOR UPDATE",
                      params).fetchone()
    if held is None:
        log_event(log, "mail_lease_lost", logging.WARNING, order_id=str(row["order_id"]), kind=row["kind"],
                  attempt=row["attempts"], error=error[:200])
        return False
    keep = held["maybe_delivered"] or in_doubt
    if held["link_salt"] and not keep:
        drop_link_token(tx, row["order_id"], link_token(settings, row["order_id"], row["kind"], held["link_salt"]))
    tx.execute("UPDATE mail_outbox SET status = 'failed', updated_at = now(), last_error = %s, lease_owner = NULL,"
               " lease_expires_at = NULL, maybe_delivered = %s, link_salt = %s WHERE id = %s",
               (error[:500], keep, held["link_salt"] if keep else None, row["id"]))
    log_event(log, "mail_failed", logging.ERROR, order_id=str(row["order_id"]), kind=row["kind"],
              attempts=row["attempts"], error=error[:200])
    return True


def _after_failure(settings: Settings, row: dict[str, Any], owner: str, failure: "SmtpFailure") -> str:
    """Put the row back for the next attempt (its link token stays for it), or fail it for good; a row
    whose lease another worker took over meanwhile is left to that worker."""
    error = str(failure)[:500]
    with transaction(settings.database_url) as tx:
        if failure.permanent or row["attempts"] > settings.mail_max_retries:
            return "failed" if _fail(settings, tx, row, error, owner=owner, in_doubt=failure.in_doubt) else "skipped"
        back = tx.execute(
            "UPDATE mail_outbox SET status = 'pending', updated_at = now(), last_error = %(error)s,"
            " lease_owner = NULL, lease_expires_at = NULL, maybe_delivered = maybe_delivered OR %(in_doubt)s"
            f" WHERE {_HELD} RETURNING id", {**_held(row, owner), "error": error, "in_doubt": failure.in_doubt},
        ).fetchone()
    if back is None:
        log_event(log, "mail_lease_lost", logging.WARNING, order_id=str(row["order_id"]), kind=row["kind"],
                  attempt=row["attempts"], error=error[:200])
        return "skipped"
    raise MailNotSent(error)


def give_up(settings: Settings, order_id: str, kind: str, error: str) -> None:
    """The task's retries ran out: a row still waiting is failed (named, logged), never left pending."""
    with transaction(settings.database_url) as tx:
        row = tx.execute("SELECT * FROM mail_outbox WHERE order_id = %s AND kind = %s AND status = 'pending'"
                         " FOR UPDATE", (order_id, Mail(kind).value)).fetchone()
        if row is not None:
            _fail(settings, tx, row, f"retries exhausted: {error}", owner=None)


def requeue_failed(settings: Settings, *, kind: str | None = None, since: datetime | None = None,
                   limit: int | None = None) -> list[tuple[str, str]]:
    """``meterai mail-retry``: put failed rows (of ``kind``, failed at or after ``since``) back to pending
    with their attempts renewed, and publish their sends; (order id, kind) of each."""
    with transaction(settings.database_url) as tx:
        rows = tx.execute(
            "UPDATE mail_outbox SET status = 'pending', attempts = 0, updated_at = now() WHERE id IN ("
            " SELECT id FROM mail_outbox WHERE status = 'failed'"
            " AND (%(kind)s::text IS NULL OR kind = %(kind)s) AND (%(since)s::timestamptz IS NULL OR updated_at >= %(since)s)"
            " ORDER BY updated_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
            " RETURNING order_id::text AS order_id, kind",
            {"kind": Mail(kind).value if kind else None, "since": since, "limit": limit}).fetchall()
    queued = [(row["order_id"], row["kind"]) for row in rows]
    for order_id, mail_kind in queued:
        jobs.publish_committed(jobs.SEND_MAIL, order_id, mail_kind)
    if queued:
        log_event(log, "mail_requeued", count=len(queued), kind=kind or "any",
                  since=since.isoformat() if since else None)
    return queued


def probe(settings: Settings) -> str | None:
    """Can the SMTP server be reached with these settings (connect, EHLO, STARTTLS, AUTH, NOOP)? None when
    it can, else what went wrong (never the password). The mail workers ask once as they start."""
    try:
        smtp = _connect(settings)
        try:
            code, reply = smtp.noop()
        finally:
            _end(smtp)
        if code != 250:
            return f"NOOP answered {code} {_text(reply)}"
    except (smtplib.SMTPException, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


def check_server(settings: Settings) -> bool:
    """:func:`probe`, said in the log: at ERROR when the server can't be reached (every e-mail would fail
    until it can: the settings, the relay or the network is wrong), never raised."""
    where = {"host": settings.smtp_server_host, "port": settings.smtp_port, "security": settings.smtp_security}
    problem = probe(settings)
    if problem is None:
        log_event(log, "smtp_probe_ok", **where)
        return True
    log_event(log, "smtp_probe_failed", logging.ERROR, **where, error=problem)
    return False


# --- SMTP ---------------------------------------------------------------------------------------------

class SmtpFailure(Exception):
    """One attempt failed. ``in_doubt``: the message may have been taken (the connection broke during
    DATA); ``permanent``: no later attempt can succeed (:func:`refused_for_good`, or an address SMTP
    can't carry)."""

    def __init__(self, message: str, *, in_doubt: bool = False, permanent: bool = False) -> None:
        super().__init__(message)
        self.in_doubt = in_doubt
        self.permanent = permanent


_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


def refused_for_good(code: int, reply: bytes | str) -> bool:
    """Whether the server's refusal of a recipient (RCPT) is about the mailbox itself, so retrying can't
    help: an enhanced status about the recipient's address (RFC 3463: 5.1.1 to 5.1.6 and 5.1.10: bad
    mailbox, bad system, bad syntax, ambiguous, moved, null MX). Everything else is retried until the
    row's attempts run out: 4xx, a 5.7.x policy refusal ("554 5.7.1 relaying denied" is a relay
    misconfigured, and would fail every e-mail while it lasts), 5.1.7/5.1.8 (our sender's address), any
    other 5xx, and a bare 5xx without an enhanced status (relays say "550 Authentication required" or
    "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)" that way)."""
    if not 500 <= code < 600:
        return False
    enhanced = _ENHANCED.match(_text(reply))
    return bool(enhanced) and enhanced.group(1) == "5" and enhanced.group(2) == "1" \
        and int(enhanced.group(3)) in (1, 2, 3, 4, 5, 6, 10)


@lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process: making one loads the system's CA certificates, about 34 ms
    of CPU, which was two thirds of an e-mail's cost when every send made its own (loadtests/bench/e2e.py).
    A context is safe to share between threads; a CA bundle changed on disk is read at the next restart."""
    return ssl.create_default_context()


def _connect(settings: Settings) -> smtplib.SMTP:
    """A session with the configured server, greeted, upgraded to TLS and logged in as configured."""
    context = _tls_context() if settings.smtp_security in ("tls", "starttls") else None
    timeout = settings.smtp_timeout_seconds
    if settings.smtp_security == "tls":
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(settings.smtp_server_host, settings.smtp_port, timeout=timeout,
                                              context=context)
    else:
        smtp = smtplib.SMTP(settings.smtp_server_host, settings.smtp_port, timeout=timeout)
    try:
        smtp.ehlo()
        if settings.smtp_security == "starttls":
            smtp.starttls(context=context)
            smtp.ehlo()
        if settings.smtp_username:
            smtp.login(settings.smtp_username, settings.smtp_password)
    except BaseException:
        smtp.close()
        raise
    return smtp


# One SMTP session per thread is kept between e-mails (RFC 5321 lets a client send one mail after another
# on a session): a session's connect, EHLO (STARTTLS, its handshake and the EHLO again, AUTH) and QUIT
# are paid once per SMTP_SESSION_MESSAGES e-mails instead of once per e-mail (loadtests/bench/smtp.py:
# over STARTTLS 3.6 -> 0.7 ms of CPU an e-mail). A session idle for SESSION_IDLE_SECONDS is ended rather
# than reused: servers end idle clients (RFC 5321 4.5.3.2.7 suggests 5 minutes; relays often use less),
# and one that ended it meanwhile is noticed when MAIL gets no answer (or a 421), before anything of the
# e-mail was sent on it, so the e-mail goes on a new session.
SESSION_IDLE_SECONDS = 30.0


class _KeptSession(threading.local):
    smtp: smtplib.SMTP | None = None
    key: tuple[Any, ...] = ()
    pid: int = 0
    sent: int = 0
    idle_since: float = 0.0


_kept = _KeptSession()


def _session_key(settings: Settings) -> tuple[Any, ...]:
    return (settings.smtp_server_host, settings.smtp_port, settings.smtp_security, settings.smtp_username,
            settings.smtp_password, settings.smtp_timeout_seconds)


def _end(smtp: smtplib.SMTP) -> None:
    try:  # a server's odd answer to QUIT decides nothing: each e-mail was taken (or not) already
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


def _take_session(settings: Settings) -> tuple[smtplib.SMTP, bool]:
    """This thread's kept session if it is still fit for these settings, else a new one; and whether it
    was kept (a kept session may have been ended by the server since)."""
    smtp, _kept.smtp = _kept.smtp, None
    if smtp is not None:
        if _kept.pid != os.getpid():
            smtp.close()  # a session from before a fork is the parent's: drop our copy, say nothing on it
        elif _kept.key == _session_key(settings) and time.monotonic() - _kept.idle_since < SESSION_IDLE_SECONDS:
            return smtp, True
        else:
            smtp.close()  # no QUIT: a server gone silent meanwhile would cost this e-mail a whole timeout
    _kept.sent = 0
    return _connect(settings), False


def _keep_session(settings: Settings, smtp: smtplib.SMTP) -> None:
    """After a message the server took: keep the session for this thread's next e-mail, or end it."""
    _kept.sent += 1
    if _kept.sent >= settings.smtp_session_messages:
        smtp.close()  # no QUIT: its answer decides nothing, and the row is not marked sent yet
        return
    _kept.smtp, _kept.key, _kept.pid, _kept.idle_since = smtp, _session_key(settings), os.getpid(), time.monotonic()


def _open_transaction(settings: Settings, sender: str) -> tuple[smtplib.SMTP, int, bytes]:
    """A session that has answered our MAIL: a kept one, or a new one when the server ended the kept one
    (no answer, or 421 "closing the channel"; nothing of the e-mail was sent on it yet)."""
    while True:
        smtp, kept = _take_session(settings)
        try:
            code, reply = smtp.mail(sender)
        except (smtplib.SMTPServerDisconnected, OSError):
            smtp.close()
            if kept:
                continue
            raise
        except BaseException:
            smtp.close()
            raise
        if code == 421 and kept:
            smtp.close()
            continue
        return smtp, code, reply


def _answered(exc: BaseException | None) -> bool:
    """Whether the session failed on a coherent answer of the server's (a refusal), so a QUIT is in step."""
    return isinstance(exc, smtplib.SMTPResponseException) or (isinstance(exc, SmtpFailure) and not exc.in_doubt)


def deliver(settings: Settings, message: Outgoing) -> None:
    """Hand ``message`` to the configured SMTP server (standard library smtplib; TLS certificates
    verified), on this thread's kept session when it has one. Raises :class:`SmtpFailure`; the password
    is never part of what is raised or logged."""
    sender = parseaddr(settings.mail_sender)[1]
    recipient = parseaddr(message.to)[1]  # the API's address, as the To header shows it
    data_sent = False
    try:
        # Addresses are made SMTP-ready before anything is sent: one that can't be (a non-ASCII
        # address; the API refuses those, an older row may hold one) is refused for good.
        content = message.content
        sender.encode("ascii"), recipient.encode("ascii")
    except (UnicodeError, ValueError) as exc:
        raise _unsendable(exc) from None
    try:
        smtp, code, reply = _open_transaction(settings, sender)
        taken = False
        try:
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, reply, sender)
            code, reply = smtp.rcpt(recipient)
            if code not in (250, 251):
                if refused_for_good(code, reply):
                    raise SmtpFailure(f"recipient refused: {code} {_text(reply)}", permanent=True)
                raise smtplib.SMTPRecipientsRefused({recipient: (code, reply)})
            data_sent = True
            # smtplib raises only when DATA itself is refused; the answer to the final "." is returned.
            code, reply = smtp.data(content)
            if code == -1:  # no readable answer: the server may have taken it
                raise SmtpFailure(f"DATA answered unreadably: {_text(reply)}", in_doubt=True)
            if code != 250:  # refused at the end of DATA (greylisting, a filter, size): certainly not taken
                raise smtplib.SMTPDataError(code, reply)
            taken = True
        finally:
            # Only a session whose last message was taken is kept. After a refusal the session is ended
            # with QUIT; after anything else (a timeout, a soft time limit mid-DATA) its state is unknown
            # and a QUIT could wait out a whole timeout: the socket is just closed.
            if taken:
                _keep_session(settings, smtp)
            elif _answered(sys.exc_info()[1]):
                _end(smtp)
            else:
                smtp.close()
    except SmtpFailure:
        raise
    except smtplib.SMTPRecipientsRefused as exc:  # refused, not for good: a policy (5.7.x) or a 4xx
        code, reply = next(iter(exc.recipients.values()))
        raise SmtpFailure(f"recipient refused for now: {code} {_text(reply)}") from None
    except smtplib.SMTPResponseException as exc:  # the server answered no: it certainly has no copy
        raise SmtpFailure(f"{type(exc).__name__}: {exc.smtp_code} {_text(exc.smtp_error)}") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise SmtpFailure(f"{type(exc).__name__}: {exc}"[:300], in_doubt=data_sent) from None
    except (UnicodeError, ValueError) as exc:  # smtplib encodes commands as ASCII
        raise SmtpFailure(_unsendable(exc).args[0], permanent=True, in_doubt=data_sent) from None


def _text(reply: bytes | str) -> str:
    return (reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply))[:200]
