"""The one base class every task runs on: its resources, the retry policy, the log line per attempt.

Why one class (as PyPI's Warehouse has ``WarehouseTask``): every task of ours has the same shape — do one
idempotent step of a service, retry a transient failure with backoff, stop after a bound and then leave
the row in a named final state — so that shape is written once, here, and a task module only says what
its task does. The rules:

* **Transient failures** (:class:`~shared.errors.TransientError`: a timeout, a dependency down; for
  stamping, anything, because the service has already released its lease) are retried with exponential
  backoff and full jitter, capped (``RETRY_BASE_SECONDS``, ``RETRY_MAX_SECONDS``): many orders failing at
  once spread their retries instead of coming back together as a second surge.
* **Retries are bounded** by the setting the task names (``retries_setting``). When they run out the
  task's ``exhausted`` hook gives its final outcome (checkout expires the order through the state
  machine; a refund stays pending for the redrive; a poll waits for its next check) and that outcome is
  returned: the message is done, nothing is retried for ever.
* **The database unavailable** (:func:`database_unavailable`: a connection lost or refused, the pool
  timing out, a pooler or server restarting, a serialization failure) is retried the same way, within the
  same bound, but its running out ends the message as ``database_unavailable`` without the ``exhausted`` hook:
  that final outcome (an order expired, an e-mail failed) is the answer to the work failing, not to the
  database being away, and it would need the database itself. The rows still say the work is due, so
  the redrive publishes it again once PostgreSQL answers. (A COMMIT cut off mid-way raises this too, with
  its follow-ups already published: ``shared.db.transaction``.)
* **Permanent failures** are never retried: they are logged and the task ends (``failed``).
* **One structured log line per attempt** (``event=task``: name, attempt, outcome, duration), and every
  task runs inside the Flask app context when the Celery app was made for a Flask app.
"""
from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, ClassVar, NoReturn

import psycopg
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from shared.admission import AdmissionController
from shared.config import Settings
from shared.errors import PermanentError, TransientError
from shared.logs import log_event
from shared.payments.gateway import PaymentGateway, gateway_from_settings
from shared.redisconn import redis_client
from shared.store import DocumentStore, store_from_settings
from workers import watchdog

log = logging.getLogger("workers.tasks")


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)], never below 0.1 s."""
    return max(0.1, random.uniform(0, min(cap, base * (2 ** attempt))))


def worker_id(task_id: str | None) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{task_id or '-'}"


@lru_cache(maxsize=4)
def _store(s: Settings) -> DocumentStore:
    return store_from_settings(s)


@lru_cache(maxsize=64)
def _gateway(s: Settings, pid: int, thread: int) -> PaymentGateway:
    """One per thread as well as per process: a ``requests.Session`` is not documented as thread-safe,
    and the threads pool's slots are long-lived threads (the circuit breaker is shared per process)."""
    return gateway_from_settings(s)


@lru_cache(maxsize=4)
def _admission(s: Settings, pid: int) -> AdmissionController:
    client = redis_client(s.redis_url, timeout=1, sentinel_password=s.redis_sentinel_password)
    return AdmissionController(s, client)


def _gave_up(task: "MeteraiTask", exc: BaseException, *args: Any) -> str:
    return "retries_exhausted"


class MeteraiTask(Task):
    """Base of every meterai task (see the module docstring). Options a task sets in ``@shared_task``:

    ``retries_setting``: the settings field bounding its retries; ``transient``: the exceptions it retries
    (default :class:`~shared.errors.TransientError`); ``exhausted``: ``f(task, exc, *args) -> outcome``
    once retries run out.
    """

    # Retries are ours (bounded below); Celery's own counter must never end a task with an exception.
    max_retries = None
    retries_setting: ClassVar[str] = ""
    transient: ClassVar[tuple[type[BaseException], ...]] = (TransientError,)
    exhausted: ClassVar[Callable[..., str]] = _gave_up
    flask_app: ClassVar[Any] = None

    # -- what a task works with --------------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        return self.app.conf.meterai_settings

    @property
    def store(self) -> DocumentStore:
        return _store(self.settings)

    @property
    def gateway(self) -> PaymentGateway:
        return _gateway(self.settings, os.getpid(), threading.get_ident())

    @property
    def admission(self) -> AdmissionController:
        return _admission(self.settings, os.getpid())

    @property
    def attempt(self) -> int:
        """1 for the first run of a message, 2 for its first retry, …"""
        return self.request.retries + 1

    @property
    def retry_limit(self) -> int:
        return int(getattr(self.settings, self.retries_setting)) if self.retries_setting else 0

    # -- the policy ----------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        watched = watchdog.entry_for(self)  # the time limits, where the pool doesn't enforce them (threads)
        try:
            watchdog.enter(watched)
            if self.flask_app is None:
                return self._attempt(args, kwargs)
            with self.flask_app.app_context():
                return self._attempt(args, kwargs)
        finally:
            outer_limit = None
            while True:
                try:
                    watchdog.leave(watched)
                    break
                except SoftTimeLimitExceeded as exc:
                    # This attempt's soft limit, landing after it had ended (workers/watchdog.py): too
                    # late to end anything, so its own outcome stands. An enclosing attempt's (a task
                    # called directly from another) is that one's to take: raised once this one has left.
                    if not watched.softened:
                        outer_limit = exc
            if outer_limit is not None:
                raise outer_limit

    def _attempt(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        started = time.monotonic()
        fields = {"task": self.name, "attempt": self.attempt, "args": ",".join(str(a) for a in args) or None}
        try:
            outcome = self.run(*args, **kwargs)
        except PermanentError as exc:
            log_event(log, "task", logging.ERROR, **fields, outcome="failed", error=exc.code, ms=_ms(started))
            return "failed"
        except Exception as exc:
            if database_unavailable(exc):
                if self.attempt > self.retry_limit:
                    log_event(log, "task", logging.ERROR, **fields, outcome="database_unavailable",
                              error=type(exc).__name__, detail=f"database unavailable: {str(exc)[:160]}",
                              ms=_ms(started))
                    return "database_unavailable"
                self._retry_later(exc, type(exc).__name__, fields, started)
            if not isinstance(exc, self.transient):
                raise
            error = getattr(exc, "code", None) or type(exc).__name__
            if self.attempt > self.retry_limit:
                outcome = type(self).exhausted(self, exc, *args)
                log_event(log, "task", logging.ERROR, **fields, outcome=outcome, error=error,
                          detail="retries exhausted", ms=_ms(started))
                return outcome
            self._retry_later(exc, error, fields, started)
        log_event(log, "task", **fields, outcome=outcome if isinstance(outcome, str) else "done",
                  ms=_ms(started))
        return outcome

    def _retry_later(self, exc: BaseException, error: str, fields: dict[str, Any], started: float) -> NoReturn:
        delay = backoff_seconds(self.request.retries, self.settings.retry_base_seconds,
                                self.settings.retry_max_seconds)
        log_event(log, "task", logging.WARNING, **fields, outcome="retry", error=error,
                  detail=str(exc)[:200], retry_in=round(delay, 2), ms=_ms(started))
        raise self.retry(exc=exc, countdown=delay)


# SQLSTATEs that mean "the database can't serve this now, try again" (PostgreSQL's appendix A): its
# shutdown or start-up, a session ended for idling, too many connections, and serialization failures and
# deadlocks, which PostgreSQL says to retry. (PgBouncer sends 08P01 for most of its own refusals: retried
# too, a query_timeout of its included.) Not the rest of OperationalError (a statement_timeout, a full
# disk, an out-of-memory): those repeat on every attempt and keep their old course (the task fails; the
# redrive sends it again).
_RETRY_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "57P05", "53300", "40001", "40P01"})


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is PostgreSQL (or the way to it) away for now: no connection to be had (the pool
    timing out, a refused or lost connection: libpq's own errors have no SQLSTATE; class 08), the server
    shutting down or starting, or a transaction PostgreSQL asks to be run again."""
    if not isinstance(exc, psycopg.OperationalError):  # psycopg_pool's PoolTimeout is one, without a SQLSTATE
        return False
    state = exc.sqlstate
    if state is None or state.startswith("08") or state in _RETRY_SQLSTATES:
        return True
    # Whatever its code, a FATAL or PANIC from the server ended the session: the connection is lost.
    # (Not the connection's state, read after the pool took it back: one past its lifetime is closed
    # then, and would make a statement_timeout look like a lost connection.)
    return exc.diag.severity_nonlocalized in ("FATAL", "PANIC")


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
