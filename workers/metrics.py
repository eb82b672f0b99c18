"""A worker node's metrics: task counts and durations from Celery's signals, served on ``METRICS_PORT``.

Every task run is counted by name and outcome when it ends (``task_postrun``: its state and the outcome
string our tasks return): ``succeeded``, ``retried`` (it raised Retry), or ``failed`` (failed for good:
a permanent failure, retries exhausted, or an exception). Stamping attempts are also counted by the
stamping service's outcome, finished refunds by path (gateway or manual). After each task the process
copies its database pool's state and its gateway breakers into the gauges, and reports its breakers to
Redis for the web's scrape and the ops page (shared/services/observe.py), at most every
:data:`BREAKER_REPORT_SECONDS` unless one changed.

The node's main process serves ``GET /metrics`` on ``METRICS_BIND_HOST:METRICS_PORT`` (0: off) for all
its prefork children, which count in the node's multiprocess directory (shared/metrics.py); on the
threads pool (payments, reconcile, mail) the main process runs the tasks and counts them itself. It
listens on an internal address only: a worker node has no public listener. A prefork child that starts
folds in the files of children that are gone. A threads-pool node its watchdog ended (a task past its
hard time limit, workers/watchdog.py) starts with its counts at zero, as any restarted node does: the
watchdog's ``task_hard_time_limit`` log line at CRITICAL is the record of it.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis
from celery.signals import task_postrun, task_prerun, worker_process_init, worker_ready

from shared import jobs, metrics
from shared.db import get_pool
from shared.logs import log_event
from shared.payments import breaker
from shared.services import observe

log = logging.getLogger(__name__)

BREAKER_REPORT_SECONDS = 30.0
POOL_RECORD_SECONDS = 1.0
# Outcome strings our tasks return that mean "this message ended without doing its work".
_FAILED_OUTCOMES = frozenset({"failed", "retries_exhausted", "database_unavailable"})
_REFUND_PATHS = {"refunded": "gateway", "refund_manual": "manual"}

_started: dict[str, float] = {}
_last = {"pool": 0.0, "breaker": 0.0}
_last_breaker_state: list[str | None] = [None]


@task_prerun.connect(weak=False)
def _task_started(task_id: str | None = None, **_: object) -> None:
    if task_id:
        _started[task_id] = time.perf_counter()


@task_postrun.connect(weak=False)
def _task_ended(task_id: str | None = None, task=None, retval=None, state: str | None = None, **_: object) -> None:
    name = getattr(task, "name", None) or "unknown"
    started = _started.pop(task_id or "", None)
    if started is not None:
        metrics.TASK_DURATION.labels(name).observe(time.perf_counter() - started)
    if state == "RETRY":
        outcome = "retried"
    elif state == "SUCCESS" and not (isinstance(retval, str) and retval in _FAILED_OUTCOMES):
        outcome = "succeeded"
    else:
        outcome = "failed"
    metrics.TASKS.labels(name, outcome).inc()
    if name == jobs.STAMP_ORDER:
        metrics.STAMPING_ATTEMPTS.labels(_label(retval) if state == "SUCCESS" else outcome).inc()
    elif name == jobs.REFUND_ORDER and state == "SUCCESS" and isinstance(retval, str) and retval in _REFUND_PATHS:
        metrics.REFUNDS.labels(_REFUND_PATHS[retval]).inc()
    _record_process_state(task)


def _label(value: object) -> str:
    """A task's outcome string as a label value: our outcomes are short fixed words, anything else 'other'."""
    return value if isinstance(value, str) and len(value) <= 40 and value.replace("_", "").isalnum() else "other"


def _record_process_state(task) -> None:
    now = time.monotonic()
    settings = getattr(task, "settings", None)
    if settings is None:
        return
    if now - _last["pool"] >= POOL_RECORD_SECONDS:
        _last["pool"] = now
        try:
            metrics.record_pool(get_pool(settings.database_url).get_stats())
        except Exception:  # noqa: BLE001 - the database's trouble shows elsewhere; never fail a task here
            pass
    # The breakers this process made (one per gateway it calls); none in a process that never called one.
    states = breaker.states()
    if not states:
        return
    worst = max(states, key=observe.BREAKER_STATES.__getitem__)
    metrics.GATEWAY_BREAKER.set(observe.BREAKER_STATES[worst])
    if worst == _last_breaker_state[0] and now - _last["breaker"] < BREAKER_REPORT_SECONDS:
        return
    _last["breaker"], _last_breaker_state[0] = now, worst
    try:
        key = f"{settings.redis_key_prefix}{observe.BREAKER_KEY}"
        pipe = task.admission.redis.pipeline(transaction=False)
        pipe.hset(key, f"{socket.gethostname()}:{os.getpid()}", f"{worst} {time.time():.0f}")
        pipe.expire(key, int(observe.BREAKER_REPORT_MAX_AGE_SECONDS * 5))
        pipe.execute()
    except redis.RedisError:
        _last_breaker_state[0] = None  # try again after the next task


@worker_process_init.connect(weak=False)
def _child_started(**_: object) -> None:
    metrics.fold_dead_processes()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404)
            return
        body = metrics.exposition()
        self.send_response(200)
        self.send_header("Content-Type", metrics.CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not events
        pass


@worker_ready.connect(weak=False)
def _serve(sender=None, **_: object) -> None:
    settings = sender.app.conf.meterai_settings if sender is not None else None
    if settings is None or not settings.metrics_port:
        return
    try:
        server = ThreadingHTTPServer((settings.metrics_bind_host, settings.metrics_port), _Handler)
    except OSError as exc:
        # The node still works; it only can't be watched. Said loudly, at ERROR: a scrape target that
        # doesn't answer is also what the "no worker consuming" alert shows.
        log_event(log, "metrics_port_unavailable", level=logging.ERROR, host=settings.metrics_bind_host,
                  port=settings.metrics_port, error=str(exc))
        return
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log_event(log, "metrics_listening", host=settings.metrics_bind_host, port=settings.metrics_port)
