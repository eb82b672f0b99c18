"""What the ops page shows, gathered in one call: the waiting room, stamping, refunds, dependencies.

Most of it is :func:`shared.services.observe.snapshot`, the scrape-time state ``/metrics`` exports too;
this module adds what only a person watching needs. The page refreshes every few seconds for every
operator watching, so each number must be cheap at a million orders a day: database figures come only
from the partial indexes the sweeps already use (open stamping work, pending and manual refunds),
never from a scan of settled orders; Redis figures are a handful of reads. Redis may lose everything
kept here: the page then shows an empty chart and unknown waits, never a wrong count of money or
stamps (those come from PostgreSQL).

The line keeps no record of when each ticket was issued or admitted, so waits are read from the line's
own counters over time: :func:`record_sample` keeps ``(when, head, tail)`` in a bounded Redis sorted set
(at most one sample per :data:`SAMPLE_EVERY_SECONDS`, an hour of them). Ticket ``n`` was issued when
``tail`` reached ``n`` and let in when ``head`` did, so its wait is the time between the two
(:func:`waits`), good to one sampling interval. The same samples draw the last hour's chart. They are
written whenever the overview is computed, and by beat when it schedules :func:`record_sample`, so the
chart also covers the minutes nobody watched.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis

from shared.admission import AdmissionController, AdmissionUnavailable
from shared.config import Settings
from shared.db import get_pool
from shared.services import observe

# One million stamps a day, the peak the 2024 surge reached, as stamps per minute.
PACE_PER_MINUTE = round(1_000_000 / (24 * 60))  # 694
SAMPLE_EVERY_SECONDS = 5
HISTORY_SECONDS = 3600
# Waits are reported for tickets let in during this window.
WAIT_WINDOW_SECONDS = 600
# Switches of the admission mode kept for the page (the log line is the record; this is a view of it).
AUDIT_KEEP = 20


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the epoch
    head: int
    tail: int
    outflow: int
    epoch: str

    def encode(self) -> str:
        return f"{self.at:.3f}:{self.head}:{self.tail}:{self.outflow}:{self.epoch}"

    @classmethod
    def decode(cls, raw: bytes | str) -> "Sample | None":
        text = raw.decode() if isinstance(raw, bytes) else raw
        try:
            at, head, tail, outflow, epoch = text.split(":", 4)
            return cls(float(at), int(head), int(tail), int(outflow), epoch)
        except ValueError:
            return None


# -- pure functions over samples (tested without services) ---------------------------------------

def reached_at(samples: list[Sample], value: Callable[[Sample], int], n: int) -> float | None:
    """When ``value`` (head or tail) first reached ``n``, interpolated between the two samples around
    it; None when it had already reached ``n`` at the first sample (before the history) or never did."""
    previous: Sample | None = None
    for sample in samples:
        if value(sample) >= n:
            if previous is None:
                return None
            low, high = value(previous), value(sample)
            share = (n - low) / (high - low) if high > low else 1.0
            return previous.at + share * (sample.at - previous.at)
        previous = sample
    return None


def _current_epoch(samples: list[Sample]) -> list[Sample]:
    """The samples of the line as it is now: after Redis lost the queue its counters start again."""
    if not samples:
        return []
    epoch = samples[-1].epoch
    run: list[Sample] = []
    for sample in samples:
        if sample.epoch != epoch or (run and sample.tail < run[-1].tail):
            run = []
        run.append(sample)
    return run


def waits(samples: list[Sample], now: float, window: float = WAIT_WINDOW_SECONDS, points: int = 200
          ) -> dict[str, float | None]:
    """Wait p50/p90 of tickets let in during the last ``window`` seconds and the oldest waiter's age.

    ``oldest_waiter_seconds`` is a lower bound (and ``oldest_waiter_before_history`` true) when the
    ticket at the head of the line was issued before the first sample."""
    run = _current_epoch(samples)
    result: dict[str, Any] = {"wait_p50_seconds": None, "wait_p90_seconds": None, "oldest_waiter_seconds": None,
                              "oldest_waiter_before_history": False, "waits_measured": 0}
    if not run:
        return result
    last = run[-1]
    if last.tail > last.head:
        issued = reached_at(run, lambda s: s.tail, last.head + 1)
        if issued is None:
            result["oldest_waiter_seconds"] = round(now - run[0].at, 1)
            result["oldest_waiter_before_history"] = True
        else:
            result["oldest_waiter_seconds"] = round(max(0.0, now - issued), 1)
    else:
        result["oldest_waiter_seconds"] = 0.0
    since = now - window
    earlier = [s for s in run if s.at <= since]
    first_head = earlier[-1].head if earlier else run[0].head
    admitted = last.head - first_head
    if admitted <= 0:
        return result
    step = max(1, admitted // points)
    measured: list[float] = []
    for n in range(first_head + 1, last.head + 1, step):
        issued, let_in = reached_at(run, lambda s: s.tail, n), reached_at(run, lambda s: s.head, n)
        if issued is not None and let_in is not None:
            measured.append(max(0.0, let_in - issued))
    if measured:
        measured.sort()
        result["wait_p50_seconds"] = round(_quantile(measured, 0.5), 1)
        result["wait_p90_seconds"] = round(_quantile(measured, 0.9), 1)
        result["waits_measured"] = len(measured)
    return result


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _line_now(line: dict[str, Any]) -> dict[str, Any]:
    """The line as the admission keys say it is now: the people still holding a ticket (tickets nobody
    polls for the abandon window are moved over, not admitted) and the oldest of them, measured from
    its issue time; these replace the sample-based estimate of ``waits``."""
    if not line:
        return {"line_length": None, "tickets_past_head": None}
    return {"line_length": line.get("waiting", line.get("length")), "tickets_past_head": line.get("length"),
            **({"oldest_waiter_seconds": round(float(line["oldest_waiter_seconds"]), 1),
                "oldest_waiter_before_history": False}
               if line.get("oldest_waiter_seconds") is not None else {})}


def minute_history(samples: list[Sample], stamped: dict[int, int], now: float,
                   minutes: int = HISTORY_SECONDS // 60) -> list[dict[str, Any]]:
    """One point per minute of the last hour: the line's length and the outflow target at the minute's
    last sample (None where no sample was taken), and the stamps counted in that minute."""
    last_in_minute: dict[int, Sample] = {}
    for sample in samples:
        last_in_minute[int(sample.at // 60)] = sample
    current = int(now // 60)
    points = []
    for minute in range(current - minutes + 1, current + 1):
        sample = last_in_minute.get(minute)
        points.append({
            "minute": minute * 60,
            "line": max(0, sample.tail - sample.head) if sample else None,
            "outflow": sample.outflow if sample else None,
            "stamped": stamped.get(minute, 0),
        })
    return points


# -- reading and writing Redis --------------------------------------------------------------------

def _samples_key(settings: Settings) -> str:
    return f"{settings.redis_key_prefix}ops:samples"


def record_sample(settings: Settings, client: redis.Redis, admission: AdmissionController,
                  now: float | None = None) -> bool:
    """Keep one ``(when, head, tail, outflow)`` sample of the line, unless another process kept one
    within :data:`SAMPLE_EVERY_SECONDS`; trims the set to the last hour. True when one was written.
    Called by every overview, and meant for beat too (so unwatched minutes are sampled)."""
    now = time.time() if now is None else now
    lock = f"{settings.redis_key_prefix}ops:sample-lock"
    if not client.set(lock, "1", nx=True, px=SAMPLE_EVERY_SECONDS * 1000 - 200):
        return False
    keys = admission.keys  # tail, head, …, epoch: the admission controller's own keys, read only
    tail, head, epoch = client.mget(keys[0], keys[1], keys[6])
    sample = Sample(now, int(head or 0), int(tail or 0), admission.outflow_per_minute(), (epoch or b"-").decode())
    key = _samples_key(settings)
    pipe = client.pipeline()
    pipe.zadd(key, {sample.encode(): now})
    pipe.zremrangebyscore(key, "-inf", now - HISTORY_SECONDS - 60)
    pipe.expire(key, HISTORY_SECONDS * 2)
    pipe.execute()
    return True


class OpsView:
    """The overview for one process: its Redis client, its admission controller, its settings."""

    def __init__(self, settings: Settings, client: redis.Redis, admission: AdmissionController,
                 store_writable: Callable[[], bool]) -> None:
        self.settings = settings
        self.redis = client
        self.admission = admission
        self.store_writable = store_writable
        p = settings.redis_key_prefix
        self.samples_key = _samples_key(settings)
        self.audit_key = f"{p}ops:audit"
        # The stamping workers' per-minute counters (AdmissionController.record_stamped), read as they are.
        self.stamped_prefix = f"{p}stats:stamped:"
        self._store_checked: tuple[float, bool] | None = None

    # samples
    def record_sample(self, now: float | None = None) -> bool:
        return record_sample(self.settings, self.redis, self.admission, now)

    def samples(self, now: float) -> list[Sample]:
        raw = self.redis.zrangebyscore(self.samples_key, now - HISTORY_SECONDS - 60, "+inf")
        return [s for s in (Sample.decode(r) for r in raw) if s is not None]

    def stamped_per_minute(self, now: float) -> dict[int, int]:
        current = int(now // 60)
        minutes = list(range(current - HISTORY_SECONDS // 60 + 1, current + 1))
        values = self.redis.mget([f"{self.stamped_prefix}{m}" for m in minutes])
        return {m: int(v) for m, v in zip(minutes, values) if v is not None}

    # audit
    def record_switch(self, entry: dict[str, Any]) -> None:
        pipe = self.redis.pipeline()
        pipe.lpush(self.audit_key, json.dumps(entry, ensure_ascii=False))
        pipe.ltrim(self.audit_key, 0, AUDIT_KEEP - 1)
        pipe.execute()

    def recent_switches(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.redis.lrange(self.audit_key, 0, AUDIT_KEEP - 1):
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        return out

    # the whole page
    def overview(self) -> dict[str, Any]:
        """The page's numbers: :func:`shared.services.observe.snapshot` (what ``/metrics`` exports too)
        plus what only the page shows: waits, the hour's chart, stamps this minute, retries, refunds
        opened in the last hour, Redis's round trip, the store's write probe, the last switches."""
        now = time.time()
        snap = observe.snapshot(self.settings, self.redis, self.admission)
        errors = snap["errors"]
        line, orders = snap.get("line") or {}, snap.get("orders") or {}
        work, refunds, pool = snap.get("stamping") or {}, snap.get("refunds") or {}, snap.get("pool") or {}
        queues = snap.get("queues") or {}
        redis_ok = "line" not in errors
        extras: dict[str, Any] = {"waits": {}, "history": [], "stamped": {}, "switches": [], "admitted": None}
        started = time.perf_counter()
        try:
            self.redis.ping()
            latency = round((time.perf_counter() - started) * 1000, 1)
            self.record_sample(now)
            samples = self.samples(now)
            extras["stamped"] = stamped = self.stamped_per_minute(now)
            extras["waits"] = waits(samples, now)
            extras["history"] = minute_history(samples, stamped, now)
            extras["switches"] = self.recent_switches()
            extras["admitted"] = int(self.redis.zcount(self.admission.keys[4], (now - 60) * 1000, "+inf"))
        except (redis.RedisError, AdmissionUnavailable) as exc:  # the controller wraps Redis errors
            redis_ok, latency = False, None
            errors.setdefault("redis", type(exc).__name__)
        database = self._database()
        minute = int(now // 60)
        stamped = extras["stamped"]
        stamping_queue = queues.get("stamping") or {}
        return {
            "at": now,
            "errors": errors,
            "waiting_room": {
                "mode": line.get("mode"),
                "active_checkouts": line.get("active_checkouts"),
                "admitted_last_minute": extras["admitted"],
                "outflow_per_minute": line.get("outflow_target_per_minute"),
                **extras["waits"],
                **_line_now(line),
            },
            "checkout": {"created": orders.get("created"), "awaiting_payment": orders.get("awaiting_payment")},
            "stamping": {
                "backlog": (orders["paid"] + orders["stamping"]) if orders else None,
                "paid": orders.get("paid"), "in_progress": orders.get("stamping"),
                "oldest_job_seconds": work.get("oldest_paid_age_seconds"),
                "stamped_last_minute": stamped.get(minute - 1, 0) if redis_ok else None,
                "stamped_this_minute": stamped.get(minute, 0) if redis_ok else None,
                "stamped_last_hour": sum(stamped.values()) if redis_ok else None,
                "outflow_per_minute": line.get("outflow_target_per_minute"),
                "pace_per_minute": PACE_PER_MINUTE,
                "retrying": database.get("retrying"), "retries": database.get("retries"),
                "queue_messages": stamping_queue.get("messages"),
                "queue_oldest_seconds": stamping_queue.get("oldest_age_seconds"),
                "queues": queues,
            },
            "refunds": {
                "pending": (refunds.get("pending") or {}).get("count"),
                "oldest_pending_seconds": (refunds.get("pending") or {}).get("oldest_age_seconds"),
                "manual": (refunds.get("manual") or {}).get("count"),
                "oldest_manual_seconds": (refunds.get("manual") or {}).get("oldest_age_seconds"),
                "opened_last_hour": database.get("opened_last_hour"),
                "nearest_deadline_seconds": work.get("nearest_deadline_seconds"),
            },
            "dependencies": {
                "redis": {"ok": redis_ok, "latency_ms": latency},
                "database": {"ok": "database" not in errors and database.get("ok", False),
                             "max": get_pool(self.settings.database_url).max_size, **pool},
                "document_store": {"ok": self._store_ok()},
                "gateway_breaker": snap.get("breaker") or {"state": None},
            },
            "history": extras["history"],
            "switches": extras["switches"],
        }

    def _store_ok(self) -> bool:
        """The store's write probe, at most every 10 s per process (it writes and deletes an object)."""
        checked = self._store_checked
        if checked is None or time.monotonic() - checked[0] > 10:
            try:
                ok = bool(self.store_writable())
            except Exception:  # noqa: BLE001 - any failure means "not writable"
                ok = False
            self._store_checked = checked = (time.monotonic(), ok)
        return checked[1]

    def _database(self) -> dict[str, Any]:
        """The page's own database figures (retries of open work, refunds opened in the last hour)."""
        try:
            with get_pool(self.settings.database_url).connection(timeout=2) as conn:
                work = conn.execute(_RETRIES).fetchone()
                opened = conn.execute(_OPENED).fetchone()
        except Exception:  # noqa: BLE001 - psycopg's and the pool's errors alike: the page says "down"
            return {"ok": False}
        return {"ok": True, "retrying": int(work["retrying"]), "retries": int(work["retries"]),
                "opened_last_hour": int(opened["n"])}


# Open stamping work on a second or later attempt (the partial index of paid/stamping orders).
_RETRIES = ("SELECT count(*) FILTER (WHERE stamp_attempts > 1) AS retrying,"
            " coalesce(sum(stamp_attempts - 1) FILTER (WHERE stamp_attempts > 1), 0) AS retries"
            " FROM orders WHERE status IN ('paid', 'stamping')")
# Refunds opened in the last hour: stamping that failed for good or ran out of time, and extra
# captures. No index on requested_at: refunds are few (they are for real failures).
_OPENED = "SELECT count(*) AS n FROM refunds WHERE requested_at > now() - interval '1 hour'"


def sanitised_operator(raw: str | None, limit: int = 64) -> str | None:
    """The name an operator typed, as the audit log records it: letters, digits, space and ``.-_@``,
    at most ``limit`` characters. None when absent; ValueError when it has anything else or is too long
    (the page offers the same rule, so a refused name is a client that ignores it)."""
    if raw is None:
        return None
    name = " ".join(raw.split())
    if not name:
        return None
    if len(name) > limit:
        raise ValueError(f"at most {limit} characters")
    if not all(c.isascii() and (c.isalnum() or c in " .-_@") for c in name):
        raise ValueError("letters, digits, spaces and . - _ @ only")
    return name
