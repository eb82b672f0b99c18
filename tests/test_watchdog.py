"""The threads pool's time limits (workers/watchdog.py): in-process, the soft limit lands in the task's
thread, and one landing after the attempt finished doesn't change its outcome; through real workers run
with the Procfile's commands (``--pool threads``), a task past its soft limit ends with
SoftTimeLimitExceeded and the worker carries on, and a task stuck past its hard limit ends the process:
its message removed (as prefork acks a task that hit its hard limit), the others it held back at the
consuming end of the queue in the order received (none taken again by the dying process's own waiting
BRPOP), exit code 70.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded

from broker_restart_app import BUSY_TASK, SLEEP_TASK
from conftest import ROOT, wait_until
from shared.devtools.services import RedisHandle
from test_broker_restart import Sender, Worker, broker, procfile_worker_command, sender  # noqa: F401 - fixtures
from workers import watchdog

PREFIX = "meterai-restart-test:"


@pytest.fixture(autouse=True)
def _no_entries_left():
    """Each test starts and ends with nothing registered: one that fails can't spill into the next."""
    watchdog._running.clear()
    yield
    leftover = dict(watchdog._running)
    watchdog._running.clear()
    assert not leftover, leftover  # the Sender's and the worker's key prefix
QUEUE = "mail"  # the Procfile's mail group runs on the threads pool


def _fake_task(hard: float | None, soft: float | None) -> SimpleNamespace:
    request = SimpleNamespace(id=uuid.uuid4().hex, timelimit=None)
    return SimpleNamespace(name="tests.fake", request=request, time_limit=hard, soft_time_limit=soft)


def test_limits_prefer_the_message_header_then_the_task() -> None:
    task = _fake_task(120, 110)
    assert watchdog.limits(task) == (120, 110)
    task.request.timelimit = (5, None)
    assert watchdog.limits(task) == (5, 110)
    task.request.timelimit = (None, 2)
    assert watchdog.limits(task) == (120, 2)


@pytest.fixture
def tasks():
    """Tasks on our base class (MeteraiTask.__call__ registers them with the watchdog), called in-process."""
    from celery import Celery

    from workers.tasks.base import MeteraiTask

    app = Celery("watchdog-test", set_as_current=False, task_cls=MeteraiTask)
    app.conf.meterai_settings = None
    yield app
    app.close()


def _in_thread(fn) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(("returned", fn()))
        except BaseException as exc:  # noqa: BLE001
            outcome.append(("raised", type(exc).__name__))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_the_soft_limit_lands_in_the_running_thread_and_the_hard_limit_is_reported(tasks) -> None:
    registered = threading.Event()

    @tasks.task(bind=True, soft_time_limit=0.05, time_limit=60)
    def busy(self) -> str:
        registered.set()
        while True:  # Python code: the asynchronous exception is checked between bytecodes
            time.sleep(0.01)

    thread, outcome = _in_thread(busy)
    registered.wait(5)
    wait_until(lambda: (watchdog.check(), not thread.is_alive())[1], timeout=10,
               message="the soft limit to end the task")
    assert outcome == [("raised", "SoftTimeLimitExceeded")]
    assert not watchdog._running

    # Past its hard limit, an entry is handed back for the process to end (the caller does it).
    stuck, release = threading.Event(), threading.Event()

    @tasks.task(bind=True, time_limit=0.01)
    def hang(self) -> str:
        stuck.set()
        release.wait(10)
        return "done"

    thread, outcome = _in_thread(hang)
    stuck.wait(5)
    time.sleep(0.05)
    overdue = watchdog.check()
    release.set()
    thread.join(5)
    assert [entry.task for entry in overdue] == [hang.name]
    assert outcome == [("returned", "done")] and not watchdog._running


def test_a_soft_limit_landing_after_the_attempt_leaves_its_outcome(tasks) -> None:
    """Raised just as the attempt ended (here: while its thread waits for the watchdog's lock to leave):
    it lands in the leaving, which is caught and done again, so the result stands and nothing is left
    registered or pending."""
    entered, proceed = threading.Event(), threading.Event()

    @tasks.task(bind=True, soft_time_limit=60, time_limit=120)
    def quick(self) -> str:
        entered.set()
        proceed.wait(10)
        return "stamped"

    thread, outcome = _in_thread(quick)
    entered.wait(5)
    _soften_while_leaving(thread, proceed, lambda: watchdog._running[thread.ident][-1])
    assert outcome == [("returned", "stamped")]
    assert not watchdog._running

    # And without the retry in MeteraiTask.__call__ it would have been the task's exception: the same
    # landing, through a bare leave(), raises.
    caught: list[str] = []
    entered.clear()
    proceed.clear()

    def bare() -> None:
        entry = watchdog.entry_for(quick)
        watchdog.enter(entry)
        entered.set()
        proceed.wait(10)
        try:
            watchdog.leave(entry)
        except SoftTimeLimitExceeded:
            caught.append("raised")
            watchdog.leave(entry)

    thread = threading.Thread(target=bare)
    thread.start()
    entered.wait(5)
    _soften_while_leaving(thread, proceed, lambda: watchdog._running[thread.ident][-1])
    assert caught == ["raised"] and not watchdog._running


def test_a_nested_attempt_leaves_the_outer_one_watched(tasks) -> None:
    seen: list[list[str]] = []

    @tasks.task(bind=True, time_limit=60)
    def inner(self) -> str:
        return "inner"

    @tasks.task(bind=True, time_limit=0.01)
    def outer(self) -> str:
        inner()  # called directly, on this thread
        time.sleep(0.05)
        seen.append([entry.task for entry in watchdog.check()])
        return "outer"

    assert outer() == "outer"
    assert seen == [[outer.name]]  # still watched (and past its hard limit) after the inner one left
    assert not watchdog._running


def test_an_entry_left_behind_never_ends_the_node_nor_interrupts_its_thread(tasks) -> None:
    """An entry whose attempt is over but which stayed registered (an asynchronous exception where no
    code could remove it) is dropped when its limits fall due: not taken for a hung task, and its soft
    limit not raised into whatever its thread runs now."""
    @tasks.task(bind=True, time_limit=0.01)
    def gone(self) -> str:
        return "done"

    @tasks.task(bind=True, soft_time_limit=0.01, time_limit=60)
    def gone_soft(self) -> str:
        return "done"

    left, proceed = threading.Event(), threading.Event()
    outcome: list[str] = []

    def leave_them_behind() -> None:
        def attempt(task) -> None:
            watchdog.enter(watchdog.entry_for(task))  # and never leave

        attempt(gone)
        attempt(gone_soft)
        left.set()
        try:
            while not proceed.is_set():  # other work on the same thread: Python code, interruptible
                time.sleep(0.01)
            outcome.append("carried on")
        except SoftTimeLimitExceeded:
            outcome.append("interrupted")

    thread = threading.Thread(target=leave_them_behind)
    thread.start()
    left.wait(5)
    time.sleep(0.05)
    assert watchdog.check() == []
    assert not watchdog._running
    proceed.set()
    thread.join(5)
    assert outcome == ["carried on"]


def test_an_enclosing_attempts_soft_limit_landing_in_a_nested_leave_reaches_it(tasks) -> None:
    entered, proceed = threading.Event(), threading.Event()
    outer_entry: list = []

    @tasks.task(bind=True, soft_time_limit=60, time_limit=120)
    def inner(self) -> str:
        entered.set()
        proceed.wait(10)
        return "inner"

    @tasks.task(bind=True, soft_time_limit=60, time_limit=120)
    def outer(self) -> str:
        outer_entry.append(watchdog._running[threading.get_ident()][-1])
        inner()
        return "outer finished"  # must not: its soft limit landed in inner's leave

    thread, outcome = _in_thread(outer)
    entered.wait(5)
    _soften_while_leaving(thread, proceed, lambda: outer_entry[0])  # the outer attempt's soft limit
    assert outcome == [("raised", "SoftTimeLimitExceeded")]
    assert not watchdog._running


def _soften_while_leaving(thread: threading.Thread, proceed: threading.Event, entry) -> None:
    """Let ``thread`` go on to leave its attempt and hold it in ``leave()`` (on the watchdog's lock), then
    raise ``entry()``'s soft limit as the watchdog would, so it lands in the leaving; wait for the thread."""
    with watchdog._lock:
        proceed.set()
        wait_until(lambda: any(frame.f_code.co_name == "leave" for frame in _frames(thread)), timeout=5,
                   message="the attempt to be leaving")
        entry().softened = True
        watchdog._set_async_exc(thread.ident, SoftTimeLimitExceeded)
    thread.join(5)


def _frames(thread: threading.Thread):
    import sys

    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        yield frame
        frame = frame.f_back


# -- a real worker ------------------------------------------------------------------------------------


def _start_worker(broker: RedisHandle, tmp_path: Path, group: str) -> Worker:
    (tmp_path / "markers").mkdir(exist_ok=True)
    env = {
        **os.environ, "DEVELOPMENT": "1", "REDIS_URL": broker.url, "REDIS_KEY_PREFIX": PREFIX,
        "DATA_DIR": str(tmp_path / "data"), "BROKER_TEST_MARKERS": str(tmp_path / "markers"),
        "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
    }
    command = procfile_worker_command(group)
    assert command[command.index("--pool") + 1] == "threads", command
    log = tmp_path / "worker.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    worker = Worker(process, log)
    wait_until(lambda: b"task_watchdog_started" in worker.output() or not worker.alive(), timeout=60,
               message="the worker to be ready with its watchdog")
    assert worker.alive(), worker.output().decode(errors="replace")[-3000:]
    return worker


@pytest.fixture
def start_worker(broker: RedisHandle, tmp_path: Path) -> Iterator:
    started: list[Worker] = []

    def start(group: str) -> Worker:
        started.append(_start_worker(broker, tmp_path, group))
        return started[-1]

    yield start
    for worker in started:
        if worker.process.poll() is None:
            os.killpg(worker.process.pid, signal.SIGTERM)
            try:
                worker.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait()


def _send(sender: Sender, task: str, seconds: float, *, hard: float, soft: float,
          queue: str = QUEUE) -> tuple[str, str]:
    name = uuid.uuid4().hex[:8]
    result = sender.app.send_task(task, args=[name, seconds], queue=queue, time_limit=hard,
                                  soft_time_limit=soft)
    return name, result.id


def _events(log: str) -> list[dict]:
    found = []
    for line in log.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                pass
    return found


def _queued_ids(client: redis.Redis, queue: str) -> list[str]:
    """Task ids in ``queue``, the next to be consumed first (kombu LPUSHes, BRPOPs the right end)."""
    return [json.loads(raw)["headers"]["id"] for raw in reversed(client.lrange(f"{PREFIX}{queue}", 0, -1))]


def test_a_task_past_its_soft_limit_ends_and_the_worker_carries_on(
        broker: RedisHandle, start_worker, sender: Sender) -> None:
    mail_worker = start_worker("mail")
    client = redis.Redis.from_url(broker.url)
    name, _ = _send(sender, BUSY_TASK, 30, hard=30, soft=1)
    wait_until(lambda: (sender.markers / f"{name}.soft").exists() or not mail_worker.alive(), timeout=20,
               message="the soft limit to land in the task")
    assert mail_worker.alive()
    assert not (sender.markers / f"{name}.done").exists()
    wait_until(lambda: b"task_soft_time_limit" in mail_worker.output(), timeout=10, message="the log line")
    # The exception ended the task, not Celery's bookkeeping: its message is acknowledged (a failure, as
    # prefork's soft limit ends one), and both slots go on running tasks.
    quick = [_send(sender, SLEEP_TASK, 0.5, hard=30, soft=20)[0] for _ in range(4)]
    wait_until(lambda: all(sender.done(one) for one in quick), timeout=30, message="the next tasks to run")
    wait_until(lambda: client.hlen(f"{PREFIX}unacked") == 0, timeout=10, message="every message acknowledged")
    assert mail_worker.alive()
    assert _queued_ids(client, QUEUE) == []
    client.close()


def _stuck_and_others(sender: Sender, others: int) -> tuple[str, str, list[str]]:
    """``others`` long tasks, then one stuck past a 4 s hard limit (started last, so the others are
    running before its clock starts)."""
    ids = []
    for _ in range(others):
        name, task_id = _send(sender, SLEEP_TASK, 30, hard=60, soft=50, queue="reconcile")
        wait_until(lambda: sender.started(name), timeout=20, message="another task to start")
        ids.append(task_id)
    stuck, stuck_id = _send(sender, SLEEP_TASK, 60, hard=4, soft=3, queue="reconcile")  # one C call
    wait_until(lambda: sender.started(stuck), timeout=20, message="the stuck task to start")
    return stuck, stuck_id, ids


def _exited(worker: Worker, stuck_id: str) -> dict:
    code = worker.process.wait(timeout=30)
    log = worker.output().decode(errors="replace")
    assert code == watchdog.EXIT_CODE, log[-3000:]
    hard = [event for event in _events(log) if event.get("event") == "task_hard_time_limit"]
    assert [event["task_id"] for event in hard] == [stuck_id], log[-3000:]
    exiting = [event for event in _events(log) if event.get("event") == "worker_exiting"]
    assert len(exiting) == 1 and "error" not in exiting[0] and "brpop" not in exiting[0], log[-3000:]
    return exiting[0]


def test_a_task_stuck_past_its_hard_limit_ends_the_process_and_nothing_is_lost(
        broker: RedisHandle, start_worker, sender: Sender) -> None:
    """On the reconcile line (4 threads) with slots free, a BRPOP waits at Redis the whole time (each for
    a second, sent again at once): neither the messages put back nor one published as the process stops
    may be taken by it and lost. That one is either received by the last BRPOP, held and put back with the
    others (usually: it is published within a few tenths of a second of the hard limit), or still waiting
    in the queue; in both cases it is next after them."""
    worker = start_worker("reconcile")
    client = redis.Redis.from_url(broker.url)
    stuck, stuck_id, others = _stuck_and_others(sender, 2)
    wait_until(lambda: b"task_hard_time_limit" in worker.output(), timeout=20, message="the hard limit")
    during = sender.app.send_task(SLEEP_TASK, args=["during", 30], queue="reconcile").id  # as it stops
    exiting = _exited(worker, stuck_id)
    assert exiting["removed"] == 1 and exiting["restored"] in (2, 3), exiting
    assert _queued_ids(client, "reconcile") == [*others, during]  # in the order received
    assert client.hlen(f"{PREFIX}unacked") == 0  # the stuck one is done with: no crash loop
    assert not sender.done(stuck)
    client.close()


def test_the_messages_put_back_are_next_in_line_in_the_order_received(
        broker: RedisHandle, start_worker, sender: Sender) -> None:
    """Every slot busy, so a message published meanwhile waits in the queue: the ones put back go ahead
    of it, first received first."""
    worker = start_worker("reconcile")
    client = redis.Redis.from_url(broker.url)
    stuck, stuck_id, others = _stuck_and_others(sender, 3)
    waiting = sender.app.send_task(SLEEP_TASK, args=["waiting", 0], queue="reconcile").id
    wait_until(lambda: _queued_ids(client, "reconcile") == [waiting], timeout=5, message="one message waiting")
    exiting = _exited(worker, stuck_id)
    assert exiting["removed"] == 1 and exiting["restored"] == 3, exiting
    assert _queued_ids(client, "reconcile") == [*others, waiting]
    assert client.hlen(f"{PREFIX}unacked") == 0
    client.close()
