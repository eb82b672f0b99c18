"""The stamp's artwork: a static part drawn once per process, and a per-document part (serial and QR).

Why split it: stamping runs under a deadline surge, and the look of the stamp never changes between
documents. So reportlab draws the static art (frame, face value, wording, our emblem) exactly once per
process; we keep only its content-stream bytes and the names of the standard fonts it uses, never pypdf
objects, so nothing is shared between documents or threads. The per-document part, the 22-character serial
and a QR code pointing at the verification page, is a few hundred bytes of PDF operators written directly.

Everything is drawn in a 100 x 100 design space (:data:`DESIGN_SIZE`); the kernel scales it to the
stamp's real size with one matrix. The emblem is our own geometric mark: never the national coat of arms
(Garuda) nor Peruri's artwork.

All wording is real text in standard PDF fonts, so text extraction finds "METERAI ELEKTRONIK" and the
serial on the stamped page.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO

import segno
from segno import encoder
from pypdf import PdfReader
from pypdf.generic import NameObject
from reportlab.lib.colors import HexColor
from reportlab.pdfbase.pdfmetrics import stringWidth
from reportlab.pdfgen.canvas import Canvas

DESIGN_SIZE = 100.0

TITLE = "METERAI ELEKTRONIK"
FACE_VALUE = "10000"
FACE_VALUE_WORDS = "SEPULUH RIBU RUPIAH"

BORDER_PINK = "#E8407A"
FILL_PINK = "#FDE4EE"
GUILLOCHE_PINK = "#F6B3CB"
INK = "#8A1538"

TITLE_FONT = "Helvetica-Bold"
SERIAL_FONT = "Courier-Bold"
# Resource name of the serial's font inside the per-document stamp form.
SERIAL_FONT_RESOURCE = "/MeteraiMono"

# QR placement in design space: lower-left corner and side of the white square, quiet zone included.
QR_X = 51.0
QR_Y = 32.0
QR_SIDE = 43.0
QR_QUIET_MODULES = 2
# Error correction M or better; "M" recovers ~15% damage, enough for a printed and scanned page.
QR_MIN_ERROR = "m"
# Above this version (49 modules, ~150 URL bytes at M) modules shrink below ~0.3 mm on a 100 pt stamp,
# too small to scan reliably from paper.
QR_MAX_VERSION = 8

SERIAL_PATTERN = re.compile(r"[0-9A-Z]{22}")
SERIAL_BASELINE = 10.5
SERIAL_MAX_WIDTH = 86.0
SERIAL_MAX_FONT_SIZE = 6.4


@dataclass(frozen=True)
class StaticArt:
    """The never-changing part of the stamp, ready to become a Form XObject in any document.

    ``fonts`` maps the resource names used by ``content`` (e.g. ``/F1``) to standard-14 base font names,
    which need no embedding.
    """

    content: bytes
    fonts: tuple[tuple[str, str], ...]


def _fit_font_size(text: str, font: str, max_width: float, max_size: float) -> float:
    """Largest size up to ``max_size`` at which ``text`` fits in ``max_width``."""
    width_at_one = stringWidth(text, font, 1.0)
    return min(max_size, max_width / width_at_one)


def _draw_frame(canvas: Canvas) -> None:
    canvas.setFillColor(HexColor(FILL_PINK))
    canvas.setStrokeColor(HexColor(BORDER_PINK))
    canvas.setLineWidth(2.0)
    canvas.roundRect(1.0, 1.0, 98.0, 98.0, 4.0, stroke=1, fill=1)
    canvas.setLineWidth(0.5)
    canvas.roundRect(4.0, 4.0, 92.0, 92.0, 2.5, stroke=1, fill=0)


def _draw_guilloche(canvas: Canvas) -> None:
    """Fine interleaved waves in the background: a hint of security printing, cheap as vectors."""
    canvas.setStrokeColor(HexColor(GUILLOCHE_PINK))
    canvas.setLineWidth(0.3)
    for row in range(7):
        base = 12.0 + row * 11.0
        for phase in (0.0, math.pi):
            path = canvas.beginPath()
            steps = 44
            for step in range(steps + 1):
                x = 6.0 + 88.0 * step / steps
                y = base + 2.2 * math.sin(phase + x / 88.0 * 6.0 * math.pi)
                if step == 0:
                    path.moveTo(x, y)
                else:
                    path.lineTo(x, y)
            canvas.drawPath(path, stroke=1, fill=0)


def _diamond(canvas: Canvas, cx: float, cy: float, half: float, *, fill: str) -> None:
    path = canvas.beginPath()
    path.moveTo(cx, cy + half)
    path.lineTo(cx + half, cy)
    path.lineTo(cx, cy - half)
    path.lineTo(cx - half, cy)
    path.close()
    canvas.setFillColor(HexColor(fill))
    canvas.drawPath(path, stroke=0, fill=1)


def _draw_emblem(canvas: Canvas, cx: float = 26.0, cy: float = 65.0, radius: float = 11.5) -> None:
    """Our own mark: a ring of ticks around nested diamonds. Deliberately abstract and geometric."""
    canvas.setStrokeColor(HexColor(BORDER_PINK))
    canvas.setFillColor(HexColor("#FFFFFF"))
    canvas.setLineWidth(0.9)
    canvas.circle(cx, cy, radius, stroke=1, fill=1)
    canvas.setLineWidth(0.6)
    for tick in range(16):
        angle = tick * math.pi / 8
        inner, outer = radius - 3.0, radius - 1.4
        canvas.line(
            cx + inner * math.cos(angle), cy + inner * math.sin(angle),
            cx + outer * math.cos(angle), cy + outer * math.sin(angle),
        )
    _diamond(canvas, cx, cy, 6.8, fill=BORDER_PINK)
    _diamond(canvas, cx, cy, 3.4, fill="#FFFFFF")
    _diamond(canvas, cx, cy, 1.5, fill=INK)


def _draw_wording(canvas: Canvas) -> None:
    canvas.setFillColor(HexColor(INK))
    title_size = _fit_font_size(TITLE, TITLE_FONT, 84.0, 8.0)
    canvas.setFont(TITLE_FONT, title_size)
    canvas.drawCentredString(50.0, 85.5, TITLE)

    value_size = _fit_font_size(FACE_VALUE, TITLE_FONT, 38.0, 16.0)
    canvas.setFont(TITLE_FONT, value_size)
    canvas.drawCentredString(26.0, 37.0, FACE_VALUE)

    words_size = _fit_font_size(FACE_VALUE_WORDS, TITLE_FONT, 84.0, 6.6)
    canvas.setFont(TITLE_FONT, words_size)
    canvas.drawCentredString(50.0, 22.0, FACE_VALUE_WORDS)

    canvas.setStrokeColor(HexColor(BORDER_PINK))
    canvas.setLineWidth(0.4)
    canvas.line(8.0, 18.0, 92.0, 18.0)


def render_static_art_pdf() -> bytes:
    """The static art as a one-page, uncompressed PDF in design space (also handy for eyeballing)."""
    buffer = BytesIO()
    canvas = Canvas(buffer, pagesize=(DESIGN_SIZE, DESIGN_SIZE), pageCompression=0, invariant=1)
    _draw_frame(canvas)
    _draw_guilloche(canvas)
    _draw_emblem(canvas)
    _draw_wording(canvas)
    canvas.showPage()
    canvas.save()
    return buffer.getvalue()


def _standard_fonts(resources: object) -> tuple[tuple[str, str], ...]:
    """Font resource names -> base fonts, refusing anything but plain standard-14 Type1 fonts."""
    font_dict = resources.get("/Font", {}).get_object() if resources else {}  # type: ignore[attr-defined]
    unexpected = set(resources or {}) - {"/Font", "/ProcSet"}  # type: ignore[arg-type]
    if unexpected:
        raise RuntimeError(f"static stamp art uses unsupported resources: {sorted(unexpected)}")
    fonts = []
    for name, ref in font_dict.items():
        font = ref.get_object()
        if font.get("/Subtype") != "/Type1" or "/FontDescriptor" in font:
            raise RuntimeError(f"static stamp art font {name} is not a standard Type1 font")
        fonts.append((str(name), str(font["/BaseFont"])))
    return tuple(sorted(fonts))


@lru_cache(maxsize=1)
def static_art() -> StaticArt:
    """Draw the static art once per process and keep only plain bytes and names."""
    reader = PdfReader(BytesIO(render_static_art_pdf()))
    page = reader.pages[0]
    contents = page.get_contents()
    if contents is None:
        raise RuntimeError("static stamp art rendered no content")
    return StaticArt(content=contents.get_data(), fonts=_standard_fonts(page.get(NameObject("/Resources"))))


def _check_version(code: segno.QRCode, verify_url: str) -> None:
    if code.version > QR_MAX_VERSION:
        raise ValueError(f"verify_url is too long for a scannable stamp QR code ({len(verify_url)} chars)")


def qr_code(verify_url: str) -> segno.QRCode:
    """The QR code for ``verify_url``: error correction M or better, small enough to scan from paper,
    with the data mask :func:`qr_matrix` chooses (see there)."""
    if not verify_url:
        raise ValueError("verify_url must not be empty")
    return segno.make_qr(verify_url, error=QR_MIN_ERROR, boost_error=True, mask=_qr_symbol(verify_url)[0])


@lru_cache(maxsize=32)
def _symbol_layout(width: int, version: int, error: int) -> tuple[tuple[int, ...], list[tuple[int, ...]],
                                                                  tuple[int, ...], list[tuple[int, ...]]]:
    """Per symbol size, as row bitmasks (bit ``j`` = column ``j``): the data region, the eight data mask
    patterns over it, the format information area, and its content for each mask.

    Built with segno's own functions, exactly as its encoder lays out a symbol, so a symbol re-masked
    here is bit for bit the one segno makes for that mask.
    """
    function = encoder.make_matrix(width, width)
    encoder.add_finder_patterns(function, width, width)
    encoder.add_alignment_patterns(function, width, width)
    function[-8][8] = 0x1
    region = tuple(sum(1 << j for j in range(width) if function[i][j] > 0x1) for i in range(width))
    patterns = [tuple(sum(1 << j for j in range(width) if pattern(i, j)) & region[i] for i in range(width))
                for pattern in encoder.get_data_mask_functions(False)]
    area, formats = None, []
    for mask in range(8):
        probe = [bytearray([0x2] * width) for _ in range(width)]
        encoder.add_format_info(probe, version, error, mask)
        if area is None:
            area = tuple(sum(1 << j for j in range(width) if probe[i][j] != 0x2) for i in range(width))
        formats.append(tuple(sum(1 << j for j in range(width) if probe[i][j] == 0x1) for i in range(width)))
    assert area is not None
    return region, patterns, area, formats


_RUNS = re.compile(r"0{5,}|1{5,}")


def _penalty(rows: list[int], width: int) -> int:
    """ISO/IEC 18004 mask penalty (N1 runs, N2 blocks, N3 finder-like patterns, N4 balance) of a symbol."""
    lines = [format(row, f"0{width}b") for row in rows]
    lines += ["".join(column) for column in zip(*lines)]
    text = "|".join(lines)
    score = sum(len(run) - 2 for run in _RUNS.findall(text))
    score += 40 * (text.count("00001011101") + text.count("10111010000"))
    inner = (1 << (width - 1)) - 1
    full = (1 << width) - 1
    for upper, lower in zip(rows, rows[1:]):
        dark = upper & lower
        light = ~(upper | lower) & full
        score += 3 * (((dark & (dark >> 1)) | (light & (light >> 1))) & inner).bit_count()
    dark_share = sum(row.bit_count() for row in rows) * 100 / (width * width)
    return score + 10 * int(abs(dark_share - 50) // 5)


@lru_cache(maxsize=8)
def _qr_symbol(verify_url: str) -> tuple[int, tuple[tuple[bool, ...], ...]]:
    """(mask, modules) of the stamp's QR code.

    segno tries all eight data masks module by module in Python (the cost is in ``docs/benchmarks.md``,
    "Kernel"); here segno encodes once with mask 0 and the eight candidates are derived with whole-row bit operations, scored
    on the finished symbol (format information included) and the lowest penalty wins. Any mask decodes
    the same; the choice only keeps scanner-confusing patterns rare. Cached for the few URLs of the
    document at hand (the kernel asks more than once per document).
    """
    if not verify_url:
        raise ValueError("verify_url must not be empty")
    code = segno.make_qr(verify_url, error=QR_MIN_ERROR, boost_error=True, mask=0)
    _check_version(code, verify_url)
    width = len(code.matrix)
    region, patterns, area, formats = _symbol_layout(width, code.version,
                                                     encoder.normalize_errorlevel(code.error))
    masked = [sum(1 << j for j, module in enumerate(row) if module) for row in code.matrix]
    data = [row ^ pattern for row, pattern in zip(masked, patterns[0])]  # mask 0 undone
    best: tuple[int, int, list[int]] | None = None
    for mask in range(8):
        rows = [((row ^ pattern) & ~cover) | bits
                for row, pattern, cover, bits in zip(data, patterns[mask], area, formats[mask])]
        score = _penalty(rows, width)
        if best is None or score < best[0]:
            best = (score, mask, rows)
    assert best is not None
    _, mask, rows = best
    return mask, tuple(tuple(bool(row >> j & 1) for j in range(width)) for row in rows)


def qr_matrix(verify_url: str) -> tuple[tuple[bool, ...], ...]:
    """Dark (True) / light modules of the stamp's QR code, top row first, without the quiet zone."""
    return _qr_symbol(verify_url)[1]


def qr_module_size(modules: int) -> float:
    """Side of one QR module in design units, for a symbol ``modules`` wide."""
    return QR_SIDE / (modules + 2 * QR_QUIET_MODULES)


def _fmt(value: float) -> str:
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


@lru_cache(maxsize=8)
def _qr_grid(modules: int) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Formatted coordinates for a symbol ``modules`` wide: x of each column's left edge, y of each row's
    bottom edge, and the width of a run of 1..modules modules (formatting floats per module is most of
    the cost of writing the QR operators otherwise)."""
    step = qr_module_size(modules)
    top = QR_Y + QR_SIDE - QR_QUIET_MODULES * step
    xs = tuple(_fmt(QR_X + (QR_QUIET_MODULES + col) * step) for col in range(modules))
    ys = tuple(_fmt(top - (row + 1) * step) for row in range(modules))
    widths = tuple(_fmt(length * step) for length in range(modules + 1))
    return xs, ys, widths


def _qr_operators(matrix: tuple[tuple[bool, ...], ...]) -> list[str]:
    """White square, then dark modules merged into horizontal runs (fewer, crisper rectangles)."""
    modules = len(matrix)
    xs, ys, widths = _qr_grid(modules)
    height = widths[1]
    ops = ["q", "1 1 1 rg", f"{_fmt(QR_X)} {_fmt(QR_Y)} {_fmt(QR_SIDE)} {_fmt(QR_SIDE)} re f", "0 0 0 rg"]
    for row_index, row in enumerate(matrix):
        y = ys[row_index]
        col = 0
        while col < modules:
            if not row[col]:
                col += 1
                continue
            start = col
            while col < modules and row[col]:
                col += 1
            ops.append(f"{xs[start]} {y} {widths[col - start]} {height} re")
    ops += ["f", "Q"]
    return ops


def _serial_operators(serial: str) -> list[str]:
    size = _fit_font_size(serial, SERIAL_FONT, SERIAL_MAX_WIDTH, SERIAL_MAX_FONT_SIZE)
    x = (DESIGN_SIZE - stringWidth(serial, SERIAL_FONT, size)) / 2
    red, green, blue = (channel / 255 for channel in HexColor(INK).bitmap_rgb())
    return [
        "BT",
        f"{_fmt(red)} {_fmt(green)} {_fmt(blue)} rg",
        f"{SERIAL_FONT_RESOURCE} {_fmt(size)} Tf",
        f"{_fmt(x)} {_fmt(SERIAL_BASELINE)} Td",
        f"({serial}) Tj",
        "ET",
    ]


def validate_serial(serial: str) -> None:
    """Serials are exactly 22 characters of ``[0-9A-Z]``; anything else is a caller bug."""
    if not SERIAL_PATTERN.fullmatch(serial):
        raise ValueError("serial must be 22 characters of [0-9A-Z]")


def per_document_content(serial: str, verify_url: str) -> bytes:
    """Operators for the serial and QR code, in design space, drawn over the static art."""
    validate_serial(serial)
    ops = _qr_operators(qr_matrix(verify_url)) + _serial_operators(serial)
    return ("\n".join(ops) + "\n").encode("ascii")
