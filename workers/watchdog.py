"""Time limits for tasks on Celery's threads pool, which enforces none: a watchdog thread does.

Why: the I/O-bound groups (payments, reconcile, mail) spend their tasks waiting on the gateway, the SMTP
server or PostgreSQL, and the prefork pool's parent costs each of their tasks more CPU than the threads
pool does (receiving, pickling to a child and back, acking: ≈ 0.4 ms a hop, ≈ 2 of the 11.7 ms the mail
group cost an order; docs/benchmarks.md). But every group relies on ``task_time_limit`` to end a task that
hangs (a socket with no timeout, a lock never granted), and only prefork enforces it. The watchdog gives
the threads pool the same two limits, with prefork's outcomes:

* **Soft limit**: :class:`~celery.exceptions.SoftTimeLimitExceeded` is raised in the task's thread
  (``PyThreadState_SetAsyncExc``), as prefork raises it in its child from a signal. The task ends as a
  failure the way prefork's does; ours retry or give up by their own rules. A thread blocked inside one C
  call (a read without a timeout) only sees it when that call returns, hence:
* **Hard limit**: a thread can't be killed, so the process ends, as prefork kills its child. First the
  hung task's message is acknowledged (prefork acks a task that hit its hard limit, with
  ``task_acks_on_failure_or_timeout``: its work is in PostgreSQL, and the redrive takes it up from there,
  so a message that always hangs can't crash the node in a loop), and every other message this process
  holds goes back to its queue at the front (prefork's ``reject_on_worker_lost``: those tasks were only
  ended because their process had to go). Then ``os._exit`` with :data:`EXIT_CODE`, the process manager
  starts it again (systemd ``Restart=always``, the development launcher). If Redis can't be reached for
  that, the messages come back after the visibility timeout and the redrive publishes their work anyway.

Started by :func:`start` on ``worker_ready`` for the threads and solo pools only. Tasks register
themselves in :meth:`workers.tasks.base.MeteraiTask.__call__` (:func:`watching`); with no watchdog
running that costs a dictionary entry.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from celery.concurrency.solo import TaskPool as SoloPool
from celery.concurrency.thread import TaskPool as ThreadPool
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_ready

from shared.logs import log_event

log = logging.getLogger(__name__)

# How often the watchdog looks: a limit is enforced within this much of its due time.
CHECK_SECONDS = 0.25
# What a process ended by the hard limit exits with (EX_SOFTWARE): the process manager starts it again.
EXIT_CODE = 70
# How long the last acknowledgements and restores may take before the process ends regardless.
GIVE_BACK_SECONDS = 5.0


@dataclass
class _Running:
    thread: int
    task: str
    task_id: str | None
    started: float
    soft_at: float | None
    hard_at: float | None
    softened: bool = False


_lock = threading.Lock()
_running: dict[int, _Running] = {}
_started = threading.Event()


def _set_async_exc(thread: int, exc: type[BaseException] | None) -> int:
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread),
                                                       ctypes.py_object(exc) if exc else None)


def limits(task: Any) -> tuple[float | None, float | None]:
    """(hard, soft) seconds for this run of ``task``, as Celery's Request reads them: the message's own
    ``timelimit`` header first, then the task's (which Celery fills from ``task_time_limit``)."""
    hard, soft = getattr(task.request, "timelimit", None) or (None, None)
    return (hard if hard is not None else task.time_limit,
            soft if soft is not None else task.soft_time_limit)


@contextmanager
def watching(task: Any) -> Iterator[None]:
    """Run a task's attempt under the watchdog's limits. Always registered (a dictionary entry), so a
    task that began just before the watchdog started is still watched; where none runs (prefork) the
    entry is all it costs."""
    hard, soft = limits(task)
    now = time.monotonic()
    entry = _Running(threading.get_ident(), task.name, task.request.id, now,
                     now + soft if soft else None, now + hard if hard else None)
    with _lock:
        _running[entry.thread] = entry
    try:
        yield
    finally:
        with _lock:
            _running.pop(entry.thread, None)
            if entry.softened:
                # Raised too late to land inside the task: it must not land in Celery's bookkeeping.
                _set_async_exc(entry.thread, None)


def check(now: float | None = None) -> list[_Running]:
    """One look: soften what passed its soft limit; return what passed its hard limit."""
    now = time.monotonic() if now is None else now
    overdue = []
    with _lock:
        for entry in _running.values():
            if entry.hard_at is not None and now >= entry.hard_at:
                overdue.append(entry)
            elif entry.soft_at is not None and now >= entry.soft_at and not entry.softened:
                entry.softened = True
                _set_async_exc(entry.thread, SoftTimeLimitExceeded)
                log_event(log, "task_soft_time_limit", logging.ERROR, task=entry.task, task_id=entry.task_id,
                          seconds=round(now - entry.started, 1))
    return overdue


def _messages() -> dict[str | None, Any]:
    """Task id -> message, for every message this process received and hasn't finished."""
    from celery.worker import state

    found = {}
    for request in list(state.reserved_requests) + list(state.active_requests):
        message = getattr(request, "message", None)
        if message is not None and getattr(message, "channel", None) is not None:
            found[request.id] = message
    return found


def give_back(hung: list[_Running]) -> tuple[int, int]:
    """Acknowledge the hung tasks' messages and put back every other one this process holds: (acked,
    restored)."""
    messages = _messages()
    tags = {messages[entry.task_id].delivery_tag for entry in hung if entry.task_id in messages}
    acked = restored = 0
    for channel in {message.channel for message in messages.values()}:
        qos = channel.qos
        for tag in list(qos._delivered):  # kombu keeps no public list of a channel's unacked messages
            if tag in tags:
                qos.ack(tag)
                acked += 1
            else:
                qos.restore_by_tag(tag, leftmost=True)
                restored += 1
    return acked, restored


def _end_process(hung: list[_Running]) -> None:
    now = time.monotonic()
    for entry in hung:
        log_event(log, "task_hard_time_limit", logging.CRITICAL, task=entry.task, task_id=entry.task_id,
                  seconds=round(now - entry.started, 1), detail="ending the worker process")
    outcome: dict[str, Any] = {}

    def _give_back() -> None:
        try:
            outcome["acked"], outcome["restored"] = give_back(hung)
        except Exception as exc:  # noqa: BLE001 - the visibility timeout and the redrive remain
            outcome["error"] = repr(exc)

    helper = threading.Thread(target=_give_back, name="watchdog-give-back", daemon=True)
    helper.start()
    helper.join(GIVE_BACK_SECONDS)
    log_event(log, "worker_exiting", logging.CRITICAL, reason="task_hard_time_limit", code=EXIT_CODE,
              **(outcome or {"error": "timed out"}))
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001
            pass
    sys.stderr.flush()
    os._exit(EXIT_CODE)


def _watch() -> None:
    while True:
        time.sleep(CHECK_SECONDS)
        hung = check()
        if hung:
            _end_process(hung)


def start() -> bool:
    """Start the watchdog in this process (once). True if it was started now."""
    with _lock:
        if _started.is_set():
            return False
        _started.set()
    threading.Thread(target=_watch, name="task-watchdog", daemon=True).start()
    return True


@worker_ready.connect(weak=False, dispatch_uid="meterai.watchdog")
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    pool = getattr(sender, "pool", None)
    if isinstance(pool, (ThreadPool, SoloPool)):
        start()
        log_event(log, "task_watchdog_started", pool=type(pool).__module__.rsplit(".", 1)[-1])
