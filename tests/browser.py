"""A real headless Chromium for page tests (Debian's chromium, driven by Playwright).

Where no Chromium is installed the page tests skip with a reason, except under CI, where `.ci/run`
installs it and a missing browser is a failure.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

# Screenshots of the page tests, kept after the run (CI keeps the folder as the test report's).
REPORT_DIR = Path(os.environ.get("TEST_REPORT_DIR") or Path(__file__).resolve().parents[1] / "reports" / "screenshots")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _require_vendored_preview() -> None:
    from shared.devtools import vendor

    if not vendor.current():
        pytest.fail("pdf.js is not vendored (the checkout's preview): run python -m shared.devtools.vendor "
                    "(./dev test does)")


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is not installed (.ci/run should have installed it)")
        pytest.skip("no Chromium on this machine: apt-get install chromium to run the page tests")
    return path


@pytest.fixture
def browser_page(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    path = chromium_path()
    _require_vendored_preview()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(30_000)
        yield page
        context.close()
        browser.close()


# The viewports the buyer pages are tested at: a desktop, and a phone 360 px wide (the narrowest common
# Android width) with touch.
VIEWPORTS = {
    "desktop": {"viewport": {"width": 1280, "height": 900}},
    "phone": {"viewport": {"width": 360, "height": 740}, "device_scale_factor": 2, "is_mobile": True,
              "has_touch": True},
}


@pytest.fixture
def browser_factory():
    """``new_page(kind)``: a fresh browser context and page for a viewport of :data:`VIEWPORTS`."""
    sync_api = pytest.importorskip("playwright.sync_api")
    path = chromium_path()
    _require_vendored_preview()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        contexts = []

        def new_page(kind: str = "desktop"):
            context = browser.new_context(accept_downloads=True, **VIEWPORTS[kind])
            context.grant_permissions(["clipboard-read", "clipboard-write"])
            contexts.append(context)
            page = context.new_page()
            page.set_default_timeout(30_000)
            return page

        yield new_page
        for context in contexts:
            context.close()
        browser.close()


def save_screenshot(page, test_name: str, step: str) -> Path:
    """A full-page screenshot under :data:`REPORT_DIR`, named by test and step."""
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    path = REPORT_DIR / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', test_name)}--{step}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def touch_drag(page, start: tuple[float, float], end: tuple[float, float], steps: int = 8) -> None:
    """Drag with one finger from ``start`` to ``end`` (CSS pixels), as a phone's touchscreen does:
    Chromium turns the touch events into the pointer events the page listens to."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": start[0], "y": start[1]}]})
    for i in range(1, steps + 1):
        x = start[0] + (end[0] - start[0]) * i / steps
        y = start[1] + (end[1] - start[1]) * i / steps
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    cdp.detach()
