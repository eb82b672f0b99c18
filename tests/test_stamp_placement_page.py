"""Placing the stamp on the checkout page's preview (pdf.js in headless Chromium) puts it where the
stamped file shows it: the buyer drags the outline, the page fills in page, x and y, and the kernel's
stamp, rendered by another engine (pdfium), covers the same part of the page as the outline did, on
plain, rotated and cropped pages.
"""
from __future__ import annotations

import pytest

from shared.stamping import stamp_document
from tests.browser import browser_factory, save_screenshot, touch_drag  # noqa: F401 - fixture
from tests.test_stamping_kernel import (
    PAGE_HEIGHT,
    PAGE_WIDTH,
    SERIAL,
    VERIFY_URL,
    make_pdf,
    pink_bbox,
    render,
    reshape,
)

# How far the stamp may be from the outline, as a share of the shown page's side: the page rounds to
# whole points (under 0.5 pt) and the preview is drawn at a fraction of a point per pixel.
TOLERANCE = 0.012

CASES = {
    "plain": {},
    "rotated-90": {"rotate": 90},
    "rotated-180": {"rotate": 180},
    "rotated-270": {"rotate": 270},
    "cropped": {"cropbox": (40.0, 60.0, 280.0, 380.0)},
    "offset-media-rotated-90": {"mediabox": (-30.0, 20.0, 300.0, 420.0), "cropbox": (0.0, 50.0, 260.0, 400.0),
                                "rotate": 90},
    "cropped-rotated-270": {"cropbox": (20.0, 30.0, 290.0, 330.0), "rotate": 270},
}


def open_preview(page, base_url: str, document, page_number: int = 1) -> None:
    page.goto(base_url + "/")
    page.set_input_files("#document", str(document))
    page.wait_for_selector("#stage[data-ready]")
    while page.eval_on_selector("#stage", "s => s.dataset.ready") != str(page_number):
        page.click("#next-page")
        page.wait_for_function(f"() => document.querySelector('#stage').dataset.ready === '{page_number}'")


def outline_share(page) -> tuple[float, float, float, float]:
    """The outline's box as shares of the shown page (left, top, right, bottom)."""
    return tuple(page.evaluate("""() => {
        const c = document.querySelector('#page-canvas').getBoundingClientRect();
        const s = document.querySelector('#stamp').getBoundingClientRect();
        return [(s.left - c.left) / c.width, (s.top - c.top) / c.height,
                (s.right - c.left) / c.width, (s.bottom - c.top) / c.height];
    }"""))


def drag_outline_to(page, share_x: float, share_y: float, *, touch: bool = False) -> None:
    """Drag the outline's centre to a point given as shares of the shown page."""
    page.eval_on_selector("#stage", "s => s.scrollIntoView({block: 'center'})")
    canvas = page.locator("#page-canvas").bounding_box()
    stamp = page.locator("#stamp").bounding_box()
    start = (stamp["x"] + stamp["width"] / 2, stamp["y"] + stamp["height"] / 2)
    end = (canvas["x"] + canvas["width"] * share_x, canvas["y"] + canvas["height"] * share_y)
    if touch:
        touch_drag(page, start, end)
        return
    page.mouse.move(*start)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(start[0] + (end[0] - start[0]) * i / 10, start[1] + (end[1] - start[1]) * i / 10)
    page.mouse.up()


def chosen(page) -> tuple[int, float, float]:
    return int(page.input_value("#page")), float(page.input_value("#x")), float(page.input_value("#y"))


def stamped_share(document: bytes, page_number: int, x: float, y: float) -> tuple[float, float, float, float]:
    """Where the stamp shows on the stamped page, as shares of the rendered page."""
    image = render(stamp_document(document, page=page_number, x=x, y=y, serial=SERIAL, verify_url=VERIFY_URL),
                   page_number - 1)
    box = pink_bbox(image)
    assert box is not None, "no stamp on the stamped page"
    width, height = image.size
    return box[0] / width, box[1] / height, box[2] / width, box[3] / height


def assert_same_place(found, expected) -> None:
    assert all(abs(f - e) <= TOLERANCE for f, e in zip(found, expected)), (found, expected)


@pytest.mark.parametrize("case", list(CASES))
def test_the_stamp_lands_where_it_was_dragged(sys_, browser_factory, tmp_path, case):
    source = reshape(make_pdf(pages=2), **CASES[case]) if CASES[case] else make_pdf(pages=2)
    document = tmp_path / f"{case}.pdf"
    document.write_bytes(source)
    page = browser_factory("desktop")
    open_preview(page, sys_.web_url, document, page_number=2)
    drag_outline_to(page, 0.3, 0.35)
    number, x, y = chosen(page)
    assert number == 2
    expected = outline_share(page)
    assert abs((expected[0] + expected[2]) / 2 - 0.3) < 0.02  # the outline went where it was dragged
    save_screenshot(page, f"placement-{case}", "dragged")
    assert_same_place(stamped_share(source, number, x, y), expected)


def test_the_outline_cannot_leave_the_page_and_typed_coordinates_move_it(sys_, browser_factory, tmp_path):
    document = tmp_path / "surat.pdf"
    document.write_bytes(make_pdf(pages=1))
    page = browser_factory("desktop")
    open_preview(page, sys_.web_url, document)
    # pdf.js and its worker come by addresses that name their content, so an hour's cache never mixes
    # versions after a deploy.
    loaded = page.evaluate("() => performance.getEntriesByType('resource').map((e) => e.name)")
    assert any("pdf.min.mjs?v=" in url for url in loaded) and any("pdf.worker.min.mjs?v=" in url for url in loaded)
    drag_outline_to(page, 1.4, -0.5)  # far past the top-right corner
    left, top, right, bottom = outline_share(page)
    assert right == pytest.approx(1.0, abs=0.005) and top == pytest.approx(0.0, abs=0.005)
    _, x, y = chosen(page)
    assert (x, y) == (PAGE_WIDTH - 100, PAGE_HEIGHT - 100)

    # The keyboard nudges it (a point per arrow press, ten with Shift) and stays inside too.
    page.focus("#stamp")
    page.keyboard.press("Shift+ArrowLeft")
    page.keyboard.press("ArrowDown")
    assert chosen(page)[1:] == (PAGE_WIDTH - 110, PAGE_HEIGHT - 101)

    # Typed coordinates, for those who know them, move the outline.
    page.click("summary")
    page.fill("#x", "20")
    page.fill("#y", "30")
    left, top, right, bottom = outline_share(page)
    assert left == pytest.approx(20 / PAGE_WIDTH, abs=0.01)
    assert bottom == pytest.approx(1 - 30 / PAGE_HEIGHT, abs=0.01)


def test_a_finger_drags_the_stamp_on_a_phone(sys_, browser_factory, tmp_path):
    source = reshape(make_pdf(pages=1), rotate=90)
    document = tmp_path / "surat.pdf"
    document.write_bytes(source)
    page = browser_factory("phone")
    open_preview(page, sys_.web_url, document)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 360  # nothing wider than the phone
    drag_outline_to(page, 0.6, 0.7, touch=True)
    expected = outline_share(page)
    assert abs((expected[0] + expected[2]) / 2 - 0.6) < 0.03
    save_screenshot(page, "placement-phone-touch", "dragged")
    number, x, y = chosen(page)
    assert_same_place(stamped_share(source, number, x, y), expected)
