"""Put an e-Meterai stamp on one page of a PDF, keeping everything else as it was.

Why it is built this way:

* The page's own content is never re-rendered or rewritten. The stamp is one Form XObject, painted by
  an extra content stream appended to the page; the original streams are only wrapped in ``q``/``Q`` so
  whatever graphics state they leave behind cannot move or recolour the stamp.
* A page with ``/Rotate`` is shown turned by readers; the stamp art is turned the opposite way around the
  centre of its square so it reads upright, while its footprint stays the same square.
* Every document is stamped the same way, as an incremental update (:class:`StampUpdate`): its bytes are
  kept exactly and a few objects are appended (the stamp forms, two small content streams, the page
  dictionary), so signatures already in it (the buyer's, or an earlier e-Meterai) still verify over the
  revision they signed, and the cost doesn't grow with the document. pypdf only reads (finds the page and
  its dictionaries, :mod:`.reading`); the appended objects are bytes written by :mod:`.incremental`, and
  the stamp exists in one representation only: the static art form, made once per process, and the
  per-document form around it.
* A document that can't take an incremental update (:func:`.reading.can_update_incrementally`: an
  unsigned encrypted one that opens without a password, whose objects would have to be encrypted; one
  whose cross-reference data only a repair can follow) is first *normalised*: pypdf writes it whole,
  unstamped (dropping the encryption), and the normalised bytes are stamped like every other document.
  A signed document can't be normalised without breaking its signatures, so one that can't take our
  update, or whose certification forbids every change, is refused before payment.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO

from pypdf import PdfReader, PdfWriter
from pypdf.generic import ArrayObject, DictionaryObject, IndirectObject, NameObject

from . import art
from .incremental import IncrementalUpdate, serialize, stream_object
from .reading import (
    Box,
    bounded_parsing,
    can_update_incrementally,
    carries_signatures,
    certification_forbids_changes,
    check_stamp_fits,
    locate_page,
    page_count,
    page_rotation,
    read_document,
    refuse_unchangeable,
    select_page,
    source_bytes,
    visible_box,
)
from .verdicts import STAMP_SIZE, DocumentRejected, DocumentUnreadable, damaged_structure, unreadable

__all__ = ["STAMP_SIZE", "DocumentRejected", "DocumentUnreadable", "StampUpdate", "prepare_stamp",
           "stamp_document", "stamp_reader", "updatable_reader"]

_PAGE_STAMP_NAME = "/MeteraiStamp"
_ART_NAME = "/MeteraiArt"
# Refusals of a stored document at stamping time: it passed preflight, so it is the document's fault now.
UNREADABLE_NOW = ("unreadable", "encrypted", "damaged_structure")


def placement_matrix(box: Box, rotation: int, x: float, y: float, size: float) -> tuple[float, ...]:
    """Matrix taking the art's design square onto the stamp's footprint, turned to read upright.

    The reader turns the page clockwise by ``rotation``; the art is turned counter-clockwise by the same
    angle around the centre of its square, so the two cancel on screen and the footprint is unchanged.
    """
    scale = size / art.DESIGN_SIZE
    cos, sin = {0: (1.0, 0.0), 90: (0.0, 1.0), 180: (-1.0, 0.0), 270: (0.0, -1.0)}[rotation]
    a, b, c, d = scale * cos, scale * sin, -scale * sin, scale * cos
    centre_x = box.llx + x + size / 2
    centre_y = box.lly + y + size / 2
    half = art.DESIGN_SIZE / 2
    e = centre_x - (a * half + c * half)
    f = centre_y - (b * half + d * half)
    return (a, b, c, d, e, f)


def _unused_name(existing: DictionaryObject, wanted: str) -> str:
    name, counter = wanted, 1
    while name in existing:
        counter += 1
        name = f"{wanted}{counter}"
    return name


def _attach_xobject(page: DictionaryObject, form_ref: IndirectObject) -> str:
    """Add the stamp to the page's own (copied) resources; returns the name it got.

    Resource dictionaries are often shared between pages, so they are copied before being changed:
    the stamp must appear on one page only.
    """
    current = page.get("/Resources")
    resources = DictionaryObject(current.get_object()) if current is not None else DictionaryObject()
    xobjects_raw = resources.get("/XObject")
    xobjects = DictionaryObject(xobjects_raw.get_object()) if xobjects_raw is not None else DictionaryObject()
    name = _unused_name(xobjects, _PAGE_STAMP_NAME)
    xobjects[NameObject(name)] = form_ref
    resources[NameObject("/XObject")] = xobjects
    page[NameObject("/Resources")] = resources
    return name


def _existing_content_refs(page: DictionaryObject) -> list[object]:
    contents = page.get("/Contents")
    if contents is None:
        return []
    resolved = contents.get_object()
    if isinstance(resolved, ArrayObject):
        return list(resolved)
    return [contents]


def _font_entry(name: str, base_font: str) -> bytes:
    return (f"{name} << /Type /Font /Subtype /Type1 /BaseFont {base_font} /Encoding /WinAnsiEncoding >>"
            .encode("ascii"))


_FORM_HEAD = (f"/Type /XObject /Subtype /Form /BBox [0 0 {art.DESIGN_SIZE:g} {art.DESIGN_SIZE:g}]"
              .encode("ascii"))


@lru_cache(maxsize=1)
def _static_art_object() -> bytes:
    """The static art as a complete Form XObject body, compressed once per process."""
    static = art.static_art()
    fonts = b" ".join(_font_entry(name, base) for name, base in static.fonts)
    entries = _FORM_HEAD + b" /Resources << /Font << " + fonts + b" >> >> /Filter /FlateDecode"
    return stream_object(b" " + entries, zlib.compress(static.content, 9))


def _stamp_form_object(art_ref: IndirectObject, serial: str, verify_url: str) -> bytes:
    """The stamp for one document: the static art form, then serial and QR code, in design space."""
    content = f"q {_ART_NAME} Do Q\n".encode("ascii") + art.per_document_content(serial, verify_url)
    resources = (b" /Resources << /XObject << " + _ART_NAME.encode("ascii") + b" " + serialize(art_ref)
                 + b" >> /Font << " + _font_entry(art.SERIAL_FONT_RESOURCE, f"/{art.SERIAL_FONT}") + b" >> >>")
    return stream_object(b" " + _FORM_HEAD + resources + b" /Filter /FlateDecode", zlib.compress(content, 6))


def _content_refs(page: DictionaryObject) -> list[IndirectObject]:
    """The page's content streams as references; a direct stream (not allowed, rarely seen) can't be kept
    by an incremental update, so such a page is refused as unreadable."""
    refs = _existing_content_refs(page)
    if not all(isinstance(ref, IndirectObject) for ref in refs):
        raise ValueError("page content is not made of indirect streams")
    return refs  # type: ignore[return-value]


_MAX_NESTING = 64  # direct dictionaries/arrays inside the page; real pages use fewer than ten


def _check_nesting(page: DictionaryObject) -> None:
    """The page dictionary is written out again, and read back by every validator and viewer: one nested
    absurdly deep (a crafted file) is refused as unreadable, as the full rewrite always refused it."""
    pending: list[tuple[object, int]] = [(page, 0)]
    while pending:
        value, depth = pending.pop()
        if depth > _MAX_NESTING:
            raise unreadable()
        if isinstance(value, DictionaryObject):
            pending.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, ArrayObject):
            pending.extend((item, depth + 1) for item in value)


@dataclass
class StampUpdate:
    """A stamp prepared as an incremental update; the signer may add its objects before :meth:`render`."""

    update: IncrementalUpdate
    page_ref: IndirectObject
    page: DictionaryObject  # the stamped page's new dictionary, written last

    def render(self) -> bytearray:
        self.update.put(self.page_ref, serialize(self.page))
        return self.update.render()


def open_update(reader: PdfReader, page_number: int) -> tuple[IncrementalUpdate, IndirectObject, DictionaryObject]:
    """An empty incremental update of ``reader``'s document and a copy of page ``page_number`` to change."""
    located = locate_page(reader, page_number)
    if located is None:
        target = reader.pages[page_number - 1]
        if target.indirect_reference is None:
            raise ValueError("page is not an indirect object")
        located = target.indirect_reference, DictionaryObject(target)
    reference, page = located
    return IncrementalUpdate(source_bytes(reader) or b"", reader), reference, page


def normalised(reader: PdfReader) -> PdfReader:
    """``reader``'s document written whole by pypdf, unstamped, and opened again: the rare path, for
    unsigned documents that can't take an incremental update as they are. Call inside
    :func:`.reading.bounded_parsing`; pypdf errors propagate."""
    output = BytesIO()
    PdfWriter(clone_from=reader, keep_initial_header=True).write(output)
    rewritten = read_document(output.getvalue())
    if not can_update_incrementally(rewritten):
        raise unreadable()
    return rewritten


def updatable_reader(reader: PdfReader) -> PdfReader:
    """A reader of a document that can take our incremental update: ``reader`` itself (the common case),
    or one of the normalised document. Raises :class:`DocumentRejected` for a signed document that can't
    take the update ("signed_encrypted", "certified_no_changes", "damaged_structure")."""
    if can_update_incrementally(reader):
        return reader
    if carries_signatures(reader):
        refuse_unchangeable(reader)
        raise damaged_structure()
    return normalised(reader)


def _check_page(reader: PdfReader, page: int) -> None:
    """The page exists, with a buyer-readable error when not (cheaply, by the page tree, when it can)."""
    if page < 1 or locate_page(reader, page) is None:
        select_page(reader, page, page_count(reader))


def prepare_stamp(
    reader: PdfReader, *, page: int, x: float, y: float, serial: str, verify_url: str, size: float
) -> StampUpdate:
    """The stamp as an incremental update of ``reader``'s document, which must be able to take one
    (:func:`updatable_reader`). The signer may add its objects before :meth:`StampUpdate.render`.

    Raises :class:`DocumentRejected` for an impossible page or position or an unchangeable signed
    document. Call inside :func:`.reading.bounded_parsing`; pypdf errors propagate.
    """
    art.validate_serial(serial)
    if not can_update_incrementally(reader):
        raise ValueError("the document can't take an incremental update; use updatable_reader() first")
    _check_page(reader, page)
    if certification_forbids_changes(reader):
        refuse_unchangeable(reader)
    update, page_ref, target = open_update(reader, page)
    box = visible_box(target)
    check_stamp_fits(box, x, y, size)
    _check_nesting(target)
    contents = _content_refs(target)
    art_ref = update.add(_static_art_object())
    form_ref = update.add(_stamp_form_object(art_ref, serial, verify_url))
    name = _attach_xobject(target, form_ref)
    matrix = placement_matrix(box, page_rotation(target), x, y, size)
    cm = " ".join(f"{value:.6f}".rstrip("0").rstrip(".") or "0" for value in matrix)
    opening = update.add(stream_object(b"", b"q\n"))
    closing = update.add(stream_object(b"", f"\nQ\nq {cm} cm {name} Do Q\n".encode("ascii")))
    target[NameObject("/Contents")] = ArrayObject([opening, *contents, closing])
    return StampUpdate(update, page_ref, target)


def prepare_any(
    reader: PdfReader, *, page: int, x: float, y: float, serial: str, verify_url: str, size: float
) -> StampUpdate:
    """:func:`prepare_stamp` for any document: the page checked first (its error is the buyer's answer
    whatever else is wrong), then normalised if it must be."""
    art.validate_serial(serial)
    _check_page(reader, page)
    return prepare_stamp(updatable_reader(reader), page=page, x=x, y=y, serial=serial,
                         verify_url=verify_url, size=size)


def stamp_reader(
    reader: PdfReader, *, page: int, x: float, y: float, serial: str, verify_url: str, size: float
) -> bytes:
    """Stamp an already opened document; the shared core of :func:`stamp_document` and the preflight's
    trial run. Call inside :func:`.reading.bounded_parsing`. pypdf errors propagate to the caller."""
    return bytes(prepare_any(reader, page=page, x=x, y=y, serial=serial, verify_url=verify_url,
                             size=size).render())


def stamp_document(
    data: bytes,
    *,
    page: int,
    x: float,
    y: float,
    serial: str,
    verify_url: str,
    size: float = STAMP_SIZE,
) -> bytes:
    """Return ``data`` with the stamp for ``serial`` on 1-based ``page`` at ``(x, y)``.

    Raises :class:`DocumentUnreadable` if the document can't be parsed or written, and
    :class:`DocumentRejected` if the page or position is impossible (both permanent: never retry).
    ``ValueError`` for a malformed serial or an over-long ``verify_url`` (caller bugs).
    """
    art.validate_serial(serial)
    art.qr_matrix(verify_url)  # a caller's bad URL is a ValueError, not the document's fault
    with bounded_parsing():
        try:
            reader = read_document(data)
        except DocumentRejected as exc:
            raise DocumentUnreadable() from exc
        try:
            return stamp_reader(reader, page=page, x=x, y=y, serial=serial, verify_url=verify_url, size=size)
        except DocumentRejected as exc:
            if exc.code in UNREADABLE_NOW:
                raise DocumentUnreadable() from exc
            raise
        except Exception as exc:
            raise DocumentUnreadable() from exc
