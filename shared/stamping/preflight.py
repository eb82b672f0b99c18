"""Checks a document must pass before the buyer is asked to pay.

The rule from the design: a document that can't be stamped is rejected with a clear reason and no charge.
So there are two levels:

* :func:`quick_check` is cheap enough for the web front end to run inline on upload (size and PDF
  header only), so obvious mistakes are answered at once.
* :func:`preflight` runs in a worker process: it parses the document under pypdf's lowered limits and
  then does a full trial stamp with a placeholder serial, exactly as the paid stamping will. Whatever
  would make stamping fail after payment makes the preflight fail before it. That includes the
  delivery check's structural part (:func:`.delivery.check_structure`: qpdf re-reads the trial stamp
  without recovery), so a document whose stamped file strict readers could not open is refused before
  the buyer pays, not refunded after.

Every rejection is a :class:`DocumentRejected` with a machine code and a message in Bahasa Indonesia.
"""
from __future__ import annotations

from dataclasses import dataclass

from pypdf import PageObject
from pypdf.errors import LimitReachedError
from pypdf.generic import ArrayObject, NullObject, StreamObject

from . import delivery
from .kernel import (
    STAMP_SIZE,
    DocumentRejected,
    bounded_parsing,
    check_stamp_fits,
    page_count,
    read_document,
    select_page,
    stamp_reader,
    unreadable,
    visible_box,
)

PDF_MAGIC = b"%PDF-"
# Readers accept some junk before the header; we allow the same window as Acrobat (1024 bytes).
HEADER_WINDOW = 1024

_TRIAL_SERIAL = "0" * 22
_TRIAL_VERIFY_URL = "https://meterai.invalid/verifikasi/" + _TRIAL_SERIAL


@dataclass(frozen=True)
class PreflightResult:
    page_count: int
    page_width: float  # of the chosen page's visible box (CropBox, else MediaBox), unrotated
    page_height: float


def _megabytes(limit: int) -> str:
    value = limit / (1024 * 1024)
    return f"{value:.1f}".rstrip("0").rstrip(".").replace(".", ",")


def quick_check(data: bytes, *, max_bytes: int) -> None:
    """Non-empty, at most ``max_bytes``, and a ``%PDF-`` header within the first 1024 bytes."""
    if not data:
        raise DocumentRejected("not_pdf", "Berkas kosong. Unggah dokumen dalam format PDF.", status=415)
    if len(data) > max_bytes:
        raise DocumentRejected(
            "too_large",
            f"Ukuran berkas melebihi batas {_megabytes(max_bytes)} MB.",
            status=413,
        )
    if PDF_MAGIC not in data[: HEADER_WINDOW + len(PDF_MAGIC)]:
        raise DocumentRejected(
            "not_pdf", "Berkas ini bukan dokumen PDF. Unggah dokumen dalam format PDF.", status=415
        )


def _check_page_limit(count: int, max_pages: int) -> None:
    if count > max_pages:
        raise DocumentRejected(
            "too_many_pages",
            f"Dokumen memiliki {count} halaman; batas maksimalnya {max_pages} halaman.",
        )


def _check_page_content(page: PageObject, number: int) -> None:
    """The content the stamp is wrapped around must decode within the parsing limits.

    Stamping copies the page's content streams without decoding them, so a decompression bomb (a few
    kilobytes of FlateDecode that inflate to gigabytes) would pass the trial stamp, and every reader of
    the stamped document would then spend seconds and gigabytes showing it. An entry of /Contents that
    is not a stream at all (an array that contains itself, say) is not a page a reader can show either.
    Other decoding errors are tolerated, as before: readers show what they can recover, and we copy the
    bytes unchanged.
    """
    try:
        contents = page.get("/Contents")
        resolved = contents.get_object() if contents is not None else NullObject()
        if isinstance(resolved, NullObject):
            return
        parts = list(resolved) if isinstance(resolved, ArrayObject) else [contents]
        streams = [part.get_object() for part in parts]
    except Exception as exc:
        raise unreadable() from exc
    if not all(isinstance(stream, StreamObject) for stream in streams):
        raise unreadable()
    for stream in streams:
        try:
            stream.get_data()
        except (LimitReachedError, MemoryError) as exc:
            raise DocumentRejected(
                "too_complex",
                f"Isi halaman {number} terlalu besar untuk diproses. Simpan ulang atau cetak ulang "
                "dokumen ke PDF, lalu unggah kembali.",
            ) from exc
        except Exception:
            continue


def preflight(
    data: bytes,
    *,
    page: int,
    x: float,
    y: float,
    max_bytes: int,
    max_pages: int,
    size: float = STAMP_SIZE,
) -> PreflightResult:
    """Everything that could stop stamping ``page`` at ``(x, y)``, checked before payment.

    Raises :class:`DocumentRejected` with code "not_pdf", "too_large", "unreadable", "encrypted",
    "no_pages", "too_many_pages", "page_out_of_range", "stamp_outside_page", "too_complex" (the
    chosen page's content inflates past the parsing limits) or "damaged_structure" (the trial stamp
    fails the independent re-read).
    """
    quick_check(data, max_bytes=max_bytes)
    with bounded_parsing():
        reader = read_document(data)
        count = page_count(reader)
        chosen = select_page(reader, page, count)
        _check_page_limit(count, max_pages)
        box = visible_box(chosen)
        check_stamp_fits(box, x, y, size)
        _check_page_content(chosen, page)
        try:
            trial = stamp_reader(
                reader, page=page, x=x, y=y, serial=_TRIAL_SERIAL, verify_url=_TRIAL_VERIFY_URL, size=size
            )
        except DocumentRejected:
            raise
        except Exception as exc:
            raise unreadable() from exc
    _check_trial(data, trial, page=page, count=count)
    return PreflightResult(page_count=count, page_width=box.width, page_height=box.height)


def damaged_structure() -> DocumentRejected:
    return DocumentRejected(
        "damaged_structure",
        "Struktur dokumen PDF ini rusak sehingga dokumen bermeterai tidak akan terbaca dengan benar di "
        "aplikasi PDF. Simpan ulang atau cetak ulang dokumen ke PDF, lalu unggah kembali.",
    )


def _check_trial(data: bytes, trial: bytes, *, page: int, count: int) -> None:
    """The trial stamp passes the delivery check's structural part, and qpdf sees the buyer's document
    with as many pages as pypdf does (the page they chose is the same page to both)."""
    expected = delivery.expected_page_count(data)
    if expected is not None and expected != count:
        raise damaged_structure()
    try:
        delivery.check_structure(trial, page=page, page_count=count)
    except delivery.DeliveryCheckFailed as exc:
        raise damaged_structure() from exc
