"""Time limits for tasks on Celery's threads pool, which enforces none: a watchdog thread does.

Why: the I/O-bound groups (payments, reconcile, mail) spend their tasks waiting on the gateway, the SMTP
server or PostgreSQL, and the prefork pool's parent costs each of their tasks more CPU than the threads
pool does (receiving, pickling to a child and back, acking: a no-op hop's worker side 0.99 → 0.66 ms,
``loadtests.bench.celery_hop``; docs/benchmarks.md). But every group relies on ``task_time_limit`` to end
a task that hangs (a socket with no timeout, a lock never granted), and only prefork enforces it. The
watchdog enforces the same two limits:

* **Soft limit**: :class:`~celery.exceptions.SoftTimeLimitExceeded` is raised in the task's thread
  (``PyThreadState_SetAsyncExc``), as prefork raises it in its child from a signal; the task ends as a
  failure the way prefork's does, and ours retry or give up by their own rules. A thread blocked inside
  one C call (a read without a timeout) only sees it when that call returns, hence:
* **Hard limit**: a thread can't be killed, so the process ends (prefork kills only the child: here every
  task of the node ends with it, which is why only groups whose tasks are idempotent and mostly waiting
  run on threads). In order: the process stops taking messages (no new BRPOP; one already waiting at
  Redis is let finish and read, so a message it brings is held rather than lost with the process); the
  hung task's message is removed from the unacknowledged index (prefork acks a task that hit its hard
  limit, with ``task_acks_on_failure_or_timeout``: its work is in PostgreSQL and the redrive takes it up,
  so a message that always hangs can't crash the node in a loop); every other message it holds goes back
  to the consuming end of its queue in the order received (as kombu gives back a closing channel's: those
  tasks were ended only because their process had to go, and run again, idempotently, elsewhere); then
  ``os._exit`` with :data:`EXIT_CODE`, and the process manager starts it again (systemd
  ``Restart=always``, the development launcher). A deadline thread ends the process in any case a few
  seconds later; what couldn't be put back comes back after the visibility timeout, and the redrive
  publishes its work from PostgreSQL anyway.

An entry counts only while the attempt that registered it is on its thread's stack (its frame, by
identity): one left behind by an exception where nothing could remove it is dropped when its limits fall
due, never raised into whatever the thread runs now, never a reason to end the node.

The watchdog never goes through :mod:`logging`: a soft limit raised in a thread just as it took a log
handler's lock leaves that lock taken, and a watchdog waiting on it would enforce nothing. Its lines are
written straight to stderr, in the JSON shape of every other line.

Started by :func:`start` on ``worker_ready`` for the threads pool only. Tasks register
themselves in :meth:`workers.tasks.base.MeteraiTask.__call__` (:func:`enter`, :func:`leave`); where no
watchdog runs (prefork) the entry is all it costs.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from celery.concurrency.thread import TaskPool as ThreadPool
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_ready

# How often the watchdog looks: a limit is enforced within this much of its due time.
CHECK_SECONDS = 0.25
# What a process ended by the hard limit exits with (EX_SOFTWARE): the process manager starts it again.
EXIT_CODE = 70
# How long giving the messages back may take, after the last BRPOP (brpop_timeout + 2 s), before the
# process ends regardless.
GIVE_BACK_SECONDS = 4.0


@dataclass(eq=False)
class _Running:
    thread: int
    task: str
    task_id: str | None
    delivery_tag: Any  # its message's, looked up as it starts (the channel it came on may be gone by then)
    started: float
    soft_at: float | None
    hard_at: float | None
    softened: bool = False
    frame: Any = None  # the attempt's frame (MeteraiTask.__call__'s): the entry is live while it runs


_lock = threading.Lock()
_running: dict[int, list[_Running]] = {}  # thread -> its attempts, innermost last
_started = threading.Event()
_consumer: list[Any] = []  # the worker's Consumer, once ready: its task channel holds our messages


def _say(level: str, event: str, **fields: Any) -> None:
    """One log line, straight to stderr (see the module docstring: never through logging's locks)."""
    line = {"timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "level": level,
            "logger": __name__, "event": event, **fields}
    try:
        os.write(2, (json.dumps(line, default=str) + "\n").encode())
    except OSError:
        pass


def _set_async_exc(thread: int, exc: type[BaseException] | None) -> int:
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread),
                                                       ctypes.py_object(exc) if exc else None)


def limits(task: Any) -> tuple[float | None, float | None]:
    """(hard, soft) seconds for this run of ``task``, as Celery's Request and prefork pool read them: the
    message's own ``timelimit`` header first, then the task's (which Celery fills from
    ``task_time_limit``); a 0 or missing value falls back to the next."""
    hard, soft = getattr(task.request, "timelimit", None) or (None, None)
    return hard or task.time_limit, soft or task.soft_time_limit


def _delivery_tag(task_id: str | None) -> Any:
    from celery.worker import state

    request = state.requests.get(task_id) if task_id else None  # a dict read: safe beside the consumer
    message = getattr(request, "message", None)
    return getattr(message, "delivery_tag", None)


def entry_for(task: Any) -> _Running:
    """This thread's attempt of ``task`` with its deadlines, not yet watched (:func:`enter` does that).
    Two steps, so the caller holds the entry before it is registered: an asynchronous exception landing
    as it is registered can then never leave it registered with nobody to remove it (a stale entry would
    in time read as a task past its hard limit and end a healthy node)."""
    hard, soft = limits(task)
    now = time.monotonic()
    return _Running(threading.get_ident(), task.name, task.request.id, _delivery_tag(task.request.id), now,
                    now + soft if soft else None, now + hard if hard else None, frame=sys._getframe(1))


def enter(entry: _Running) -> None:
    """Watch ``entry`` until :func:`leave`. Always registered (a dictionary entry), so a task that began
    just before the watchdog started is still watched. Nested attempts on one thread (a task calling
    another directly) stack, and each leaves only its own entry."""
    with _lock:
        _running.setdefault(entry.thread, []).append(entry)


def leave(entry: _Running | None) -> None:
    """``entry``'s attempt is over (``None``: it never registered). A soft limit raised just before can
    land in here (at this function's first line, or as the lock is taken): the caller catches it and
    calls again (:meth:`workers.tasks.base.MeteraiTask.__call__`), so this removes exactly ``entry`` and
    is a no-op the second time. Once the entry is gone the watchdog can't raise for it any more; one it
    raised and that hasn't landed is taken back."""
    if entry is None:
        return
    with _lock:
        _drop(entry)
    entry.frame = None
    if entry.softened:
        _set_async_exc(entry.thread, None)


def _drop(entry: _Running) -> bool:
    """Unregister ``entry`` (under ``_lock``); whether it was registered."""
    stack = _running.get(entry.thread, [])
    found = any(other is entry for other in stack)
    if found:
        stack[:] = [other for other in stack if other is not entry]
    if not stack:
        _running.pop(entry.thread, None)
    return found


def check(now: float | None = None) -> list[_Running]:
    """One look: soften what passed its soft limit; return what passed its hard limit. An entry whose
    thread has left its attempt without leaving it (an exception where nothing could remove it) is
    dropped instead: raising in that thread would hit whatever it runs now, and ending the node for it
    would end a healthy one."""
    now = time.monotonic() if now is None else now
    overdue, softened, stale = [], [], []
    with _lock:  # only the registry, a look at the thread's frames and the raise: nothing here waits
        frames = None  # the threads' stacks, looked at only when something falls due
        for entry in [entry for stack in _running.values() for entry in stack]:
            due_hard = entry.hard_at is not None and now >= entry.hard_at
            due_soft = entry.soft_at is not None and now >= entry.soft_at and not entry.softened
            if not (due_hard or due_soft):
                continue
            frames = sys._current_frames() if frames is None else frames
            if not _still_running(entry, frames.get(entry.thread)):
                _drop(entry)
                stale.append(entry)
            elif due_hard:
                overdue.append(entry)
            else:
                entry.softened = True
                _set_async_exc(entry.thread, SoftTimeLimitExceeded)
                softened.append(entry)
    for entry in softened:
        _say("error", "task_soft_time_limit", task=entry.task, task_id=entry.task_id,
             seconds=round(now - entry.started, 1))
    for entry in stale:
        _say("error", "task_watchdog_stale_entry", task=entry.task, task_id=entry.task_id)
    return overdue


def _still_running(entry: _Running, frame: Any) -> bool:
    """Whether the attempt that registered ``entry`` is still on its thread's stack (``frame``: the
    thread's current frame): identity of frame objects only, nothing of the thread's is read or changed."""
    while frame is not None:
        if frame is entry.frame:
            return True
        frame = frame.f_back
    return False


def _task_channel() -> Any:
    consumer = _consumer[0] if _consumer else None
    task_consumer = getattr(consumer, "task_consumer", None)
    return getattr(task_consumer, "channel", None)


def stop_consuming(channel: Any) -> bool:
    """No more messages for this process, and none lost on the way: no new BRPOP is sent (the channel's
    ``_brpop_start`` does nothing from now on), and one already waiting at Redis is let finish and be
    read by the event loop as usual (credit forced, or kombu would leave a paused BRPOP's reply unread:
    a message Redis popped for it would be lost with the process), so whatever it brings is held, and
    given back below. True once no BRPOP has been in flight for a tenth of a second (the loop may have
    looked the method up just before it was replaced: that BRPOP shows within microseconds), within
    ``brpop_timeout`` and two seconds (a paused one resumes at the loop's next tick)."""
    channel._brpop_start = lambda *args, **kwargs: None
    channel.qos.can_consume = lambda: True
    deadline = time.monotonic() + _brpop_timeout(channel) + 2.0
    quiet_since = None
    while time.monotonic() < deadline:
        if channel._in_poll:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= 0.1:
            return True
        time.sleep(0.01)
    return False


def _brpop_timeout(channel: Any) -> float:
    return float(getattr(channel, "brpop_timeout", 1) or 1)


def give_back(channel: Any, hung: list[_Running]) -> tuple[int, int]:
    """Remove the hung tasks' messages from the unacknowledged index (shared by every channel: one that
    came on a channel since closed is found too), put every other message this process holds back at
    the consuming end of its queue, first received first again: (removed, restored: at most that many,
    a task that finished meanwhile has nothing to put back)."""
    qos = channel.qos
    hung_tags = {entry.delivery_tag for entry in hung if entry.delivery_tag is not None}
    hung_ids = {entry.task_id for entry in hung}
    for tag in hung_tags:
        qos._remove_from_indices(tag).execute()
    done: set[Any] = set(hung_tags)
    restored = 0
    for _ in range(2):  # a second look for anything received while the first was put back
        acked = set(qos._dirty)  # acknowledged in Redis already, not yet dropped from _delivered
        held = [tag for tag, message in list(qos._delivered.items())
                if tag not in acked and tag not in done
                and (getattr(message, "headers", None) or {}).get("id") not in hung_ids]
        for tag in reversed(held):  # each RPUSH goes in front of the last: the first received ends up first
            qos.restore_by_tag(tag, leftmost=False)
        done.update(held)
        restored += len(held)
    return len(hung_tags), restored


def _end_process(hung: list[_Running]) -> None:
    outcome: dict[str, Any] = {}
    try:
        channel = _task_channel()
        # Whatever happens below, the process ends in time: the give-back's own bound and a margin.
        limit = (_brpop_timeout(channel) if channel is not None else 1.0) + 2.0 + GIVE_BACK_SECONDS
        threading.Timer(limit, os._exit, args=(EXIT_CODE,)).start()
        now = time.monotonic()
        for entry in hung:
            _say("critical", "task_hard_time_limit", task=entry.task, task_id=entry.task_id,
                 seconds=round(now - entry.started, 1), detail="ending the worker process")
        if channel is None:
            outcome["error"] = "no consumer channel (reconnecting?)"
        else:
            if not stop_consuming(channel):
                outcome["brpop"] = "unread"  # the event loop didn't read it: the redrive covers its message
            outcome["removed"], outcome["restored"] = give_back(channel, hung)
    except BaseException as exc:  # noqa: BLE001 - the visibility timeout and the redrive remain
        outcome["error"] = repr(exc)
    finally:
        _say("critical", "worker_exiting", reason="task_hard_time_limit", code=EXIT_CODE, **outcome)
        os._exit(EXIT_CODE)


def _watch() -> None:
    while True:
        time.sleep(CHECK_SECONDS)
        try:
            hung = check()
        except Exception as exc:  # noqa: BLE001 - the watchdog must outlive any one look
            _say("error", "task_watchdog_error", error=repr(exc))
            continue
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
    if isinstance(pool, ThreadPool):  # (solo runs tasks inside the event loop's own read: not for it)
        _consumer[:] = [sender]
        start()
        _say("info", "task_watchdog_started", pool=type(pool).__module__.rsplit(".", 1)[-1])
