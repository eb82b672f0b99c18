"""Checks a document must pass before the buyer is asked to pay.

The rule from the design: a document that can't be stamped is rejected with a clear reason and no charge.
So there are two levels:

* :func:`.header.quick_check` is cheap enough for the web front end to run inline on upload (size and
  PDF header only), so obvious mistakes are answered at once.
* :func:`preflight` runs in a sandbox child of a checkout worker (:mod:`.isolation`, the job
  :func:`sandbox_job`): it parses the document under pypdf's lowered limits and
  then does a full trial stamp with a placeholder serial, exactly as the paid stamping will. Whatever
  would make stamping fail after payment makes the preflight fail before it. That includes the
  delivery check's structural part (:func:`.delivery.check_structure`: qpdf re-reads the trial stamp
  without recovery), so a document whose stamped file strict readers could not open is refused before
  the buyer pays, not refunded after.

Every rejection is a :class:`DocumentRejected` with a machine code and a message in Bahasa Indonesia.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pypdf import PageObject
from pypdf.errors import LimitReachedError
from pypdf.generic import ArrayObject, NullObject, StreamObject

from shared.sandbox import Answer

from . import art, delivery
from .header import quick_check
from .kernel import stamp_reader
from .reading import bounded_parsing, check_stamp_fits, page_count, read_document, select_page, visible_box
from .verdicts import (
    STAMP_SIZE,
    TOO_BIG_MESSAGE,
    DocumentRejected,
    PreflightResult,
    damaged_structure,
    too_complex,
    unreadable,
)

_TRIAL_SERIAL = "0" * 22
_TRIAL_VERIFY_URL = "https://meterai.invalid/verifikasi/" + _TRIAL_SERIAL


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
    Other decoding errors are tolerated: readers show what they can recover, and we copy the bytes
    unchanged.
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
            raise too_complex(f"Isi halaman {number} terlalu besar untuk diproses. Simpan ulang atau cetak "
                              "ulang dokumen ke PDF, lalu unggah kembali.") from exc
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


# --- in the sandbox (shared/sandbox/jobs.py names these) ------------------------------------------------

def sandbox_warm() -> None:
    """Draw the stamp art once per worker, not once per child: every fork inherits the cached art."""
    art.static_art()


def sandbox_job(data: bytes, arguments: dict[str, Any]) -> Answer:
    """:func:`preflight` as a sandbox job. Only an accepted document leaves the child clean: a rejected
    one may have driven the parser down odd paths, so its child is not reused."""
    try:
        result = preflight(data, **arguments)
    except DocumentRejected as exc:
        if _ran_out_of_memory(exc):
            exc = too_complex(TOO_BIG_MESSAGE)
        return Answer({"ok": False, "code": exc.code, "message": exc.message}, clean=False)
    except RecursionError:
        exc = unreadable()
        return Answer({"ok": False, "code": exc.code, "message": exc.message}, clean=False)
    return Answer({"ok": True, **asdict(result)}, clean=True)


def _ran_out_of_memory(exc: BaseException) -> bool:
    """pypdf turns some MemoryErrors into read errors, which the preflight reports as "unreadable"."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, MemoryError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
