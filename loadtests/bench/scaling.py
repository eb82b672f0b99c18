"""Benchmark: the stamping stage on 1 and then 2 stamping nodes, same cores per node: does a second node
add a node's worth of stamps, with no duplicate work and no lost leases?

    .venv/bin/python -m loadtests.bench.scaling              # about 4 minutes on an idle box
    .venv/bin/python -m loadtests.bench.scaling --no-pin     # the nodes float over the cores

Each phase (1 node, 2 nodes; ``--rounds`` times, alternating) first makes ``k × --orders-per-node``
paid orders through the real system with no stamping node running: web, the stand-in gateway, the
checkout and payments workers (buyer threads upload, wait for the payment, pay; the notification makes
the order ``paid`` and queues its stamping task). Then it starts ``k`` stamping nodes: copies of the
Procfile's stamping group, each a process group with its own ``DATA_DIR``, the same document store and
signing files as every other node (:meth:`loadtests.stack.Stack.start_node`), ``--concurrency 1``
each and, on a machine with a core per node, pinned with ``taskset`` to a core of its own. They drain the
queue; the phase ends when every order is stamped.

Why pinned at one slot each: this box has two cores, so "the same cores-per-node budget" can only be one
core per node. Pinning makes one node's budget exactly one core in both phases (unpinned, a lone node's
single Celery child still uses at most one core, but the OS may move it and the other processes around;
``--no-pin`` measures that too). What is *not* equal between the phases: PostgreSQL, Redis and the
store serve every node and run unpinned; with one node they have the second core to themselves, with
two nodes they compete with the stamping children. The benchmark reports their CPU per stamped order so
that cost is visible, and it is part of what a second node costs in production too (there on other
machines).

Measured per node, from the database: the order's last claim names the worker (``host:pid:task``),
whose pid belongs to one node. Throughput is counted in the window every node of the phase was
stamping (from each node's ``--skip``-th stamp to the first node's last), so start-up and the tail of
the queue don't count. Duplicates: an order with two ``stamped`` events (the commit is a CAS on one's
own lease, so: must be 0), orders claimed more than once (a lease taken over), stamping tasks that lost
their lease at commit (``stamp_lease_lost`` in the node's log) and messages for an order already taken
(``not_claimable``: harmless duplicates).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

import psycopg

from loadtests.bench.loadgen import HttpClient, multipart
from loadtests.documents import make_pdf
from loadtests.stack import REPORTS, CpuMeter, Stack, postgres_backend_pids, procfile_commands, say, workdir_for

FIELDS = {"page": "1", "x": "400", "y": "80", "email": "pelamar@example.id"}
OPEN_WIDE = {"ADMISSION_PER_MINUTE": "100000000", "ADMISSION_BURST": "100000000",
             "ADMISSION_ACTIVE_CHECKOUTS": "100000000", "PROXY_HOPS": "1"}


def stamping_command(concurrency: int, cpu: int | None) -> str:
    """The Procfile's stamping command with ``concurrency`` slots, pinned to core ``cpu`` (taskset) if given."""
    command = re.sub(r"--concurrency\s+\d+", f"--concurrency {concurrency}", procfile_commands()["stamping"])
    return f"taskset -c {cpu} {command}" if cpu is not None else command


# --- paid orders, made through the system ------------------------------------------------------------

def make_paid_orders(stack: Stack, count: int, body: bytes, content_type: str, threads: int) -> list[str]:
    """``count`` orders taken to ``paid`` by buyer threads (upload, wait for the payment, pay), then waits
    until the payments worker has booked them all. Returns their ids."""
    ids: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    todo = iter(range(count))

    def buyer(number: int) -> None:
        web, gateway = HttpClient(stack.web_url), HttpClient(stack.gateway_url)
        while True:
            with lock:
                n = next(todo, None)
            if n is None:
                return
            try:
                ids.append(_pay_one(web, gateway, body, content_type, f"198.19.{number}.{n % 250 + 1}"))
            except Exception as exc:  # noqa: BLE001 - counted; the phase refuses to run on a short batch
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])

    workers = [threading.Thread(target=buyer, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {count} orders could not be paid; first: {errors[0]}")
    deadline = time.monotonic() + 120
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        while True:
            paid = conn.execute("SELECT count(*) FROM orders WHERE status = 'paid' AND id = ANY(%s::uuid[])",
                                (ids,)).fetchone()[0]
            if paid == len(ids):
                return ids
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {paid} of {len(ids)} orders were booked paid in 120 s")
            time.sleep(0.3)


def _pay_one(web: HttpClient, gateway: HttpClient, body: bytes, content_type: str, address: str) -> str:
    answer = web.request("POST", "/api/v1/orders", body, {
        "Content-Type": content_type, "Idempotency-Key": uuid.uuid4().hex, "X-Forwarded-For": address})
    if answer.status != 202:
        raise RuntimeError(f"create answered {answer.status} {answer.body[:200]!r} {answer.error}")
    order = answer.json()
    headers = {"Authorization": f"Bearer {order['access_token']}"}
    deadline = time.monotonic() + 60
    while True:
        view = web.request("GET", f"/api/v1/orders/{order['order_id']}", headers=headers).json()
        if view.get("status") == "awaiting_payment":
            break
        if view.get("status") not in ("created", None) or time.monotonic() > deadline:
            raise RuntimeError(f"order {order['order_id']} is {view.get('status')}, not awaiting payment")
        time.sleep(0.2)
    paid = gateway.request("POST", f"/sandbox/pay/{view['payment']['gateway_order_id']}",
                           json.dumps({"payment_type": "qris"}).encode(), {"Content-Type": "application/json"})
    if paid.status != 200:
        raise RuntimeError(f"pay answered {paid.status} {paid.error}")
    return str(order["order_id"])


# --- one phase ---------------------------------------------------------------------------------------

@dataclass
class NodeFigures:
    name: str
    cpu: int | None
    stamped: int = 0            # of this phase's orders, by this node
    in_window: int = 0          # stamped inside the common window
    per_second: float = 0.0     # in_window / window
    cpu_ms_per_order: float = 0.0
    lease_lost: int = 0
    not_claimable: int = 0


@dataclass
class Phase:
    nodes: int
    orders: int
    window_seconds: float = 0.0
    per_second: float = 0.0
    node_figures: list[NodeFigures] = field(default_factory=list)
    stamped_twice: int = 0
    claimed_more_than_once: int = 0
    postgres_cpu_ms_per_order: float = 0.0
    redis_cpu_ms_per_order: float = 0.0
    drain_seconds: float = 0.0
    # The machine's 1-minute load average at the end of the phase: other work on the box shows here.
    load_average: float = 0.0


# Per order of the phase: when it was stamped, and the worker of its last claim before that.
STAMPED_BY_SQL = """
SELECT o.id::text, extract(epoch FROM o.stamped_at) AS at,
       (SELECT e.detail->>'worker' FROM order_events e
         WHERE e.order_id = o.id AND e.to_status = 'stamping' ORDER BY e.id DESC LIMIT 1) AS worker
FROM orders o WHERE o.id = ANY(%(ids)s::uuid[]) AND o.status = 'stamped'
"""
DUPLICATES_SQL = """
SELECT (SELECT count(*) FROM (SELECT order_id FROM order_events WHERE order_id = ANY(%(ids)s::uuid[])
                              AND to_status = 'stamped' GROUP BY order_id HAVING count(*) > 1) d),
       (SELECT count(*) FROM (SELECT order_id FROM order_events WHERE order_id = ANY(%(ids)s::uuid[])
                              AND to_status = 'stamping' GROUP BY order_id HAVING count(*) > 1) c)
"""


def run_phase(stack: Stack, nodes: int, per_node: int, *, concurrency: int, pin: bool, skip: int,
              body: bytes, content_type: str, threads: int, round_number: int) -> Phase:
    count = nodes * per_node
    say(f"phase: {nodes} stamping node(s); making {count} paid orders first (no stamping node running)")
    ids = make_paid_orders(stack, count, body, content_type, threads)
    names = [f"stamping-r{round_number}-{nodes}n-{i}" for i in range(1, nodes + 1)]
    cpus = {name: (i % (os.cpu_count() or 1) if pin else None) for i, name in enumerate(names)}
    started = time.monotonic()
    for name in names:
        stack.start_node("stamping", name, overrides=OPEN_WIDE, command=stamping_command(concurrency, cpus[name]))
    stack.launcher.wait_ready(names, timeout=90)
    pids: dict[str, set[int]] = {name: set(stack.process_pids(name)) for name in names}
    groups = {name: (lambda n=name: stack.process_pids(n)) for name in names}
    groups["postgres"] = lambda: postgres_backend_pids(stack.database_url)
    groups["redis"] = lambda: stack.redis_pids
    meter = CpuMeter(groups)
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        meter.start()
        metered_from = float(conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()[0])
        deadline = time.monotonic() + 600
        while True:
            for name in names:  # pool children can be replaced (max-tasks-per-child): keep every pid seen
                pids[name].update(stack.process_pids(name))
            done = conn.execute("SELECT count(*) FROM orders WHERE status <> 'paid' AND status <> 'stamping'"
                                " AND id = ANY(%s::uuid[])", (ids,)).fetchone()[0]
            if done == count or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        cpu = meter.stop()
        rows = conn.execute(STAMPED_BY_SQL, {"ids": ids}).fetchall()
        twice, reclaimed = conn.execute(DUPLICATES_SQL, {"ids": ids}).fetchone()
    drained = time.monotonic() - started
    logs = {name: stack.processes[name].output().decode("utf-8", "replace") for name in names}
    stack.launcher.stop(*names)
    if done != count:
        raise RuntimeError(f"only {done} of {count} orders left paid/stamping in 600 s")
    by_pid = {pid: name for name, found in pids.items() for pid in found}
    stamps: dict[str, list[float]] = {name: [] for name in names}
    unknown = 0
    for _order, at, worker in rows:
        pid = int(worker.split(":")[1]) if worker and worker.count(":") >= 2 else -1
        if by_pid.get(pid) in stamps:
            stamps[by_pid[pid]].append(float(at))
        else:
            unknown += 1
    if unknown:
        say(f"  {unknown} stamped orders name a worker pid no node of this phase had")
    for times in stamps.values():
        times.sort()
    begin = max(times[min(skip, len(times) - 1)] for times in stamps.values() if times)
    end = min(times[-1] for times in stamps.values() if times)
    window = max(end - begin, 1e-9)
    metered = {name: sum(1 for t in times if t > metered_from) for name, times in stamps.items()}
    stamped_in_meter = max(1, sum(metered.values()))
    phase = Phase(nodes=nodes, orders=count, window_seconds=window, stamped_twice=int(twice),
                  claimed_more_than_once=int(reclaimed), drain_seconds=drained,
                  postgres_cpu_ms_per_order=1000 * cpu["postgres"] / stamped_in_meter,
                  redis_cpu_ms_per_order=1000 * cpu["redis"] / stamped_in_meter,
                  load_average=os.getloadavg()[0])
    for name in names:
        times = stamps[name]
        inside = sum(1 for t in times if begin < t <= end)
        phase.node_figures.append(NodeFigures(
            name=name, cpu=cpus[name], stamped=len(times), in_window=inside, per_second=inside / window,
            cpu_ms_per_order=1000 * cpu[name] / max(1, metered[name]),
            lease_lost=logs[name].count("stamp_lease_lost"), not_claimable=logs[name].count("not_claimable")))
    phase.per_second = sum(n.per_second for n in phase.node_figures)
    say(f"  {nodes} node(s): {phase.per_second:.1f} stamped/s over a {window:.1f} s window "
        f"({', '.join(f'{n.name} {n.per_second:.1f}/s' for n in phase.node_figures)}); "
        f"stamped twice {phase.stamped_twice}, claimed more than once {phase.claimed_more_than_once}, "
        f"lease lost {sum(n.lease_lost for n in phase.node_figures)}")
    return phase


# --- the benchmark -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders-per-node", type=int, default=200, help="paid orders per stamping node per phase")
    parser.add_argument("--rounds", type=int, default=3, help="1-node then 2-node phases, this many times")
    parser.add_argument("--concurrency", type=int, default=1, help="Celery slots per stamping node")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="don't pin each node to a core")
    parser.add_argument("--skip", type=int, default=10, help="each node's first stamps not counted (warm-up)")
    parser.add_argument("--buyers", type=int, default=24, help="threads making the paid orders")
    args = parser.parse_args(argv)
    if args.pin and (os.cpu_count() or 1) < 2:
        say("one core only: running unpinned")
        args.pin = False
    workdir = workdir_for("bench-scaling")
    body, content_type = multipart(FIELDS, {"document": ("surat.pdf", make_pdf(200_000), "application/pdf")})
    phases: list[Phase] = []
    # A fresh system per round (database, Redis, store, processes): the private SeaweedFS holds about
    # half a gigabyte, and no round inherits another's tables or queues.
    for round_number in range(1, args.rounds + 1):
        with Stack(workdir / f"round-{round_number}", label="bench_scaling") as stack:
            store = stack.open_document_store()
            stack.make_shared_pki(OPEN_WIDE)
            stack.start_node("web", "web", overrides=OPEN_WIDE, port=stack.web_port)
            for group in ("checkout", "payments", "gateway"):
                stack.start_node(group, group, overrides=OPEN_WIDE)
            stack.launcher.wait_ready(timeout=90)
            say(f"round {round_number}: web, gateway, checkout, payments ready; documents in the {store} store; "
                f"stamping nodes --concurrency {args.concurrency}, {'pinned to a core each' if args.pin else 'unpinned'}")
            for nodes in (1, 2):
                phases.append(run_phase(stack, nodes, args.orders_per_node, concurrency=args.concurrency,
                                        pin=args.pin, skip=args.skip, body=body, content_type=content_type,
                                        threads=args.buyers, round_number=round_number))
    one = [p.per_second for p in phases if p.nodes == 1]
    two = [p.per_second for p in phases if p.nodes == 2]
    one_median, two_median = statistics.median(one), statistics.median(two)
    ratio = two_median / one_median
    duplicates = sum(p.stamped_twice for p in phases)
    lease_lost = sum(n.lease_lost for p in phases for n in p.node_figures)
    print()
    print(f"stamping stage, {args.orders_per_node} paid orders per node per phase, --concurrency {args.concurrency} "
          f"per node, {'pinned (taskset), one core each' if args.pin else 'unpinned'}; store: {store}")
    print(f"{'phase':<10} {'stamped/s':>10} {'per node':>24} {'window s':>9} {'node CPU ms/order':>18}"
          f" {'PG ms/order':>12} {'twice':>6} {'reclaimed':>10} {'lease lost':>11} {'dup msgs':>9} {'load':>5}")
    for p in phases:
        print(f"{p.nodes} node{'s' if p.nodes > 1 else ' '}   {p.per_second:>10.1f} "
              f"{' + '.join(f'{n.per_second:.1f}' for n in p.node_figures):>24} {p.window_seconds:>9.1f} "
              f"{' / '.join(f'{n.cpu_ms_per_order:.1f}' for n in p.node_figures):>18} "
              f"{p.postgres_cpu_ms_per_order:>12.1f} {p.stamped_twice:>6} {p.claimed_more_than_once:>10} "
              f"{sum(n.lease_lost for n in p.node_figures):>11} {sum(n.not_claimable for n in p.node_figures):>9}"
              f" {p.load_average:>5.1f}")
    print(f"median: 1 node {one_median:.1f}/s, 2 nodes {two_median:.1f}/s; 2-node / 1-node = {ratio:.2f}; "
          f"per-node efficiency {ratio / 2:.2f}; stamped twice {duplicates}; leases lost {lease_lost}")
    out = {"benchmark": "scaling", "command": "python -m loadtests.bench.scaling " + " ".join(sys.argv[1:] if argv is None else argv),
           "when": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": vars(args), "store": store,
           "phases": [asdict(p) for p in phases], "one_node_per_second": one_median,
           "two_nodes_per_second": two_median, "ratio": ratio, "per_node_efficiency": ratio / 2,
           "stamped_twice": duplicates, "lease_lost": lease_lost}
    (workdir / "result.json").write_text(json.dumps(out, indent=2))
    (REPORTS / "bench").mkdir(parents=True, exist_ok=True)
    (REPORTS / "bench" / "scaling.json").write_text(json.dumps(out, indent=2))
    print(f"details: {workdir / 'result.json'}")
    return 0 if duplicates == 0 and lease_lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
