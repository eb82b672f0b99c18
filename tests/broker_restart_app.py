"""A Celery app for tests/test_broker_restart.py and tests/test_watchdog.py: our real configuration
(``make_celery_app``) plus tasks that sleep, so a test can hold an acks_late message in flight while it
restarts Redis under the worker, or keep a task running past its time limits.

The task leaves a file per phase in ``BROKER_TEST_MARKERS`` (``<name>.started``, ``<name>.done``): the test
sees what the worker did without a result backend.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from shared import jobs
from shared.config import load_settings
from workers.celery_app import make_celery_app

SLEEP_TASK = "tests.broker_restart.sleep"
QUEUE = jobs.QUEUES[jobs.PREPARE_ORDER]  # a real queue of ours, on the test's own Redis

app = make_celery_app(load_settings())


@app.task(name=SLEEP_TASK)
def sleep(name: str, seconds: float) -> None:
    markers = Path(os.environ["BROKER_TEST_MARKERS"])
    (markers / f"{name}.started").touch()
    time.sleep(seconds)
    (markers / f"{name}.done").touch()


BUSY_TASK = "tests.watchdog.busy"


@app.task(name=BUSY_TASK)
def busy(name: str, seconds: float) -> None:
    """Python code running (short sleeps): a soft time limit lands in it."""
    from celery.exceptions import SoftTimeLimitExceeded

    markers = Path(os.environ["BROKER_TEST_MARKERS"])
    (markers / f"{name}.started").touch()
    until = time.monotonic() + seconds
    try:
        while time.monotonic() < until:
            time.sleep(0.02)
    except SoftTimeLimitExceeded:
        (markers / f"{name}.soft").touch()
        raise
    (markers / f"{name}.done").touch()
