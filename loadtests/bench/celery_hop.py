"""Benchmark: what one Celery hop costs on each worker pool, and what a publish costs.

Every order takes about five hops (checkout, the notification, stamping, two e-mails), each a publish and
a task run by a worker, and the prefork pool's parent (receiving, pickling to its child, acknowledging) is
18–28 % of each worker group's samples (loadtests/bench/e2e.py --py-spy). This runs the no-op task of
``loadtests/bench/bare_celery.py`` (acks_late, prefetch 1, the product's Redis transport) on a worker per
pool: prefork and threads with two slots, solo with one, drives ``--count`` hops through each and prints
CPU ms per hop of the publisher and of the worker with Redis.

Not a pool to switch to by this alone: neither threads nor solo enforce ``task_time_limit``, which every
group of ours relies on to end a hung task (docs/benchmarks.md, "End to end").

    python -m loadtests.bench.celery_hop [--count 1000] [--rounds 2]

Uses REDIS_URL when it answers (database 13 of it), else a private redis-server.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

POOLS = ("prefork", "threads", "solo")


def _tree(pid: int) -> list[int]:
    import psutil

    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench.celery_hop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="hops per pool per round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    import redis

    from loadtests.stack import REPORTS, cpu_seconds_of, say, workdir_for
    from shared.devtools.services import ensure_redis

    workdir = workdir_for("bench-celery-hop")
    url, handle = ensure_redis(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), workdir)
    url = url.rsplit("/", 1)[0] + "/13"
    os.environ["BENCH_BROKER_URL"] = url
    from loadtests.bench.bare_celery import app, noop

    app.conf.broker_url = url
    client = redis.Redis.from_url(url)
    redis_pid = int(client.info("server")["process_id"])
    root = Path(__file__).resolve().parents[2]
    results: dict[str, dict[str, list[float]]] = {pool: {"publish": [], "worker+redis": []} for pool in POOLS}

    def drain(deadline_seconds: float = 60.0) -> None:
        deadline, quiet = time.monotonic() + deadline_seconds, 0
        while quiet < 3:  # three looks in a row with nothing queued nor unacknowledged
            quiet = quiet + 1 if not (client.llen("bare") or client.hlen("unacked")) else 0
            if time.monotonic() > deadline:
                raise RuntimeError("the worker did not drain its queue")
            time.sleep(0.05)

    try:
        for number in range(1, args.rounds + 1):
            for pool in POOLS:
                client.flushdb()
                slots = [] if pool == "solo" else ["--concurrency", "2"]
                worker = subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "loadtests.bench.bare_celery", "worker", "--queues", "bare",
                     "--pool", pool, *slots, "--prefetch-multiplier", "1", "--loglevel", "WARNING",
                     "--hostname", f"hop-{pool}@%h"], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                    stdout=subprocess.DEVNULL, stderr=open(workdir / f"worker-{pool}.log", "ab"))
                try:
                    deadline = time.monotonic() + 60
                    while not client.keys("_kombu.binding.bare*"):
                        if time.monotonic() > deadline or worker.poll() is not None:
                            raise RuntimeError(f"the {pool} worker did not start (see {workdir})")
                        time.sleep(0.2)
                    for i in range(50):  # warm: pool processes, connections
                        noop.delay(f"w{i}")
                    drain()
                    pids = _tree(worker.pid) + [redis_pid]
                    before = sum(cpu_seconds_of(pid) for pid in pids)
                    started = time.process_time()
                    for i in range(args.count):
                        noop.delay(f"{i:08d}")
                    published = time.process_time() - started
                    drain()
                    used = sum(cpu_seconds_of(pid) for pid in pids) - before
                finally:
                    worker.terminate()
                    worker.wait(timeout=30)
                results[pool]["publish"].append(1000 * published / args.count)
                results[pool]["worker+redis"].append(1000 * used / args.count)
                say(f"round {number}, {pool}: publish {1000 * published / args.count:.3f} ms, worker + Redis "
                    f"{1000 * used / args.count:.3f} ms per hop")
    finally:
        client.flushdb()
        if handle is not None:
            handle.stop()
    print()
    print(f"CPU ms per no-op Celery hop (median of {args.rounds} rounds of {args.count}):")
    print(f"  {'pool':<9} {'publish':>8} {'worker + Redis':>15} {'hop':>7}")
    medians = {}
    for pool in POOLS:
        publish, work = (statistics.median(results[pool][k]) for k in ("publish", "worker+redis"))
        medians[pool] = {"publish": publish, "worker+redis": work, "hop": publish + work}
        print(f"  {pool:<9} {publish:8.3f} {work:15.3f} {publish + work:7.3f}")
    out = {"benchmark": "celery_hop", "command": "python -m loadtests.bench.celery_hop " + " ".join(argv or sys.argv[1:]),
           "when": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": vars(args), "median_ms": medians, "rounds": results}
    (REPORTS / "bench").mkdir(parents=True, exist_ok=True)
    (REPORTS / "bench" / "celery_hop.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
