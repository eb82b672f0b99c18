"""A bare Celery hop for loadtests/bench/e2e.py: one task that does nothing, on a worker run with the
Procfile's worker flags (prefork, ``--concurrency 2 --prefetch-multiplier 1 --loglevel INFO``) and the
delivery guarantees every meterai queue needs (``acks_late``, results ignored), through the stack's
Redis. What a message from a publisher to a task and its acknowledgement costs at the least, so the
end-to-end benchmark can show how much of an order's CPU is the hops themselves.

    celery -A loadtests.bench.bare_celery worker --queues bare --concurrency 2 --prefetch-multiplier 1

Reads BENCH_BROKER_URL.
"""
from __future__ import annotations

import os

from celery import Celery

app = Celery("bare", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/15"))
# The product's Redis transport (shared/broker/redis_transport.py: a publish reuses its channel's client),
# so the hop is the cheapest one the product could make, not stock kombu's.
app.conf.update(task_acks_late=True, task_ignore_result=True, worker_prefetch_multiplier=1,
                task_default_queue="bare", broker_connection_retry_on_startup=True,
                broker_transport="shared.broker.redis_transport:Transport")


@app.task(name="bare.noop")
def noop(order_id: str) -> None:
    """Nothing: the hop is what is measured."""
    return None
