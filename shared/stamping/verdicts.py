"""The verdicts a document check speaks in, importable without any PDF library.

Why a module of their own: the web process (upload checks), the sandbox's parent side (which turns a
child's answer back into these) and the workers all name the same rejections, and only the workers and
the sandbox's children may load pypdf, reportlab, segno, pikepdf or pyHanko. So the exceptions, the
preflight's result and the rejections built in more than one place live here, next to nothing heavy.

Every rejection is a :class:`DocumentRejected`: a machine code and a message in Bahasa Indonesia for the
buyer, permanent (a bad document is never retried). The HTTP status each code gets is the web layer's
choice, not this module's.
"""
from __future__ import annotations

from dataclasses import dataclass

from shared.errors import PermanentError

STAMP_SIZE: float = 100.0

UNREADABLE_MESSAGE = "Dokumen PDF rusak atau tidak dapat dibaca."
TOO_SLOW_MESSAGE = (
    "Dokumen PDF terlalu rumit untuk diperiksa dalam batas waktu. Simpan ulang atau cetak ulang "
    "dokumen ke PDF, lalu unggah kembali."
)
TOO_BIG_MESSAGE = (
    "Dokumen PDF membutuhkan memori terlalu besar untuk diperiksa. Simpan ulang atau cetak ulang "
    "dokumen ke PDF, lalu unggah kembali."
)


class DocumentRejected(PermanentError):
    """The uploaded document can't be stamped as asked; ``code`` says why, ``message`` tells the buyer."""

    code = "document_rejected"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)

    def __reduce__(self) -> tuple[object, ...]:
        # Exceptions cross process boundaries (Celery results); the default pickling replays
        # ``args`` = (message,), which doesn't fit this constructor.
        return (type(self), (self.code, self.message))


class DocumentUnreadable(PermanentError):
    """A stored document that passed preflight can't be parsed or written now."""

    code = "unreadable"

    def __init__(self, message: str = UNREADABLE_MESSAGE) -> None:
        super().__init__(message, code="unreadable")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message,))


@dataclass(frozen=True)
class PreflightResult:
    page_count: int
    page_width: float  # of the chosen page's visible box (CropBox, else MediaBox), unrotated
    page_height: float


def unreadable() -> DocumentRejected:
    return DocumentRejected("unreadable", UNREADABLE_MESSAGE)


def too_complex(message: str = TOO_SLOW_MESSAGE) -> DocumentRejected:
    return DocumentRejected("too_complex", message)


def damaged_structure() -> DocumentRejected:
    return DocumentRejected(
        "damaged_structure",
        "Struktur dokumen PDF ini rusak sehingga dokumen bermeterai tidak akan terbaca dengan benar di "
        "aplikasi PDF. Simpan ulang atau cetak ulang dokumen ke PDF, lalu unggah kembali.",
    )
