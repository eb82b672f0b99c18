"""Put an e-Meterai stamp on one page of a PDF, keeping everything else as it was.

Why it is built this way:

* The page's own content is never re-rendered or rewritten. The stamp is one Form XObject, painted by
  an extra content stream appended to the page; the original streams are only wrapped in ``q``/``Q`` so
  whatever graphics state they leave behind cannot move or recolour the stamp.
* The caller places the stamp in the coordinates a person sees in the checkout page: ``x, y`` in points
  from the lower-left corner of the page's visible box (the CropBox clipped to the MediaBox, as PDF
  readers show it), in the page's unrotated space. Pages with a non-zero box origin are common (scans,
  imposition tools), so the box origin is always added.
* A page with ``/Rotate`` is shown turned by readers; the stamp art is turned the opposite way around the
  centre of its square so it reads upright, while its footprint stays the same square.
* Untrusted PDFs are parsed with pypdf's decompression and size limits lowered for the duration of the
  call (a context variable, so no global state changes), and without ever calling external decoders.
* Every document is stamped as an incremental update (:class:`StampUpdate`): its bytes are kept exactly
  and a few objects are appended (the stamp forms, two small content streams, the page dictionary), so
  signatures already in it (the buyer's, or an earlier e-Meterai) still verify over the revision they
  signed, and the cost doesn't grow with the document. pypdf only reads (finds the page and its
  dictionaries); the appended objects are written by :mod:`.incremental`. The static stamp art is one
  Form XObject whose bytes are made once per process.
* Two kinds of document are rewritten whole by pypdf instead: an unsigned encrypted one that opens
  without a password (its objects would have to be encrypted; the rewrite drops the encryption) and
  one whose cross-reference data is not intact: pypdf had to repair it, or qpdf, reading it without
  recovery, finds an object missing or misplaced (the rewrite normalises it before signing; the
  incremental update would point back at data strict readers can't follow). A signed document that can't be updated incrementally (encrypted), or whose certification forbids
  every change, is refused before payment.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO

from pypdf import Configuration, PageObject, PasswordType, PdfReader, PdfWriter, apply_configuration
from pypdf.generic import (
    ArrayObject,
    DecodedStreamObject,
    DictionaryObject,
    FloatObject,
    IndirectObject,
    NameObject,
    StreamObject,
)

from shared.errors import PermanentError

from . import art, delivery
from .incremental import IncrementalUpdate, serialize, stream_object

STAMP_SIZE: float = 100.0

# Per-stream ceilings while reading untrusted PDFs. A 2 MB upload has no business inflating one stream
# past these; pypdf's own defaults (75 MB each) are sized for trusted desktop use.
_STREAM_LIMIT = 32 * 1024 * 1024
PARSING_LIMITS: dict[str, object] = {
    "maximum_declared_stream_length": _STREAM_LIMIT,
    "array_based_stream_maximum_output_length": _STREAM_LIMIT,
    "zlib_maximum_output_length": _STREAM_LIMIT,
    "lzw_maximum_output_length": _STREAM_LIMIT,
    "run_length_maximum_output_length": _STREAM_LIMIT,
    "jbig2_maximum_output_length": _STREAM_LIMIT,
    "brotli_maximum_output_length": _STREAM_LIMIT,
    "image_maximum_buffer_size": _STREAM_LIMIT,
    "stream_decoding_work_maximum_length": 4 * _STREAM_LIMIT,
    # Never start an external program on a document a stranger uploaded.
    "jbig2dec_binary": None,
}

_PAGE_STAMP_NAME = "/MeteraiStamp"
_ART_NAME = "/MeteraiArt"
_WRAP_TOLERANCE = 0.01  # points; front ends send floats that land exactly on the page edge


class DocumentRejected(PermanentError):
    """The uploaded document can't be stamped as asked; ``code`` says why, ``message`` tells the buyer."""

    code = "document_rejected"
    status = 422

    def __init__(self, code: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message, code=code, status=status)

    def __reduce__(self) -> tuple[object, ...]:
        # Exceptions cross process boundaries (Celery results, multiprocessing); the default pickling
        # replays ``args`` = (message,), which doesn't fit this constructor.
        return (type(self), (self.code, self.message), {"status": self.status})


class DocumentUnreadable(PermanentError):
    """A stored document that passed preflight can't be parsed or written now."""

    code = "unreadable"
    status = 422

    def __init__(self, message: str = "Dokumen PDF rusak atau tidak dapat dibaca.") -> None:
        super().__init__(message, code="unreadable")


@dataclass(frozen=True)
class Box:
    """A normalised rectangle in a page's unrotated user space."""

    llx: float
    lly: float
    urx: float
    ury: float

    @property
    def width(self) -> float:
        return self.urx - self.llx

    @property
    def height(self) -> float:
        return self.ury - self.lly


def _supported_limits() -> dict[str, object]:
    """Only the knobs this pypdf release has: older 6.x/7.x releases lack some of the newer fields."""
    known = {field.name for field in dataclasses.fields(Configuration)}
    return {name: value for name, value in PARSING_LIMITS.items() if name in known}


@contextmanager
def bounded_parsing() -> Iterator[None]:
    """pypdf reads lazily, so every read *and* write of an untrusted document runs inside this.

    The limits live in a context variable for the duration of the block: other code in the process,
    and other threads, keep pypdf's defaults.
    """
    with apply_configuration(**_supported_limits()):
        yield


def unreadable() -> DocumentRejected:
    return DocumentRejected("unreadable", "Dokumen PDF rusak atau tidak dapat dibaca.")


class _Reader(PdfReader):
    """pypdf's reader, remembering whether it had to repair the cross-reference table on the way in.

    An incremental update points back at the document's last cross-reference section; if that section is
    broken, the updated file would be too (for stricter readers), so such a document is rewritten whole.
    """

    xref_repaired = False
    independently_sound: bool | None = None  # qpdf's verdict on the source, once asked

    def _get_xref_issues(self, stream, startxref):  # type: ignore[no-untyped-def,override]
        issues = PdfReader._get_xref_issues(stream, startxref)
        if issues:
            self.xref_repaired = True
        return issues

    def _rebuild_xref_table(self, stream) -> None:  # type: ignore[no-untyped-def]
        self.xref_repaired = True
        super()._rebuild_xref_table(stream)


def read_document(data: bytes) -> PdfReader:
    """Open ``data``; encrypted documents only if they open with an empty password.

    Raises :class:`DocumentRejected` ("encrypted" or "unreadable"). Call inside :func:`bounded_parsing`.
    """
    try:
        reader = _Reader(BytesIO(data), strict=False)
        locked = reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED
    except Exception as exc:  # pypdf raises far more than PyPdfError on hostile input
        raise unreadable() from exc
    if locked:
        raise DocumentRejected(
            "encrypted",
            "Dokumen PDF dilindungi kata sandi. Hapus kata sandinya, lalu unggah ulang.",
        )
    return reader


def page_count(reader: PdfReader) -> int:
    try:
        return len(reader.pages)
    except Exception as exc:
        raise unreadable() from exc


def select_page(reader: PdfReader, page: int, count: int) -> PageObject:
    """The 1-based ``page`` of the document, or :class:`DocumentRejected` ("no_pages", "page_out_of_range")."""
    if count == 0:
        raise DocumentRejected("no_pages", "Dokumen PDF tidak memiliki halaman.")
    if not 1 <= page <= count:
        raise DocumentRejected(
            "page_out_of_range",
            f"Halaman {page} tidak ada; dokumen ini memiliki {count} halaman.",
        )
    try:
        return reader.pages[page - 1]
    except Exception as exc:
        raise unreadable() from exc


def _read_box(page: DictionaryObject, key: str) -> Box | None:
    raw = page.get(key)
    if raw is None:
        return None
    values = raw.get_object()
    if not isinstance(values, ArrayObject) or len(values) < 4:
        return None
    x1, y1, x2, y2 = (float(value.get_object()) for value in values[:4])
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    return Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def visible_box(page: DictionaryObject) -> Box:
    """What a reader shows: the CropBox clipped to the MediaBox, or the MediaBox alone.

    Reads the raw entries instead of ``page.cropbox`` because pypdf's accessor writes a CropBox into the
    page as a side effect. Raises :class:`DocumentRejected` ("unreadable") for a page without a usable box.
    """
    try:
        media = _read_box(page, "/MediaBox")
        crop = _read_box(page, "/CropBox")
    except Exception as exc:
        raise unreadable() from exc
    if media is None or media.width <= 0 or media.height <= 0:
        raise unreadable()
    if crop is None:
        return media
    clipped = Box(max(crop.llx, media.llx), max(crop.lly, media.lly),
                  min(crop.urx, media.urx), min(crop.ury, media.ury))
    if clipped.width <= 0 or clipped.height <= 0:
        return media  # a CropBox outside the page is ignored by readers too
    return clipped


def page_rotation(page: DictionaryObject) -> int:
    """``/Rotate`` normalised to 0, 90, 180 or 270 (clockwise, as readers turn the page)."""
    try:
        raw = page.get("/Rotate", 0)
        value = float(raw.get_object() if isinstance(raw, IndirectObject) else raw)
    except Exception:
        return 0
    if not math.isfinite(value):
        return 0
    return int(round(value / 90.0)) * 90 % 360


def check_stamp_fits(box: Box, x: float, y: float, size: float) -> None:
    """The whole stamp square must lie on the visible page, or :class:`DocumentRejected`."""
    values = (x, y, size)
    inside = (
        all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        and size > 0
        and x >= -_WRAP_TOLERANCE
        and y >= -_WRAP_TOLERANCE
        and x + size <= box.width + _WRAP_TOLERANCE
        and y + size <= box.height + _WRAP_TOLERANCE
    )
    if not inside:
        raise DocumentRejected(
            "stamp_outside_page",
            "Posisi meterai berada di luar halaman. Geser meterai agar seluruhnya berada di dalam halaman.",
        )


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


def _stream(data: bytes, entries: dict[str, object] | None = None) -> StreamObject:
    stream = DecodedStreamObject()
    stream.set_data(data)
    for key, value in (entries or {}).items():
        stream[NameObject(key)] = value  # type: ignore[assignment]
    return stream.flate_encode() if len(data) > 256 else stream


def _font(base_font: str) -> DictionaryObject:
    return DictionaryObject({
        NameObject("/Type"): NameObject("/Font"),
        NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject(base_font),
        NameObject("/Encoding"): NameObject("/WinAnsiEncoding"),
    })


def _form(content: bytes, resources: DictionaryObject) -> StreamObject:
    bbox = ArrayObject(FloatObject(v) for v in (0, 0, art.DESIGN_SIZE, art.DESIGN_SIZE))
    return _stream(content, {
        "/Type": NameObject("/XObject"),
        "/Subtype": NameObject("/Form"),
        "/BBox": bbox,
        "/Resources": resources,
    })


def _stamp_form(writer: PdfWriter, serial: str, verify_url: str) -> IndirectObject:
    """The whole stamp as one Form XObject in design space: static art form + serial + QR."""
    static = art.static_art()
    art_fonts = DictionaryObject({NameObject(name): _font(base) for name, base in static.fonts})
    art_ref = writer._add_object(_form(static.content, DictionaryObject({NameObject("/Font"): art_fonts})))
    resources = DictionaryObject({
        NameObject("/XObject"): DictionaryObject({NameObject(_ART_NAME): art_ref}),
        NameObject("/Font"): DictionaryObject({NameObject(art.SERIAL_FONT_RESOURCE): _font(f"/{art.SERIAL_FONT}")}),
    })
    content = f"q {_ART_NAME} Do Q\n".encode("ascii") + art.per_document_content(serial, verify_url)
    return writer._add_object(_form(content, resources))


def _unused_name(existing: DictionaryObject, wanted: str) -> str:
    name, counter = wanted, 1
    while name in existing:
        counter += 1
        name = f"{wanted}{counter}"
    return name


def _attach_xobject(page: PageObject, form_ref: IndirectObject) -> str:
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


def _existing_content_refs(page: PageObject) -> list[object]:
    contents = page.get("/Contents")
    if contents is None:
        return []
    resolved = contents.get_object()
    if isinstance(resolved, ArrayObject):
        return list(resolved)
    return [contents]


def _append_stamp_content(writer: PdfWriter, page: PageObject, name: str, matrix: tuple[float, ...]) -> None:
    """New /Contents: ``q``, the original streams untouched, ``Q``, then paint the stamp."""
    cm = " ".join(f"{value:.6f}".rstrip("0").rstrip(".") or "0" for value in matrix)
    opening = writer._add_object(_stream(b"q\n"))
    closing = writer._add_object(_stream(f"\nQ\nq {cm} cm {name} Do Q\n".encode("ascii")))
    page[NameObject("/Contents")] = ArrayObject([opening, *_existing_content_refs(page), closing])


_FIELD_WALK_LIMIT = 10_000  # form fields visited looking for signatures; real forms have a few hundred


def carries_signatures(reader: PdfReader) -> bool:
    """True if the document has a filled signature field (or document timestamp) or DocMDP/UR rights.

    Walks the AcroForm field tree iteratively, bounded in nodes, guarding against reference cycles.
    """
    root = reader.trailer["/Root"].get_object()
    if "/Perms" in root:
        return True
    acroform = root.get("/AcroForm")
    if acroform is None:
        return False
    acroform = acroform.get_object()
    if not isinstance(acroform, DictionaryObject):
        return False
    fields = acroform.get("/Fields")
    fields = fields.get_object() if fields is not None else None
    pending = list(fields) if isinstance(fields, ArrayObject) else []  # a malformed form signs nothing
    seen: set[tuple[int, int]] = set()
    visited = 0
    while pending and visited < _FIELD_WALK_LIMIT:
        ref = pending.pop()
        if isinstance(ref, IndirectObject):
            if (ref.idnum, ref.generation) in seen:
                continue
            seen.add((ref.idnum, ref.generation))
        field = ref.get_object()
        visited += 1
        if not isinstance(field, DictionaryObject):
            continue
        if field.get("/FT") == "/Sig" and field.get("/V") is not None:
            return True
        kids = field.get("/Kids")
        if kids is not None and isinstance(kids.get_object(), ArrayObject):
            pending.extend(kids.get_object())
    return visited >= _FIELD_WALK_LIMIT  # too many fields to be sure: keep the bytes, to be safe


def _certification_forbids_changes(reader: PdfReader) -> bool:
    """A certification (DocMDP) signature with permission level 1: "no changes allowed".

    A malformed entry counts as no restriction: nothing a reader could validate is broken by the stamp.
    """
    try:
        perms = reader.trailer["/Root"].get_object().get("/Perms")
        docmdp = perms.get_object().get("/DocMDP") if perms is not None else None
        references = docmdp.get_object().get("/Reference") if docmdp is not None else None
        references = references.get_object() if references is not None else None
        for reference in references if isinstance(references, ArrayObject) else []:
            reference = reference.get_object()
            if isinstance(reference, DictionaryObject) and reference.get("/TransformMethod") == "/DocMDP":
                params = reference.get("/TransformParams")
                level = params.get_object().get("/P", 2) if params is not None else 2
                return int(level) == 1
    except (AttributeError, TypeError, ValueError):
        return False
    return False


def _refuse_unchangeable(reader: PdfReader) -> None:
    """A signed document we can only stamp by breaking its signatures is refused (before payment)."""
    if reader.is_encrypted:
        raise DocumentRejected(
            "signed_encrypted",
            "Dokumen PDF bertanda tangan ini terenkripsi; meterai tidak dapat dibubuhkan tanpa merusak "
            "tanda tangannya. Unggah versi tanpa enkripsi.",
        )
    if _certification_forbids_changes(reader):
        raise DocumentRejected(
            "certified_no_changes",
            "Dokumen PDF ini disertifikasi tanpa izin perubahan apa pun; meterai tidak dapat "
            "dibubuhkan tanpa merusak sertifikasinya.",
        )


def _writer_for(reader: PdfReader) -> PdfWriter:
    """The rewrite path: incremental for signed documents (their signatures keep verifying), whole otherwise."""
    if not carries_signatures(reader):
        return PdfWriter(clone_from=reader, keep_initial_header=True)
    _refuse_unchangeable(reader)
    return PdfWriter(reader, incremental=True)


def source_bytes(reader: PdfReader) -> bytes | None:
    """The bytes ``reader`` was opened on (by :func:`read_document`), or ``None`` if they are not at hand."""
    stream = getattr(reader, "stream", None)
    return stream.getvalue() if isinstance(stream, BytesIO) else None


def can_update_incrementally(reader: PdfReader) -> bool:
    """Not encrypted, cross-reference data intact, and opened from bytes we have.

    "Intact" is asked of two parsers: pypdf must not have repaired the table, and qpdf must read every
    object where the table says without recovery (:func:`.delivery.source_is_sound`). pypdf silently
    works around much (entries a few bytes off, a subsection numbered past 2^32, xref streams pointing
    nowhere: it searches the file for the object), and an update appended to such data is a file strict
    readers can't open. Asked once per reader.
    """
    if reader.is_encrypted or getattr(reader, "xref_repaired", True) or reader.xref_index:
        return False
    sound = getattr(reader, "independently_sound", None)
    if sound is None:
        source = source_bytes(reader)
        sound = source is not None and delivery.source_is_sound(source)
        reader.independently_sound = sound  # type: ignore[attr-defined]
    return sound


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
    by an incremental update, so it is unreadable here and the caller falls back to a rewrite."""
    refs = _existing_content_refs(page)  # type: ignore[arg-type]
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


_INHERITABLE = ("/Resources", "/MediaBox", "/CropBox", "/Rotate")
_PAGE_TREE_WALK_LIMIT = 4096  # tree nodes and leaves looked at; a real tree needs depth x fan-out


def locate_page(reader: PdfReader, number: int) -> tuple[IndirectObject, DictionaryObject] | None:
    """Page ``number`` (1-based) found by descending the page tree, as viewers do, with ``/Count``.

    Why not ``reader.pages``: pypdf loads every page of the document to count them (2 ms for ten
    pages), so stamping would cost more the longer the document. Here only the nodes on the way down
    and the kids before ours at each level are read. Returns the page's reference and a copy of its
    dictionary with the inherited attributes filled in, or ``None`` when the tree is anything but
    plain (missing or implausible ``/Count``, a cycle, the page not there): then pypdf's walk decides.
    """
    try:
        node_ref = reader.trailer["/Root"].raw_get("/Pages")
        inherited: dict[str, object] = {}
        remaining = number - 1
        seen: set[int] = set()
        looked_at = 0
        while isinstance(node_ref, IndirectObject) and node_ref.idnum not in seen:
            seen.add(node_ref.idnum)
            node = node_ref.get_object()
            for key in _INHERITABLE:
                if key in node:
                    inherited[key] = node.raw_get(key)
            kids = node.get("/Kids")
            kids = kids.get_object() if kids is not None else None
            if not isinstance(kids, ArrayObject):
                return None
            for kid_ref in kids:
                looked_at += 1
                if looked_at > _PAGE_TREE_WALK_LIMIT or not isinstance(kid_ref, IndirectObject):
                    return None
                kid = kid_ref.get_object()
                if not isinstance(kid, DictionaryObject):
                    return None
                if "/Kids" in kid:  # an intermediate node: skip it whole, or go down into it
                    count = kid.get("/Count")
                    if not isinstance(count, int) or count < 0:
                        return None
                    if remaining < count:
                        node_ref = kid_ref
                        break
                    remaining -= count
                elif remaining == 0:
                    page = DictionaryObject(kid)
                    for key, value in inherited.items():
                        if key not in page:
                            page[NameObject(key)] = value  # type: ignore[assignment]
                    return kid_ref, page
                else:
                    remaining -= 1
            else:
                return None
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return None


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


def prepare_stamp(
    reader: PdfReader, *, page: int, x: float, y: float, serial: str, verify_url: str, size: float
) -> StampUpdate | None:
    """The stamp as an incremental update, or ``None`` when the document must be rewritten instead.

    Raises :class:`DocumentRejected` for an impossible page or position or an unchangeable signed
    document. Call inside :func:`bounded_parsing`; pypdf errors propagate.
    """
    art.validate_serial(serial)
    if not can_update_incrementally(reader) or page < 1 or locate_page(reader, page) is None:
        select_page(reader, page, page_count(reader))  # range check with a buyer-readable error
    if not can_update_incrementally(reader):
        return None
    if _certification_forbids_changes(reader):
        _refuse_unchangeable(reader)
    update, page_ref, target = open_update(reader, page)
    box = visible_box(target)
    check_stamp_fits(box, x, y, size)
    _check_nesting(target)
    contents = _content_refs(target)
    art_ref = update.add(_static_art_object())
    form_ref = update.add(_stamp_form_object(art_ref, serial, verify_url))
    name = _attach_xobject(target, form_ref)  # type: ignore[arg-type]
    matrix = placement_matrix(box, page_rotation(target), x, y, size)
    cm = " ".join(f"{value:.6f}".rstrip("0").rstrip(".") or "0" for value in matrix)
    opening = update.add(stream_object(b"", b"q\n"))
    closing = update.add(stream_object(b"", f"\nQ\nq {cm} cm {name} Do Q\n".encode("ascii")))
    target[NameObject("/Contents")] = ArrayObject([opening, *contents, closing])
    return StampUpdate(update, page_ref, target)


def _rewrite_with_stamp(
    reader: PdfReader, *, page: int, x: float, y: float, serial: str, verify_url: str, size: float
) -> bytes:
    """The pypdf path for documents that can't take an incremental update (see the module docstring)."""
    writer = _writer_for(reader)
    target = writer.pages[page - 1]
    box = visible_box(target)
    check_stamp_fits(box, x, y, size)
    name = _attach_xobject(target, _stamp_form(writer, serial, verify_url))
    _append_stamp_content(writer, target, name, placement_matrix(box, page_rotation(target), x, y, size))
    output = BytesIO()
    writer.write(output)
    return output.getvalue()


def stamp_reader(
    reader: PdfReader, *, page: int, x: float, y: float, serial: str, verify_url: str, size: float
) -> bytes:
    """Stamp an already opened document; the shared core of :func:`stamp_document` and the preflight's
    trial run. Call inside :func:`bounded_parsing`. pypdf errors propagate to the caller."""
    prepared = prepare_stamp(reader, page=page, x=x, y=y, serial=serial, verify_url=verify_url, size=size)
    if prepared is not None:
        return bytes(prepared.render())
    return _rewrite_with_stamp(reader, page=page, x=x, y=y, serial=serial, verify_url=verify_url, size=size)


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
            if exc.code == "unreadable":
                raise DocumentUnreadable() from exc
            raise
        except Exception as exc:
            raise DocumentUnreadable() from exc
