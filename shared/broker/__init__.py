"""The Celery broker as every process speaks to it: how to reach Redis, which queue each task goes to.

Publishing is not the workers' business alone: the web publishes after commit, the ``meterai`` CLI's
sweeps and the redrive publish too. So the broker settings live here, in the core, and the workers' app
(:mod:`workers.celery_app`) adds only what running tasks needs on top (:func:`broker_config`).
:func:`use_broker` gives a process that runs no tasks (the CLI) a publisher of its own.

Every message published by any process that imports this carries the time it was published
(:data:`PUBLISHED_AT_HEADER`), so a scrape can say how old the oldest waiting one is
(shared/services/observe.py): kombu's Redis messages carry no time of their own.
"""
from __future__ import annotations

import ssl
import time
from typing import Any

from celery import Celery
from celery.signals import before_task_publish
from kombu import Exchange, Queue

from shared import jobs
from shared.broker import redis_transport
from shared.config import Settings
from shared.redisconn import kombu_broker

PUBLISHED_AT_HEADER = "meterai_published_at"


@before_task_publish.connect(weak=False, dispatch_uid="meterai.published_at")
def _stamp_publish_time(headers: dict | None = None, **_: object) -> None:
    if headers is not None:
        headers[PUBLISHED_AT_HEADER] = time.time()


def broker_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for reaching the broker and routing every task to its queue."""
    # BROKER_URL (else REDIS_URL); a redis+sentinel:// URL becomes kombu's sentinel:// list, with the
    # master's name in the transport options (shared/redisconn.py).
    url, sentinel_options = kombu_broker(settings.broker, settings.redis_sentinel_password,
                                         "BROKER_URL" if settings.broker_url else "REDIS_URL")
    return {
        "broker_url": url,
        # Said again for reads and writes, which Celery prefers to broker_url: the `celery` command takes
        # a BROKER_URL variable (our setting's name) as its own --broker and puts it in
        # CELERY_BROKER_URL, which beats broker_url; for a redis+sentinel:// URL, which kombu can't read,
        # every worker then died at start.
        "broker_read_url": url,
        "broker_write_url": url,
        # kombu's Redis transport with one repair (see shared/broker/redis_transport.py): with Celery 5.7
        # a Redis restart under running acks_late tasks could stop the worker with an AttributeError.
        "broker_transport": redis_transport.transport_for(url),
        # TLS for a rediss:// broker, with the server's certificate verified (kombu alone would turn
        # verification off for that scheme).
        "broker_use_ssl": ({"ssl_cert_reqs": ssl.CERT_REQUIRED}
                           if url.lower().startswith("rediss://") else None),
        "broker_transport_options": {
            "visibility_timeout": settings.broker_visibility_timeout,
            "global_keyprefix": settings.redis_key_prefix,
            # A hung Redis must not hang a web request that publishes after commit: the redrive
            # recovers anything not published. The same bound lets a consumer notice a primary that
            # vanished without closing its sockets (a failover, a NAT's timeout) and reconnect.
            "socket_timeout": 2.0,
            "socket_connect_timeout": 2.0,
            "socket_keepalive": True,
            # kombu PINGs idle connections and drops a BRPOP whose reply is overdue by this much.
            "health_check_interval": 10,
            **sentinel_options,
        },
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                                      "interval_max": 0.5},
        "broker_connection_retry_on_startup": True,
        # One direct exchange per queue, routing key = queue name: a message reaches exactly one queue.
        "task_queues": [Queue(name, Exchange(name, type="direct"), routing_key=name)
                        for name in jobs.ALL_QUEUES],
        "task_default_queue": "housekeeping",
        "task_default_exchange": "housekeeping",
        "task_default_routing_key": "housekeeping",
        "task_create_missing_queues": False,
        "task_routes": {name: {"queue": queue} for name, queue in jobs.QUEUES.items()},
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
    }


def use_broker(settings: Settings) -> Celery:
    """A publish-only Celery app for a process that runs no tasks, made this process's publisher."""
    app = Celery("meterai-publisher")
    app.config_from_object(broker_config(settings))
    jobs.set_publisher(app)
    return app
