"""The surge drill's virtual buyer, for Locust.

One :class:`Buyer` does what an applicant does in the last days before the CPNS deadline, over HTTP:

1. uploads their letter (a real ~200 KB PDF, drawn with reportlab once per process) with a fresh
   ``Idempotency-Key``;
2. when the waiting room answers 429 with a ticket, waits in line: polls ``GET /api/v1/queue/{ticket}``
   no faster than ``Retry-After`` says, and once admitted repeats the same create with the
   ``Admission-Token`` header (a 429 from the per-client rate limit is waited out the same way);
3. polls the order until its payment is open and pays through the stand-in gateway
   (``POST /sandbox/pay/{gateway_order_id}``), as pressing "Bayar" does;
4. polls until the order is stamped, downloads the document and checks it: the PDF opens with pypdf and
   the stamped page's text has "METERAI ELEKTRONIK" and the serial the API reported;
5. thinks a few seconds and buys again.

Each buyer sends its own client address in ``X-Forwarded-For`` (from the 198.18.0.0/15 benchmarking
range; nothing is ever sent there) so per-client rate limits see many buyers, as in production behind a
proxy; the drill runs the web with ``PROXY_HOPS=1``.

The load shape is chosen by ``DRILL_SHAPE`` (``spike`` or ``steady``) and ``DRILL_SHAPE_PARAMS`` (JSON);
see :mod:`loadtests.shapes`. Other knobs, all optional: ``DRILL_GATEWAY_URL`` (default
``http://127.0.0.1:8001``), ``DRILL_PDF_BYTES`` (200000), ``DRILL_THINK_SECONDS`` ("3,10"),
``DRILL_POLL_SECONDS`` (1), ``DRILL_STEP_TIMEOUT_SECONDS`` (180: longest wait for a payment to open or a
stamp), ``DRILL_QUEUE_PATIENCE_SECONDS`` (900), ``DRILL_PAYMENT_TYPE`` (qris), ``DRILL_REQUEST_LOG`` (a path:
one JSON line per request, its end time, name, status, whether a 503 carried ``Retry-After``, and the
order a create was answered with; the failover drill reads it).

A ``503`` with ``Retry-After`` (a dependency briefly away: the waiting room failing closed, the database
or the document store) is waited out and the same request sent again, as a client of the API is told to
do; it is still counted by status, so a drill that allows no 503 still fails on it.

``--summary-json PATH`` writes what the run saw (per request name: counts by status code, percentiles;
purchases started/completed; stamp checks) for the SLO gate (:mod:`loadtests.slo`). The drill
(``python -m loadtests.drill``) runs all of this headless and gates on it; by hand::

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000
"""
from __future__ import annotations

import itertools
import json
import os
import random
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from locust import HttpUser, LoadTestShape, between, events, task

from loadtests import shapes
from loadtests.documents import make_pdf, stamp_problem
from loadtests.slo import CREATE, DOWNLOAD, PAY, QUEUE, STAMP_CHECK, STATUS


# -- load shapes ------------------------------------------------------------------------------------
# Locust runs the first non-abstract shape class it finds here, so the two shapes are abstract and
# DrillShape, bound below to the one DRILL_SHAPE names, is the only runnable one.

class PhasedShape(LoadTestShape):
    abstract = True
    kind = ""
    params: Any = None

    def __init__(self, params: Any = None) -> None:
        super().__init__()
        if params is not None:
            self.params = params

    def tick(self) -> shapes.Tick:
        return shapes.plan(self.kind, self.params, self.get_run_time())


class SpikeShape(PhasedShape):
    """The last days before the CPNS deadline, compressed: quiet, a one-minute stampede, hold, drain."""

    abstract = True
    kind = "spike"
    params = shapes.SpikeParams()


class SteadyShape(PhasedShape):
    """An ordinary busy day: a constant number of buyers."""

    abstract = True
    kind = "steady"
    params = shapes.SteadyParams()


SHAPE_CLASSES: dict[str, type[PhasedShape]] = {"spike": SpikeShape, "steady": SteadyShape}
_kind, _params = shapes.selected()
_base = SHAPE_CLASSES[_kind]
DrillShape = type(_base)("DrillShape", (_base,), {"params": _params, "__module__": __name__})


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


GATEWAY_URL = os.environ.get("DRILL_GATEWAY_URL", "http://127.0.0.1:8001").rstrip("/")
PDF_BYTES = int(_env_float("DRILL_PDF_BYTES", 200_000))
THINK_MIN, THINK_MAX = (float(v) for v in os.environ.get("DRILL_THINK_SECONDS", "3,10").split(","))
POLL_SECONDS = _env_float("DRILL_POLL_SECONDS", 1.0)
STEP_TIMEOUT = _env_float("DRILL_STEP_TIMEOUT_SECONDS", 180.0)
QUEUE_PATIENCE = _env_float("DRILL_QUEUE_PATIENCE_SECONDS", 900.0)
PAYMENT_TYPE = os.environ.get("DRILL_PAYMENT_TYPE", "qris")
# A kept-alive connection idle this long is dropped by the client before the next request, below
# gunicorn's keep-alive (2 s). Reusing one the server is about to reap races gunicorn's gthread reaper,
# which resets a connection whose next request arrives just after its keep-alive ran out (browsers
# resend in that case; python-requests doesn't). 0 keeps every connection: that shows the resets.
CLIENT_IDLE_SECONDS = _env_float("DRILL_CLIENT_IDLE_SECONDS", 1.5)
REQUEST_TIMEOUT = (5.0, 30.0)  # connect, read: a stalled answer counts as a timeout, never hangs a buyer
PAGE, X, Y = 1, 400.0, 80.0
OUTCOMES = ("stamped", "refunded", "refund_manual", "rejected", "expired")

# What this process saw; gevent runs one greenlet at a time, so plain counters are safe.
status_counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
unavailable_with_retry_after: dict[str, int] = defaultdict(int)
REQUEST_LOG = os.environ.get("DRILL_REQUEST_LOG", "").strip()
_request_log = open(f"{REQUEST_LOG}.{os.getpid()}", "a", buffering=1) if REQUEST_LOG else None
# A dependency that stays away this long makes a buyer give up the step (counted as a failure).
UNAVAILABLE_PATIENCE = _env_float("DRILL_UNAVAILABLE_PATIENCE_SECONDS", 120.0)
flows: dict[str, int] = defaultdict(int)
stamp_check_examples: list[str] = []
_addresses = itertools.count()
_started_at = time.time()


def _retry_after(response: Any, default: float = 2.0) -> float:
    """Seconds to wait before asking again: ``Retry-After`` is a minimum, and like a real client (and so
    that thousands of buyers told "2" don't come back in lockstep) we add up to a quarter on top."""
    try:
        seconds = max(0.5, float(response.headers.get("Retry-After", default)))
    except (TypeError, ValueError):
        seconds = default
    return seconds * random.uniform(1.0, 1.25)


def _come_back(response: Any) -> bool:
    """A 503 that says when to come back: a dependency briefly away, not a break."""
    return response.status_code == 503 and response.headers.get("Retry-After") is not None


def _json(response: Any) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _brief(response: Any) -> str:
    if not response.status_code:
        error = getattr(response, "error", None)
        return f"no HTTP answer: {type(error).__name__}: {error}"[:200]
    code = (_json(response).get("error") or {}).get("code", "")
    return f"HTTP {response.status_code}" + (f" {code}" if code else "")


class Buyer(HttpUser):
    """An applicant buying one e-Meterai after another."""

    wait_time = between(THINK_MIN, THINK_MAX)

    def on_start(self) -> None:
        n = next(_addresses)
        self.address = f"198.18.{(n // 250) % 256}.{n % 250 + 1}"
        self.document = make_pdf(PDF_BYTES)
        self.last_request_at = time.monotonic()
        self.unavailable_since: float | None = None

    def fresh_if_idle(self) -> None:
        """Called before each request: forget kept-alive connections idle past CLIENT_IDLE_SECONDS."""
        now = time.monotonic()
        if CLIENT_IDLE_SECONDS and now - self.last_request_at > CLIENT_IDLE_SECONDS:
            self.client.close()
            flows["idle_connections_dropped"] += 1
        self.last_request_at = now

    def unavailable_until(self) -> float:
        """Until when this step waits out 503s with Retry-After (from the first of a row of them)."""
        if self.unavailable_since is None:
            self.unavailable_since = time.monotonic()
        return self.unavailable_since + UNAVAILABLE_PATIENCE

    def context(self) -> dict[str, Any]:
        return {"buyer": self}  # so the request listener can note when this buyer's request ended

    # -- the purchase --------------------------------------------------------------------------
    @task
    def buy_a_stamp(self) -> None:
        flows["started"] += 1
        order = self.create_order()
        if order is None:
            return
        view = self.wait_for_status(order, ("awaiting_payment",) + OUTCOMES)
        if view is None:
            return
        if view["status"] != "awaiting_payment" or not view.get("payment"):
            flows[view["status"]] += 1
            return
        if not self.pay(view["payment"]["gateway_order_id"]):
            return
        view = self.wait_for_status(order, OUTCOMES)
        if view is None:
            return
        if view["status"] != "stamped":
            flows[view["status"]] += 1
            return
        self.download_and_check(order, view.get("serial", ""))

    def create_order(self) -> dict[str, Any] | None:
        """POST the order; wait in the queue or out a rate limit as told. None if the buyer gave up."""
        key = uuid.uuid4().hex
        admission_token: str | None = None
        give_up_at = time.monotonic() + QUEUE_PATIENCE
        self.unavailable_since = None
        while time.monotonic() < give_up_at:
            headers = {"Idempotency-Key": key, "X-Forwarded-For": self.address}
            if admission_token:
                headers["Admission-Token"] = admission_token
            self.fresh_if_idle()
            with self.client.post(
                "/api/v1/orders", name=CREATE, headers=headers, catch_response=True, timeout=REQUEST_TIMEOUT,
                data={"page": str(PAGE), "x": str(X), "y": str(Y), "email": f"pelamar-{key[:8]}@example.id"},
                files={"document": ("surat-pernyataan.pdf", self.document, "application/pdf")},
            ) as response:
                if response.status_code in (200, 202):
                    response.success()
                    return _json(response)
                if response.status_code == 429:
                    response.success()  # the waiting room or the rate limit at work: not a failure
                    queue = _json(response).get("queue")
                    if queue and queue.get("ticket"):
                        flows["queued"] += 1
                        admission_token = self.wait_in_queue(queue["ticket"], _retry_after(response), give_up_at)
                        if admission_token is None:
                            return None
                    else:
                        flows["rate_limited"] += 1
                        time.sleep(_retry_after(response))
                    continue
                if _come_back(response) and time.monotonic() < self.unavailable_until():
                    response.success()  # counted by status all the same
                    flows["unavailable_waited"] += 1
                    time.sleep(_retry_after(response))
                    continue
                response.failure(_brief(response))
                if response.status_code in (403, 409, 410) and admission_token:
                    admission_token = None  # token refused: queue again
                    continue
                return None
        flows["gave_up_queueing"] += 1
        return None

    def wait_in_queue(self, ticket: str, first_wait: float, give_up_at: float) -> str | None:
        wait = first_wait
        while time.monotonic() < give_up_at:
            # Far back in line Retry-After is up to two minutes: sleep at most until giving up, then ask a
            # last time (an admission granted meanwhile would otherwise hold an active slot, unused).
            time.sleep(max(0.0, min(wait, give_up_at - time.monotonic())))
            self.fresh_if_idle()
            with self.client.get(f"/api/v1/queue/{ticket}", name=QUEUE, catch_response=True,
                                 timeout=REQUEST_TIMEOUT) as response:
                if _come_back(response) and time.monotonic() < self.unavailable_until():
                    response.success()
                    wait = _retry_after(response)
                    continue
                if response.status_code != 200:
                    response.failure(_brief(response))
                    return None
                self.unavailable_since = None
                body = _json(response)
                if body.get("admitted") and body.get("admission_token"):
                    flows["admitted_from_queue"] += 1
                    return str(body["admission_token"])
                wait = _retry_after(response)
        flows["gave_up_queueing"] += 1
        return None

    def wait_for_status(self, order: dict[str, Any], wanted: tuple[str, ...]) -> dict[str, Any] | None:
        """Poll the order until its status is one of ``wanted``; None on a failed poll or after the timeout."""
        deadline = time.monotonic() + STEP_TIMEOUT
        headers = {"Authorization": f"Bearer {order['access_token']}"}
        while True:
            self.fresh_if_idle()
            with self.client.get(f"/api/v1/orders/{order['order_id']}", name=STATUS, headers=headers,
                                 catch_response=True, timeout=REQUEST_TIMEOUT) as response:
                if _come_back(response) and time.monotonic() < self.unavailable_until():
                    response.success()
                    time.sleep(_retry_after(response))
                    continue
                if response.status_code != 200:
                    response.failure(_brief(response))
                    return None
                self.unavailable_since = None
                view = _json(response)
            if view.get("status") in wanted:
                return view
            if time.monotonic() > deadline:
                flows["timeouts"] += 1
                events.request.fire(request_type="FLOW", name=f"timeout waiting for {'/'.join(wanted[:1])}",
                                    response_time=STEP_TIMEOUT * 1000, response_length=0,
                                    exception=TimeoutError(f"order still {view.get('status')}"), context={})
                return None
            time.sleep(POLL_SECONDS)

    def pay(self, gateway_order_id: str) -> bool:
        """Press "Bayar"; a buyer whose press met an error presses again (twice more, a few seconds apart)."""
        for attempt in range(3):
            self.fresh_if_idle()
            with self.client.post(f"{GATEWAY_URL}/sandbox/pay/{gateway_order_id}", name=PAY,
                                  json={"payment_type": PAYMENT_TYPE}, catch_response=True,
                                  timeout=REQUEST_TIMEOUT) as response:
                if response.status_code == 200:
                    response.success()
                    flows["paid"] += 1
                    return True
                response.failure(_brief(response))
                if response.status_code and response.status_code < 500:
                    return False
            time.sleep(3.0)
        return False

    def download_and_check(self, order: dict[str, Any], serial: str) -> None:
        headers = {"Authorization": f"Bearer {order['access_token']}"}
        self.unavailable_since = None
        while True:
            self.fresh_if_idle()
            with self.client.get(f"/api/v1/orders/{order['order_id']}/document", name=DOWNLOAD, headers=headers,
                                 catch_response=True, timeout=REQUEST_TIMEOUT) as response:
                if _come_back(response) and time.monotonic() < self.unavailable_until():
                    response.success()
                    time.sleep(_retry_after(response))
                    continue
                if response.status_code != 200:
                    response.failure(_brief(response))
                    return
                content = response.content
                break
        started = time.perf_counter()
        problem = stamp_problem(content, serial, PAGE)
        elapsed_ms = (time.perf_counter() - started) * 1000
        if problem:
            flows["stamp_check_failed"] += 1
            if len(stamp_check_examples) < 10:
                stamp_check_examples.append(f"order {order['order_id']}: {problem}")
        else:
            flows["completed"] += 1
        events.request.fire(request_type="CHECK", name=STAMP_CHECK, response_time=elapsed_ms,
                            response_length=len(content), exception=AssertionError(problem) if problem else None,
                            context={})


# -- what the run saw, for the SLO gate -------------------------------------------------------------

@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    parser.add_argument("--summary-json", default="", help="write the drill summary (for the SLO gate) here")


@events.request.add_listener
def _count_status(request_type: str, name: str, response: Any = None, exception: Any = None,
                  context: Any = None, **_: Any) -> None:
    buyer = (context or {}).get("buyer")
    if buyer is not None:
        buyer.last_request_at = time.monotonic()
    if response is None:
        return  # our own FLOW/CHECK events, not HTTP
    status = getattr(response, "status_code", 0) or 0
    status_counts[name][str(status)] += 1
    retry_after = status == 503 and response.headers.get("Retry-After") is not None
    if retry_after:
        unavailable_with_retry_after[name] += 1
    if _request_log is not None:
        record = {"end": round(time.time(), 3), "ms": round(float(_.get("response_time") or 0)), "name": name,
                  "status": status, "retry_after": retry_after}
        if name == CREATE and 200 <= status < 300:
            record["order_id"] = _json(response).get("order_id")
        _request_log.write(json.dumps(record) + "\n")


def summary(environment: Any) -> dict[str, Any]:
    endpoints: dict[str, Any] = {}
    for (name, method), entry in environment.stats.entries.items():
        if method in ("FLOW", "CHECK"):
            continue
        endpoints[name] = {
            "requests": entry.num_requests,
            "failures": entry.num_failures,
            "status_counts": dict(status_counts.get(name, {})),
            "unavailable_with_retry_after": unavailable_with_retry_after.get(name, 0),
            "p50_ms": entry.get_response_time_percentile(0.50) or 0.0,
            "p95_ms": entry.get_response_time_percentile(0.95) or 0.0,
            "p99_ms": entry.get_response_time_percentile(0.99) or 0.0,
            "max_ms": entry.max_response_time or 0.0,
        }
    return {
        "endpoints": endpoints,
        "flows_started": flows["started"],
        "flows_completed": flows["completed"],
        "flows_refunded": flows["refunded"] + flows["refund_manual"],
        "flows_rejected": flows["rejected"],
        "flow_timeouts": flows["timeouts"],
        "stamp_checks_failed": flows["stamp_check_failed"],
        "stamp_check_examples": list(stamp_check_examples),
        "duration_seconds": round(time.time() - _started_at, 1),
        "flows": dict(flows),
    }


def _write_summary(environment: Any) -> None:
    path = getattr(environment.parsed_options, "summary_json", "") if environment.parsed_options else ""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary(environment), indent=2, sort_keys=True))


@events.test_stop.add_listener
def _on_stop(environment: Any, **_: Any) -> None:
    _write_summary(environment)


@events.quitting.add_listener
def _on_quit(environment: Any, **_: Any) -> None:
    _write_summary(environment)
