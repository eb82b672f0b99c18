"""The request id across Celery: published tasks carry it, running tasks log it; Celery's own logs as JSON.

* ``before_task_publish``: the id in :data:`shared.logs.REQUEST_ID` (the web request's, or the running
  task's) goes into the message headers, so tasks a task publishes (and its retries) carry it too.
* ``task_prerun``: the task's id (or a fresh one for work nobody requested, the beat's sweeps: the tasks
  a sweep publishes then share it) is set for the run, so every line the task logs carries it, the base
  task's line per attempt included; ``task_postrun`` clears it.
* ``setup_logging``: Celery leaves logging to :func:`shared.logs.configure_logging` (worker, its pool's
  children, beat), so its own lines ("ready.", "received", tracebacks) are JSON lines like ours.
"""
from __future__ import annotations

import logging
from contextvars import Token
from typing import Any

from celery.signals import before_task_publish, setup_logging, task_postrun, task_prerun, worker_process_init

from shared.logs import REQUEST_ID, configure_logging, current_request_id, new_request_id, sane_request_id

HEADER = "meterai_request_id"
_running: dict[str, Token] = {}


def _publishing(headers: dict[str, Any] | None = None, **_: Any) -> None:
    request_id = current_request_id()
    if request_id and headers is not None:
        headers.setdefault(HEADER, request_id)


def _starting(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    carried = getattr(task.request, HEADER, None) if task is not None else None
    token = REQUEST_ID.set(sane_request_id(carried) or new_request_id())
    if task_id:
        _running[task_id] = token


def _finished(task_id: str | None = None, **_: Any) -> None:
    token = _running.pop(task_id, None) if task_id else None
    if token is not None:
        try:
            REQUEST_ID.reset(token)
        except ValueError:  # set in another context (a thread pool); just clear it
            REQUEST_ID.set(None)
    else:
        REQUEST_ID.set(None)


def _logging(loglevel: Any = None, **_: Any) -> None:
    configure_logging(loglevel or "INFO")


def _process_init(**_: Any) -> None:
    configure_logging(logging.getLogger().level or logging.INFO)


def register() -> None:
    """Connect the signals (once per process, whatever the number of apps made)."""
    before_task_publish.connect(_publishing, weak=False, dispatch_uid="meterai.request_id.publish")
    task_prerun.connect(_starting, weak=False, dispatch_uid="meterai.request_id.prerun")
    task_postrun.connect(_finished, weak=False, dispatch_uid="meterai.request_id.postrun")
    setup_logging.connect(_logging, weak=False, dispatch_uid="meterai.logging")
    worker_process_init.connect(_process_init, weak=False, dispatch_uid="meterai.logging.child")
