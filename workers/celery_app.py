"""The Celery app, configured once from :class:`shared.config.Settings` (Flask's ``celery_init_app``).

Defaults follow what paid work needs: ``acks_late`` with ``reject_on_worker_lost`` so a message is only
gone once its task finished (a killed worker's message is redelivered), prefetch 1 so one slow document
doesn't hold others hostage, hard and soft time limits, and a broker visibility timeout longer than the
longest task plus the longest retry delay so Redis doesn't hand a running task to a second worker.
"""
from __future__ import annotations

from datetime import timedelta

from celery import Celery
from flask import Flask

from shared import jobs, statuscache
from shared.broker import broker_config
from shared.config import Settings
from workers import context
from workers.tasks.base import MeteraiTask

TASK_MODULES = (
    "workers.tasks.checkout",
    "workers.tasks.payments",
    "workers.tasks.stamping",
    "workers.tasks.refunds",
    "workers.tasks.housekeeping",
    "workers.tasks.mail",
)


def beat_schedule(settings: Settings) -> dict[str, dict]:
    return {
        "sweep-refunds": {
            "task": jobs.SWEEP_REFUNDS,
            "schedule": timedelta(seconds=settings.sweep_interval_seconds),
            "options": {"queue": jobs.QUEUES[jobs.SWEEP_REFUNDS]},
        },
        "redrive": {
            "task": jobs.REDRIVE,
            "schedule": timedelta(seconds=settings.redrive_interval_seconds),
            "options": {"queue": jobs.QUEUES[jobs.REDRIVE]},
        },
        "reconcile-payments": {
            "task": jobs.RECONCILE_PAYMENTS,
            "schedule": timedelta(seconds=settings.reconcile_interval_seconds),
            "options": {"queue": jobs.QUEUES[jobs.RECONCILE_PAYMENTS]},
        },
        "expire-unpaid": {
            "task": jobs.EXPIRE_UNPAID,
            "schedule": timedelta(seconds=settings.expire_unpaid_interval_seconds),
            "options": {"queue": jobs.QUEUES[jobs.EXPIRE_UNPAID]},
        },
        "ops-sample": {
            "task": jobs.OPS_SAMPLE,
            "schedule": timedelta(seconds=15),
            # A sample that waited past its minute is worth nothing: dropped, not run late.
            "options": {"queue": jobs.QUEUES[jobs.OPS_SAMPLE], "expires": 15},
        },
    }


def celery_config(settings: Settings) -> dict:
    return {
        **broker_config(settings),
        # A worker outlives any Redis outage, however long: it reconnects when Redis is back instead of
        # exiting after Celery's default 100 attempts (and taking its share of the work with it).
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        # A channel that fails while the consumer (re)connects, as on a Sentinel failover, is retried like a
        # lost connection instead of ending the consumer (celery#8030, #10205: workers that stop consuming).
        "broker_channel_error_retry": True,
        # On a lost broker connection, let running tasks finish rather than kill them mid-way (a gateway
        # call made, its result not yet written): their work lands in PostgreSQL, their message comes back
        # after the visibility timeout or from the redrive, and the task's own checks make the rerun a
        # no-op. Said explicitly because Celery 6 flips the default.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit_seconds,
        "task_soft_time_limit": max(1, settings.task_time_limit_seconds - 10),
        "worker_hijack_root_logger": True,
        "beat_schedule": beat_schedule(settings),
        "beat_scheduler": "workers.beat:MemoryScheduler",  # a bare `celery beat` keeps nothing on disk either
        "include": list(TASK_MODULES),
    }


def make_celery_app(settings: Settings, flask_app: Flask | None = None) -> Celery:
    # Every task runs on the one base class (its retry policy, its log line per attempt), inside the
    # Flask app's context when there is one.
    task_class = type("AppTask", (MeteraiTask,), {"flask_app": flask_app})
    app = Celery("meterai", task_cls=task_class)
    app.config_from_object(celery_config(settings))
    app.conf.meterai_settings = settings
    app.set_default()
    context.register()  # the request id in task headers and log lines; Celery's logs as JSON
    jobs.set_publisher(app)
    statuscache.configure(settings)
    return app


def celery_init_app(flask_app: Flask, settings: Settings) -> Celery:
    app = make_celery_app(settings, flask_app)
    flask_app.extensions["celery"] = app
    return app
