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
bounded, so the parse and signature validation run in a short-lived child process forked from a
pre-loaded fork server (a few milliseconds per check), under a wall-clock timeout after which the child
is killed, and with its address space capped. The web process only reads the size-capped upload, waits
on a pipe and asks PostgreSQL; at most ``verify_concurrency`` checks run at once per web process, and
more are told to come back (503) rather than queueing without bound.
"""
from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import multiprocessing.connection
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.config import Settings
from shared.db import get_pool
from shared.errors import DomainError, TransientError
from shared.logs import log_event
from shared.stamping.signing import serial_from_field_name, trust_root_from_settings

log = logging.getLogger(__name__)

_ADDRESS_SPACE_HEADROOM = 1024 * 1024 * 1024  # what a child may allocate beyond its forked image


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


# --- what the signature says (runs in the isolated child) ----------------------------------------

@dataclass(frozen=True)
class SignatureFindings:
    """What the child process found; plain data so it crosses the process boundary."""

    # ok, or a reason: not_signed, unreadable, signature_invalid, untrusted_signer, modified_after_stamping
    outcome: str
    serial: str | None = None
    signer: str | None = None


def inspect_signature(data: bytes, trust_root_der: bytes) -> SignatureFindings:
    """Find our last signature in ``data`` and validate it against ``trust_root_der`` only.

    Pure and in-process: call it through :func:`inspect_isolated` for anything a stranger uploaded.
    """
    from asn1crypto import x509 as asn1_x509
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import validate_pdf_signature
    from pyhanko.sign.validation.status import SignatureCoverageLevel
    from pyhanko_certvalidator import ValidationContext

    try:
        reader = PdfFileReader(io.BytesIO(data), strict=False)
        ours = [(sig, serial_from_field_name(sig.field_name)) for sig in reader.embedded_regular_signatures]
    except Exception:  # pyHanko raises far more than PdfReadError on hostile input
        return SignatureFindings("unreadable")
    ours = [(sig, serial) for sig, serial in ours if serial is not None]
    if not ours:
        return SignatureFindings("not_signed")
    embedded, serial = ours[-1]  # signatures come in file order: the last covers the most
    try:
        subject = embedded.signer_cert.subject
        signer = subject.native.get("common_name") or subject.human_friendly
        context = ValidationContext(trust_roots=[asn1_x509.Certificate.load(trust_root_der)],
                                    allow_fetching=False)
        # Diff analysis only matters for a signature that doesn't cover the whole file, which we
        # refuse anyway; skipping it keeps the work small and its hostile-input surface smaller.
        status = validate_pdf_signature(embedded, context, skip_diff=True)
    except Exception:
        return SignatureFindings("signature_invalid", serial=serial)
    if not (status.intact and status.valid):
        return SignatureFindings("signature_invalid", serial=serial, signer=signer)
    if not status.trusted:
        return SignatureFindings("untrusted_signer", serial=serial, signer=signer)
    if status.coverage != SignatureCoverageLevel.ENTIRE_FILE:
        return SignatureFindings("modified_after_stamping", serial=serial, signer=signer)
    return SignatureFindings("ok", serial=serial, signer=signer)


def _limit_child_resources(cpu_seconds: int) -> None:
    try:
        import resource

        with open("/proc/self/statm", "rb") as statm:
            current = int(statm.read().split()[0]) * resource.getpagesize()
        limit = current + _ADDRESS_SPACE_HEADROOM
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    except (ImportError, OSError, ValueError):
        pass  # not Linux: the wall-clock timeout in the parent still holds


def _child_main(conn: multiprocessing.connection.Connection, data: bytes, trust_root_der: bytes,
                cpu_seconds: int) -> None:
    _limit_child_resources(cpu_seconds)
    # pyHanko warns once per oddity; a crafted file could fill the fork server's stderr with them.
    logging.getLogger("pyhanko").setLevel(logging.ERROR)
    logging.getLogger("pyhanko_certvalidator").setLevel(logging.ERROR)
    try:
        conn.send(inspect_signature(data, trust_root_der))
    except BaseException:  # MemoryError under the cap, or anything else: the parent reads "unreadable"
        try:
            conn.send(SignatureFindings("unreadable"))
        except Exception:
            pass
    finally:
        conn.close()


class VerificationTimeout(DomainError):
    code = "verification_timeout"
    status = 422


class VerificationBusy(TransientError):
    code = "verification_busy"
    status = 503


_context_lock = threading.Lock()
_context: multiprocessing.context.BaseContext | None = None


def _fork_server() -> multiprocessing.context.BaseContext:
    """A fork server that imports pyHanko once; each check forks from it (no threads, no sockets of ours
    are inherited, unlike forking a web worker)."""
    global _context
    with _context_lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            # "__main__" as in multiprocessing's default: the entry script (gunicorn's, say) is
            # imported once in the server rather than once per child.
            context.set_forkserver_preload(["__main__", __name__, "pyhanko.sign.validation",
                                            "pyhanko.pdf_utils.reader", "pyhanko_certvalidator"])
            _context = context
        return _context


def inspect_isolated(data: bytes, trust_root_der: bytes, *, timeout: float) -> SignatureFindings:
    """:func:`inspect_signature` in a child process that is killed after ``timeout`` seconds."""
    context = _fork_server()
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(sender, data, trust_root_der, int(timeout) + 1),
                            daemon=True)
    try:
        child.start()
    except OSError as exc:  # out of processes or file descriptors: come back later
        receiver.close()
        raise VerificationBusy("Layanan verifikasi sedang sibuk; silakan coba lagi sebentar lagi.") from exc
    finally:
        sender.close()
    try:
        if not receiver.poll(timeout):
            raise VerificationTimeout(
                "Dokumen tidak dapat diperiksa dalam batas waktu; pastikan berkasnya dokumen e-Meterai "
                "yang utuh.")
        try:
            findings = receiver.recv()
        except EOFError:  # the child died (address-space cap, CPU limit) before answering
            findings = SignatureFindings("unreadable")
        return findings if isinstance(findings, SignatureFindings) else SignatureFindings("unreadable")
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join(timeout=5)
        child.close()


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


_slots_lock = threading.Lock()
_slots: dict[int, threading.BoundedSemaphore] = {}


def _slot(settings: Settings) -> threading.BoundedSemaphore:
    size = max(1, settings.verify_concurrency)
    with _slots_lock:
        return _slots.setdefault(size, threading.BoundedSemaphore(size))


def verify_document(settings: Settings, data: bytes) -> Verdict:
    """The verdict on an uploaded PDF. The caller has already capped its size and checked it is a PDF.

    Raises :class:`VerificationTimeout` (422) for a document too slow to check and
    :class:`VerificationBusy` (503) when every slot stayed taken for a few seconds.
    """
    slot = _slot(settings)
    if not slot.acquire(timeout=min(5.0, settings.verify_timeout_seconds)):
        raise VerificationBusy("Layanan verifikasi sedang sibuk; silakan coba lagi sebentar lagi.")
    try:
        trust_root = trust_root_from_settings(settings).dump()
        findings = inspect_isolated(data, trust_root, timeout=settings.verify_timeout_seconds)
    finally:
        slot.release()
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
