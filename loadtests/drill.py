"""One command for a surge drill: bring the system up, run Locust headless, drain, gate, tear down.

    .venv/bin/python -m loadtests.drill --profile short     # about 2 minutes, the deadline spike
    .venv/bin/python -m loadtests.drill --profile full      # about 11 minutes (make drill-full)
    .venv/bin/python -m loadtests.drill --profile short --shape steady
    .venv/bin/python -m loadtests.drill --profile multi     # about 3 minutes: many nodes, two killed
    .venv/bin/python -m loadtests.drill --profile failover  # about 5 minutes: each dependency lost in turn

What it does, in order:

1. a fresh database on the configured PostgreSQL (or a private one), migrations applied; a private Redis;
2. every ``Procfile`` process (gunicorn web, the Celery workers, beat) and the stand-in gateway of
   ``Procfile.dev``, with drill settings: the waiting room's outflow set from this machine's measured
   stamping capacity, per-client limits keyed on the buyer's forwarded address (``PROXY_HOPS=1``), the
   profile's gateway faults;
3. Locust headless with the profile's load shape (:mod:`loadtests.shapes`) and the virtual buyer of
   :mod:`loadtests.locustfile`, writing CSV and HTML into ``reports/drill-<profile>-<time>/``;
4. a drain window: waits until every paid order is stamped or refunded (bounded);
5. the SLO gate (:mod:`loadtests.slo`): no 5xx, no connection errors, p95 of create-order and status
   under the thresholds, downloads verified, and the invariants queried from the database;
6. stops everything it started and drops the database (``--keep-database`` keeps it).

Throughout the run and the drain it scrapes the system's own metrics every ~10 s, as Prometheus would
(every web node's ``/metrics`` with the stack's ``OPS_TOKEN``, every worker node's ``METRICS_PORT``), and
keeps a few key series in ``metrics.jsonl`` beside gate.json, summarised in gate.json's ``metrics``
(:mod:`loadtests.scrapes`).

``--profile multi`` runs the same spike, gate and audit against the system laid out as on many machines
(:mod:`loadtests.multinode`): two web nodes behind the private nginx, two stamping nodes, every other worker
group and one beat, each a process group with its own ``DATA_DIR`` and no shared folder (documents only
in the S3 store, the signing files made once and handed to every node by path); mid-run it SIGKILLs one
web node and one stamping node, brings them back, and the report says when (``timeline`` in gate.json)
and how many requests the proxy carried over to the other web node.

``--profile failover`` runs the spike, held longer, against the system on its production arrangement of
dependencies (:mod:`loadtests.failover`: PostgreSQL behind PgBouncer, Redis through Sentinel, documents
on SeaweedFS) and loses each in turn mid-surge: the Redis primary SIGKILLed, PostgreSQL restarted,
PgBouncer restarted, the document store away for 30 s. Its gate allows buyers a 503 with ``Retry-After``
and nothing else of 5xx, checks that every order answered 202 is in the database and none was stamped,
given a serial or refunded twice, and every fault was done and undone; ``failover`` in gate.json has the
timeline, each status counted per request, and how long each loss kept new orders from being accepted.

Exit code: 0 when the gate passes, 1 when it fails, 2 when the drill could not run (e.g. Locust is not
installed: ``pip install -e '.[load]'``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from loadtests.failover import FailoverPlan
from loadtests.multinode import Chaos, MultiNode

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Profile:
    name: str
    shape: str
    shape_params: dict[str, Any]
    steady_params: dict[str, Any]
    # Settings for every process of the system under drill (on top of the stack's own).
    settings: dict[str, str]
    # JSON knobs for the stand-in gateway's /sandbox/faults, set before the run.
    faults: dict[str, Any] = field(default_factory=dict)
    think_seconds: str = "2,6"
    drain_window_seconds: float = 60.0
    p95_create_ms: float = 1500.0
    p95_status_ms: float = 1000.0
    multi: MultiNode | None = None
    failover: FailoverPlan | None = None

    def params_for(self, shape: str) -> dict[str, Any]:
        return self.shape_params if shape == "spike" else self.steady_params


# The waiting room's outflow is set below what this 2-core machine stamps end to end while it also runs
# Locust, PostgreSQL and Redis (docs/benchmarks.md, "Surge drills"), so 90/min leaves headroom. The
# spike's peak is many times that: each buyer who is not waiting in line asks for a new order every
# few seconds.
_SYSTEM = {
    "ADMISSION_PER_MINUTE": "90",
    "ADMISSION_BURST": "10",
    "PROXY_HOPS": "1",
}

PROFILES: dict[str, Profile] = {
    "short": Profile(
        name="short",
        shape="spike",
        shape_params={"quiet_users": 3, "quiet_seconds": 10, "peak_users": 100, "ramp_seconds": 30,
                      "hold_seconds": 40, "drain_seconds": 10},
        steady_params={"users": 12, "ramp_seconds": 10, "hold_seconds": 70, "drain_seconds": 10},
        settings=dict(_SYSTEM),
        faults={"duplicate_notifications": 1},
        drain_window_seconds=45.0,
    ),
    "full": Profile(
        name="full",
        shape="spike",
        shape_params={"quiet_users": 5, "quiet_seconds": 60, "peak_users": 300, "ramp_seconds": 60,
                      "hold_seconds": 420, "drain_seconds": 60},
        steady_params={"users": 15, "ramp_seconds": 30, "hold_seconds": 540, "drain_seconds": 30},
        settings=dict(_SYSTEM),
        # A gateway having a bad day: slow and sometimes failing checkouts and status queries (retried
        # with backoff), every notification twice and out of step.
        faults={"duplicate_notifications": 1, "notification_jitter_ms": 300, "latency_ms": 50,
                "error_rate": 0.02, "endpoints": ["create", "status"]},
        drain_window_seconds=180.0,
    ),
    # Many nodes on this one 2-core box: twice the web and stamping processes of the short drill, the
    # same outflow and a slightly lower peak (the extra processes cost memory and some CPU). The buyers
    # send their own X-Forwarded-For (an address of 198.18.0.0/15) as if a CDN stood in front of nginx at
    # 127.0.0.1; nginx believes that front (set_real_ip_from) and sends the web nodes one address: one
    # hop, as in production. A killed stamping node leaves its claimed orders under a lease
    # until the lease runs out; the drill shortens the lease (above the task time limit, as the settings
    # insist) and runs the redrive every 10 s, so its work is taken over within the drill, not an hour
    # later. Production keeps the defaults: a lost node's orders wait at most the lease (3 minutes).
    "multi": Profile(
        name="multi",
        shape="spike",
        shape_params={"quiet_users": 3, "quiet_seconds": 10, "peak_users": 80, "ramp_seconds": 30,
                      "hold_seconds": 110, "drain_seconds": 10},
        steady_params={"users": 12, "ramp_seconds": 10, "hold_seconds": 140, "drain_seconds": 10},
        settings={**_SYSTEM, "TASK_TIME_LIMIT_SECONDS": "30", "LEASE_SECONDS": "40",
                  "PREFLIGHT_TIMEOUT_SECONDS": "15", "REDRIVE_INTERVAL_SECONDS": "10",
                  "REDRIVE_GRACE_SECONDS": "10", "SWEEP_INTERVAL_SECONDS": "10"},
        faults={"duplicate_notifications": 1},
        drain_window_seconds=120.0,
        multi=MultiNode(),
    ),
    # The short spike held long enough for four losses 35 s apart, each after the last has recovered.
    # Work that met a dependency away is retried with backoff or found again by the redrive and the
    # payment watch: the drill runs them every 10 s and caps the backoff at 30 s, so it all ends within
    # the drain, not an hour later (production keeps the defaults).
    "failover": Profile(
        name="failover",
        shape="spike",
        shape_params={"quiet_users": 3, "quiet_seconds": 10, "peak_users": 100, "ramp_seconds": 30,
                      "hold_seconds": 170, "drain_seconds": 10},
        steady_params={"users": 12, "ramp_seconds": 10, "hold_seconds": 200, "drain_seconds": 10},
        settings={**_SYSTEM, "TASK_TIME_LIMIT_SECONDS": "30", "LEASE_SECONDS": "40",
                  "PREFLIGHT_TIMEOUT_SECONDS": "15", "REDRIVE_INTERVAL_SECONDS": "10",
                  "REDRIVE_GRACE_SECONDS": "10", "SWEEP_INTERVAL_SECONDS": "10", "RETRY_MAX_SECONDS": "30",
                  "RECONCILE_AFTER_SECONDS": "30", "RECONCILE_INTERVAL_SECONDS": "10"},
        faults={"duplicate_notifications": 1},
        drain_window_seconds=150.0,
        failover=FailoverPlan(first_at=45.0, spacing=35.0, store_down_seconds=30.0, revive_after=15.0),
    ),
}


def _locust_missing() -> bool:
    return importlib.util.find_spec("locust") is None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.drill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="short")
    parser.add_argument("--shape", choices=["spike", "steady"], default=None,
                        help="load shape (default: the profile's, the deadline spike)")
    parser.add_argument("--p95-create-ms", type=float, default=None, help="gate: p95 of create-order")
    parser.add_argument("--p95-status-ms", type=float, default=None, help="gate: p95 of order-status polls")
    parser.add_argument("--drain-seconds", type=float, default=None, help="longest wait for paid work to finish")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="extra setting for the system under drill, e.g. --set ADMISSION_PER_MINUTE=60")
    parser.add_argument("--pgbouncer", action="append", default=[], metavar="NAME=VALUE",
                        help="failover profile: a setting added to the private PgBouncer's")
    parser.add_argument("--faults", default=None, help="JSON for the stand-in gateway's /sandbox/faults")
    parser.add_argument("--report-dir", type=Path, default=None, help="default: reports/drill-<profile>-<time>")
    parser.add_argument("--keep-database", action="store_true", help="don't drop the drill's database")
    return parser.parse_args(argv)


def _counts(database_url: str) -> str:
    import psycopg

    try:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=3) as conn:
            rows = conn.execute("SELECT status, count(*) FROM orders GROUP BY status ORDER BY status").fetchall()
    except psycopg.Error:
        return "(database busy)"
    return " ".join(f"{s}={n}" for s, n in rows) or "no orders yet"


def _queue_length(stack: Any) -> int | None:
    import redis

    try:
        tail, head = stack.redis_client().mget("meterai:adm:tail", "meterai:adm:head")
        return int(tail or 0) - int(head or 0)
    except (redis.RedisError, ValueError):
        return None


def run_locust(stack: Any, profile: Profile, shape: str, params: Any, report: Path,
               on_tick: Callable[[float], set[str]] | None = None) -> int:
    """Locust headless with the chosen shape; bounded by the shape's length plus a margin. ``on_tick``
    is called with the seconds elapsed about every half second and returns the processes that are down
    on purpose right now (a process that died otherwise stops the run)."""
    from loadtests import shapes
    from loadtests.stack import say

    env = stack.env({
        "DRILL_REQUEST_LOG": str(report / "requests.jsonl"),
        "DRILL_SHAPE": shape,
        "DRILL_SHAPE_PARAMS": json.dumps(asdict(params)),
        "DRILL_GATEWAY_URL": stack.gateway_url,
        "DRILL_THINK_SECONDS": profile.think_seconds,
    })
    command = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
        "--host", stack.web_url, "--csv", str(report / "locust"), "--html", str(report / "locust-report.html"),
        "--summary-json", str(report / "locust-summary.json"), "--logfile", str(report / "locust.log"),
        "--loglevel", "WARNING", "--exit-code-on-error", "0", "--stop-timeout", "0",
    ]
    say(f"locust: {shapes.describe(shape, params)}; report in {report}")
    limit = params.total_seconds + 60
    started = time.monotonic()
    with open(report / "locust.out", "ab") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            while process.poll() is None:
                elapsed = time.monotonic() - started
                if elapsed > limit:
                    say(f"locust still running after {limit:.0f} s; stopping it")
                    process.send_signal(signal.SIGINT)
                    try:
                        process.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        process.kill()
                    break
                down = on_tick(elapsed) if on_tick is not None else set()
                dead = [p for p in stack.dead_processes() if p.name not in down]
                if dead:
                    say(f"{dead[0].name} died during the drill:\n{dead[0].tail()}")
                    process.send_signal(signal.SIGINT)
                    process.wait(timeout=15)
                    break
                plan = shapes.plan(shape, params, elapsed)
                users = plan[0] if plan else 0
                queue = _queue_length(stack)
                say(f"t={elapsed:5.0f}s users≈{users:<4} waiting room={queue if queue is not None else '?':<5} "
                    f"orders: {_counts(stack.database_url)}")
                for _ in range(20):
                    if process.poll() is not None:
                        break
                    time.sleep(0.5)
                    if on_tick is not None:
                        on_tick(time.monotonic() - started)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return process.returncode if process.returncode is not None else -1


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if _locust_missing():
        print("Locust is not installed in this environment. Install the load extra first:\n"
              "    .venv/bin/pip install -e '.[load]'", file=sys.stderr)
        return 2
    import requests

    from loadtests import scrapes, shapes, slo
    from loadtests.invariants import read_invariants, wait_for_drain
    from loadtests.stack import Stack, say, workdir_for

    profile = PROFILES[args.profile]
    overrides = dict(profile.settings)
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"--set wants NAME=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[name.strip().upper()] = value
    faults = json.loads(args.faults) if args.faults is not None else profile.faults
    shape = args.shape or profile.shape
    params = shapes.params_from(shape, profile.params_for(shape))
    thresholds = slo.Thresholds(
        p95_create_ms=args.p95_create_ms if args.p95_create_ms is not None else profile.p95_create_ms,
        p95_status_ms=args.p95_status_ms if args.p95_status_ms is not None else profile.p95_status_ms,
        **({"allow_unavailable_with_retry_after": True, "unjudged_endpoints": (slo.PAY,)} if profile.failover else {}),
    )
    drain_window = args.drain_seconds if args.drain_seconds is not None else profile.drain_window_seconds
    report = args.report_dir or workdir_for(f"drill-{profile.name}-{shape}")
    report.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupted)  # so the with-block below stops what it started
    from loadtests.failover import Faults, HAStack, failover_report, print_failover
    from loadtests.multinode import order_histories, print_multi, proxy_retries, start_multi, takeovers, wait_answers

    layout: dict[str, Any] = {}
    chaos: Chaos | Faults | None = None
    kind = HAStack if profile.failover is not None else Stack
    if profile.failover is not None:
        HAStack.pgbouncer_settings = dict(item.split("=", 1) for item in args.pgbouncer if "=" in item)
    try:
        with kind(report, label="drill", keep_database=args.keep_database) as stack:
            if profile.multi is not None:
                layout = start_multi(stack, profile.multi, overrides)
                overrides = layout.pop("overrides")
                stack.wait_ready()
                wait_answers(f"{layout['front']}/readyz")
                chaos = Chaos(stack, profile.multi, profile.multi.victims)
            elif profile.failover is not None:
                stack.start_procfile(overrides=overrides)
                stack.wait_ready()
                chaos = Faults(stack, profile.failover)
            else:
                stack.start_procfile(overrides=overrides)
                stack.wait_ready()
            if faults:
                requests.post(f"{stack.gateway_url}/sandbox/faults", json=faults, timeout=5).raise_for_status()
                say(f"gateway faults: {json.dumps(faults)}")
            watch = scrapes.Watch(report / scrapes.FILE_NAME, lambda: scrapes.stack_targets(stack)).start()
            try:  # scraped through the run and the drain
                run_locust(stack, profile, shape, params, report, on_tick=chaos)
                if isinstance(chaos, Faults):
                    chaos(float("inf"))  # every fault undone before the drain
                elif chaos is not None and chaos.state != "after":
                    chaos(float("inf"))  # the run ended early: bring the victims back before the drain
                    stack.wait_ready(timeout=60)
                summary_path = report / "locust-summary.json"
                if not summary_path.exists():
                    say(f"locust wrote no summary; see {report / 'locust.out'}")
                    return 2
                load = slo.load_summary_from_json(summary_path)
                say(f"load done: {load.requests} requests, {load.flows_completed} stamped documents downloaded; "
                    f"draining (at most {drain_window:.0f} s)")
                waited = wait_for_drain(stack.database_url, drain_window, progress=say)
                invariants = read_invariants(stack.database_url, drain_seconds=waited)
            finally:
                seen = watch.stop()
            result = slo.evaluate(load, invariants, thresholds)
            multi: dict[str, Any] = {}
            failover: dict[str, Any] = {}
            if isinstance(chaos, Faults):
                failover = failover_report(stack, chaos, report, result)
            elif chaos is not None:
                multi = {**layout, "timeline": chaos.timeline, "proxy": proxy_retries(stack),
                         "takeovers": takeovers(stack.database_url),
                         "killed_mid_stamp": order_histories(stack.database_url, chaos.held_when_killed)}
            (report / "gate.json").write_text(json.dumps({
                **result.as_dict(), "profile": profile.name, "shape": shape, "shape_params": asdict(params),
                "settings": overrides, "faults": faults, "thresholds": asdict(thresholds),
                "orders_by_status": invariants.orders_by_status, "load": slo.load_summary_as_dict(load),
                "metrics": seen,
                **({"multi_node": multi} if multi else {}), **({"failover": failover} if failover else {}),
            }, indent=2, sort_keys=True))
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped")
        return 130
    _print_endpoints(load)
    if failover:
        print_failover(failover)
    elif chaos is not None:
        print_multi(multi)
    print(f"orders by status after the drain: {json.dumps(invariants.orders_by_status, sort_keys=True)}")
    print(scrapes.render(seen))
    print(result.render())
    print(f"report: {report} (locust-report.html, locust_stats.csv, gate.json, {scrapes.FILE_NAME}, logs/); "
          f"drill took {time.monotonic() - started:.0f} s")
    return 0 if result.passed else 1


def _print_endpoints(load: Any) -> None:
    print(f"{'request':<20} {'count':>7} {'fail':>5} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}  statuses")
    for name, e in sorted(load.endpoints.items()):
        codes = " ".join(f"{c}:{n}" for c, n in sorted(e.status_counts.items()))
        print(f"{name:<20} {e.requests:>7} {e.failures:>5} {e.p50_ms:>7.0f} {e.p95_ms:>7.0f} {e.p99_ms:>7.0f}  {codes}")
    print(f"purchases: started {load.flows_started}, stamped and verified {load.flows_completed}, "
          f"refunded {load.flows_refunded}, rejected {load.flows_rejected}, timed out {load.flow_timeouts}")


if __name__ == "__main__":
    sys.exit(main())
