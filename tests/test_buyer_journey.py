"""An applicant's whole journey in headless Chromium, on a desktop and on a phone: choose the file, see
the page, drag the stamp, wait in line while the room is full, pay at the stand-in gateway, close the
tab, come back through the e-mailed link (in a fresh browser, as from another device), download, and
verify the downloaded file on /verify. The stamp in the downloaded file is where it was dragged. Each
step's screenshot is saved in the test report folder (tests/browser.py REPORT_DIR).
"""
from __future__ import annotations

import uuid

import pytest

from tests.browser import browser_factory, save_screenshot  # noqa: F401 - fixture
from tests.test_admission import _create, throttled  # noqa: F401 - fixture
from tests.test_stamp_placement_page import (
    assert_same_place,
    drag_outline_to,
    make_pdf,
    outline_share,
    pink_bbox,
    render,
    reshape,
)


def downloaded_share(path: str, page_number: int) -> tuple[float, float, float, float]:
    with open(path, "rb") as handle:
        image = render(handle.read(), page_number - 1)
    box = pink_bbox(image)
    assert box is not None, "no stamp in the downloaded file"
    width, height = image.size
    return box[0] / width, box[1] / height, box[2] / width, box[3] / height


@pytest.mark.parametrize("kind", ["desktop", "phone"])
def test_an_applicant_buys_waits_pays_leaves_comes_back_by_email_downloads_and_verifies(
        sys_, throttled, browser_factory, tmp_path, kind):
    shot = f"journey-{kind}"
    # A place every 6 s: the page is still in line when the test looks, on a machine running two files.
    base = throttled(admission_per_minute=10, admission_burst=1)
    document = tmp_path / "surat-lamaran.pdf"
    document.write_bytes(reshape(make_pdf(pages=2), rotate=90) if kind == "phone" else make_pdf(pages=2))
    email = f"pelamar-{uuid.uuid4().hex[:8]}@example.id"

    # Choose the file, see page 2, drag the stamp there.
    page = browser_factory(kind)
    page.goto(base + "/")
    page.set_input_files("#document", str(document))
    page.wait_for_selector("#stage[data-ready='1']")
    page.click("#next-page")
    page.wait_for_selector("#stage[data-ready='2']")
    drag_outline_to(page, 0.3, 0.3, touch=kind == "phone")
    dragged = outline_share(page)
    if kind == "phone":
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 360
    save_screenshot(page, shot, "1-placed")
    page.fill("#email", email)
    assert _create(base).status_code == 202  # someone else takes the one free place: the room is full
    page.click("#submit")

    # Wait in line; once admitted the upload goes and the page moves to the order page.
    page.wait_for_selector("text=Posisi Anda")
    assert "Biarkan halaman ini terbuka" in page.inner_text("#status")
    save_screenshot(page, shot, "2-in-line")
    page.wait_for_url("**/pesanan/**", timeout=90_000)
    order_id = page.url.split("/pesanan/")[1].split("#")[0]
    page.wait_for_selector("#pay")
    save_screenshot(page, shot, "3-order-page")

    # Pay at the stand-in gateway's page, then close every tab.
    with page.context.expect_page() as opened:
        page.click("#pay")
    gateway = opened.value
    gateway.wait_for_load_state()
    gateway.click("text=Bayar sekarang")
    gateway.wait_for_load_state()
    save_screenshot(gateway, shot, "4-paid-at-gateway")
    page.context.close()

    # The receipt and the stamped e-mail arrive; the latter's link brings the buyer back.
    receipt = sys_.wait_mail(order_id, "receipt")
    assert receipt["To"] == email
    stamped = sys_.wait_mail(order_id, "stamped", timeout=60)
    link, linked_order, _ = sys_.mail_link(stamped)
    assert linked_order == order_id
    again = browser_factory(kind)
    again.goto(link)
    again.wait_for_selector("text=Selesai: dokumen Anda sudah bermeterai", timeout=30_000)
    save_screenshot(again, shot, "5-back-by-email")
    with again.expect_download() as download_info:
        again.click("#download")
    path = download_info.value.path()
    assert_same_place(downloaded_share(path, 2), dragged)

    # Anyone can check it on /verify.
    again.goto(sys_.web_url + "/verify")
    again.set_input_files("#document", path)
    again.click("text=Periksa dokumen")
    again.wait_for_selector("text=e-Meterai sah")
    save_screenshot(again, shot, "6-verified")
    row = sys_.order_row(order_id)
    assert (row["status"], row["page"]) == ("stamped", 2)
