"""Verification: is this serial real, and is this PDF a genuine, unaltered e-Meterai document?

A document is genuine when all of these hold, checked in this order (the first failure is the reason):

1. It carries a signature in a field named ``eMeterai-<serial>`` (the last one, if stamped twice).
   A stamp image pasted onto another PDF, or a document whose signature was stripped, has none.
2. That signature is cryptographically intact, by a certificate that chains to our root (the only trust
   root used; nothing is fetched from the network), and covers the entire file: bytes appended after
   signing (an incremental update) or changed inside the signed range fail here.
3. The serial is in our database, ``used`` (not voided by a refund, not merely reserved), and the
   document's SHA-256 equals the one recorded when it was stamped.

Uploads are hostile input. pyHanko is pure Python and its parsing time on a crafted file is not
bounded, so the parse and signature validation run in the sandbox (:mod:`shared.sandbox`, the job
"inspect_signature" in :mod:`shared.stamping.inspection`): a reused child of the web process, killed
after a wall-clock timeout, with its address space and CPU capped. This module is the web-facing side and
stays light (no PDF or signing library): it reads the root certificate's bytes, waits on the sandbox and
asks PostgreSQL. At most ``verify_concurrency`` checks run at once per web process, on as many threads
and sandbox children of their own (:class:`_Checkers`), and more are told to come back (503) rather than
queueing without bound.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared import sandbox
from shared.config import Settings
from shared.db import get_pool
from shared.errors import DomainError, TransientError
from shared.logs import log_event
from shared.stamping.key_material import trust_root_der

log = logging.getLogger(__name__)

_ADDRESS_SPACE_HEADROOM = 1024 * 1024 * 1024  # what one check may allocate beyond the child's own size
_OUTCOMES = frozenset({"ok", "not_signed", "unreadable", "signature_invalid", "untrusted_signer",
                       "modified_after_stamping"})


@dataclass(frozen=True)
class SerialRecord:
    serial: str
    status: str  # reserved | used | voided
    stamped_at: datetime | None
    document_sha256: str | None

    def as_json(self) -> dict[str, Any]:
        """The API.md shape: ``{serial, status, stamped_at?, document_sha256?}``."""
        body: dict[str, Any] = {"serial": self.serial, "status": self.status}
        if self.status == "used":
            body["stamped_at"] = self.stamped_at.isoformat() if self.stamped_at else None
            body["document_sha256"] = self.document_sha256
        return body


def lookup_serial(settings: Settings, serial: str) -> SerialRecord | None:
    with get_pool(settings.database_url).connection() as conn:
        row = conn.execute(
            "SELECT s.serial, s.status, s.document_sha256, o.stamped_at FROM serials s"
            " JOIN orders o ON o.id = s.order_id WHERE s.serial = %s",
            (serial,),
        ).fetchone()
    if row is None:
        return None
    return SerialRecord(serial=row["serial"], status=row["status"], stamped_at=row["stamped_at"],
                        document_sha256=row["document_sha256"])


# --- what the signature says (found in a sandbox child) -------------------------------------------

@dataclass(frozen=True)
class SignatureFindings:
    """What the sandbox child found (:func:`shared.stamping.inspection.inspect_signature`)."""

    # ok, or a reason: not_signed, unreadable, signature_invalid, untrusted_signer, modified_after_stamping
    outcome: str
    serial: str | None = None
    signer: str | None = None

    @classmethod
    def from_answer(cls, answer: dict[str, Any]) -> SignatureFindings:
        """The child's answer, or "unreadable" for anything that is not one of ours."""
        outcome, serial, signer = answer.get("outcome"), answer.get("serial"), answer.get("signer")
        if outcome not in _OUTCOMES or not isinstance(serial, (str, type(None))) \
                or not isinstance(signer, (str, type(None))):
            return cls("unreadable")
        return cls(outcome, serial=serial, signer=signer)


class VerificationTimeout(DomainError):
    """The document could not be checked in time: its own doing (the web answers 422)."""

    code = "verification_timeout"


class VerificationBusy(TransientError):
    """No slot, or no sandbox child, for another check now: come back (the web answers 503)."""

    code = "verification_busy"


_BUSY = "Layanan verifikasi sedang sibuk; silakan coba lagi sebentar lagi."


def inspect_isolated(data: bytes, trust_root: bytes, *, timeout: float) -> SignatureFindings:
    """The signature in ``data``, inspected in a sandbox child that is killed after ``timeout`` seconds.

    ``trust_root`` is the DER of the only root trusted. Raises :class:`VerificationTimeout` when the check
    runs out of time (or CPU) and :class:`VerificationBusy` when no child can be started; a child that
    runs out of memory or crashes makes the document "unreadable".
    """
    limits = sandbox.Limits(timeout_seconds=timeout, memory_bytes=_ADDRESS_SPACE_HEADROOM)
    arguments = {"trust_root": base64.b64encode(trust_root).decode("ascii")}
    try:
        outcome = sandbox.run("inspect_signature", data, arguments, limits)
    except sandbox.SandboxUnavailable as exc:  # out of processes or file descriptors: come back later
        raise VerificationBusy(_BUSY) from exc
    if outcome.answer is not None:
        return SignatureFindings.from_answer(outcome.answer)
    log_event(log, "verification_child_failed", logging.WARNING, cause=outcome.cause,
              document_bytes=len(data), reused=outcome.reused)
    if outcome.failure in (sandbox.TIMEOUT, sandbox.CPU):
        raise VerificationTimeout(
            "Dokumen tidak dapat diperiksa dalam batas waktu; pastikan berkasnya dokumen e-Meterai yang utuh.")
    return SignatureFindings("unreadable")


# --- the verdict ---------------------------------------------------------------------------------

MESSAGES: dict[str, str] = {
    "valid": "Dokumen asli: meterai elektronik sah dan isi dokumen tidak berubah sejak meterai dibubuhkan.",
    "not_signed": "Dokumen ini tidak memuat tanda tangan digital e-Meterai. Gambar meterai tanpa tanda "
                  "tangan digital yang sah tidak berlaku.",
    "unreadable": "Dokumen PDF rusak atau tidak dapat dibaca.",
    "signature_invalid": "Tanda tangan digital e-Meterai pada dokumen ini tidak utuh: isi dokumen telah "
                         "diubah.",
    "untrusted_signer": "Tanda tangan digital pada dokumen ini tidak dibuat oleh penerbit e-Meterai.",
    "modified_after_stamping": "Dokumen telah diubah setelah meterai dibubuhkan.",
    "unknown_serial": "Nomor seri meterai pada dokumen ini tidak terdaftar.",
    "serial_voided": "Nomor seri meterai ini telah dibatalkan karena pembayarannya dikembalikan.",
    "serial_not_used": "Nomor seri meterai ini belum dipakai pada dokumen mana pun.",
    "document_mismatch": "Dokumen ini bukan dokumen yang dibubuhi meterai dengan nomor seri tersebut.",
}


@dataclass(frozen=True)
class Verdict:
    valid: bool
    reason: str | None
    serial: str | None = None
    stamped_at: datetime | None = None
    document_sha256: str | None = None
    signer: str | None = None

    @property
    def message(self) -> str:
        return MESSAGES[self.reason or "valid"]

    def as_json(self) -> dict[str, Any]:
        """The API.md shape ``{valid, serial?, stamped_at?, reason?}`` plus ``message`` and the hash."""
        body: dict[str, Any] = {"valid": self.valid}
        if self.serial:
            body["serial"] = self.serial
        if self.valid:
            body["stamped_at"] = self.stamped_at.isoformat() if self.stamped_at else None
            body["document_sha256"] = self.document_sha256
        else:
            body["reason"] = self.reason
        body["message"] = self.message
        return body


class _Checkers:
    """The slots and the threads that run verification's sandbox children, per web process.

    At most ``verify_concurrency`` checks run at once (a slot each); more are told to come back. They run
    on that many long-lived threads of their own rather than on the request threads: a sandbox child
    serves only the thread that forked it (it dies with that thread), and a gunicorn ``gthread`` worker
    hands requests to any of its threads, so children made by request threads would be one per thread,
    each paying pyHanko's import. Here there are at most ``verify_concurrency`` children per process,
    all reused.
    """

    def __init__(self, size: int) -> None:
        self.slots = threading.BoundedSemaphore(size)
        self.threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="verification")


_checkers_lock = threading.Lock()
_checkers: dict[int, _Checkers] = {}


def _checkers_for(settings: Settings) -> _Checkers:
    size = max(1, settings.verify_concurrency)
    with _checkers_lock:
        if size not in _checkers:
            _checkers[size] = _Checkers(size)
        return _checkers[size]


def _forget_checkers_after_fork() -> None:
    """In a forked process the threads are gone (and a lock may be held by one): start afresh."""
    global _checkers_lock, _checkers
    _checkers_lock, _checkers = threading.Lock(), {}


os.register_at_fork(after_in_child=_forget_checkers_after_fork)


def verify_document(settings: Settings, data: bytes) -> Verdict:
    """The verdict on an uploaded PDF. The caller has already capped its size and checked it is a PDF.

    Raises :class:`VerificationTimeout` for a document too slow to check and :class:`VerificationBusy`
    when every slot stayed taken for a few seconds.
    """
    checkers = _checkers_for(settings)
    if not checkers.slots.acquire(timeout=min(5.0, settings.verify_timeout_seconds)):
        raise VerificationBusy(_BUSY)
    try:
        # The sandbox ends the check by its deadline, so the wait for this thread is bounded too.
        findings = checkers.threads.submit(inspect_isolated, data, trust_root_der(settings),
                                           timeout=settings.verify_timeout_seconds).result()
    finally:
        checkers.slots.release()
    verdict = _judge(settings, findings, hashlib.sha256(data).hexdigest())
    log_event(log, "document_verified", valid=verdict.valid, reason=verdict.reason, serial=verdict.serial)
    return verdict


def _judge(settings: Settings, findings: SignatureFindings, digest: str) -> Verdict:
    if findings.outcome != "ok":
        return Verdict(False, findings.outcome, serial=findings.serial, signer=findings.signer)
    serial = findings.serial
    assert serial is not None
    record = lookup_serial(settings, serial)
    if record is None:
        return Verdict(False, "unknown_serial", serial=serial, signer=findings.signer)
    if record.status == "voided":
        return Verdict(False, "serial_voided", serial=serial, signer=findings.signer)
    if record.status != "used":
        return Verdict(False, "serial_not_used", serial=serial, signer=findings.signer)
    if record.document_sha256 != digest:
        return Verdict(False, "document_mismatch", serial=serial, signer=findings.signer)
    return Verdict(True, None, serial=serial, stamped_at=record.stamped_at, document_sha256=digest,
                   signer=findings.signer)
