"""The ops page: a real browser against a web node with an ops token, on the suite's running system.

The suite's own web runs without ``OPS_TOKEN`` (so everything under ``/ops`` is 404 there); these tests
start a second web node of the same system through the launcher, with a token. It shares the system's
Redis prefix (its tasks must reach the system's workers), so the waiting room it switches is the
system's: every test that switches puts ``auto`` back.
"""
from __future__ import annotations

import io

import pytest
import requests
from PIL import Image

from shared.devtools.services import free_port
from shared.services.opsview import Sample, minute_history, reached_at, sanitised_operator, waits
from tests.browser import browser_page  # noqa: F401 - fixture
from tests.conftest import wait_until

TOKEN = "ops-token-for-the-page-tests-0123456789"
OPERATOR = "Sari Ops"


@pytest.fixture(scope="module")
def ops_url(system):
    """A web node of the session's system with an ops token (started once for this module)."""
    name = "web-ops"
    process = system.launcher.processes.get(name)
    if process is None or not process.alive():
        system.launcher.start("web", name=name, port=free_port(), env={"OPS_TOKEN": TOKEN})
        system.launcher.wait_ready([name], timeout=90)
    yield system.launcher.processes[name].url
    system.stop(name)


@pytest.fixture
def ops(sys_, ops_url):
    """The ops node's URL, the waiting room back in ``auto`` after the test whatever it did."""
    yield ops_url
    requests.post(f"{ops_url}/ops/admission", json={"mode": "auto"}, timeout=5,
                  headers={"Authorization": f"Bearer {TOKEN}"}).raise_for_status()


def _auth(**extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", **extra}


# -- the numbers, without services ------------------------------------------------------------------

def _line(*points: tuple[float, int, int]) -> list[Sample]:
    return [Sample(at, head, tail, 600, "e1") for at, head, tail in points]


def test_a_tickets_wait_is_the_time_between_the_tail_and_the_head_reaching_it():
    # Tickets 1-10 issued between t=0 and t=10 (tail), let in between t=60 and t=70 (head): 60 s each.
    samples = _line((0, 0, 0), (10, 0, 10), (60, 0, 10), (70, 10, 10))
    assert reached_at(samples, lambda s: s.tail, 5) == pytest.approx(5.0)
    assert reached_at(samples, lambda s: s.head, 5) == pytest.approx(65.0)
    result = waits(samples, now=70, window=600)
    assert result["wait_p50_seconds"] == pytest.approx(60.0)
    assert result["wait_p90_seconds"] == pytest.approx(60.0)
    assert result["oldest_waiter_seconds"] == 0.0  # nobody waits now


def test_the_oldest_waiter_is_the_ticket_behind_the_head():
    samples = _line((0, 0, 0), (100, 0, 4), (200, 2, 4))
    result = waits(samples, now=250)
    assert result["oldest_waiter_seconds"] == pytest.approx(250 - 75)  # ticket 3 issued at t=75
    # A line older than the history: a lower bound, said so.
    before = waits(_line((100, 0, 4), (200, 2, 4)), now=250)
    assert before["oldest_waiter_seconds"] == 150 and before["oldest_waiter_before_history"]


def test_waits_start_again_when_redis_lost_the_line():
    samples = _line((0, 0, 0), (10, 0, 50), (20, 50, 50)) + [Sample(30, 0, 0, 600, "e2"), Sample(40, 0, 2, 600, "e2")]
    result = waits(samples, now=40)
    assert result["wait_p50_seconds"] is None and result["oldest_waiter_seconds"] == pytest.approx(5.0)


def test_the_hour_has_one_point_per_minute_with_the_minutes_stamps():
    now = 3600 * 10 + 30
    samples = _line((now - 125, 0, 7), (now - 65, 3, 9), (now - 5, 9, 9))
    points = minute_history(samples, {int(now // 60): 4}, now)
    assert len(points) == 60
    assert [p["line"] for p in points[-3:]] == [7, 6, 0]
    assert points[-1]["stamped"] == 4 and points[0]["line"] is None


def test_the_operators_name_is_bounded_and_plain():
    assert sanitised_operator("  Sari   Ops ") == "Sari Ops"
    assert sanitised_operator(None) is None and sanitised_operator("   ") is None
    for bad in ("x" * 65, "Sari\nevent=forged", "<script>", "Sári"):
        with pytest.raises(ValueError):
            sanitised_operator(bad)


# -- over HTTP --------------------------------------------------------------------------------------

def test_everything_under_ops_is_not_found_without_an_ops_token(sys_):
    for path in ("/ops", "/ops/overview", "/ops/admission"):
        assert requests.get(sys_.web_url + path, timeout=5).status_code == 404


def test_the_overview_needs_the_token_and_a_switch_needs_a_plain_name(ops):
    assert requests.get(f"{ops}/ops", timeout=5).status_code == 200  # the shell, no data in it
    assert requests.get(f"{ops}/ops/overview", timeout=5).status_code == 401
    assert requests.get(f"{ops}/ops/overview", headers={"Authorization": TOKEN}, timeout=5).status_code == 401
    r = requests.get(f"{ops}/ops/overview", headers=_auth(), timeout=5)
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    body = r.json()
    assert body["waiting_room"]["mode"] == "auto" and body["stamping"]["pace_per_minute"] == 694
    assert body["dependencies"]["redis"]["ok"] and body["dependencies"]["database"]["ok"]
    assert len(body["history"]) == 60
    refused = requests.post(f"{ops}/ops/admission", json={"mode": "paused"}, timeout=5,
                            headers=_auth(**{"X-Ops-Operator": "a" * 65}))
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_operator"
    assert requests.get(f"{ops}/ops/admission", headers=_auth(), timeout=5).json()["mode"] == "auto"


# -- in the browser ---------------------------------------------------------------------------------

def _log_lines(sys_, needle: str) -> list[str]:
    return [line for line in sys_.process("web-ops").output().decode(errors="replace").splitlines()
            if needle in line]


def test_a_bad_token_is_told_in_bahasa_and_shows_nothing(ops, browser_page):
    page = browser_page
    page.goto(f"{ops}/ops")
    page.fill("#token", "not-the-token")
    page.fill("#operator", OPERATOR)
    page.click("#login-submit")
    page.wait_for_selector("text=Token ops salah")
    assert page.is_hidden("#dashboard") and page.is_hidden("#switches")
    assert page.evaluate("sessionStorage.getItem('meterai-ops-token')") is None
    assert TOKEN not in page.url


def test_the_page_shows_live_numbers_switches_the_mode_and_renders(sys_, ops, browser_page):
    page = browser_page
    dialogs: list[str] = []

    def accept(dialog):
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    page.goto(f"{ops}/ops")
    page.fill("#token", TOKEN)
    page.fill("#operator", OPERATOR)
    page.click("#login-submit")
    page.wait_for_selector("#dashboard:not([hidden])")
    wait_until(lambda: page.text_content("#checkout-awaiting") == "0", message="no order waits to be paid")
    assert page.evaluate("sessionStorage.getItem('meterai-ops-token')") == TOKEN
    assert TOKEN not in page.url and not page.context.cookies()

    # A real order: the page's count of orders awaiting payment moves, then the stamp count.
    order_id, token, view = sys_.order_awaiting_payment()
    wait_until(lambda: page.text_content("#checkout-awaiting") == "1", timeout=30, message="count moved")
    sys_.pay(sys_.query("SELECT gateway_order_id FROM payments")[0]["gateway_order_id"])
    sys_.wait_status(order_id, token, "stamped")
    wait_until(lambda: page.text_content("#stamp-now") != "0" or page.text_content("#stamp-rate") != "0",
               timeout=30, message="stamps counted")

    # The switches: queue everyone, then pause (confirmed), each in the audit log with its operator.
    page.click("#mode-queue_all")
    wait_until(lambda: requests.get(f"{ops}/ops/admission", headers=_auth(), timeout=5).json()["mode"]
               == "queue_all", message="queue_all switched")
    page.click("#mode-paused")
    wait_until(lambda: requests.get(f"{ops}/ops/admission", headers=_auth(), timeout=5).json()["mode"]
               == "paused", message="paused switched")
    assert len(dialogs) == 1 and "Hentikan penjualan" in dialogs[0]
    page.wait_for_selector("#room-mode:has-text('Penjualan dihentikan')")
    page.wait_for_selector("#audit >> text=" + OPERATOR)
    logged = wait_until(lambda: [line for line in _log_lines(sys_, "admission_mode_changed")
                                 if OPERATOR in line and "paused" in line], message="switch logged")
    assert "queue_all" in logged[-1] and TOKEN not in "".join(_log_lines(sys_, ""))

    # It renders: the chart is drawn, and the screenshot is not one colour.
    assert page.locator("#chart polyline.series-line").count() == 1
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    colours = shot.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20, "the page rendered blank"


def test_the_line_is_sampled_once_per_interval_whoever_asks(sys_):
    import dataclasses
    import uuid

    import redis

    from shared.admission import AdmissionController
    from shared.services.opsview import record_sample

    settings = dataclasses.replace(sys_.settings, redis_key_prefix=f"meterai-ops-{uuid.uuid4().hex[:8]}:")
    client = redis.Redis.from_url(settings.redis_url)
    controller = AdmissionController(settings, client)
    try:
        assert record_sample(settings, client, controller, now=1000.0)
        assert not record_sample(settings, client, controller, now=1001.0)  # another web node, same moment
        (raw,) = client.zrange(f"{settings.redis_key_prefix}ops:samples", 0, -1)
        assert Sample.decode(raw).outflow == controller.outflow_per_minute()
    finally:
        for key in client.scan_iter(match=f"{settings.redis_key_prefix}*"):
            client.delete(key)


def test_beat_samples_the_line_for_the_chart_even_when_nobody_watches(sys_):
    """The chart's samples come from a periodic housekeeping task too (not only from an open page), at
    most one per interval however many beats or pages ask."""
    import redis

    from shared import jobs
    from shared.services.opsview import _samples_key

    client = redis.Redis.from_url(sys_.settings.redis_url)
    key = _samples_key(sys_.settings)
    client.delete(key, f"{sys_.settings.redis_key_prefix}ops:sample-lock")
    for _ in range(3):
        jobs.publish(jobs.OPS_SAMPLE)
    wait_until(lambda: client.zcard(key) >= 1, message="the housekeeping worker's sample")
    assert client.zcard(key) == 1  # three asked within one interval: one sample
    [raw] = client.zrange(key, 0, -1)
    assert Sample.decode(raw) is not None
