"""The threads pool's time limits (workers/watchdog.py): in-process, the soft limit lands in the task's
thread; through a real worker run with the Procfile's mail command (``--pool
threads``), a task past its soft limit ends with SoftTimeLimitExceeded and the worker carries on, and a
task stuck past its hard limit ends the process: its message acknowledged (as prefork acks a task that hit
its hard limit), the other message it held back at the front of the queue, exit code 70.
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
from shared.devtools.services import RedisHandle, start_private_redis
from test_broker_restart import Sender, Worker, procfile_worker_command
from workers import watchdog

PREFIX = "meterai-restart-test:"  # the Sender's and the worker's key prefix
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


def test_the_soft_limit_lands_in_the_running_thread_and_the_hard_limit_is_reported() -> None:
    outcome: dict[str, object] = {}
    registered = threading.Event()

    def run() -> None:
        try:
            with watchdog.watching(_fake_task(hard=60, soft=0.05)):
                registered.set()
                while True:  # Python code: the asynchronous exception is checked between bytecodes
                    time.sleep(0.01)
        except SoftTimeLimitExceeded:
            outcome["soft"] = True

    thread = threading.Thread(target=run)
    thread.start()
    registered.wait(5)
    wait_until(lambda: (watchdog.check(), not thread.is_alive())[1], timeout=10,
               message="the soft limit to end the task")
    assert outcome == {"soft": True}
    assert not watchdog._running

    # Past its hard limit, an entry is handed back for the process to end (the caller does it).
    stuck = threading.Event()
    release = threading.Event()

    def hang() -> None:
        with watchdog.watching(_fake_task(hard=0.01, soft=None)):
            stuck.set()
            release.wait(10)

    thread = threading.Thread(target=hang)
    thread.start()
    stuck.wait(5)
    time.sleep(0.05)
    overdue = watchdog.check()
    release.set()
    thread.join(5)
    assert [entry.task for entry in overdue] == ["tests.fake"]


# -- a real worker ------------------------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisHandle]:
    handle = start_private_redis(tmp_path)
    yield handle
    handle.stop()


def _start_mail_worker(broker: RedisHandle, tmp_path: Path) -> Worker:
    (tmp_path / "markers").mkdir(exist_ok=True)
    env = {
        **os.environ, "DEVELOPMENT": "1", "REDIS_URL": broker.url, "REDIS_KEY_PREFIX": PREFIX,
        "DATA_DIR": str(tmp_path / "data"), "BROKER_TEST_MARKERS": str(tmp_path / "markers"),
        "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
    }
    command = procfile_worker_command("mail")
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
def mail_worker(broker: RedisHandle, tmp_path: Path) -> Iterator[Worker]:
    worker = _start_mail_worker(broker, tmp_path)
    try:
        yield worker
    finally:
        if worker.process.poll() is None:
            os.killpg(worker.process.pid, signal.SIGTERM)
            try:
                worker.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait()


@pytest.fixture
def sender(broker: RedisHandle, tmp_path: Path) -> Iterator[Sender]:
    publisher = Sender(broker, tmp_path / "markers")
    yield publisher
    publisher.close()


def _send(sender: Sender, task: str, seconds: float, *, hard: float, soft: float) -> tuple[str, str]:
    name = uuid.uuid4().hex[:8]
    result = sender.app.send_task(task, args=[name, seconds], queue=QUEUE, time_limit=hard,
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


def _queued_ids(client: redis.Redis) -> list[str]:
    """Task ids in the mail queue, the next to be consumed first (kombu LPUSHes, BRPOPs the right end)."""
    return [json.loads(raw)["headers"]["id"] for raw in reversed(client.lrange(f"{PREFIX}{QUEUE}", 0, -1))]


def test_a_task_past_its_soft_limit_ends_and_the_worker_carries_on(mail_worker: Worker, sender: Sender) -> None:
    name, _ = _send(sender, BUSY_TASK, 30, hard=30, soft=1)
    wait_until(lambda: (sender.markers / f"{name}.soft").exists() or not mail_worker.alive(), timeout=20,
               message="the soft limit to land in the task")
    assert mail_worker.alive()
    assert not (sender.markers / f"{name}.done").exists()
    wait_until(lambda: b"task_soft_time_limit" in mail_worker.output(), timeout=10, message="the log line")
    # The thread's exception ended the task, not Celery's bookkeeping: the same slot runs the next one.
    quick, _ = _send(sender, SLEEP_TASK, 0, hard=30, soft=20)
    wait_until(lambda: sender.done(quick), timeout=20, message="the next task to run")
    assert mail_worker.alive()


def test_a_task_stuck_past_its_hard_limit_ends_the_process_and_the_other_message_goes_back(
        broker: RedisHandle, mail_worker: Worker, sender: Sender) -> None:
    client = redis.Redis.from_url(broker.url)
    stuck, stuck_id = _send(sender, SLEEP_TASK, 60, hard=4, soft=3)  # time.sleep: one C call, no soft landing
    wait_until(lambda: sender.started(stuck), timeout=20, message="the stuck task to start")
    other, other_id = _send(sender, SLEEP_TASK, 30, hard=60, soft=50)
    wait_until(lambda: sender.started(other), timeout=20, message="the other task to start on the second thread")

    code = mail_worker.process.wait(timeout=30)
    log = mail_worker.output().decode(errors="replace")
    assert code == watchdog.EXIT_CODE, log[-3000:]
    assert "task_hard_time_limit" in log and stuck_id in log, log[-3000:]
    exiting = [event for event in _events(log) if event.get("event") == "worker_exiting"]
    assert len(exiting) == 1 and exiting[0]["acked"] == 1 and exiting[0]["restored"] == 1, log[-3000:]
    # The stuck one is done with (acknowledged: no crash loop); the other is first in line again.
    assert _queued_ids(client) == [other_id]
    assert client.hlen(f"{PREFIX}unacked") == 0
    assert not sender.done(stuck) and not sender.done(other)
    client.close()
