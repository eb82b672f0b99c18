"""Benchmark: the refund sweep costs what it finds, not the size of the orders table.

    .venv/bin/python -m loadtests.bench.sweep           # about 3 minutes (most of it inserting 1M rows)

Target (docs/benchmarks.md): ``shared.services.housekeeping.sweep_refunds`` moving 1,000 stuck orders to
``refund_pending`` among 1,000,000 settled orders takes at most 2× as long as among 10,000.

Two scratch databases (fresh, migrated, dropped afterwards) are filled with ``generate_series``:
settled (stamped) orders with their captured payment and used serial, the rows the sweep's statements
touch or could scan. Then, alternating between the two databases, each round adds 1,000 stuck orders
(half ``paid`` past their refund deadline, half ``stamping`` whose worker's lease expired, with a
reserved serial) and times one sweep, which must move exactly those 1,000. The median of the rounds is
compared. The sweep also runs once with nothing due (what beat does every minute on a healthy day).

The refund tasks the sweep publishes are not what is measured: this script (and only this script)
installs a publisher stub that counts them instead of sending them to a broker.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import psycopg

from loadtests.stack import REPORTS, Stack, say, workdir_for

TARGET = 2.0
STUCK = 1_000

SETTLED_ORDERS = """
INSERT INTO orders (id, idempotency_key, request_fingerprint, access_token_hashes, email, status, amount_idr,
                    page, x, y, document_key, document_sha256, document_bytes, stamped_document_key,
                    stamped_sha256, serial, stamp_attempts, created_at, updated_at, paid_at, refund_due_at,
                    stamped_at)
SELECT u, 'settled-' || g, md5('f' || g), ARRAY[md5('t' || g)], 'pelamar' || g || '@example.id', 'stamped', 12500,
       1, 400, 80, 'uploads/' || u || '.pdf', encode(sha256(('d' || g)::bytea), 'hex'), 200000,
       'stamped/' || u || '.pdf', encode(sha256(('s' || g)::bytea), 'hex'), upper(substr(md5('serial' || g), 1, 22)),
       1, ts, ts + interval '40 seconds', ts + interval '30 seconds', ts + interval '6 hours 30 seconds',
       ts + interval '40 seconds'
FROM (SELECT g, md5('order' || g)::uuid AS u,
             now() - interval '30 days' + g * (interval '25 days' / %(n)s) AS ts
      FROM generate_series(1, %(n)s) AS g) AS s
ORDER BY u
"""

STUCK_ORDERS = """
INSERT INTO orders (id, idempotency_key, request_fingerprint, access_token_hashes, email, status, amount_idr,
                    page, x, y, document_key, document_sha256, document_bytes, serial, lease_owner,
                    lease_expires_at, stamp_attempts, created_at, updated_at, paid_at, refund_due_at)
SELECT u, 'stuck-' || %(round)s || '-' || g, md5('sf' || g), ARRAY[md5('st' || g)], 'stuck' || g || '@example.id',
       CASE WHEN g %% 2 = 0 THEN 'paid' ELSE 'stamping' END, 12500, 1, 400, 80, 'uploads/' || u || '.pdf',
       encode(sha256(('sd' || g)::bytea), 'hex'), 200000,
       CASE WHEN g %% 2 = 0 THEN NULL ELSE upper(substr(md5('stuck-serial' || %(round)s || '-' || g), 1, 22)) END,
       CASE WHEN g %% 2 = 0 THEN NULL ELSE 'stamping@dead-worker' END,
       CASE WHEN g %% 2 = 0 THEN NULL ELSE now() - interval '2 minutes' END,
       g %% 2, now() - interval '7 hours', now() - interval '6 hours', now() - interval '6 hours 1 minute',
       now() - interval '1 minute' - g * interval '10 ms'
FROM (SELECT g, md5('stuck-order' || %(round)s || '-' || g)::uuid AS u FROM generate_series(1, %(n)s) AS g) AS s
"""

PAYMENTS = """
INSERT INTO payments (gateway_order_id, order_id, amount_idr, token, redirect_url, gateway_status, payment_type,
                      transaction_id, captured_at, created_at, updated_at)
SELECT 'MTR-' || replace(id::text, '-', '') || '-1', id, amount_idr, md5(id::text), 'https://pay.invalid/' || id,
       'settlement', 'qris', md5('tx' || id::text), paid_at, created_at, paid_at
FROM orders WHERE idempotency_key LIKE %(prefix)s
"""

SERIALS = """
INSERT INTO serials (serial, order_id, status, reserved_at, used_at, document_sha256)
SELECT serial, id, CASE WHEN status = 'stamped' THEN 'used' ELSE 'reserved' END, paid_at,
       CASE WHEN status = 'stamped' THEN stamped_at END, stamped_sha256
FROM orders WHERE idempotency_key LIKE %(prefix)s AND serial IS NOT NULL
"""

SWEEP_SELECT = """
SELECT id, status FROM orders
WHERE status IN ('paid', 'stamping') AND refund_due_at <= now()
  AND (lease_expires_at IS NULL OR lease_expires_at < now())
ORDER BY refund_due_at LIMIT 500 FOR UPDATE SKIP LOCKED
"""


class CountingPublisher:
    """Stands in for Celery here only: the refund tasks are not what this benchmark measures."""

    def __init__(self) -> None:
        self.sent = 0

    def send_task(self, name: str, args: Any = None, queue: str | None = None, **options: Any) -> None:
        self.sent += 1


def fill_settled(url: str, n: int) -> float:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SETTLED_ORDERS, {"n": n})
        conn.execute(PAYMENTS, {"prefix": "settled-%"})
        conn.execute(SERIALS, {"prefix": "settled-%"})
        conn.execute("VACUUM ANALYZE orders")
        conn.execute("VACUUM ANALYZE payments")
        conn.execute("VACUUM ANALYZE serials")
    return time.perf_counter() - started


def add_stuck(url: str, round_number: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(STUCK_ORDERS, {"n": STUCK, "round": round_number})
        conn.execute(PAYMENTS, {"prefix": f"stuck-{round_number}-%"})
        conn.execute(SERIALS, {"prefix": f"stuck-{round_number}-%"})
        conn.execute("ANALYZE orders")


def timed_sweep(url: str) -> tuple[float, int]:
    from shared.config import load_settings
    from shared.services.housekeeping import sweep_refunds

    settings = load_settings({"DATABASE_URL": url})
    started = time.perf_counter()
    moved = sweep_refunds(settings)
    return time.perf_counter() - started, moved


def explain(url: str) -> str:
    with psycopg.connect(url) as conn:
        rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + SWEEP_SELECT).fetchall()
        conn.rollback()
    return "\n".join(r[0] for r in rows)


def table_sizes(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {name: conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
                for name in ("orders", "payments", "serials", "refunds")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10_000, help="settled orders in the small database")
    parser.add_argument("--large", type=int, default=1_000_000, help="settled orders in the large database")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    from shared import jobs
    from shared.db import close_pools

    publisher = CountingPublisher()
    jobs.set_publisher(publisher)
    workdir = workdir_for("bench-sweep")
    times: dict[str, list[float]] = {"small": [], "large": []}
    idle: dict[str, float] = {}
    with Stack(workdir, label="bench_sweep_s") as small, Stack(workdir / "large", label="bench_sweep_l") as large:
        urls = {"small": small.database_url, "large": large.database_url}
        # As in the housekeeping worker, every refunded order's status-cache marker goes to Redis (one
        # pipeline per batch, after its commit), so that cost is in the figure.
        from shared import statuscache
        from shared.config import load_settings

        statuscache.configure(load_settings(small.env()))
        for name, n in (("small", args.small), ("large", args.large)):
            say(f"{name}: inserting {n:,} settled orders with payments and serials")
            say(f"  done in {fill_settled(urls[name], n):.0f} s")
        for name in urls:  # a sweep that finds nothing, warm (what beat does on a healthy day)
            timed_sweep(urls[name])
            idle[name] = statistics.median(timed_sweep(urls[name])[0] for _ in range(5))
        for round_number in range(1, args.rounds + 1):
            for name in (("small", "large") if round_number % 2 else ("large", "small")):
                add_stuck(urls[name], round_number)
                seconds, moved = timed_sweep(urls[name])
                if moved != STUCK:
                    raise RuntimeError(f"the sweep moved {moved} orders in {name}, expected {STUCK}")
                times[name].append(seconds)
                say(f"round {round_number} {name}: {moved} stuck orders to refund_pending in {seconds * 1000:.0f} ms")
        add_stuck(urls["large"], 99)
        plan = explain(urls["large"])
        sizes = {name: table_sizes(url) for name, url in urls.items()}
        close_pools()
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["large"] / medians["small"]
    met = ratio <= TARGET
    print()
    for name in ("small", "large"):
        print(f"{name:<6} {getattr(args, name):>10,} settled ({sizes[name]['orders']:,} orders in all): sweep of {STUCK:,} stuck orders median"
              f" {medians[name] * 1000:6.0f} ms (rounds: {', '.join(f'{t * 1000:.0f}' for t in times[name])});"
              f" sweep finding nothing {idle[name] * 1000:.1f} ms")
    print(f"ratio 1M / 10k = {ratio:.2f}   target ≤ {TARGET}   {'MET' if met else 'MISSED'}")
    print(f"refund tasks published (to the stub): {publisher.sent}")
    print("plan of the sweep's SELECT on the large database (1,000 due):")
    print("  " + plan.replace("\n", "\n  "))
    out = {"benchmark": "sweep", "command": "python -m loadtests.bench.sweep " + " ".join(sys.argv[1:]),
           "when": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": vars(args), "seconds": times,
           "medians": medians, "idle_sweep_seconds": idle, "ratio": ratio, "target": TARGET, "met": met,
           "sizes": sizes, "plan": plan}
    (workdir / "result.json").write_text(json.dumps(out, indent=2))
    (REPORTS / "bench").mkdir(parents=True, exist_ok=True)
    (REPORTS / "bench" / "sweep.json").write_text(json.dumps(out, indent=2))
    print(f"details: {workdir / 'result.json'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
