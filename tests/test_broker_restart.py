"""A worker rides out Redis restarts: a real Celery worker process, run with the Procfile's flags, keeps
running while its Redis is killed and started again empty (and restarted plainly), several times, with an
acks_late task in flight each time, and consumes new work after each restart.

The failure this guards against (shared/broker/redis_transport.py): on the lost connection Celery 5.7 closes the
broker connection twice; when Redis is still down, the second close restores the in-flight message
through a transport whose client is gone and the worker died with
``Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")``. It takes one
message in flight while the worker's other pool slot waits on BRPOP, and Redis still down when the worker
notices: the test sets exactly that up.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from celery import Celery

from broker_restart_app import QUEUE, SLEEP_TASK
from conftest import ROOT, WORKERS, wait_until
from shared.devtools.procfile import PROCFILE, parse_procfile
from shared.devtools.services import RedisHandle, start_private_redis
from shared.config import load_settings
from workers.celery_app import celery_config

LOST = b"Connection to broker lost"
RETRYING = b"Cannot connect to"
CRASHED = b"Unrecoverable error"


def procfile_worker_command(name: str) -> list[str]:
    """The Procfile's command for worker ``name``, pointed at the test app (same flags: gossip, mingle,
    heartbeat and remote control on, concurrency 2, prefetch 1)."""
    commands = {spec.name: spec.command for spec in parse_procfile(PROCFILE.read_text())}
    words = shlex.split(commands[name].replace(f"${{PS:-{name}}}", name))  # what bash makes of it
    assert words[:3] == ["celery", "-A", "workers.make_celery"], words
    return [sys.executable, "-m", "celery", "-A", "broker_restart_app", *words[3:]]


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path

    def output(self, since: int = 0) -> bytes:
        return self.log.read_bytes()[since:]

    def alive(self) -> bool:
        return self.process.poll() is None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisHandle]:
    handle = start_private_redis(tmp_path)
    yield handle
    handle.stop()


@pytest.fixture
def worker(broker: RedisHandle, tmp_path: Path) -> Iterator[Worker]:
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {
        **os.environ, "DEVELOPMENT": "1", "REDIS_URL": broker.url, "REDIS_KEY_PREFIX": "meterai-restart-test:",
        "DATA_DIR": str(tmp_path / "data"), "BROKER_TEST_MARKERS": str(markers), "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
    }
    log = tmp_path / "worker.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(procfile_worker_command("checkout"), cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    running = Worker(process, log)
    try:
        wait_until(lambda: b" ready." in running.output() or not running.alive(), timeout=60,
                   message="the worker to be ready")
        assert running.alive(), running.output().decode(errors="replace")[-3000:]
        yield running
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


class Sender:
    """Publishes the sleep task to the test's Redis with our real Celery configuration."""

    def __init__(self, broker: RedisHandle, markers: Path) -> None:
        settings = load_settings({"DEVELOPMENT": "1", "REDIS_URL": broker.url,
                                  "REDIS_KEY_PREFIX": "meterai-restart-test:"})
        # Not make_celery_app: that would also make this app the process's publisher and default app.
        self.app = Celery("broker-restart-test", set_as_current=False)
        self.app.config_from_object(celery_config(settings))
        self.markers = markers

    def send(self, seconds: float) -> str:
        name = uuid.uuid4().hex[:8]
        self.app.send_task(SLEEP_TASK, args=[name, seconds], queue=QUEUE)
        return name

    def started(self, name: str) -> bool:
        return (self.markers / f"{name}.started").exists()

    def done(self, name: str) -> bool:
        return (self.markers / f"{name}.done").exists()

    def close(self) -> None:
        self.app.close()


@pytest.fixture
def sender(broker: RedisHandle, tmp_path: Path) -> Iterator[Sender]:
    publisher = Sender(broker, tmp_path / "markers")
    yield publisher
    publisher.close()


def kill(broker: RedisHandle) -> None:
    """SIGKILL: no goodbye to the clients, nothing kept (the server is memory-only)."""
    assert broker.process is not None
    broker.process.kill()
    broker.process.wait()
    broker.process = None


@pytest.mark.parametrize("how", ["kill", "restart"])
def test_worker_keeps_consuming_across_redis_restarts_with_a_task_in_flight(
        how: str, broker: RedisHandle, worker: Worker, sender: Sender) -> None:
    rounds = 4 if how == "kill" else 2
    for round_ in range(1, rounds + 1):
        seen = len(worker.output())
        slow = sender.send(seconds=4)  # acks_late: unacknowledged while it runs
        wait_until(lambda: sender.started(slow), timeout=30, message=f"round {round_}: the slow task to start")

        if how == "kill":
            kill(broker)
            # Redis stays down until the worker has noticed and begun to reconnect (or died): the moment
            # the old worker crashed in.
            wait_until(lambda: RETRYING in worker.output(seen) or not worker.alive(), timeout=30,
                       message=f"round {round_}: the worker to notice Redis is gone")
            broker.start()
        else:
            broker.restart()  # SIGTERM, then a new empty server at once

        new = sender.send(seconds=0)
        wait_until(lambda: sender.done(new) or not worker.alive(), timeout=60,
                   message=f"round {round_}: new work to be consumed after the restart")
        log = worker.output(seen).decode(errors="replace")
        assert worker.alive(), f"round {round_}: the worker died:\n{log[-4000:]}"
        assert CRASHED.decode() not in log, log[-4000:]
        assert sender.done(new)
        wait_until(lambda: sender.done(slow), timeout=30, message=f"round {round_}: the slow task to finish")
    assert worker.alive()


def test_orders_complete_when_redis_dies_under_busy_workers(sys_) -> None:
    """The whole system: checkouts in flight (the gateway answers slowly) and one waiting in Redis when
    Redis is killed; the workers stay up, and what only the old Redis knew comes back by the redrive."""
    from shared.services import housekeeping

    checkout = sys_.process("checkout")
    workers = [sys_.process(name) for name in WORKERS]
    pids = {worker.name: worker.pid for worker in workers}
    orders: list[tuple[str, str]] = []
    for round_, how, count in ((1, "kill", 1), (2, "kill", 3), (3, "restart", 2)):
        seen = checkout.log.stat().st_size
        sys_.http.post(f"{sys_.gateway_url}/sandbox/faults", json={"latency_ms": 2000, "endpoints": ["create"]},
                       timeout=5).raise_for_status()
        batch = []
        for _ in range(count):
            r = sys_.create()
            assert r.status_code == 202, r.text
            batch.append((r.json()["order_id"], r.json()["access_token"]))
        received = lambda: checkout.log.read_bytes()[seen:].count(b"prepare_order[")  # noqa: E731
        wait_until(lambda: received() >= min(count, 2), timeout=30,
                   message=f"round {round_}: checkouts to be in flight")
        if how == "kill":
            kill(sys_.redis)
            wait_until(lambda: RETRYING in checkout.log.read_bytes()[seen:] or not checkout.alive(), timeout=30,
                       message=f"round {round_}: the worker to notice Redis is gone")
            sys_.redis.start()
        else:
            sys_.redis.restart()
        sys_.http.delete(f"{sys_.gateway_url}/sandbox/faults", timeout=5).raise_for_status()
        assert checkout.alive(), checkout.log.read_bytes()[seen:].decode(errors="replace")[-4000:]

        housekeeping.redrive(sys_.settings)  # what only the old Redis held (the checkout waiting in line)
        for order_id, token in batch:
            view = sys_.wait_status(order_id, token, "awaiting_payment", timeout=60)
            sys_.pay(view["payment"]["gateway_order_id"])
        orders += batch

    for order_id, token in orders:
        sys_.wait_status(order_id, token, "stamped", timeout=60)
    assert {worker.name: sys_.process(worker.name).pid for worker in workers} == pids  # nobody died and came back
    for worker in workers:
        assert CRASHED not in worker.log.read_bytes()
