"""The stamping kernel on real PDFs: what the buyer gets back, where the stamp lands, what preflight refuses.

Source documents are drawn with reportlab here; stamped pages are rendered with pdfium (a different PDF
engine from the one that wrote them) and inspected pixel by pixel: pink where the stamp should be and
nowhere else, and the QR code's modules, sampled where an upright stamp would have them, equal to the
code for the verification URL. A stamp turned the wrong way or placed in the wrong box fails both.
"""
from __future__ import annotations

import io
import pickle

import pypdfium2 as pdfium
import pytest
import segno
from PIL import Image, ImageChops
from pypdf import PdfReader, PdfWriter
from pypdf.generic import ArrayObject, DecodedStreamObject, NameObject, NumberObject, RectangleObject
from reportlab.pdfgen.canvas import Canvas

from shared.errors import PermanentError
from shared.stamping import (
    STAMP_SIZE,
    DocumentRejected,
    DocumentUnreadable,
    PreflightResult,
    preflight,
    qr_code,
    qr_matrix,
    quick_check,
    stamp_document,
)
from shared.stamping import art

SERIAL = "0123456789ABCDEFGHIJKL"
VERIFY_URL = "https://meterai.example.id/verifikasi/0123456789ABCDEFGHIJKL"
PAGE_WIDTH, PAGE_HEIGHT = 300.0, 400.0
RENDER_SCALE = 4.0
MAX_BYTES = 1024 * 1024


# --- building source documents -------------------------------------------------------------------

def make_pdf(pages: int = 3, size: tuple[float, float] = (PAGE_WIDTH, PAGE_HEIGHT)) -> bytes:
    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=size)
    for number in range(1, pages + 1):
        canvas.setFont("Helvetica", 10)
        canvas.drawString(70, 250, f"Surat Lamaran Pekerjaan halaman {number}")
        canvas.drawString(70, 236, "Dengan hormat, saya yang bertanda tangan di bawah ini")
        canvas.showPage()
    canvas.save()
    return buffer.getvalue()


def reshape(
    data: bytes,
    *,
    rotate: int | None = None,
    mediabox: tuple[float, float, float, float] | None = None,
    cropbox: tuple[float, float, float, float] | None = None,
    inherit_rotation: bool = False,
) -> bytes:
    """Change every page's boxes or rotation, as other PDF producers do."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    for page in writer.pages:
        if rotate is not None and not inherit_rotation:
            page[NameObject("/Rotate")] = NumberObject(rotate)
        if inherit_rotation and "/Rotate" in page:
            del page["/Rotate"]
        if mediabox is not None:
            page[NameObject("/MediaBox")] = RectangleObject(mediabox)
        if cropbox is not None:
            page[NameObject("/CropBox")] = RectangleObject(cropbox)
    if inherit_rotation:
        writer.root_object["/Pages"].get_object()[NameObject("/Rotate")] = NumberObject(rotate or 0)
    return write(writer)


def with_unbalanced_graphics_state(data: bytes) -> bytes:
    """Append page content that scales the CTM and leaves it so, as careless producers do."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    for page in writer.pages:
        leftover = DecodedStreamObject()
        leftover.set_data(b"0.5 0 0 0.5 0 0 cm 0 0.6 0 rg 0 0 1 1 re f\n")
        contents = page.raw_get("/Contents")  # the reference: streams must stay indirect
        existing = list(contents.get_object()) if isinstance(contents.get_object(), ArrayObject) else [contents]
        page[NameObject("/Contents")] = ArrayObject([*existing, writer._add_object(leftover)])
    return write(writer)


def write(writer: PdfWriter) -> bytes:
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def encrypted(data: bytes, *, user_password: str, algorithm: str) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=user_password, owner_password="pemilik-dokumen", algorithm=algorithm)
    return write(writer)


def stamp(data: bytes, *, page: int = 2, x: float = 150.0, y: float = 40.0) -> bytes:
    return stamp_document(data, page=page, x=x, y=y, serial=SERIAL, verify_url=VERIFY_URL)


def run_preflight(data: bytes, **overrides: float) -> PreflightResult:
    arguments = {"page": 1, "x": 20.0, "y": 20.0, "max_bytes": MAX_BYTES, "max_pages": 10, **overrides}
    return preflight(data, **arguments)  # type: ignore[arg-type]


def page_texts(data: bytes) -> list[str]:
    return [page.extract_text() for page in PdfReader(io.BytesIO(data)).pages]


# --- looking at rendered pages -------------------------------------------------------------------

def render(data: bytes, page_index: int) -> Image.Image:
    document = pdfium.PdfDocument(data)
    try:
        return document[page_index].render(scale=RENDER_SCALE).to_pil().convert("RGB")
    finally:
        document.close()


def pink_bbox(image: Image.Image) -> tuple[int, int, int, int] | None:
    """Bounding box of reddish pixels. The source pages are black on white, so only the stamp is pink."""
    red, green, _ = image.split()
    mask = ImageChops.subtract(red, green).point(lambda value: 255 if value > 12 else 0)
    return mask.getbbox()


def displayed_rect(
    x: float, y: float, width: float, height: float, rotation: int
) -> tuple[float, float, float, float]:
    """Where the stamp square appears on screen, in points from the top-left of the shown page.

    ``width``/``height`` are the visible box's, unrotated; the reader turns the page clockwise.
    """
    def shown(u: float, v: float) -> tuple[float, float]:
        return {
            0: (u, height - v),
            90: (v, u),
            180: (width - u, v),
            270: (height - v, width - u),
        }[rotation]

    corners = [shown(u, v) for u in (x, x + STAMP_SIZE) for v in (y, y + STAMP_SIZE)]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return min(xs), min(ys), max(xs), max(ys)


def sampled_qr(image: Image.Image, left: float, top: float, modules: int) -> tuple[tuple[bool, ...], ...]:
    """Read the QR modules where an upright stamp whose top-left corner is at (left, top) draws them."""
    scale = STAMP_SIZE / art.DESIGN_SIZE
    step = art.qr_module_size(modules)
    grey = image.convert("L")

    def dark(row: int, col: int) -> bool:
        design_x = art.QR_X + (art.QR_QUIET_MODULES + col + 0.5) * step
        design_y = art.QR_Y + art.QR_SIDE - (art.QR_QUIET_MODULES + row + 0.5) * step
        pixel_x = (left + design_x * scale) * RENDER_SCALE
        pixel_y = (top + (art.DESIGN_SIZE - design_y) * scale) * RENDER_SCALE
        return grey.getpixel((int(pixel_x), int(pixel_y))) < 110

    return tuple(tuple(dark(row, col) for col in range(modules)) for row in range(modules))


def assert_stamp_shown_upright_at(
    image: Image.Image, x: float, y: float, box_width: float, box_height: float, rotation: int
) -> None:
    left, top, right, bottom = displayed_rect(x, y, box_width, box_height, rotation)
    expected = [edge * RENDER_SCALE for edge in (left, top, right, bottom)]
    found = pink_bbox(image)
    assert found is not None, "no stamp pixels on the page"
    assert all(abs(f - e) <= 3 for f, e in zip(found, expected)), (found, expected)
    matrix = qr_matrix(VERIFY_URL)
    assert sampled_qr(image, left, top, len(matrix)) == matrix


# --- stamping ------------------------------------------------------------------------------------

def test_stamped_document_keeps_every_page_and_its_text() -> None:
    source = make_pdf(pages=3)

    stamped = stamp(source, page=2)

    texts = page_texts(stamped)
    assert len(texts) == 3
    for number, text in enumerate(texts, start=1):
        assert f"Surat Lamaran Pekerjaan halaman {number}" in text


def test_stamp_text_and_serial_appear_only_on_the_chosen_page() -> None:
    stamped = stamp(make_pdf(pages=3), page=2)

    first, second, third = page_texts(stamped)
    assert "METERAI ELEKTRONIK" in second
    assert SERIAL in second
    assert "SEPULUH RIBU RUPIAH" in second
    for other in (first, third):
        assert "METERAI" not in other
        assert SERIAL not in other


def test_stamp_is_drawn_at_the_requested_point_and_nowhere_else() -> None:
    stamped = stamp(make_pdf(pages=3), page=2, x=150.0, y=40.0)

    assert_stamp_shown_upright_at(render(stamped, 1), 150.0, 40.0, PAGE_WIDTH, PAGE_HEIGHT, 0)
    assert pink_bbox(render(stamped, 0)) is None
    assert pink_bbox(render(stamped, 2)) is None


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_stamp_reads_upright_on_rotated_pages(rotation: int) -> None:
    source = reshape(make_pdf(pages=2), rotate=rotation)

    stamped = stamp(source, page=1, x=30.0, y=250.0)

    assert_stamp_shown_upright_at(render(stamped, 0), 30.0, 250.0, PAGE_WIDTH, PAGE_HEIGHT, rotation)
    assert "Surat Lamaran Pekerjaan halaman 1" in page_texts(stamped)[0]


def test_rotation_inherited_from_the_page_tree_is_honoured() -> None:
    source = reshape(make_pdf(pages=2), rotate=90, inherit_rotation=True)

    stamped = stamp(source, page=2, x=180.0, y=10.0)

    assert_stamp_shown_upright_at(render(stamped, 1), 180.0, 10.0, PAGE_WIDTH, PAGE_HEIGHT, 90)


def test_stamp_position_is_relative_to_a_media_box_with_non_zero_origin() -> None:
    source = reshape(make_pdf(pages=1, size=(400, 500)), mediabox=(50, 60, 350, 460))

    stamped = stamp(source, page=1, x=10.0, y=20.0)

    assert_stamp_shown_upright_at(render(stamped, 0), 10.0, 20.0, 300.0, 400.0, 0)


def test_stamp_position_is_relative_to_a_crop_box_smaller_than_the_media_box() -> None:
    source = reshape(make_pdf(pages=1), cropbox=(40, 50, 260, 350))

    stamped = stamp(source, page=1, x=20.0, y=30.0)

    image = render(stamped, 0)
    assert image.size == (round(220 * RENDER_SCALE), round(300 * RENDER_SCALE))
    assert_stamp_shown_upright_at(image, 20.0, 30.0, 220.0, 300.0, 0)


def test_stamp_on_rotated_page_with_cropped_offset_box() -> None:
    source = reshape(make_pdf(pages=1), cropbox=(40, 50, 260, 350), rotate=270)

    stamped = stamp(source, page=1, x=100.0, y=150.0)

    assert_stamp_shown_upright_at(render(stamped, 0), 100.0, 150.0, 220.0, 300.0, 270)


def test_page_content_that_leaves_the_graphics_state_changed_does_not_move_the_stamp() -> None:
    source = with_unbalanced_graphics_state(make_pdf(pages=1))

    stamped = stamp(source, page=1, x=150.0, y=40.0)

    assert_stamp_shown_upright_at(render(stamped, 0), 150.0, 40.0, PAGE_WIDTH, PAGE_HEIGHT, 0)


def test_a_page_can_carry_two_stamps() -> None:
    once = stamp_document(make_pdf(pages=1), page=1, x=10, y=10, serial=SERIAL, verify_url=VERIFY_URL)

    twice = stamp_document(once, page=1, x=150, y=250, serial="Z" * 22, verify_url=VERIFY_URL)

    text = page_texts(twice)[0]
    assert SERIAL in text and "Z" * 22 in text
    found = pink_bbox(render(twice, 0))
    assert found is not None
    expected = [10 * RENDER_SCALE, 50 * RENDER_SCALE, 250 * RENDER_SCALE, 390 * RENDER_SCALE]
    assert all(abs(f - e) <= 3 for f, e in zip(found, expected)), (found, expected)


def test_a_blank_page_without_content_can_be_stamped() -> None:
    writer = PdfWriter()
    writer.add_blank_page(PAGE_WIDTH, PAGE_HEIGHT)

    stamped = stamp(write(writer), page=1, x=10.0, y=10.0)

    assert_stamp_shown_upright_at(render(stamped, 0), 10.0, 10.0, PAGE_WIDTH, PAGE_HEIGHT, 0)


def test_stamping_an_owner_password_document_that_opens_without_a_password() -> None:
    source = encrypted(make_pdf(pages=2), user_password="", algorithm="AES-128")

    stamped = stamp(source, page=1, x=20.0, y=20.0)

    texts = page_texts(stamped)
    assert "Surat Lamaran Pekerjaan halaman 1" in texts[0]
    assert SERIAL in texts[0]


def test_qr_code_encodes_the_verify_url_with_error_correction_m_or_better() -> None:
    code = qr_code(VERIFY_URL)

    assert code.error in ("M", "Q", "H")
    reference = segno.make_qr(VERIFY_URL, error=code.error, version=code.version, mask=code.mask)
    assert qr_matrix(VERIFY_URL) == tuple(tuple(bool(m) for m in row) for row in reference.matrix)


@pytest.mark.parametrize("url", ["https://a.id/", VERIFY_URL, "http://127.0.0.1:5000/verify/ZZZZ9999AAAA8888BBBB77",
                                 "https://meterai.example.id/verifikasi/" + "X" * 60])
def test_qr_matrix_is_the_symbol_segno_makes_with_the_chosen_mask(url: str) -> None:
    code = qr_code(url)

    reference = segno.make_qr(url, error=code.error, version=code.version, mask=code.mask)
    assert qr_matrix(url) == tuple(tuple(bool(m) for m in row) for row in reference.matrix)


def test_stamping_garbage_is_a_permanent_unreadable_error() -> None:
    with pytest.raises(DocumentUnreadable) as caught:
        stamp(b"%PDF-1.7\n" + b"\x00\xff garbage " * 200)

    assert caught.value.code == "unreadable"
    assert isinstance(caught.value, PermanentError)


def test_stamping_rejects_a_malformed_serial() -> None:
    with pytest.raises(ValueError):
        stamp_document(make_pdf(pages=1), page=1, x=0, y=0, serial="abc", verify_url=VERIFY_URL)


def test_stamping_twice_gives_independent_documents() -> None:
    source = make_pdf(pages=2)

    first = stamp_document(source, page=1, x=0, y=0, serial="A" * 22, verify_url=VERIFY_URL)
    second = stamp_document(source, page=2, x=0, y=0, serial="B" * 22, verify_url=VERIFY_URL)

    assert "A" * 22 in page_texts(first)[0] and "B" * 22 not in "".join(page_texts(first))
    assert "B" * 22 in page_texts(second)[1] and "A" * 22 not in "".join(page_texts(second))


# --- preflight -----------------------------------------------------------------------------------

def rejection(data: bytes, **overrides: float) -> DocumentRejected:
    with pytest.raises(DocumentRejected) as caught:
        run_preflight(data, **overrides)
    assert caught.value.message, "a person must be told why"
    return caught.value


def test_preflight_accepts_a_valid_document_and_measures_the_chosen_page() -> None:
    result = run_preflight(make_pdf(pages=3), page=3, x=200.0, y=300.0)

    assert result == PreflightResult(page_count=3, page_width=PAGE_WIDTH, page_height=PAGE_HEIGHT)


def test_preflight_measures_the_visible_unrotated_box() -> None:
    source = reshape(make_pdf(pages=2), cropbox=(40, 50, 260, 350), rotate=90)

    result = run_preflight(source, page=2, x=120.0, y=200.0)

    assert (result.page_width, result.page_height) == (220.0, 300.0)


@pytest.mark.parametrize("data", [b"", b"Surat Lamaran.docx", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64])
def test_preflight_rejects_what_is_not_a_pdf(data: bytes) -> None:
    assert rejection(data).code == "not_pdf"


def test_quick_check_allows_leading_junk_only_within_the_first_kilobyte() -> None:
    quick_check(b"\x00" * 1000 + make_pdf(pages=1), max_bytes=MAX_BYTES)

    with pytest.raises(DocumentRejected) as caught:
        quick_check(b"\x00" * 2000 + make_pdf(pages=1), max_bytes=MAX_BYTES)
    assert caught.value.code == "not_pdf"


def test_preflight_rejects_a_document_over_the_size_limit() -> None:
    source = make_pdf(pages=1)

    error = rejection(source, max_bytes=len(source) - 1)

    assert error.code == "too_large" and "MB" in error.message


def test_preflight_rejects_a_truncated_document() -> None:
    source = make_pdf(pages=3)

    assert rejection(source[: len(source) // 2]).code == "unreadable"


def test_preflight_rejects_garbage_after_the_header() -> None:
    assert rejection(b"%PDF-1.7\n" + bytes(range(256)) * 16).code == "unreadable"


def test_preflight_rejects_a_document_locked_with_a_user_password() -> None:
    source = encrypted(make_pdf(pages=1), user_password="rahasia", algorithm="AES-256")

    assert rejection(source).code == "encrypted"


def test_preflight_accepts_an_encrypted_document_that_opens_without_a_password() -> None:
    source = encrypted(make_pdf(pages=2), user_password="", algorithm="AES-256")

    assert run_preflight(source).page_count == 2


@pytest.mark.parametrize("page", [0, 4, -1])
def test_preflight_rejects_a_page_that_does_not_exist(page: int) -> None:
    assert rejection(make_pdf(pages=3), page=page).code == "page_out_of_range"


def test_preflight_rejects_a_document_without_pages() -> None:
    assert rejection(write(PdfWriter())).code == "no_pages"


def test_preflight_rejects_a_document_with_too_many_pages() -> None:
    assert rejection(make_pdf(pages=3), max_pages=2).code == "too_many_pages"


@pytest.mark.parametrize(
    ("x", "y"),
    [(201.0, 20.0), (20.0, 301.0), (-1.0, 20.0), (20.0, -5.0), (float("nan"), 20.0), (float("inf"), 0.0)],
)
def test_preflight_rejects_a_stamp_that_sticks_out_of_the_page(x: float, y: float) -> None:
    assert rejection(make_pdf(pages=1), x=x, y=y).code == "stamp_outside_page"


def test_preflight_accepts_a_stamp_touching_the_page_corner() -> None:
    assert run_preflight(make_pdf(pages=1), x=200.0, y=300.0).page_count == 1


def test_a_rejection_keeps_its_code_and_message_across_processes() -> None:
    error = rejection(make_pdf(pages=1), max_bytes=10)

    copy = pickle.loads(pickle.dumps(error))

    assert (type(copy), copy.code, copy.message) == (DocumentRejected, "too_large", error.message)


def test_preflight_judges_the_stamp_against_the_crop_box_not_the_media_box() -> None:
    source = reshape(make_pdf(pages=1), cropbox=(40, 50, 260, 350))

    assert rejection(source, x=150.0, y=20.0).code == "stamp_outside_page"
