"""Independent checks on a stamped PDF: text via pypdf, pixels via pdfium (a different PDF engine)."""
from __future__ import annotations

import io

import pypdf
import pypdfium2 as pdfium


def page_texts(pdf: bytes) -> list[str]:
    return [page.extract_text() or "" for page in pypdf.PdfReader(io.BytesIO(pdf)).pages]


def is_stamp_pink(rgb: tuple[int, int, int]) -> bool:
    r, g, b = rgb[:3]
    return r > 170 and r - g > 70 and b > 60 and b < r


def pink_pixels(pdf: bytes, page_number: int, box: tuple[float, float, float, float]) -> tuple[int, int]:
    """(pink pixels inside ``box``, pink pixels outside it) on the rendered page, 1 px per point.

    ``box`` is (x0, y0, x1, y1) in PDF points from the page's lower-left corner, as the reader sees it.
    """
    doc = pdfium.PdfDocument(pdf)
    try:
        page = doc[page_number - 1]
        image = page.render(scale=1).to_pil().convert("RGB")
    finally:
        doc.close()
    width, height = image.size
    x0, y0, x1, y1 = box
    inside = outside = 0
    pixels = image.load()
    for py in range(height):
        for px in range(width):
            if not is_stamp_pink(pixels[px, py]):
                continue
            x, y = px + 0.5, height - py - 0.5
            if x0 - 1 <= x <= x1 + 1 and y0 - 1 <= y <= y1 + 1:
                inside += 1
            else:
                outside += 1
    return inside, outside
