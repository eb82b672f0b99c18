"""What the system looks like right now, read at scrape time: queues, the waiting line, open orders and
refunds, e-mails to buyers not sent (waiting, failed), the gateway breaker, the database pool.

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
# E-mails to buyers not sent: those still to send (pending, or claimed: sending) and the age of the oldest
# of them, through the unsent partial index; and the failed ones, all and those of the last hour, through
# the failed one.
_MAIL = """
SELECT status, count(*) AS n, extract(epoch FROM now() - min(created_at)) AS oldest_age, 0 AS recent
FROM mail_outbox WHERE status IN ('pending', 'sending') GROUP BY status
UNION ALL
SELECT 'failed', count(*), NULL, count(*) FILTER (WHERE updated_at > now() - interval '1 hour')
FROM mail_outbox WHERE status = 'failed'
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
    tail, head, mode, active, stamped, waiting = pipe.execute()
    tail, head, waiting = int(tail or 0), int(head or 0), int(waiting)
    return {
        "mode": mode.decode() if mode else "auto",
        "length": max(0, tail - head),
        "waiting": waiting,
        "oldest_waiter_seconds": _oldest_waiter_age(client, controller, live_since_ms, waiting, now),
        "head": head,
        "tail": tail,
        "active_checkouts": int(active),
        "outflow_target_per_minute": controller.outflow_per_minute(),
        "stamped_last_minute": int(stamped or 0),
    }


# The oldest ticket past the head that is still held (its holder polled since ARGV[1], ms): its issue
# time (s), 0 with none held among the first ARGV[2] tickets past the head (-1: the bound was reached, so
# the answer is unknown, not "nobody"). Read-only and atomic, so the head can't move between the reads.
# KEYS: head, issued, seen.
_OLDEST_HELD = """
local head = tonumber(redis.call('GET', KEYS[1]) or '0')
local bound = tonumber(ARGV[2])
local scanned = 0
while scanned < bound do
  local batch = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. head, '+inf', 'LIMIT', scanned, 200)
  if #batch == 0 then return 0 end
  for _, entry in ipairs(batch) do
    local n, at = string.match(entry, '^(%d+):(%d+)$')
    local seen = n and tonumber(redis.call('ZSCORE', KEYS[3], n))
    if seen and seen >= tonumber(ARGV[1]) then return tonumber(at) end
  end
  scanned = scanned + #batch
end
return -1
"""
# Tickets looked at for the oldest held one: abandoned tickets pile up at the front only while the head
# can't move (the active-checkout cap full, queue_all, paused); past this many the age is unknown.
OLDEST_WAITER_SCAN = 2000


def _oldest_waiter_age(client: redis.Redis, controller: AdmissionController, live_since_ms: float,
                       waiting: int, now: float) -> float | None:
    """Seconds since the oldest ticket still held in line was issued; 0 with nobody waiting; None when
    the first :data:`OLDEST_WAITER_SCAN` tickets past the head are all abandoned (unknown)."""
    if waiting == 0:
        return 0.0
    issued = int(client.register_script(_OLDEST_HELD)(
        keys=[controller.keys[1], controller.issued_key, controller.keys[7]],
        args=[int(live_since_ms), OLDEST_WAITER_SCAN]))
    if issued < 0:
        return None
    return max(0.0, now - issued) if issued else 0.0


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
        mail = {row["status"]: row for row in conn.execute(_MAIL).fetchall()}
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
        "mail": {
            **{status: int(mail[status]["n"]) if status in mail else 0 for status in ("pending", "sending", "failed")},
            "failed_last_hour": int(mail["failed"]["recent"]) if "failed" in mail else 0,
            # Since the oldest unsent e-mail was owed (its row made); 0 when every e-mail is sent or failed.
            "oldest_unsent_age_seconds": max([float(mail[s]["oldest_age"] or 0) for s in ("pending", "sending")
                                              if s in mail] or [0.0]),
        },
        "pool": {"size": stats.get("pool_size", 0), "available": stats.get("pool_available", 0),
                 "in_use": max(0, stats.get("pool_size", 0) - stats.get("pool_available", 0)),
                 "waiting": stats.get("requests_waiting", 0), "errors": stats.get("requests_errors", 0)},
    }
