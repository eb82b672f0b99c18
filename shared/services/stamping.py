"""Stamping: claim a paid order under a lease, affix the stamp, and commit only from our own claim.

The claim is a compare-and-set ``paid → stamping`` that writes a lease (worker id + expiry) and
reserves the serial in the same transaction; a retry of the same order re-uses that serial. The result
commits by ``stamping → stamped`` guarded by "the lease is still mine", so a worker that lost its lease
(it was too slow, the sweep refunded the order) can never stamp a refunded order. Transient failures
release the lease and are retried; a permanent one (unreadable document) refunds at once.

The upload is read against the SHA-256 PostgreSQL recorded when it was accepted. A missing upload is
transient (:class:`~shared.store.DocumentMissing`): it was durable before the 202, so the miss says this
node's store is wrong (no ``DOCUMENT_STORE_URL``, a wrong bucket or prefix, a lagging server), and a
node so misconfigured must not refund every paid order it claims. It is logged at ERROR with the store's
identity on every attempt and retried like any transient failure; the deadline sweep refunds an order
that never finds it. Bytes that differ from the record (:class:`~shared.store.DocumentCorrupt`) are not
the buyer's document: they are never stamped, and since reading again returns the same bytes, the order
is refunded at once (invariant 1 leaves no other outcome) with a reason that names our error. The stored
document is stamped, then signed (:mod:`shared.stamping.signing`), and its recorded SHA-256 is that of
the signed file, which is what verification compares. Stamp and signature are one incremental update
made in one pass (:func:`shared.stamping.signing.stamp_and_sign`).

Nothing is ``stamped`` before the delivery check (:func:`shared.stamping.delivery.check_delivery`):
qpdf, not pypdf that wrote the file, re-reads it without recovery and checks the page tree, our stamp
and our signature over the whole file. A file that fails is never stored or delivered: the attempt
failed for good (the same bytes give the same file), so the order is refunded and its serial voided.
The check parses in this process, like the stamping itself: the document passed the preflight's
sandbox, where the same qpdf re-read ran on its trial stamp.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

from shared.config import Settings
from shared.db import transaction
from shared.errors import PermanentError
from shared.lifecycle import NOW, Status, before_deadline, lease_free, lease_held_by, release_lease, transition
from shared.logs import log_event
from shared.services.refunds import begin_refund
from shared.stamping.delivery import DeliveryCheckFailed, check_delivery, expected_page_count
from shared.stamping.signing import stamp_and_sign, signer_from_settings
from shared.store import DocumentCorrupt, DocumentMissing, DocumentStore, stamped_key

log = logging.getLogger(__name__)

# What the buyer reads when the stored upload is not their document: our error, not theirs.
CORRUPT_UPLOAD_MESSAGE = ("Dokumen Anda di penyimpanan kami rusak, sehingga meterai tidak dibubuhkan. Ini "
                          "kesalahan kami; dana Anda dikembalikan penuh secara otomatis. Silakan unggah ulang.")


def verify_url(settings: Settings, serial: str) -> str:
    return f"{settings.public_base_url.rstrip('/')}/verify/{serial}"


def claim(settings: Settings, order_id: str, worker_id: str) -> dict[str, Any] | None:
    """Take the stamping lease on a paid order (or one whose earlier lease expired) before its deadline;
    the claim reserves the order's serial (:mod:`shared.lifecycle` declares it)."""
    lease = (worker_id, settings.lease_seconds)
    with transaction(settings.database_url) as tx:
        return transition(
            tx, order_id, Status.PAID, Status.STAMPING, lease=lease, guards=(before_deadline(),),
            detail={"worker": worker_id},
        ) or transition(
            tx, order_id, Status.STAMPING, Status.STAMPING, lease=lease,
            guards=(before_deadline(), lease_free()), detail={"worker": worker_id},
        )


def release(settings: Settings, order_id: str, worker_id: str, error: str) -> None:
    """Give the lease back after a transient failure so the retry (or redrive) can claim again."""
    with transaction(settings.database_url) as tx:
        release_lease(tx, order_id, worker_id, error)


def stamp_order(settings: Settings, store: DocumentStore, order_id: str, worker_id: str) -> str:
    """One attempt at stamping ``order_id``. Raises TransientError (after releasing the lease) to retry."""
    order = claim(settings, order_id, worker_id)
    if order is None:
        return "not_claimable"
    serial = order["serial"]
    try:
        source = store.get(order["document_key"], sha256=order["document_sha256"])
        # Signed over the whole stamped file; a missing key is SigningUnavailable (transient:
        # retried), a document that can't be stamped or signed is DocumentUnreadable (permanent: refunded).
        signer = signer_from_settings(settings)
        stamped = stamp_and_sign(source, signer, page=order["page"], x=order["x"], y=order["y"],
                                 serial=serial, verify_url=verify_url(settings, serial),
                                 size=settings.stamp_size)
        # DeliveryCheckFailed (permanent) unless another parser reads what we wrote as we meant it.
        check_delivery(stamped, page=order["page"], page_count=expected_page_count(source), serial=serial,
                       issuer=signer.certificate)
        key = stamped_key(order_id, order["stamp_attempts"])
        store.put(key, stamped, exclusive=True)  # never over another attempt's file
    except DocumentMissing as exc:
        log_event(log, "upload_missing_from_store", logging.ERROR, order_id=order_id, store=repr(store),
                  key=order["document_key"], attempt=order["stamp_attempts"],
                  detail="accepted uploads are durable before the 202: this node's store is not the one "
                         "it was put in (DOCUMENT_STORE_URL, bucket, prefix) or it lags; retrying")
        release(settings, order_id, worker_id, f"{type(exc).__name__}: {exc}")
        raise
    except PermanentError as exc:
        with transaction(settings.database_url) as tx:
            begun = begin_refund(tx, order_id, Status.STAMPING, reason=exc.code,
                                 guards=(lease_held_by(worker_id),),
                                 message=CORRUPT_UPLOAD_MESSAGE if isinstance(exc, DocumentCorrupt) else None)
        log_event(log, "stamp_failed_permanently", logging.WARNING, order_id=order_id, serial=serial,
                  code=exc.code, refund=begun,
                  problem=exc.problem if isinstance(exc, DeliveryCheckFailed) else None)
        return "refund_pending"
    except Exception as exc:
        release(settings, order_id, worker_id, f"{type(exc).__name__}: {exc}")
        raise
    digest = hashlib.sha256(stamped).hexdigest()
    with transaction(settings.database_url) as tx:
        moved = transition(
            tx, order_id, Status.STAMPING, Status.STAMPED,
            changes={"stamped_document_key": key, "stamped_sha256": digest, "stamped_at": NOW},
            guards=(lease_held_by(worker_id),), detail={"serial": serial},
        )
    if moved is None:
        log_event(log, "stamp_lease_lost", logging.WARNING, order_id=order_id, worker=worker_id)
        return "lease_lost"
    log_event(log, "stamped", order_id=order_id, serial=serial)
    return "stamped"
