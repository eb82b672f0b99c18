"""Append an incremental update to a PDF: a handful of new or replaced objects, an xref section, a trailer.

Why our own: stamping and signing change a few objects (the stamp forms, one page, the form fields, the
signature) of a document that is otherwise kept byte for byte. pypdf's and pyHanko's writers are general
and pure Python; writing these few objects ourselves costs microseconds and never touches the rest of the
file. pypdf's reader is still used to find the page and its existing dictionaries (see the kernel).

The update follows the document's last cross-reference section in kind: a classic ``xref`` table after a
table, a cross-reference stream after a stream, so readers that insist on one kind per file are happy.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from io import BytesIO

from pypdf import PdfReader
from pypdf.generic import ArrayObject, IndirectObject, PdfObject

_XREF_KEYWORD = b"xref"


def serialize(value: PdfObject) -> bytes:
    """PDF syntax for a pypdf object from an unencrypted document (indirect references stay references)."""
    buffer = BytesIO()
    value.write_to_stream(buffer)
    return buffer.getvalue()


def stream_object(dictionary: bytes, data: bytes) -> bytes:
    """An object body for a stream: ``dictionary`` holds the entries (without ``/Length``), no ``<<``."""
    return b"<<" + dictionary + b" /Length %d >>\nstream\n" % len(data) + data + b"\nendstream"


def last_section_is_stream(data: bytes, startxref: int) -> bool:
    """True when the section ``startxref`` points at is a cross-reference stream rather than a table."""
    return not data[startxref:startxref + 16].lstrip().startswith(_XREF_KEYWORD)


def highest_object_number(reader: PdfReader) -> int:
    """The largest object number the document uses, whatever its trailer's ``/Size`` claims."""
    highest = 0
    for entries in reader.xref.values():
        if entries:
            highest = max(highest, max(entries))
    if reader.xref_objStm:
        highest = max(highest, max(reader.xref_objStm))
    return highest


@dataclass
class IncrementalUpdate:
    """The objects to append to ``original``, numbered after the document's own."""

    original: bytes
    reader: PdfReader
    objects: list[tuple[int, int, bytes]] = field(default_factory=list)
    _next: int = 0

    def __post_init__(self) -> None:
        size = self.reader.trailer.get("/Size", 0)
        self._next = max(int(size) if isinstance(size, int) else 0, highest_object_number(self.reader) + 1)

    def reserve(self) -> IndirectObject:
        """A fresh object number, to be filled by :meth:`put`."""
        number = self._next
        self._next += 1
        return IndirectObject(number, 0, self.reader)

    def put(self, reference: IndirectObject, body: bytes) -> None:
        """Write (or replace, for an existing object) the object ``reference`` with ``body``."""
        self.objects.append((reference.idnum, reference.generation, body))

    def add(self, body: bytes) -> IndirectObject:
        reference = self.reserve()
        self.put(reference, body)
        return reference

    def render(self) -> bytearray:
        """``original`` followed by the update: objects, cross-reference section, trailer, ``%%EOF``."""
        startxref = int(self.reader._startxref)  # the section our /Prev points back to
        out = bytearray(self.original)
        if not out.endswith((b"\n", b"\r")):
            out += b"\n"
        offsets: dict[int, tuple[int, int]] = {}
        for number, generation, body in self.objects:
            offsets[number] = (len(out), generation)
            out += b"%d %d obj\n" % (number, generation)
            out += body
            out += b"\nendobj\n"
        trailer = self._trailer_entries(startxref)
        if last_section_is_stream(self.original, startxref):
            self._write_xref_stream(out, offsets, trailer)
        else:
            self._write_xref_table(out, offsets, trailer)
        return out

    def _trailer_entries(self, startxref: int) -> bytes:
        trailer = self.reader.trailer
        entries = [b"/Root " + serialize(trailer.raw_get("/Root"))]
        if "/Info" in trailer:
            entries.append(b"/Info " + serialize(trailer.raw_get("/Info")))
        first_id = None
        identifiers = trailer.get("/ID")
        if isinstance(identifiers, ArrayObject) and identifiers:
            first = identifiers[0].get_object()
            first_id = bytes(first.original_bytes) if hasattr(first, "original_bytes") else None
        # The first identifier names the document for good; the second changes with every revision.
        changed = hashlib.md5(self.original[-64:] + os.urandom(16), usedforsecurity=False).digest()
        entries.append(b"/ID [<%s> <%s>]" % ((first_id or changed).hex().encode(), changed.hex().encode()))
        entries.append(b"/Prev %d" % startxref)
        return b" ".join(entries)

    def _write_xref_table(self, out: bytearray, offsets: dict[int, tuple[int, int]], trailer: bytes) -> None:
        xref_at = len(out)
        out += b"xref\n"
        numbers = sorted(offsets)
        index = 0
        while index < len(numbers):  # one subsection per run of consecutive numbers
            end = index
            while end + 1 < len(numbers) and numbers[end + 1] == numbers[end] + 1:
                end += 1
            out += b"%d %d\n" % (numbers[index], end - index + 1)
            for number in numbers[index:end + 1]:
                offset, generation = offsets[number]
                out += b"%010d %05d n\r\n" % (offset, generation)
            index = end + 1
        out += b"trailer\n<< /Size %d %s >>\nstartxref\n%d\n%%%%EOF\n" % (self._next, trailer, xref_at)

    def _write_xref_stream(self, out: bytearray, offsets: dict[int, tuple[int, int]], trailer: bytes) -> None:
        number = self._next
        self._next += 1
        xref_at = len(out)
        offsets = {**offsets, number: (xref_at, 0)}
        numbers = sorted(offsets)
        rows = b"".join(struct.pack(">BIH", 1, offsets[n][0], offsets[n][1]) for n in numbers)
        index = b" ".join(b"%d 1" % n for n in numbers)
        dictionary = b" /Type /XRef /W [1 4 2] /Index [%s] /Size %d %s" % (index, self._next, trailer)
        out += b"%d 0 obj\n" % number + stream_object(dictionary, rows) + b"\nendobj\n"
        out += b"startxref\n%d\n%%%%EOF\n" % xref_at
