"""The upload check the web front end runs inline: size and PDF header, nothing parsed.

Why here and this small: obvious mistakes (an image, an empty file, a file over the limit) are answered
at once, in the request, and the web process must stay light (no PDF library loaded), so this looks only
at the bytes. Everything else about a document is the preflight's job, in the sandbox
(:mod:`shared.stamping.isolation`).
"""
from __future__ import annotations

from .verdicts import DocumentRejected

PDF_MAGIC = b"%PDF-"
# Readers accept some junk before the header; we allow the same window as Acrobat (1024 bytes).
HEADER_WINDOW = 1024


def _megabytes(limit: int) -> str:
    value = limit / (1024 * 1024)
    return f"{value:.1f}".rstrip("0").rstrip(".").replace(".", ",")


def quick_check(data: bytes, *, max_bytes: int) -> None:
    """Non-empty, at most ``max_bytes``, and a ``%PDF-`` header within the first 1024 bytes.

    Raises :class:`DocumentRejected` "not_pdf" or "too_large" (the web answers 415 and 413).
    """
    if not data:
        raise DocumentRejected("not_pdf", "Berkas kosong. Unggah dokumen dalam format PDF.")
    if len(data) > max_bytes:
        raise DocumentRejected("too_large", f"Ukuran berkas melebihi batas {_megabytes(max_bytes)} MB.")
    if PDF_MAGIC not in data[: HEADER_WINDOW + len(PDF_MAGIC)]:
        raise DocumentRejected("not_pdf", "Berkas ini bukan dokumen PDF. Unggah dokumen dalam format PDF.")
