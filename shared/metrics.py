"""Prometheus metrics: every series we count, and prometheus-client's multiprocess mode set up for them.

Why here, in the core: web and workers count into the same definitions, and both run several processes
per node (gunicorn workers, Celery's prefork children), so each node's processes write their values to
files in one directory and a scrape adds them up (prometheus-client's multiprocess mode).

The directory: ``PROMETHEUS_MULTIPROC_DIR`` (default ``<DATA_DIR>/metrics``) is a base; each process group
(a gunicorn master and its workers, a Celery node and its children) counts in ``group-<host>-<leader pid>``
below it, so a web node and a worker node on one machine never add up each other's values, and a node
that starts wipes its own directory and those of groups whose leader is gone (nothing piles up across
restarts). The first process to import this module is its group's leader; processes forked from it
(gunicorn workers, prefork children) inherit the directory. prometheus-client chooses multiprocess mode
when it is imported, so this module must be imported before anything else imports it (gunicorn.conf.py
does, in the master).

Within a group, a process that dies leaves counter and histogram files behind (their counts must not go
backwards); :func:`fold_dead_processes` adds them into one ``*_archive.db`` per kind and deletes them, so
churning workers don't make every scrape read more files. Gauges are "live" only: a dead process's go.

Names follow Prometheus' conventions: ``meterai_`` prefix, base units (seconds), ``_total`` counters,
no per-buyer label (routes are templates, tasks and outcomes fixed strings).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

GROUP_PREFIX = "group-"


def _base_directory() -> Path:
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if given and Path(given).name.startswith(GROUP_PREFIX):
        # Inherited through the environment from a process that leads a group of its own (a test
        # process starting the system, say): this process starts its own group beside it.
        return Path(given).parent
    # Absolute: a process that changes directory later (gunicorn --chdir) still writes here.
    return Path(given or os.path.join(os.environ.get("DATA_DIR") or ".data", "metrics")).absolute()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_group() -> Path:
    base = _base_directory()
    base.mkdir(parents=True, exist_ok=True)
    # Named by host and pid: a folder shared across machines or containers (a volume, NFS) must not let
    # one node's pid 1 take, or reap, another's; only this host's own dead groups are removed.
    here = f"{GROUP_PREFIX}{socket.gethostname()}-"
    for other in base.glob(f"{GROUP_PREFIX}*"):
        if not other.name.startswith(here):
            continue
        leader = other.name[len(here):]
        if leader.isdigit() and not _alive(int(leader)):
            shutil.rmtree(other, ignore_errors=True)
    directory = base / f"{here}{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)  # a reused pid's leftovers
    directory.mkdir()
    return directory


DIRECTORY = _start_group()
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(DIRECTORY)

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram  # noqa: E402
from prometheus_client import generate_latest, multiprocess  # noqa: E402
from prometheus_client import values as _values  # noqa: E402
from prometheus_client.core import GaugeMetricFamily  # noqa: E402,F401 - for the scrape-time collectors
from prometheus_client.mmap_dict import MmapedDict  # noqa: E402

if not getattr(_values.ValueClass, "_multiprocess", False):
    raise RuntimeError("prometheus_client was imported before shared.metrics: its values would stay in this "
                       "process only; import shared.metrics first (gunicorn.conf.py does, in the master)")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# -- web (web/metrics.py) ------------------------------------------------------------------------------
HTTP_REQUESTS = Counter("meterai_http_requests_total", "HTTP requests answered, by route template, method "
                        "and status.", ["route", "method", "status"])
HTTP_DURATION = Histogram("meterai_http_request_duration_seconds", "Time to answer an HTTP request, by route "
                          "template and method.", ["route", "method"],
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
HTTP_REFUSALS = Counter("meterai_http_refusals_total", "Answers 429 and 503, by status and reason (the "
                        "error code: queued, rate_limited, sales_paused, admission_unavailable, ...).",
                        ["status", "reason"])

QUEUE_POLLS = Counter("meterai_queue_polls_total", "Waiting-line polls (GET /api/v1/queue/<ticket>) by the "
                      "server that answered: polls (web/pollserver.py, where the proxy sends them) or web "
                      "(its fallback: a poll server down or unreachable).", ["server"])


# The methods counted by name; any other is counted as "other" (a client can send any token).
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_http_series: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}


def record_http(route: str, method: str, status: int | str, seconds: float | None) -> None:
    """Count one answered request (and its time, when known) by route template, method and status: the
    Flask hook (web/metrics.py), the answers made before Flask (web/staticfiles.py, web/queuepoll.py) and
    the poll server (web/pollserver.py). Each label set's series are looked up once per process: the
    lookup was a tenth of a queue poll's work on the poll server. (The labels are a fixed, small set.)"""
    key = (route, method, str(status))
    series = _http_series.get(key)
    if series is None:
        series = _http_series[key] = (HTTP_REQUESTS.labels(*key), HTTP_DURATION.labels(route, method))
    series[0].inc()
    if seconds is not None:
        series[1].observe(seconds)


# -- workers (workers/metrics.py) ----------------------------------------------------------------------
TASKS = Counter("meterai_tasks_total", "Task runs by task name and outcome: succeeded, retried, or failed "
                "(failed for good: a permanent failure, retries exhausted, or an exception).",
                ["task", "outcome"])
TASK_DURATION = Histogram("meterai_task_duration_seconds", "Time one task run took, by task name.", ["task"],
                          buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0))
STAMPING_ATTEMPTS = Counter("meterai_stamping_attempts_total", "Stamping attempts by outcome (stamped, "
                            "retry, refund_pending, ... as the stamping service returns it).", ["outcome"])
REFUNDS = Counter("meterai_refunds_total", "Refunds finished by path: gateway (refunded through the "
                  "gateway's API) or manual (left for finance to pay out).", ["path"])
GATEWAY_BREAKER = Gauge("meterai_gateway_breaker_state", "The payment gateway's circuit breaker in the "
                        "worst live process: 0 closed, 1 half-open, 2 open.", multiprocess_mode="livemax")

# -- every process with a database pool ------------------------------------------------------------------
DB_POOL_CONNECTIONS = Gauge("meterai_db_pool_connections", "PostgreSQL pool connections by state (in_use, "
                            "idle), summed over live processes.", ["state"], multiprocess_mode="livesum")
DB_POOL_WAITING = Gauge("meterai_db_pool_waiting_requests", "Requests waiting for a pool connection, summed "
                        "over live processes.", multiprocess_mode="livesum")
DB_POOL_TIMEOUTS = Counter("meterai_db_pool_timeouts_total", "Requests that gave up waiting for a pool "
                           "connection.")

_last_timeouts: dict[int, int] = {}


def record_pool(stats: dict[str, int]) -> None:
    """Copy a psycopg pool's ``get_stats()`` into the pool series (this process's share)."""
    size, available = stats.get("pool_size", 0), stats.get("pool_available", 0)
    DB_POOL_CONNECTIONS.labels("in_use").set(max(0, size - available))
    DB_POOL_CONNECTIONS.labels("idle").set(available)
    DB_POOL_WAITING.set(stats.get("requests_waiting", 0))
    timeouts, pid = stats.get("requests_errors", 0), os.getpid()
    # psycopg-pool counts timeouts among requests_errors since the pool was made: add what is new.
    if timeouts > _last_timeouts.get(pid, 0):
        DB_POOL_TIMEOUTS.inc(timeouts - _last_timeouts.get(pid, 0))
    _last_timeouts[pid] = timeouts


# -- collection -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _group_lock(exclusive: bool) -> Iterator[None]:
    """Scrapes read the group's files under a shared lock; folding a dead process's files in takes it
    exclusively, so no scrape sees a count twice or not at all (a counter that dips reads as a reset)."""
    with open(DIRECTORY / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def exposition(*extra_collectors: object) -> bytes:
    """This process group's series in Prometheus' text format, with ``extra_collectors`` (scrape-time
    values) after them."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(DIRECTORY))
    for collector in extra_collectors:
        registry.register(collector)  # type: ignore[arg-type]
    with _group_lock(exclusive=False):
        return generate_latest(registry)


_FILE = re.compile(r"(counter|histogram|summary|gauge_\w+?)_(\d+)\.db")


def fold_dead_processes(pid: int | None = None) -> int:
    """Fold the files of ``pid`` (or of every process of the group that is gone) into the group's archive:
    counters and histograms added to ``<kind>_archive.db``, live gauges deleted (prometheus-client's
    ``mark_process_dead``). Returns how many processes were folded."""
    dead: set[int] = set()
    for path in DIRECTORY.glob("*.db"):
        match = _FILE.fullmatch(path.name)
        if match and (int(match.group(2)) == pid if pid is not None else not _alive(int(match.group(2)))):
            dead.add(int(match.group(2)))
    if not dead:
        return 0
    with _group_lock(exclusive=True):
        for gone in dead:
            multiprocess.mark_process_dead(gone, str(DIRECTORY))
            for kind in ("counter", "histogram", "summary"):
                source = DIRECTORY / f"{kind}_{gone}.db"
                if not source.exists():
                    continue
                archive = MmapedDict(str(DIRECTORY / f"{kind}_archive.db"))
                try:
                    for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(source)):
                        archive.write_value(key, archive.read_value(key)[0] + value, 0.0)
                finally:
                    archive.close()
                source.unlink()
            for gauge in DIRECTORY.glob(f"gauge_*_{gone}.db"):
                gauge.unlink()
    return len(dead)
