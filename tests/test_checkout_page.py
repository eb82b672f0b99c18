"""The buyer's checkout page in a real browser: upload, wait in line, pay, download (on the order page
the checkout moves to once the order exists)."""
from __future__ import annotations

import pypdf

from tests.browser import browser_page  # noqa: F401 - fixture
from tests.conftest import make_pdf, wait_until
from tests.test_admission import throttled  # noqa: F401 - fixture


def _gateway_order_id(sys_) -> str:
    rows = wait_until(lambda: sys_.query("SELECT gateway_order_id FROM payments WHERE token IS NOT NULL"),
                      message="payment opened")
    return rows[0]["gateway_order_id"]


def _checkout(page, base_url: str, tmp_path) -> None:
    document = tmp_path / "surat.pdf"
    document.write_bytes(make_pdf(pages=2))
    page.goto(base_url + "/")
    assert "Beli e-Meterai" in page.title()
    page.set_input_files("#document", str(document))
    page.wait_for_selector("#stage[data-ready]")  # the preview is up
    page.fill("#page", "2")
    page.click("#manual summary")  # the typed coordinates, for those who know them
    page.fill("#x", "350")
    page.fill("#y", "120")
    page.fill("#email", "pelamar@example.id")
    page.click("#submit")


def test_buyer_checks_out_pays_and_downloads_in_the_browser(sys_, browser_page, tmp_path):
    page = browser_page
    _checkout(page, sys_.web_url, tmp_path)
    page.wait_for_selector("text=Bayar sekarang")
    sys_.pay(_gateway_order_id(sys_))
    page.wait_for_selector("text=Selesai: dokumen Anda sudah bermeterai", timeout=60_000)
    with page.expect_download() as download_info:
        page.click("#download")
    path = download_info.value.path()
    reader = pypdf.PdfReader(path)
    assert "METERAI ELEKTRONIK" in reader.pages[1].extract_text()
    order = sys_.query("SELECT * FROM orders")[0]
    assert (order["status"], order["page"], order["x"], order["y"]) == ("stamped", 2, 350, 120)


def test_buyer_over_the_outflow_waits_in_line_then_is_let_in(sys_, throttled, browser_page, tmp_path):
    # A place every 10 s: still in line after the tab is closed and opened again, on a busy machine too.
    base = throttled(admission_per_minute=6, admission_burst=1)
    from tests.test_admission import _create

    assert _create(base).status_code == 202  # someone else takes the one free place
    page = browser_page
    uploads = []
    page.on("request", lambda r: uploads.append(r.url) if r.method == "POST" and r.url.endswith("/api/v1/orders") else None)
    _checkout(page, base, tmp_path)
    page.wait_for_selector("text=Posisi Anda")
    assert uploads == []  # in line with a ticket: the document is not sent before the buyer's turn
    page.wait_for_selector("text=Bayar sekarang", timeout=60_000)  # admitted, order created
    assert len(uploads) == 1
    orders = sys_.query("SELECT count(*) AS n FROM orders")[0]["n"]
    assert orders == 2


def test_a_queued_buyer_keeps_waiting_through_a_sales_pause(sys_, throttled, browser_page, tmp_path):
    import requests

    base = throttled(admission_per_minute=6, admission_burst=1, ops_token="ops-secret-for-the-tests-0123456789")
    from tests.test_admission import _create

    assert _create(base).status_code == 202  # someone else takes the one free place
    page = browser_page
    _checkout(page, base, tmp_path)
    page.wait_for_selector("text=Posisi Anda")
    ops = {"url": f"{base}/ops/admission", "headers": {"Authorization": "Bearer ops-secret-for-the-tests-0123456789"}, "timeout": 5}
    requests.post(json={"mode": "paused"}, **ops)
    page.wait_for_selector("text=Penjualan sedang dihentikan sementara", timeout=30_000)
    requests.post(json={"mode": "auto"}, **ops)
    page.wait_for_selector("text=Bayar sekarang", timeout=60_000)  # same ticket, let in after the pause
    assert sys_.query("SELECT count(*) AS n FROM orders")[0]["n"] == 2


def test_bad_input_is_explained_in_bahasa_indonesia(sys_, browser_page, tmp_path):
    page = browser_page
    not_pdf = tmp_path / "foto.pdf"
    not_pdf.write_bytes(b"\x89PNG not really a pdf")
    page.goto(sys_.web_url + "/")
    page.set_input_files("#document", str(not_pdf))
    page.fill("#email", "pelamar@example.id")
    # The preview can't read it, and says so; the typed coordinates stay, and the server refuses it.
    page.wait_for_selector("text=Pratinjau tidak dapat ditampilkan")
    page.click("#submit")
    page.wait_for_selector("text=Berkas ini bukan dokumen PDF")
    assert sys_.query("SELECT count(*) AS n FROM orders")[0]["n"] == 0


def test_a_buyer_who_closes_the_tab_in_line_keeps_the_place_on_coming_back(sys_, throttled, browser_page, tmp_path):
    import redis

    # A place every 10 s: still in line after the tab is closed and opened again, on a busy machine too.
    base = throttled(admission_per_minute=6, admission_burst=1)
    from tests.test_admission import _create

    assert _create(base).status_code == 202  # someone else takes the one free place
    page = browser_page
    _checkout(page, base, tmp_path)
    page.wait_for_selector("text=Posisi Anda")
    # The place is remembered without holding up the line (the file into IndexedDB, then the note in
    # localStorage): a tab closed before that ends starts afresh; the buyer here closes it after.
    page.wait_for_function("() => localStorage.getItem('meterai-waiting') !== null")
    client = redis.Redis.from_url(sys_.settings.redis_url)
    tickets = int(client.get(f"{base.prefix}adm:tail"))
    context = page.context
    page.close()  # the tab is gone; the place in line, the file and the choices stay in this browser

    again = context.new_page()
    again.goto(base + "/")
    again.wait_for_selector("text=Melanjutkan antrean Anda")
    again.wait_for_url("**/pesanan/**", timeout=90_000)  # admitted on the same ticket, the order made
    again.wait_for_selector("#pay")
    assert int(client.get(f"{base.prefix}adm:tail")) == tickets  # no second place in line
    order = sys_.query("SELECT page, x, y, email FROM orders ORDER BY created_at DESC LIMIT 1")[0]
    assert (order["page"], order["x"], order["y"], order["email"]) == (2, 350, 120, "pelamar@example.id")
    # Once the order exists, the checkout offers the way back to it and no longer resumes a line.
    again.goto(base + "/")
    again.wait_for_selector("text=Buka pesanan terakhir Anda")
    assert again.locator("#checkout").is_visible()


def test_a_create_lost_on_the_way_is_repeated_with_the_same_key(sys_, browser_page, tmp_path):
    """The connection drops under the create: "Coba lagi" sends the same purchase again, under the same
    Idempotency-Key (so had the server made the order, it would answer with that one: tests/test_api.py),
    and the buyer lands on the one order."""
    page = browser_page
    keys = []

    def drop_the_first(route):
        keys.append(route.request.headers.get("idempotency-key"))
        if len(keys) == 1:
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route("**/api/v1/orders", drop_the_first)
    _checkout(page, sys_.web_url, tmp_path)
    page.wait_for_selector("#retry")
    page.click("#retry")
    page.wait_for_url("**/pesanan/**")
    page.wait_for_selector("#pay")
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0]
    rows = sys_.query("SELECT id FROM orders")
    assert len(rows) == 1 and str(rows[0]["id"]) in page.url
