"""Benchmark: create-order under overload, relative to the waiting room's configured outflow.

    .venv/bin/python -m loadtests.bench.overload        # about 3 minutes

Targets (docs/benchmarks.md):

* the p99 latency of create-order at 3× the outflow is at most 2× its p99 at half the outflow;
* at 10× the outflow there are no 5xx answers and no timeouts or connection errors: the excess is
  answered 429 with a queue ticket, fast.

"Load" is new buyers per second against the waiting room's outflow (``ADMISSION_PER_MINUTE``, 600 by
default here: the product's own floor, 10 admissions a second). Arrivals are open-loop (Poisson, seeded):
buyers keep arriving whatever the server does, as they do before a deadline. Each buyer behaves as the
API asks: a 429 with a ticket makes it poll ``GET /api/v1/queue/{ticket}`` no sooner than
``Retry-After`` (plus jitter) and, once admitted, repeat the create with ``Admission-Token``; a plain
429 (rate limit) is retried after ``Retry-After``. Every create-order request counts toward its phase's
p99: direct admissions, 429 tickets and token creates alike. Latency is measured from when the
request was sent; how late the generator sent it is reported separately (client lag), so a busy client
can't pass for a slow server. Each phase starts with an empty waiting room.

Only the web runs (gunicorn as in the Procfile, with PostgreSQL and Redis): the front end is what is
measured, and in production workers run on other machines. Uploads are the 200 KB PDF.

``--through both`` runs every phase twice on the same gunicorn in the same run, back to back: straight to
it (the baseline), then through the private nginx rendered from ``deploy/nginx/meterai.conf``
(:mod:`shared.devtools.proxy`), and reports proxied/direct ratios: gunicorn CPU per request (at 10x almost
all 429s, whose 200 KB body nginx has read before gunicorn sees the request), nginx's own CPU, and the
p99 of admitted buyers. nginx is told to trust the load generator's X-Forwarded-For (``set_real_ip_from``,
as production would behind a load balancer), so each simulated buyer is still a client of its own.
"""
from __future__ import annotations

import argparse
import heapq
import os
import itertools
import json
import random
import sys
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from loadtests.documents import make_pdf
from loadtests.bench.loadgen import Answer, HttpClient, multipart, percentile
from loadtests.stack import REPORTS, CpuMeter, Stack, gunicorn_flags, postgres_backend_pids, say, workdir_for
from shared.devtools.proxy import start_nginx

TARGET_P99_RATIO = 2.0
FIELDS = {"page": "1", "x": "400", "y": "80", "email": "pelamar@example.id"}


@dataclass
class Buyer:
    number: int
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    token: str | None = None
    ticket: str | None = None

    @property
    def address(self) -> str:
        return f"198.18.{(self.number // 250) % 256}.{self.number % 250 + 1}"


@dataclass
class Sample:
    kind: str        # create / queue
    outcome: str     # 202, 429-queued, 429-limited, 5xx, error, ...
    status: int
    seconds: float
    lag: float
    token: bool = False


class Phase:
    """One open-loop run: arrivals at ``rate``/s for ``seconds``, with buyers following up as told."""

    def __init__(self, base_url: str, body: bytes, content_type: str, rate: float, seconds: float, seed: int,
                 threads: int = 256) -> None:
        self.base_url, self.body, self.content_type = base_url, body, content_type
        self.rate, self.seconds = rate, seconds
        self.random = random.Random(seed)
        self.samples: list[Sample] = []
        self.lock = threading.Lock()
        self.heap: list[tuple[float, int, str, Buyer]] = []
        self.sequence = itertools.count()
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="buyer")
        self.counts: dict[str, int] = defaultdict(int)
        self.clients: list[HttpClient] = []

    def client(self) -> HttpClient:
        if not hasattr(self.local, "client"):
            self.local.client = HttpClient(self.base_url, timeout=10.0)
            with self.lock:
                self.clients.append(self.local.client)
        return self.local.client

    def connection_closes(self) -> dict[str, int]:
        """How often the server closed a kept-alive connection after answering (seen before reuse, or by a
        request that then had to be resent)."""
        return {"seen_closed_before_reuse": sum(c.dropped_by_server for c in self.clients),
                "resent_after_close": sum(c.resent for c in self.clients)}

    def schedule(self, at: float, job: str, buyer: Buyer) -> None:
        if at < self.end:
            with self.lock:
                heapq.heappush(self.heap, (at, next(self.sequence), job, buyer))

    def run(self) -> list[Sample]:
        self.start = time.monotonic()
        self.end = self.start + self.seconds
        t, number = self.start, 0
        while True:  # Poisson arrivals over the phase
            t += self.random.expovariate(self.rate)
            if t >= self.end:
                break
            self.schedule(t, "create", Buyer(number))
            number += 1
        self.counts["buyers"] = number
        while True:
            with self.lock:
                due = self.heap[0] if self.heap else None
            now = time.monotonic()
            if due is None and now >= self.end:
                break
            if due is None or due[0] > now:
                time.sleep(min(0.002, max(0.0, (due[0] - now) if due else 0.01)))
                if now >= self.end + 0.5:
                    break
                continue
            with self.lock:
                at, _, job, buyer = heapq.heappop(self.heap)
            self.pool.submit(self.job, job, buyer, at)
        self.pool.shutdown(wait=True)
        return self.samples

    def job(self, job: str, buyer: Buyer, due: float) -> None:
        lag = time.monotonic() - due
        if job == "create":
            self.create(buyer, lag)
        else:
            self.poll(buyer, lag)

    def _retry_after(self, answer: Answer) -> float:
        try:
            seconds = float(answer.headers.get("retry-after", "2"))
        except ValueError:
            seconds = 2.0
        return seconds * self.random.uniform(1.0, 1.25)

    def record(self, sample: Sample) -> None:
        with self.lock:
            self.samples.append(sample)

    def create(self, buyer: Buyer, lag: float) -> None:
        headers = {"Content-Type": self.content_type, "Idempotency-Key": buyer.key, "X-Forwarded-For": buyer.address}
        if buyer.token:
            headers["Admission-Token"] = buyer.token
        answer = self.client().request("POST", "/api/v1/orders", self.body, headers)
        outcome = _outcome(answer)
        self.record(Sample("create", outcome, answer.status, answer.seconds, lag, token=bool(buyer.token)))
        if outcome == "429-queued":
            buyer.ticket = answer.json()["queue"]["ticket"]
            self.schedule(time.monotonic() + self._retry_after(answer), "poll", buyer)
        elif outcome == "429-limited":
            self.schedule(time.monotonic() + self._retry_after(answer), "create", buyer)

    def poll(self, buyer: Buyer, lag: float) -> None:
        answer = self.client().request("GET", f"/api/v1/queue/{buyer.ticket}", headers={"X-Forwarded-For": buyer.address})
        self.record(Sample("queue", _outcome(answer), answer.status, answer.seconds, lag))
        if answer.status != 200:
            return
        body = answer.json()
        if body.get("admitted") and body.get("admission_token"):
            buyer.token = body["admission_token"]
            self.schedule(time.monotonic(), "create", buyer)
        else:
            self.schedule(time.monotonic() + self._retry_after(answer), "poll", buyer)


def _outcome(answer: Answer) -> str:
    if answer.status == 0:
        kind = answer.error.split(":", 1)[0]
        return "timeout" if "timed out" in answer.error.lower() else f"connection-error ({kind})"
    if answer.status >= 500:
        return "5xx"
    if answer.status == 429:
        return "429-queued" if "queue" in answer.json() else "429-limited"
    return str(answer.status)


def summarise(name: str, factor: float, rate: float, samples: list[Sample], cpu: dict[str, float],
              seconds: float) -> dict:
    creates = [s for s in samples if s.kind == "create"]
    polls = [s for s in samples if s.kind == "queue"]
    by_outcome: dict[str, int] = defaultdict(int)
    for s in samples:
        by_outcome[f"{s.kind} {s.outcome}"] += 1

    def ms(values: list[float], q: float) -> float:
        return 1000 * percentile(values, q)

    admitted = [s.seconds for s in creates if s.outcome in ("202", "200")]
    queued = [s.seconds for s in creates if s.outcome == "429-queued"]
    return {
        "phase": name, "factor": factor, "arrivals_per_second": rate, "seconds": seconds,
        "creates": len(creates), "create_p50_ms": ms([s.seconds for s in creates], 0.50),
        "create_p99_ms": ms([s.seconds for s in creates], 0.99),
        "admitted": len(admitted), "admitted_p99_ms": ms(admitted, 0.99),
        "queued": len(queued), "queued_p99_ms": ms(queued, 0.99),
        "queue_polls": len(polls), "queue_poll_p99_ms": ms([s.seconds for s in polls], 0.99),
        "server_errors": sum(1 for s in samples if s.outcome == "5xx"),
        "timeouts_or_connection_errors": sum(1 for s in samples if s.status == 0),
        "client_lag_p99_ms": ms([s.lag for s in samples], 0.99),
        "outcomes": dict(by_outcome), "cpu_seconds": cpu,
        "cpu_ms_per_request": {group: 1000 * seconds / max(len(samples), 1) for group, seconds in cpu.items()},
    }


def reset_waiting_room(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    for pattern in ("meterai:adm:*", "meterai:rl:*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)


def drained_web():
    """EXPERIMENT for ``--variant drained``, not the product: our app, except that before a 429 goes out
    the unread upload is read off the socket in 64 KiB chunks. gunicorn then keeps the connection alive
    instead of draining 64 KiB in 1 KiB reads and closing it. Served by gunicorn with the Procfile's flags
    as ``loadtests.bench.overload:drained_web()``, to measure what that change to web/api.py would buy."""
    from web import create_app

    app = create_app()
    inner = app.wsgi_app

    def wsgi(environ, start_response):
        seen = {}

        def remember(status, headers, exc_info=None):
            seen["status"] = status
            return start_response(status, headers, exc_info)

        result = inner(environ, remember)
        if seen.get("status", "").startswith("429"):
            stream = environ["wsgi.input"]
            while stream.read(65536):
                pass
        return result

    app.wsgi_app = wsgi
    return app


PHASES = ("warm-up", "half load", "3x overload", "10x overload")


def run_phases(stack: Stack, targets: dict[str, tuple[str, dict]], body: bytes, content_type: str,
               args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every phase against each target (name: base URL and CPU groups), the targets one after the other
    within each phase so they meet the same machine; the summaries of all but the warm-up, per target."""
    outflow = args.outflow_per_minute / 60.0
    phases = [("warm-up", 0.5, 5.0), ("half load", 0.5, args.half_seconds), ("3x overload", 3.0, args.seconds),
              ("10x overload", 10.0, args.seconds)]
    results: dict[str, list[dict]] = {target: [] for target in targets}
    for number, (name, factor, seconds) in enumerate(phases):
        for target, (base_url, cpu_groups) in targets.items():
            reset_waiting_room(stack.redis_url)
            rate = factor * outflow
            say(f"{name} ({target}): {rate:.1f} new buyers/s for {seconds:.0f} s (outflow {outflow:.1f}/s) at {base_url}")
            meter = CpuMeter(cpu_groups)
            meter.start()
            phase = Phase(base_url, body, content_type, rate, seconds, args.seed + number)
            samples = phase.run()
            summary = summarise(name, factor, rate, samples, meter.stop(), seconds)
            summary["server_closed_keepalive"] = phase.connection_closes()
            say(f"  creates {summary['creates']} (202: {summary['admitted']}, 429 ticket: {summary['queued']}),"
                f" p50 {summary['create_p50_ms']:.0f} ms, p99 {summary['create_p99_ms']:.0f} ms;"
                f" queue polls {summary['queue_polls']}; 5xx {summary['server_errors']};"
                f" timeouts/conn errors {summary['timeouts_or_connection_errors']};"
                f" client lag p99 {summary['client_lag_p99_ms']:.0f} ms;"
                f" kept-alive connections closed by the server: {summary['server_closed_keepalive']}")
            if name != "warm-up":
                results[target].append(summary)
    return results


def checks_for(results: list[dict], path: str) -> list[dict]:
    half, three, ten = results
    ratio = three["create_p99_ms"] / max(half["create_p99_ms"], 1e-9)
    return [
        {"path": path, "target": "p99 create-order at 3x <= 2x p99 at half load", "value": ratio,
         "met": ratio <= TARGET_P99_RATIO},
        {"path": path, "target": "no 5xx at 10x", "value": ten["server_errors"], "met": ten["server_errors"] == 0},
        {"path": path, "target": "no timeouts or connection errors at 10x", "value": ten["timeouts_or_connection_errors"],
         "met": ten["timeouts_or_connection_errors"] == 0},
    ]


def print_results(results: list[dict], checks: list[dict], path: str) -> None:
    half, three, ten = results
    print()
    print(f"{path}:")
    print(f"{'phase':<14} {'buyers/s':>8} {'creates':>8} {'202':>6} {'429':>6} {'p50 ms':>7} {'p99 ms':>7}"
          f" {'202 p99':>8} {'429 p99':>8} {'polls':>6} {'5xx':>4} {'t/o':>4} {'lag p99':>8} {'gunicorn ms/req':>16}"
          f" {'nginx ms/req':>13}")
    for r in results:
        per = r["cpu_ms_per_request"]
        print(f"{r['phase']:<14} {r['arrivals_per_second']:>8.1f} {r['creates']:>8} {r['admitted']:>6} {r['queued']:>6}"
              f" {r['create_p50_ms']:>7.0f} {r['create_p99_ms']:>7.0f} {r['admitted_p99_ms']:>8.0f}"
              f" {r['queued_p99_ms']:>8.0f} {r['queue_polls']:>6} {r['server_errors']:>4}"
              f" {r['timeouts_or_connection_errors']:>4} {r['client_lag_p99_ms']:>8.0f}"
              f" {per.get('gunicorn', 0):>16.2f} {per.get('nginx', 0):>13.2f}")
    ratio = checks[0]["value"]
    print(f"p99 create-order 3x / half load = {three['create_p99_ms']:.0f} / {half['create_p99_ms']:.0f} ms"
          f" = {ratio:.2f}   target ≤ {TARGET_P99_RATIO}   {'MET' if checks[0]['met'] else 'MISSED'}")
    print(f"10x overload: {ten['server_errors']} 5xx, {ten['timeouts_or_connection_errors']} timeouts/connection"
          f" errors   target 0 and 0   {'MET' if checks[1]['met'] and checks[2]['met'] else 'MISSED'}")


def proxy_ratios(direct: list[dict], proxied: list[dict]) -> list[dict]:
    """Proxied over direct, per phase: what putting nginx in front changes."""
    rows = []
    for d, p in zip(direct, proxied):
        rows.append({
            "phase": d["phase"],
            "gunicorn_cpu_per_request": p["cpu_ms_per_request"]["gunicorn"] / max(d["cpu_ms_per_request"]["gunicorn"], 1e-9),
            "gunicorn_plus_nginx_cpu_per_request": (p["cpu_ms_per_request"]["gunicorn"] + p["cpu_ms_per_request"].get("nginx", 0))
            / max(d["cpu_ms_per_request"]["gunicorn"], 1e-9),
            "admitted_p99": p["admitted_p99_ms"] / max(d["admitted_p99_ms"], 1e-9),
            "create_p99": p["create_p99_ms"] / max(d["create_p99_ms"], 1e-9),
            "queued_p99": p["queued_p99_ms"] / max(d["queued_p99_ms"], 1e-9),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--outflow-per-minute", type=int, default=600)
    parser.add_argument("--half-seconds", type=float, default=60.0, help="length of the half-load phase")
    parser.add_argument("--seconds", type=float, default=40.0, help="length of the 3x and 10x phases")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--variant", choices=["product", "drained"], default="product",
                        help="drained: an experiment that reads the unread upload before answering 429")
    parser.add_argument("--through", choices=["direct", "proxy", "both"], default="direct",
                        help="straight to gunicorn, through the private nginx, or both in turn (ratios)")
    parser.add_argument("--proxy-workers", type=int, default=1, help="nginx worker processes")
    args = parser.parse_args(argv)
    workdir = workdir_for("bench-overload")
    body, content_type = multipart(FIELDS, {"document": ("surat.pdf", make_pdf(200_000), "application/pdf")})
    with Stack(workdir, label="bench_overload") as stack:
        overrides = {"ADMISSION_PER_MINUTE": str(args.outflow_per_minute), "PROXY_HOPS": "1"}
        if args.variant == "product":
            stack.start_procfile(["web"], overrides=overrides)
        else:
            stack.start("web", f"gunicorn --bind 127.0.0.1:{stack.web_port} {' '.join(gunicorn_flags())}"
                        " 'loadtests.bench.overload:drained_web()'", stack.env(overrides))
        stack.wait_ready()
        cpu_groups = {"gunicorn": lambda: stack.process_pids("web"), "load generator": lambda: [os.getpid()],
                      "postgres": lambda: postgres_backend_pids(stack.database_url),
                      "redis": lambda: stack.redis_pids}
        targets: dict[str, tuple[str, dict]] = {}
        if args.through in ("direct", "both"):
            targets["direct"] = (f"http://127.0.0.1:{stack.web_port}", cpu_groups)
        proxy = None
        if args.through in ("proxy", "both"):
            proxy = start_nginx(workdir / "nginx", [f"127.0.0.1:{stack.web_port}"], trust_forwarded_from="127.0.0.1",
                                workers=args.proxy_workers)
            targets["proxy"] = (proxy.url, {**cpu_groups, "nginx": proxy.pids})
        try:
            runs = run_phases(stack, targets, body, content_type, args)
        finally:
            if proxy is not None:
                proxy.stop()
    checks = [check for path, results in runs.items() for check in checks_for(results, path)]
    for path, results in runs.items():
        print_results(results, [c for c in checks if c["path"] == path], path)
    ratios = proxy_ratios(runs["direct"], runs["proxy"]) if len(runs) == 2 else []
    if ratios:
        print()
        print("proxied / direct:")
        print(f"{'phase':<14} {'gunicorn CPU/req':>17} {'gunicorn+nginx CPU/req':>23} {'202 p99':>8} {'create p99':>11}"
              f" {'429 p99':>8}")
        for r in ratios:
            print(f"{r['phase']:<14} {r['gunicorn_cpu_per_request']:>17.2f} {r['gunicorn_plus_nginx_cpu_per_request']:>23.2f}"
                  f" {r['admitted_p99']:>8.2f} {r['create_p99']:>11.2f} {r['queued_p99']:>8.2f}")
    out = {"benchmark": "overload", "variant": args.variant, "through": args.through,
           "command": "python -m loadtests.bench.overload " + " ".join(sys.argv[1:]),
           "when": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": vars(args),
           "phases": runs.get("direct") or runs["proxy"], "runs": runs, "proxy_ratios": ratios, "checks": checks}
    (workdir / "result.json").write_text(json.dumps(out, indent=2))
    (REPORTS / "bench").mkdir(parents=True, exist_ok=True)
    name = "overload" + ("" if args.variant == "product" else f"-{args.variant}") + \
        ("" if args.through == "direct" else f"-{args.through}")
    (REPORTS / "bench" / f"{name}.json").write_text(json.dumps(out, indent=2))
    print(f"details: {workdir / 'result.json'}")
    return 0 if all(c["met"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
