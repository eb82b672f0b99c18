"""The documents virtual buyers upload, and the check that what they get back is really stamped.

Applicants upload a short letter, often a scan: a few pages of text with one photographed or scanned
image that makes most of the bytes. :func:`make_pdf` draws that with reportlab, the image being
seeded noise so it doesn't compress, and grows the image until the file is about ``target_bytes``
(default 200 KB, the size the benchmarks name). It is made once per process and re-sent by every buyer.

:func:`stamp_problem` is what a buyer checks on the download: the PDF opens with pypdf and the text of
the stamped page contains "METERAI ELEKTRONIK" and the serial the API reported.
"""
from __future__ import annotations

import io
import random
from functools import lru_cache

DEFAULT_TARGET_BYTES = 200_000
STAMP_WORDS = "METERAI ELEKTRONIK"


def _noise_image(side: int, seed: int):
    from PIL import Image

    rnd = random.Random(seed)
    return Image.frombytes("L", (side, side), rnd.randbytes(side * side))


def _draw(target_bytes: int, pages: int, side: int, seed: int) -> bytes:
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.utils import ImageReader
    from reportlab.pdfgen.canvas import Canvas

    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=A4)
    width, height = A4
    for number in range(1, pages + 1):
        canvas.setFont("Helvetica-Bold", 13)
        canvas.drawString(72, height - 90, "Surat Pernyataan Pelamar CPNS")
        canvas.setFont("Helvetica", 10)
        lines = [
            "Yang bertanda tangan di bawah ini menyatakan dengan sesungguhnya bahwa saya:",
            "1. tidak pernah dipidana dengan pidana penjara berdasarkan putusan pengadilan;",
            "2. tidak pernah diberhentikan dengan hormat tidak atas permintaan sendiri;",
            "3. tidak berkedudukan sebagai calon PNS, anggota TNI atau Polri;",
            "4. bersedia ditempatkan di seluruh wilayah Negara Kesatuan Republik Indonesia.",
            "Demikian surat pernyataan ini saya buat dengan sebenarnya.",
        ]
        for i, line in enumerate(lines):
            canvas.drawString(72, height - 130 - 16 * i, line)
        canvas.drawString(72, 60, f"halaman {number} dari {pages}")
        if number == 1 and side > 0:
            # The scanned part: a photo / signature block, drawn above the stamp's usual corner.
            canvas.drawImage(ImageReader(_noise_image(side, seed)), 72, 260, width=220, height=220)
        canvas.showPage()
    canvas.save()
    return buffer.getvalue()


@lru_cache(maxsize=8)
def make_pdf(target_bytes: int = DEFAULT_TARGET_BYTES, pages: int = 3, seed: int = 2024) -> bytes:
    """A ``pages``-page letter of about ``target_bytes`` (within a few percent; at least the text alone)."""
    bare = len(_draw(target_bytes, pages, 0, seed))
    if target_bytes <= bare:
        return _draw(target_bytes, pages, 0, seed)
    side = max(8, int((target_bytes - bare) ** 0.5))
    data = _draw(target_bytes, pages, side, seed)
    for _ in range(4):  # the image's encoding overhead is not known in advance: correct twice or so
        if abs(len(data) - target_bytes) <= target_bytes * 0.02:
            break
        side = max(8, int(side * (target_bytes - bare) ** 0.5 / max(1, len(data) - bare) ** 0.5))
        data = _draw(target_bytes, pages, side, seed)
    return data


def stamp_problem(pdf: bytes, serial: str, page: int = 1) -> str | None:
    """``None`` when ``pdf`` opens and page ``page`` shows the stamp words and ``serial``; else what's wrong."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(pdf))
        text = reader.pages[page - 1].extract_text() or ""
    except Exception as exc:  # noqa: BLE001 - any failure to open is the finding
        return f"PDF does not open: {type(exc).__name__}: {exc}"[:300]
    if STAMP_WORDS not in text:
        return f"page {page} text lacks {STAMP_WORDS!r}"
    if not serial or serial not in text:
        return f"page {page} text lacks the serial {serial!r}"
    return None
