"""How we read a stranger's PDF: bounded, leniently where readers are lenient, strictly where it matters.

Why it is built this way:

* Untrusted PDFs are parsed with pypdf's decompression and size limits lowered for the duration of the
  call (a context variable, so no global state changes), and without ever calling external decoders.
* Positions are in the coordinates a person sees in the checkout page: ``x, y`` in points from the
  lower-left corner of the page's visible box (the CropBox clipped to the MediaBox, as PDF readers show
  it), in the page's unrotated space. Pages with a non-zero box origin are common (scans, imposition
  tools), so the box origin is always added.
* Whether a document may take an incremental update is asked of two parsers (:func:`can_update_incrementally`):
  pypdf must not have repaired its cross-reference data, and qpdf must read every object without
  recovery; an update appended to data only a repair can follow is a file strict readers can't open.
* A page is found by descending the page tree (:func:`locate_page`), as viewers do, rather than by
  loading every page.

Every refusal is a :class:`~shared.stamping.verdicts.DocumentRejected` with a buyer-readable message.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO

from pypdf import Configuration, PageObject, PasswordType, PdfReader, apply_configuration
from pypdf.generic import ArrayObject, DictionaryObject, IndirectObject, NameObject

from . import delivery
from .verdicts import DocumentRejected, unreadable

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

_WRAP_TOLERANCE = 0.01  # points; front ends send floats that land exactly on the page edge


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


def certification_forbids_changes(reader: PdfReader) -> bool:
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


def refuse_unchangeable(reader: PdfReader) -> None:
    """A signed document we can only stamp by breaking its signatures is refused (before payment)."""
    if reader.is_encrypted:
        raise DocumentRejected(
            "signed_encrypted",
            "Dokumen PDF bertanda tangan ini terenkripsi; meterai tidak dapat dibubuhkan tanpa merusak "
            "tanda tangannya. Unggah versi tanpa enkripsi.",
        )
    if certification_forbids_changes(reader):
        raise DocumentRejected(
            "certified_no_changes",
            "Dokumen PDF ini disertifikasi tanpa izin perubahan apa pun; meterai tidak dapat "
            "dibubuhkan tanpa merusak sertifikasinya.",
        )


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

    A classic table whose first subsection does not start at object 0 (pypdf's ``xref_index``) is the
    normal shape of an incremental update (every signed or stamped document has one) and no reason to
    rewrite: were it a misnumbered table, qpdf would find the objects where they are not said to be.
    """
    if reader.is_encrypted or getattr(reader, "xref_repaired", True):
        return False
    sound = getattr(reader, "independently_sound", None)
    if sound is None:
        source = source_bytes(reader)
        sound = source is not None and delivery.source_is_sound(source)
        reader.independently_sound = sound  # type: ignore[attr-defined]
    return sound


_INHERITABLE = ("/Resources", "/MediaBox", "/CropBox", "/Rotate")
_PAGE_TREE_WALK_LIMIT = 4096  # tree nodes and leaves looked at; a real tree needs depth x fan-out


def locate_page(reader: PdfReader, number: int) -> tuple[IndirectObject, DictionaryObject] | None:
    """Page ``number`` (1-based) found by descending the page tree, as viewers do, with ``/Count``.

    Why not ``reader.pages``: pypdf loads every page of the document to count them, so stamping would
    cost more the longer the document (``docs/benchmarks.md``, "Kernel"). Here only the nodes on the way down
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
