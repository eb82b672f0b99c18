"""Every buyer page (checkout, waiting room, order, verification) at 360 px wide: nothing wider than the
screen, every control named for a screen reader, and a keyboard focus order that follows the page;
the order page works as the place to come back to (reload, a missing or wrong token)."""
from __future__ import annotations

import pytest

from tests.browser import browser_factory, save_screenshot  # noqa: F401 - fixture
from tests.conftest import make_pdf

UNNAMED_CONTROLS = """() => [...document.querySelectorAll('input, select, textarea, button, summary, a[href], [tabindex]')]
  .filter((el) => el.offsetParent !== null || el.tagName === 'SUMMARY')
  .filter((el) => {
    const labelled = (el.labels && el.labels.length) || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby');
    return !(labelled || (el.textContent || '').trim() || el.getAttribute('title'));
  })
  .map((el) => el.outerHTML.slice(0, 120))"""


def _check_phone_layout(page, name: str) -> None:
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 360, name
    assert page.evaluate(UNNAMED_CONTROLS) == [], name
    assert page.evaluate("() => document.documentElement.lang") == "id"
    save_screenshot(page, f"phone-{name}", "shown")


def test_every_buyer_page_fits_a_phone_and_names_its_controls(sys_, browser_factory, tmp_path):
    order_id, token, _ = sys_.order_awaiting_payment()
    page = browser_factory("phone")
    document = tmp_path / "surat.pdf"
    document.write_bytes(make_pdf(pages=2))
    page.goto(sys_.web_url + "/")
    page.set_input_files("#document", str(document))
    page.wait_for_selector("#stage[data-ready]")
    _check_phone_layout(page, "checkout")
    for name, path in (("queue", "/antrian/not-a-ticket"), ("verify", "/verify"),
                       ("verify-serial", "/verify/0123456789ABCDEFGHIJKL")):
        page.goto(sys_.web_url + path)
        _check_phone_layout(page, name)
    page.goto(f"{sys_.web_url}/pesanan/{order_id}#t={token}")
    page.wait_for_selector("#pay")
    _check_phone_layout(page, "order")


def test_the_checkout_focus_order_follows_the_page(sys_, browser_factory, tmp_path):
    page = browser_factory("desktop")
    document = tmp_path / "surat.pdf"
    document.write_bytes(make_pdf(pages=2))
    page.goto(sys_.web_url + "/")
    page.set_input_files("#document", str(document))
    page.wait_for_selector("#stage[data-ready]")
    page.focus("#document")
    order = []
    for _ in range(12):
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.id || document.activeElement.tagName"))
    wanted = ["page", "next-page", "stamp", "SUMMARY", "email", "submit"]
    positions = [order.index(item) for item in wanted]
    assert positions == sorted(positions), order


def test_the_order_page_survives_a_reload_and_explains_a_broken_link(sys_, browser_factory):
    order_id, token, _ = sys_.order_awaiting_payment()
    page = browser_factory("phone")
    page.goto(f"{sys_.web_url}/pesanan/{order_id}#t={token}")
    page.wait_for_selector("#pay")
    assert "Silakan lakukan pembayaran" in page.inner_text("#state")
    page.reload()
    page.wait_for_selector("#pay")
    # "Salin tautan" copies the link with its token (the fragment), which is how one comes back.
    page.click("#copy-link")
    page.wait_for_selector("text=Tautan disalin")
    assert page.evaluate("() => navigator.clipboard.readText()") == f"{sys_.web_url}/pesanan/{order_id}#t={token}"
    page.goto(f"{sys_.web_url}/pesanan/{order_id}")
    page.wait_for_selector("text=Tautan pesanan tidak lengkap")
    page.goto(f"{sys_.web_url}/pesanan/{order_id}#t=not-the-token")
    page.wait_for_selector("text=Pesanan tidak ditemukan")


@pytest.mark.parametrize("path", ["/pesanan/not-a-uuid"])
def test_an_order_page_address_that_is_no_order_id_is_a_404(sys_, path):
    assert sys_.http.get(sys_.web_url + path, timeout=5).status_code == 404


HIDE = """(hidden) => {
  Object.defineProperty(document, 'hidden', { value: hidden, configurable: true });
  Object.defineProperty(document, 'visibilityState', { value: hidden ? 'hidden' : 'visible', configurable: true });
  document.dispatchEvent(new Event('visibilitychange'));
}"""


def test_an_order_page_nobody_looks_at_polls_rarely_and_at_once_when_looked_at_again(sys_, browser_factory):
    """While the buyer pays in another tab or app the page is hidden: it asks every 30 s instead of 5, and
    asks at once when shown again, so the paid order is what the buyer sees on coming back. The page's
    clock is Playwright's (page.clock), moved forward by hand: the 30 s are checked without waiting them."""
    order_id, token, view = sys_.order_awaiting_payment()
    page = browser_factory("phone")
    polls: list[str] = []
    page.on("request", lambda r: polls.append(r.url) if r.url.endswith(f"/api/v1/orders/{order_id}") else None)
    page.clock.install()
    page.goto(f"{sys_.web_url}/pesanan/{order_id}#t={token}")
    page.wait_for_selector("#pay")
    page.evaluate(HIDE, True)

    status_url = f"**/api/v1/orders/{order_id}"

    def polls_after(forward: str) -> None:  # the poll's answer has come back and the next wait has begun
        with page.expect_response(status_url, timeout=5_000):
            page.clock.fast_forward(forward)
        page.wait_for_function("() => document.documentElement.dataset.nextPoll !== undefined", timeout=10_000)

    def quiet_after(forward: str) -> bool:
        before = len(polls)
        page.clock.fast_forward(forward)
        page.wait_for_timeout(400)  # real time for a request a timer would have started
        return len(polls) == before

    polls_after("00:06")  # the visible page's 5 s wait, begun before it was hidden
    assert quiet_after("00:20")  # hidden: nothing at 5, 10, 15 or 20 s
    polls_after("00:11")  # 31 s into the hidden nap: asked
    sys_.pay(view["payment"]["gateway_order_id"])
    assert quiet_after("00:10")
    assert "Silakan lakukan pembayaran" in page.inner_text("#status-title")
    page.evaluate(HIDE, False)
    page.wait_for_function("() => !document.querySelector('#status-title').textContent.includes('Silakan')",
                           timeout=3_000)  # asked at once on being shown, not at the end of the nap
