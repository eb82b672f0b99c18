"""One command for a surge drill: bring the system up, run Locust headless, drain, gate, tear down.

    .venv/bin/python -m loadtests.drill --profile short     # about 2 minutes, the deadline spike
    .venv/bin/python -m loadtests.drill --profile full      # about 11 minutes (make drill-full)
    .venv/bin/python -m loadtests.drill --profile short --shape steady
    .venv/bin/python -m loadtests.drill --profile multi     # about 3 minutes: many nodes, two killed

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

``--profile multi`` runs the same spike, gate and audit against the system laid out as on many machines
(:func:`start_multi`): two web nodes behind the private nginx, two stamping nodes, every other worker
group and one beat, each a process group with its own ``DATA_DIR`` and no shared folder (documents only
in the S3 store, the signing files made once and handed to every node by path); mid-run it SIGKILLs one
web node and one stamping node, brings them back, and the report says when (``timeline`` in gate.json)
and how many requests the proxy carried over to the other web node.

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

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class MultiNode:
    """The multi-node layout and its failures: ``victims`` are SIGKILLed ``kill_at`` seconds into the
    load and brought back ``down_seconds`` later."""

    web_nodes: int = 2
    stamping_nodes: int = 2
    kill_at: float = 50.0
    down_seconds: float = 30.0
    victims: tuple[str, ...] = ("web-2", "stamping-2")


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


def _queue_length(redis_url: str) -> int | None:
    import redis

    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=1)
        tail, head = client.mget("meterai:adm:tail", "meterai:adm:head")
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
                queue = _queue_length(stack.redis_url)
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


def start_multi(stack: Any, plan: MultiNode, overrides: dict[str, str]) -> dict[str, Any]:
    """The system as on many machines, on this one: every node a process group with its own DATA_DIR,
    documents in the shared store only, the signing files made once before any node starts, the web
    nodes behind the private nginx. Returns what was laid out (for the report)."""
    from shared.devtools.services import free_port
    from loadtests.stack import say

    store = stack.open_document_store()
    stack.make_shared_pki(overrides)
    web_ports = [free_port() for _ in range(plan.web_nodes)]
    try:
        front = stack.start_proxy(web_ports, trust_forwarded_from="127.0.0.1")
        proxied = True
    except ImportError:
        # No private nginx yet: the buyers and the gateway talk to web-1, and only the other web nodes
        # may be killed (a real deployment always has its proxy).
        front, proxied = f"http://127.0.0.1:{web_ports[0]}", False
        stack.web_port = web_ports[0]
        overrides = {**overrides, "PUBLIC_BASE_URL": front,
                     "NOTIFICATION_URL": f"{front}/api/v1/payments/notifications"}
        say(f"no shared.devtools.proxy yet: buyers go straight to web-1 at {front}")
    nodes = [(f"web-{i}", "web", port) for i, port in enumerate(web_ports, start=1)]
    nodes += [(f"stamping-{i}", "stamping", None) for i in range(1, plan.stamping_nodes + 1)]
    nodes += [(g, g, None) for g in ("checkout", "payments", "refunds", "housekeeping", "reconcile", "beat", "gateway")]
    for name, group, port in nodes:
        stack.start_node(group, name, overrides=overrides, port=port)
    say(f"started {', '.join(n for n, _, _ in nodes)}; each with its own DATA_DIR under {stack.workdir / 'nodes'}")
    return {"front": front, "proxied": proxied, "store": store, "nodes": [n for n, _, _ in nodes],
            "overrides": overrides}


class Chaos:
    """Kills the plan's victims at ``kill_at`` and brings them back ``down_seconds`` later; logs when."""

    def __init__(self, stack: Any, plan: MultiNode, victims: tuple[str, ...]) -> None:
        self.stack, self.plan, self.victims = stack, plan, victims
        self.down: set[str] = set()
        self.timeline: list[dict[str, Any]] = []
        self.held_when_killed: list[str] = []
        self.origin: float | None = None
        self.state = "before"

    def note(self, t: float, event: str, node: str) -> None:
        from loadtests.stack import say

        t = time.monotonic() - self.origin if self.origin is not None else t  # after any wait for a lease
        self.timeline.append({"t": round(t, 1), "at": time.strftime("%H:%M:%S"), "event": event, "node": node})
        say(f"t={t:5.1f}s {event}: {node}")

    def holding_lease(self, name: str, patience: float = 10.0) -> list[str]:
        """Wait (at most ``patience`` seconds) until node ``name`` holds a stamping lease, so the kill
        lands mid-stamp and the takeover is exercised; the orders it held (none: it had no lease)."""
        import psycopg

        deadline = time.monotonic() + patience
        with psycopg.connect(self.stack.database_url, autocommit=True) as conn:
            while True:
                pids = [str(pid) for pid in self.stack.process_pids(name)]
                held = [r[0] for r in conn.execute(
                    "SELECT id::text FROM orders WHERE status = 'stamping' AND lease_expires_at > now()"
                    " AND split_part(lease_owner, ':', 2) = ANY(%s)", (pids,))]
                if held or time.monotonic() > deadline:
                    return held
                time.sleep(0.02)

    def __call__(self, t: float) -> set[str]:
        if t != float("inf"):
            self.origin = time.monotonic() - t
        if self.state == "before" and t >= self.plan.kill_at:
            for name in self.victims:
                held = self.holding_lease(name) if name.startswith("stamping") else []
                self.stack.kill(name)
                self.down.add(name)
                self.held_when_killed += held
                self.note(t, "SIGKILL (whole process group)" + (f" holding the lease of {', '.join(held)}" if held else ""),
                          name)
            self.state = "down"
        elif self.state == "down" and t >= self.plan.kill_at + self.plan.down_seconds:
            for name in self.victims:
                self.stack.bring_back(name)
                self.note(t, "started again", name)
            self.state = "coming back"
        elif self.state == "coming back":
            for name in sorted(self.down):
                if self.stack.launcher.up(name):
                    self.down.discard(name)
                    self.note(t, "up again", name)
            if not self.down:
                self.state = "after"
        return set(self.down)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if _locust_missing():
        print("Locust is not installed in this environment. Install the load extra first:\n"
              "    .venv/bin/pip install -e '.[load]'", file=sys.stderr)
        return 2
    import requests

    from loadtests import shapes, slo
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
    )
    drain_window = args.drain_seconds if args.drain_seconds is not None else profile.drain_window_seconds
    report = args.report_dir or workdir_for(f"drill-{profile.name}-{shape}")
    report.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupted)  # so the with-block below stops what it started
    layout: dict[str, Any] = {}
    chaos: Chaos | None = None
    try:
        with Stack(report, label="drill", keep_database=args.keep_database) as stack:
            if profile.multi is not None:
                layout = start_multi(stack, profile.multi, overrides)
                overrides = layout.pop("overrides")
                stack.wait_ready()
                _wait_answers(f"{layout['front']}/readyz")
                victims = tuple(v for v in profile.multi.victims if layout["proxied"] or v != "web-1")
                chaos = Chaos(stack, profile.multi, victims)
            else:
                stack.start_procfile(overrides=overrides)
                stack.wait_ready()
            if faults:
                requests.post(f"{stack.gateway_url}/sandbox/faults", json=faults, timeout=5).raise_for_status()
                say(f"gateway faults: {json.dumps(faults)}")
            run_locust(stack, profile, shape, params, report, on_tick=chaos)
            if chaos is not None and chaos.state != "after":
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
            result = slo.evaluate(load, invariants, thresholds)
            multi: dict[str, Any] = {}
            if chaos is not None:
                multi = {**layout, "timeline": chaos.timeline, "proxy": proxy_retries(stack),
                         "takeovers": takeovers(stack.database_url),
                         "killed_mid_stamp": order_histories(stack.database_url, chaos.held_when_killed)}
            (report / "gate.json").write_text(json.dumps({
                **result.as_dict(), "profile": profile.name, "shape": shape, "shape_params": asdict(params),
                "settings": overrides, "faults": faults, "thresholds": asdict(thresholds),
                "orders_by_status": invariants.orders_by_status, "load": slo.load_summary_as_dict(load),
                **({"multi_node": multi} if multi else {}),
            }, indent=2, sort_keys=True))
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped")
        return 130
    _print_endpoints(load)
    if chaos is not None:
        _print_multi(multi)
    print(f"orders by status after the drain: {json.dumps(invariants.orders_by_status, sort_keys=True)}")
    print(result.render())
    print(f"report: {report} (locust-report.html, locust_stats.csv, gate.json, logs/); "
          f"drill took {time.monotonic() - started:.0f} s")
    return 0 if result.passed else 1


def _wait_answers(url: str, timeout: float = 30.0) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} does not answer 200 after {timeout:.0f} s")
        time.sleep(0.2)


# Orders whose stamping changed hands: a claim taken over after a lease ran out (the stamping node died
# holding it), and orders stamped more than once (must be none: the commit is a CAS on one's own lease).
TAKEOVERS_SQL = """
SELECT (SELECT count(*) FROM order_events WHERE from_status = 'stamping' AND to_status = 'stamping') AS reclaims,
       (SELECT count(*) FROM (SELECT order_id FROM order_events WHERE to_status = 'stamped'
                              GROUP BY order_id HAVING count(*) > 1) d) AS stamped_twice,
       (SELECT count(*) FROM orders WHERE status = 'stamped' AND stamp_attempts > 1) AS stamped_after_retry
"""


def takeovers(database_url: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        reclaims, twice, retried = conn.execute(TAKEOVERS_SQL).fetchone()
    return {"reclaimed_after_lease_expiry": int(reclaims), "stamped_twice": int(twice),
            "stamped_after_more_than_one_attempt": int(retried)}


def order_histories(database_url: str, order_ids: list[str]) -> dict[str, list[str]]:
    """Each order's events (``from → to (worker) at``): what became of the orders a killed node held."""
    import psycopg

    if not order_ids:
        return {}
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT order_id::text, coalesce(from_status, '') || ' → ' || to_status"
            " || coalesce(' (' || (detail->>'worker') || ')', '') || ' at ' || to_char(at, 'HH24:MI:SS.MS')"
            " FROM order_events WHERE order_id = ANY(%s::uuid[]) ORDER BY order_id, id", (order_ids,)).fetchall()
    histories: dict[str, list[str]] = {order: [] for order in order_ids}
    for order, line in rows:
        histories[order].append(line)
    return histories


def proxy_retries(stack: Any) -> dict[str, Any]:
    """What the proxy hid from the buyers: requests it sent to a second web node after the first failed
    (its access log lists every upstream tried, comma-separated), by the first upstream's status."""
    proxy = getattr(stack, "proxy", None)
    log = getattr(proxy, "access_log", None) if proxy is not None else None
    if log is None:
        candidates = sorted((stack.workdir / "nginx").rglob("access*.log")) if proxy is not None else []
        log = candidates[0] if candidates else None
    if log is None or not Path(log).exists():
        return {"access_log": None, "retried": None}
    retried, by_status, answered_5xx = 0, {}, 0
    for line in Path(log).read_text(errors="replace").splitlines():
        fields = _upstream_fields(line)
        if fields is None:
            continue
        statuses, final = fields
        if final >= 500:
            answered_5xx += 1
        if len(statuses) > 1:
            retried += 1
            by_status[statuses[0]] = by_status.get(statuses[0], 0) + 1
    return {"access_log": str(log), "retried": retried, "first_upstream_status": by_status,
            "answered_5xx": answered_5xx}


def _upstream_fields(line: str) -> tuple[list[str], int] | None:
    """(each upstream's status, the status the client got) from an access-log line that carries
    ``upstream_status=…`` (nginx writes ``502, 202`` when it tried two) and ``status=…``; JSON lines too."""
    import re

    if line.lstrip().startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            return None
        upstream, status = str(record.get("upstream_status", "")), record.get("status")
    else:
        up = re.search(r"upstream_status=\"?([^\"]*?)\"?(?:\s+\w+=|$)", line)
        st = re.search(r"(?:^|\s)status=\"?(\d{3})", line)
        if up is None or st is None:
            return None
        upstream, status = up.group(1), st.group(1)
    statuses = [part.strip() for part in re.split(r"[,:]", upstream) if part.strip()]
    try:
        return statuses, int(status)
    except (TypeError, ValueError):
        return None


def _print_multi(multi: dict[str, Any]) -> None:
    print(f"nodes: {', '.join(multi['nodes'])}; documents in the {multi['store']} store; "
          f"front: {'nginx' if multi['proxied'] else 'web-1 directly (no proxy module yet)'} at {multi['front']}")
    for event in multi["timeline"]:
        print(f"  t={event['t']:6.1f}s ({event['at']})  {event['event']}: {event['node']}")
    proxy = multi["proxy"]
    if proxy.get("retried") is not None:
        print(f"proxy: {proxy['retried']} requests carried over to another web node after the first failed "
              f"(first upstream answered {json.dumps(proxy['first_upstream_status'])}), "
              f"{proxy['answered_5xx']} answered 5xx to the client")
    t = multi["takeovers"]
    print(f"stamping: {t['reclaimed_after_lease_expiry']} claims taken over after a lease ran out, "
          f"{t['stamped_after_more_than_one_attempt']} orders stamped on a later attempt, "
          f"{t['stamped_twice']} stamped twice")
    for order, events in multi["killed_mid_stamp"].items():
        print(f"order {order}, held by the killed stamping node: " + "; ".join(events[-3:]))


def _print_endpoints(load: Any) -> None:
    print(f"{'request':<20} {'count':>7} {'fail':>5} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}  statuses")
    for name, e in sorted(load.endpoints.items()):
        codes = " ".join(f"{c}:{n}" for c, n in sorted(e.status_counts.items()))
        print(f"{name:<20} {e.requests:>7} {e.failures:>5} {e.p50_ms:>7.0f} {e.p95_ms:>7.0f} {e.p99_ms:>7.0f}  {codes}")
    print(f"purchases: started {load.flows_started}, stamped and verified {load.flows_completed}, "
          f"refunded {load.flows_refunded}, rejected {load.flows_rejected}, timed out {load.flow_timeouts}")


if __name__ == "__main__":
    sys.exit(main())
