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
* A document that already carries signatures (the buyer's, or an earlier e-Meterai) is stamped as an
  incremental update: its bytes are kept exactly and the stamp is appended, so those signatures still
  verify over the revision they signed. Any other document is rewritten whole, which also normalises
  damaged cross-reference tables before the result is signed. A signed document that can't be updated
  incrementally (encrypted), or whose certification forbids every change, is refused before payment.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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

from . import art

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


def read_document(data: bytes) -> PdfReader:
    """Open ``data``; encrypted documents only if they open with an empty password.

    Raises :class:`DocumentRejected` ("encrypted" or "unreadable"). Call inside :func:`bounded_parsing`.
    """
    try:
        reader = PdfReader(BytesIO(data), strict=False)
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


def _writer_for(reader: PdfReader) -> PdfWriter:
    """Incremental for signed documents (their signatures keep verifying), a full rewrite otherwise."""
    if not carries_signatures(reader):
        return PdfWriter(clone_from=reader, keep_initial_header=True)
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
    return PdfWriter(reader, incremental=True)


def stamp_reader(
    reader: PdfReader, *, page: int, x: float, y: float, serial: str, verify_url: str, size: float
) -> bytes:
    """Stamp an already opened document; the shared core of :func:`stamp_document` and the preflight's
    trial run. Call inside :func:`bounded_parsing`. pypdf errors propagate to the caller."""
    art.validate_serial(serial)
    count = page_count(reader)
    select_page(reader, page, count)  # range check with a buyer-readable error
    writer = _writer_for(reader)
    target = writer.pages[page - 1]
    box = visible_box(target)
    check_stamp_fits(box, x, y, size)
    name = _attach_xobject(target, _stamp_form(writer, serial, verify_url))
    _append_stamp_content(writer, target, name, placement_matrix(box, page_rotation(target), x, y, size))
    output = BytesIO()
    writer.write(output)
    return output.getvalue()


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
    art.qr_code(verify_url)
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
