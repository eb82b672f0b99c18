"""What the system looks like right now, read at scrape time: queues, the waiting line, open orders and
refunds, the gateway breaker, the database pool.

One plain function, :func:`snapshot`, returns it as a dict: the web's ``/metrics`` turns it into gauges
(web/metrics.py) and the ops page shows it. Everything here only reads, and each part is read on its own:
a part whose source is down is reported in ``errors`` (and as ``meterai_observe_up{source}=0``), the rest
still answers. Only the open orders are counted (each group through its partial index, so the cost
follows the work in flight, not the millions of settled orders); how fast orders settle is the rate of
the workers' counters.
"""
from __future__ import annotations

import json
import time
from typing import Any

import redis

from shared import jobs
from shared.admission import AdmissionController, AdmissionUnavailable
from shared.config import Settings
from shared.db import get_pool
from shared.broker import PUBLISHED_AT_HEADER

# Each query matches one partial index's predicate (shared/db/migrations), so it reads only open rows.
_OPEN_ORDERS = """
SELECT status, count(*) AS n FROM orders WHERE status IN ('created', 'awaiting_payment') GROUP BY status
UNION ALL
SELECT status, count(*) FROM orders WHERE status IN ('paid', 'stamping') GROUP BY status
UNION ALL
SELECT 'refund_pending', count(*) FROM orders WHERE status = 'refund_pending'
UNION ALL
SELECT 'refund_manual', count(*) FROM orders WHERE status = 'refund_manual'
"""
_STAMP_WORK = """
SELECT extract(epoch FROM now() - min(paid_at)) AS oldest_paid_age,
       extract(epoch FROM min(refund_due_at) - now()) AS nearest_deadline
FROM orders WHERE status IN ('paid', 'stamping')
"""
_REFUNDS = """
SELECT 'pending' AS status, count(*) AS n, extract(epoch FROM now() - min(requested_at)) AS oldest_age
FROM refunds WHERE status = 'pending'
UNION ALL
SELECT 'manual', count(*), extract(epoch FROM now() - min(requested_at)) FROM refunds WHERE status = 'manual'
"""
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
# Workers report their breakers here (workers/metrics.py): field "<host>:<pid>", value "<state> <unix time>".
BREAKER_KEY = "obs:breakers"
# A report older than this is a worker that is gone (or idle long enough not to matter).
BREAKER_REPORT_MAX_AGE_SECONDS = 120.0


def snapshot(settings: Settings, client: redis.Redis, controller: AdmissionController) -> dict[str, Any]:
    """The system's state now, as plain values (seconds, counts); ``errors`` names the parts not read."""
    result: dict[str, Any] = {"at": time.time(), "errors": {}}
    for name, part in (("queues", _queues), ("line", _line), ("breaker", _breaker)):
        try:
            result[name] = part(settings, client, controller)
        except (redis.RedisError, AdmissionUnavailable) as exc:  # the controller wraps Redis errors
            result["errors"][name] = type(exc).__name__
    try:
        result.update(_database(settings))
    except Exception as exc:  # noqa: BLE001 - psycopg's and the pool's errors alike: reported, not raised
        result["errors"]["database"] = type(exc).__name__
    return result


def _queues(settings: Settings, client: redis.Redis, _: AdmissionController) -> dict[str, dict[str, float]]:
    """Messages waiting per queue and the age of the oldest (kombu pushes on the left and pops on the
    right, so the oldest is the last element). A message without our publish time (published by an
    older process) has no age: it counts as 0 until it is taken."""
    pipe = client.pipeline(transaction=False)
    for queue in jobs.ALL_QUEUES:
        key = f"{settings.redis_key_prefix}{queue}"
        pipe.llen(key)
        pipe.lindex(key, -1)
    answers = pipe.execute()
    now, queues = time.time(), {}
    for index, queue in enumerate(jobs.ALL_QUEUES):
        depth, oldest = int(answers[2 * index] or 0), answers[2 * index + 1]
        queues[queue] = {"messages": depth, "oldest_age_seconds": max(0.0, now - _published_at(oldest, now))}
    return queues


def _published_at(raw: bytes | None, default: float) -> float:
    if not raw:
        return default
    try:
        headers = json.loads(raw).get("headers") or {}
        return float(headers.get(PUBLISHED_AT_HEADER, default))
    except (ValueError, TypeError, AttributeError):
        return default


def _line(settings: Settings, client: redis.Redis, controller: AdmissionController) -> dict[str, Any]:
    """The waiting line from the admission controller's own keys, read only: tickets issued (tail),
    admitted up to (head), how many of those waiting still hold their ticket (polled within the abandon
    window: the rest will be moved over, not admitted), the oldest of them, mode, checkouts admitted
    within the session window, the outflow's target and the stamps of the last full minute (the measured
    outflow the default target follows)."""
    tail_key, head_key, active_key, mode_key, seen_key = (controller.keys[i] for i in (0, 1, 4, 5, 7))
    now = time.time()
    minute = int(now // 60)
    live_since_ms = (now - settings.admission_abandon_seconds) * 1000
    pipe = client.pipeline(transaction=False)
    pipe.get(tail_key)
    pipe.get(head_key)
    pipe.get(mode_key)
    pipe.zcount(active_key, (now - settings.admission_session_seconds) * 1000, "+inf")
    pipe.get(f"{settings.redis_key_prefix}stats:stamped:{minute - 1}")
    pipe.zcount(seen_key, live_since_ms, "+inf")
    pipe.zrange(controller.issued_key, 0, OLDEST_WAITER_SCAN - 1)
    tail, head, mode, active, stamped, waiting, lowest = pipe.execute()
    tail, head = int(tail or 0), int(head or 0)
    return {
        "mode": mode.decode() if mode else "auto",
        "length": max(0, tail - head),
        "waiting": int(waiting),
        "oldest_waiter_seconds": _oldest_waiter_age(client, seen_key, lowest, head, live_since_ms, now),
        "head": head,
        "tail": tail,
        "active_checkouts": int(active),
        "outflow_target_per_minute": controller.outflow_per_minute(),
        "stamped_last_minute": int(stamped or 0),
    }


# How many of the lowest tickets past the head are looked at for the oldest live one: abandoned tickets
# at the front are few (the head moves over them as it reaches them), so a live one is among the first.
OLDEST_WAITER_SCAN = 200


def _oldest_waiter_age(client: redis.Redis, seen_key: str, lowest: list[bytes], head: int,
                       live_since_ms: float, now: float) -> float:
    """Seconds since the lowest-numbered ticket past the head that is still held (polled within the
    abandon window) was issued; 0 with nobody waiting. When none of the scanned ones is held, the
    oldest scanned one answers (an upper bound, and the head will move over them shortly)."""
    entries = []
    for raw in lowest:
        number, _, issued = raw.decode().partition(":")
        if int(number) > head:
            entries.append((number, float(issued or now)))
    if not entries:
        return 0.0
    scores = client.zmscore(seen_key, [number for number, _ in entries])
    for (_, issued), seen in zip(entries, scores):
        if seen is not None and seen >= live_since_ms:
            return max(0.0, now - issued)
    return max(0.0, now - entries[0][1])


def _breaker(settings: Settings, client: redis.Redis, _: AdmissionController) -> dict[str, Any]:
    """The gateway breaker as the workers last reported it: the worst live state, and how many processes
    report each state."""
    reports = client.hgetall(f"{settings.redis_key_prefix}{BREAKER_KEY}")
    now, counts = time.time(), {state: 0 for state in BREAKER_STATES}
    for value in reports.values():
        state, _, at = value.decode().partition(" ")
        if state in counts and now - float(at or 0) <= BREAKER_REPORT_MAX_AGE_SECONDS:
            counts[state] += 1
    worst = max((s for s, n in counts.items() if n), key=BREAKER_STATES.__getitem__, default="closed")
    return {"state": worst, "processes": counts}


def _database(settings: Settings) -> dict[str, Any]:
    pool = get_pool(settings.database_url)
    with pool.connection() as conn:
        orders = {row["status"]: int(row["n"]) for row in conn.execute(_OPEN_ORDERS).fetchall()}
        work = conn.execute(_STAMP_WORK).fetchone()
        refunds = {row["status"]: row for row in conn.execute(_REFUNDS).fetchall()}
    stats = pool.get_stats()
    return {
        "orders": {status: orders.get(status, 0) for status in (
            "created", "awaiting_payment", "paid", "stamping", "refund_pending", "refund_manual")},
        "stamping": {
            "oldest_paid_age_seconds": float(work["oldest_paid_age"] or 0),
            # Seconds until the nearest paid order's stamping deadline (then it is refunded); None: none open.
            "nearest_deadline_seconds": (float(work["nearest_deadline"])
                                         if work["nearest_deadline"] is not None else None),
        },
        "refunds": {status: {"count": int(refunds[status]["n"]),
                             "oldest_age_seconds": float(refunds[status]["oldest_age"] or 0)}
                    for status in ("pending", "manual")},
        "pool": {"size": stats.get("pool_size", 0), "available": stats.get("pool_available", 0),
                 "in_use": max(0, stats.get("pool_size", 0) - stats.get("pool_available", 0)),
                 "waiting": stats.get("requests_waiting", 0), "errors": stats.get("requests_errors", 0)},
    }
