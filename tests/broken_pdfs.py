"""Broken-but-parseable PDFs, written byte by byte: the kind real scanners, old tools and fuzzers produce.

Every file here is one lenient readers still open (pypdf, and usually poppler and qpdf after a repair),
so it gets past a parser that only asks "can I read it?". What is broken is the cross-reference data
that an incremental update points back to: offsets past the end or past 2^32, a subsection numbered
2^32 (as in the public fuzzed file pdf.js calls GHOSTSCRIPT-698804-1, which we don't ship: this is our
own file of that kind), cross-reference streams whose entries point nowhere, page trees that only a
repair finds. No binary fixtures: each function builds its bytes.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

HEADER = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"
CATALOG = b"<< /Type /Catalog /Outlines 6 0 R /Pages 2 0 R >>"
PAGES = b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>"
PAGE = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> /ProcSet [/PDF /Text] >> >>")
TEXT = b"BT /F1 14 Tf 72 700 Td (Surat Pernyataan) Tj ET"
CONTENT = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(TEXT), TEXT)
FONT = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
OUTLINES = b"<< /Type /Outlines /Count 0 >>"


def standard_objects(**replaced: bytes) -> dict[int, bytes]:
    """A one-page letter's objects, by number; ``replaced`` swaps some (``o2=b"null"``)."""
    objects = {1: CATALOG, 2: PAGES, 3: PAGE, 4: CONTENT, 5: FONT, 6: OUTLINES}
    for key, value in replaced.items():
        objects[int(key[1:])] = value
    return objects


def body(objects: dict[int, bytes], header: bytes = HEADER) -> tuple[bytearray, dict[int, int]]:
    """The header and objects; returns the bytes so far and where each object starts."""
    out = bytearray(header)
    offsets: dict[int, int] = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, objects[number])
    return out, offsets


def xref_table(offsets: dict[int, int], size: int, *, shift: int = 0, free: tuple[int, ...] = ()) -> bytes:
    """A classic table for objects 0..size-1; ``shift`` is added to every offset, ``free`` marks some free."""
    rows = [b"0000000000 65535 f \n"]
    for number in range(1, size):
        if number in offsets and number not in free:
            rows.append(b"%010d 00000 n \n" % (offsets[number] + shift))
        else:
            rows.append(b"0000000000 65535 f \n")
    return b"xref\n0 %d\n" % size + b"".join(rows)


def tail(trailer: bytes, startxref: bytes | int) -> bytes:
    value = startxref if isinstance(startxref, bytes) else b"%d" % startxref
    return b"trailer\n" + trailer + b"\nstartxref\n" + value + b"\n%%EOF\n"


def classic(objects: dict[int, bytes] | None = None, *, shift: int = 0, free: tuple[int, ...] = (),
            trailer: bytes | None = None, startxref: bytes | int | None = None) -> bytes:
    """Objects, a table, a trailer; each part can be made wrong."""
    objects = objects or standard_objects()
    out, offsets = body(objects)
    size = max(objects) + 1
    at = len(out)
    out += xref_table(offsets, size, shift=shift, free=free)
    out += tail(trailer if trailer is not None else b"<< /Size %d /Root 1 0 R >>" % size,
                startxref if startxref is not None else at)
    return bytes(out)


# --- the corpus ---------------------------------------------------------------------------------------

def subsection_number_overflows() -> bytes:
    """The fuzzed-file kind: the second subsection starts at object 2^32, so the table lists objects
    4294967296-4294967298 where 2-4 should be, and a line of spaces ends it. pypdf finds 2-4 by searching
    the file; a strict reader finds no page tree, and new objects numbered after "the highest" overflow
    every reader's object numbers."""
    objects = standard_objects()
    out, offsets = body(objects)
    at = len(out)
    out += b"xref\n0 2\n0000000000 65535 f \n%010d 00000 n \n" % offsets[1]
    out += b"00000004294967296 3\n" + b"".join(b"%010d 00000 n \n" % offsets[n] for n in (2, 3, 4))
    out += b"                   \n\n"
    out += tail(b"<< /Size 7 /Root 1 0 R >>", at)
    return bytes(out)


def startxref_overflows() -> bytes:
    """``startxref`` is a number no 64-bit offset holds."""
    return classic(startxref=b"18446744073709551999")


def startxref_past_end() -> bytes:
    return classic(startxref=1_000_000)


def startxref_into_an_object() -> bytes:
    """``startxref`` points into the middle of the page object."""
    out, offsets = body(standard_objects())
    return classic(startxref=offsets[3] + 9)


def xref_offsets_past_4_gib() -> bytes:
    """Every entry is its object's offset plus 9 GB: ten digits, but past any 32-bit reader and the file."""
    return classic(shift=9_000_000_000)


def xref_offsets_shifted() -> bytes:
    """Every entry off by a few bytes, as after an editor inserted a line without updating the table."""
    return classic(shift=7)


def page_tree_marked_free() -> bytes:
    """The page tree's object is listed as free: only a search of the file finds it."""
    return classic(free=(2,))


def catalog_marked_free() -> bytes:
    return classic(free=(1,))


def null_page_tree() -> bytes:
    """The catalog's ``/Pages`` is null; the page objects are there, reachable from nothing."""
    return classic(standard_objects(o1=b"<< /Type /Catalog /Pages null >>"))


def trailer_without_root() -> bytes:
    """No ``/Root`` in the trailer: a repair finds the catalog by its ``/Type``."""
    return classic(trailer=b"<< /Size 7 >>")


def _xref_stream(objects: dict[int, bytes], *, shift: int = 0, rows_missing: int = 0) -> bytes:
    out, offsets = body(objects, header=b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n")
    number = max(objects) + 1
    at = len(out)
    rows = [struct.pack(">BIH", 0, 0, 65535)]
    rows += [struct.pack(">BIH", 1, offsets[n] + shift, 0) for n in range(1, number)]
    rows.append(struct.pack(">BIH", 1, at, 0))
    data = b"".join(rows[:len(rows) - rows_missing] if rows_missing else rows)
    dictionary = b"<< /Type /XRef /Size %d /W [1 4 2] /Root 1 0 R /Length %d >>" % (number + 1, len(data))
    out += b"%d 0 obj\n%s\nstream\n%s\nendstream\nendobj\n" % (number, dictionary, data)
    out += b"startxref\n%d\n%%%%EOF\n" % at
    return bytes(out)


def xref_stream_pointing_nowhere() -> bytes:
    """A cross-reference stream whose entries all point 50 KB past the end of the file."""
    return _xref_stream(standard_objects(), shift=50_000)


def xref_stream_pointing_between_objects() -> bytes:
    """A cross-reference stream whose entries all land a few bytes into their objects."""
    return _xref_stream(standard_objects(), shift=3)


def xref_stream_cut_short() -> bytes:
    """A cross-reference stream with fewer rows than its ``/Size``: the last objects are nowhere."""
    return _xref_stream(standard_objects(), rows_missing=4)


def table_with_zeroed_offsets() -> bytes:
    """Every in-use entry says offset 0: a table only a rebuild can use (pypdf rebuilds it)."""
    out, offsets = body(standard_objects())
    at = len(out)
    size = max(offsets) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size + b"0000000000 00000 n \n" * (size - 1)
    out += tail(b"<< /Size %d /Root 1 0 R >>" % size, at)
    return bytes(out)


def update_with_a_dangling_prev() -> bytes:
    """A well-formed file plus an incremental update whose ``/Prev`` points past the end."""
    base = bytearray(classic())
    at = len(base)
    page = PAGE.replace(b"/MediaBox [0 0 612 792]", b"/MediaBox [0 0 595 842]")
    base += b"3 0 obj\n%s\nendobj\n" % page
    xref_at = len(base)
    base += b"xref\n3 1\n%010d 00000 n \n" % at
    base += tail(b"<< /Size 7 /Root 1 0 R /Prev 987654 >>", xref_at)
    return bytes(base)


def update_whose_prev_loops() -> bytes:
    """An incremental update whose ``/Prev`` is itself: a reader following the chain goes round."""
    base = bytearray(classic())
    at = len(base)
    base += b"3 0 obj\n%s\nendobj\n" % PAGE
    xref_at = len(base)
    base += b"xref\n3 1\n%010d 00000 n \n" % at
    base += tail(b"<< /Size 7 /Root 1 0 R /Prev %d >>" % xref_at, xref_at)
    return bytes(base)


def stream_length_wrong() -> bytes:
    """The content stream's ``/Length`` is 400 bytes more than the stream holds."""
    return classic(standard_objects(o4=CONTENT.replace(b"/Length %d" % len(TEXT), b"/Length %d" % (len(TEXT) + 400))))


@dataclass(frozen=True)
class Broken:
    name: str
    build: Callable[[], bytes]


CORPUS: list[Broken] = [Broken(name, build) for name, build in [
    ("subsection_number_overflows", subsection_number_overflows),
    ("startxref_overflows", startxref_overflows),
    ("startxref_past_end", startxref_past_end),
    ("startxref_into_an_object", startxref_into_an_object),
    ("xref_offsets_past_4_gib", xref_offsets_past_4_gib),
    ("xref_offsets_shifted", xref_offsets_shifted),
    ("page_tree_marked_free", page_tree_marked_free),
    ("catalog_marked_free", catalog_marked_free),
    ("null_page_tree", null_page_tree),
    ("trailer_without_root", trailer_without_root),
    ("xref_stream_pointing_nowhere", xref_stream_pointing_nowhere),
    ("xref_stream_pointing_between_objects", xref_stream_pointing_between_objects),
    ("xref_stream_cut_short", xref_stream_cut_short),
    ("table_with_zeroed_offsets", table_with_zeroed_offsets),
    ("update_with_a_dangling_prev", update_with_a_dangling_prev),
    ("update_whose_prev_loops", update_whose_prev_loops),
    ("stream_length_wrong", stream_length_wrong),
]]


SIGNED_FORM = (b"<< /Type /Catalog /Outlines 6 0 R /Pages 2 0 R"
               b" /AcroForm << /Fields [7 0 R] /SigFlags 3 >> >>")
SIGNATURE_FIELD = (b"<< /FT /Sig /T (TandaTanganPelamar) /Rect [0 0 0 0] /P 3 0 R"
                   b" /V << /Type /Sig /Filter /Adobe.PPKLite /SubFilter /adbe.pkcs7.detached"
                   b" /ByteRange [0 0 0 0] /Contents <00> >> >>")


def _signed_objects(**replaced: bytes) -> dict[int, bytes]:
    objects = standard_objects(o1=SIGNED_FORM, **replaced)
    objects[7] = SIGNATURE_FIELD
    return objects


def signed_with_shifted_offsets() -> bytes:
    """A document that carries a (filled) signature field, its table's entries a few bytes off.

    A signed document is never rewritten whole (that would break its signatures), so the stamp could
    only go on as an update of data strict readers can't follow: such a file must be refused. (Before
    the trial stamp was re-read, preflight accepted it and the paid stamping then failed: a refund.)"""
    return classic(_signed_objects(), shift=7)


def signed_xref_stream_pointing_between_objects() -> bytes:
    return _xref_stream(_signed_objects(), shift=3)


def signed_with_wrong_stream_length() -> bytes:
    """A signed document whose content stream's ``/Length`` is 400 bytes too long: pypdf stamps and signs
    it as an update, and qpdf then has to recover that stream in the stamped file."""
    length = b"/Length %d" % len(TEXT)
    return classic(_signed_objects(o4=CONTENT.replace(length, b"/Length %d" % (len(TEXT) + 400))))


def signed_with_page_tree_marked_free() -> bytes:
    """A signed document whose page tree object is listed as free: pyHanko's signer asserts on it."""
    return classic(_signed_objects(), free=(2,))


SIGNED_CORPUS: list[Broken] = [Broken(name, build) for name, build in [
    ("signed_with_page_tree_marked_free", signed_with_page_tree_marked_free),
    ("signed_with_shifted_offsets", signed_with_shifted_offsets),
    ("signed_xref_stream_pointing_between_objects", signed_xref_stream_pointing_between_objects),
    ("signed_with_wrong_stream_length", signed_with_wrong_stream_length),
]]


def page_tree_with_a_lying_count() -> bytes:
    """Two pages, the first under an intermediate node whose ``/Count`` says 0. Descending by ``/Count``
    (as the kernel finds a page without loading them all) lands on the second page, while readers (and
    qpdf) walk ``/Kids`` and show the first as page 1: a stamp on a page nobody chose. Every object is
    where the table says, so only the re-read of the stamped page can tell (preflight's, and the
    delivery check's)."""
    second_text = b"BT /F1 14 Tf 72 700 Td (Lampiran) Tj ET"
    objects = standard_objects(o2=b"<< /Type /Pages /Kids [8 0 R 9 0 R] /Count 2 >>",
                               o3=PAGE.replace(b"/Parent 2 0 R", b"/Parent 8 0 R"))
    objects[8] = b"<< /Type /Pages /Parent 2 0 R /Kids [3 0 R] /Count 0 >>"
    objects[9] = PAGE.replace(b"/Contents 4 0 R", b"/Contents 10 0 R")
    objects[10] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(second_text), second_text)
    return classic(objects)
