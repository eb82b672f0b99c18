"""Routing over the real broker: each task's message lands in exactly one queue, its own."""
from __future__ import annotations

import dataclasses

import redis

from shared import jobs
from workers.celery_app import make_celery_app


def _clean_up(client: redis.Redis, prefix: str, app, system) -> None:
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()
    app.close()
    make_celery_app(system.settings)  # restore the session's publisher


def test_each_task_lands_in_exactly_its_own_queue(system):
    # A key prefix no worker listens on, so the messages stay put for us to count.
    settings = dataclasses.replace(system.settings, redis_key_prefix="meterai-routing-test:")
    app = make_celery_app(settings)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        with app.connection_for_write() as conn:  # declare every queue and binding, as workers do
            for queue in app.amqp.queues.values():
                queue.bind(conn.default_channel).declare()
        for name, queue in jobs.QUEUES.items():
            with app.producer_or_acquire() as producer:
                app.send_task(name, args=["x"], queue=queue, producer=producer)
            lengths = {q: client.llen(f"{settings.redis_key_prefix}{q}") for q in jobs.ALL_QUEUES}
            assert lengths[queue] == 1, (name, lengths)
            assert sum(lengths.values()) == 1, (name, lengths)
            client.delete(f"{settings.redis_key_prefix}{queue}")
    finally:
        _clean_up(client, settings.redis_key_prefix, app, system)


def test_our_publish_lands_in_its_queue_with_nothing_declared(system):
    """``jobs.publish`` skips the declare (our queues are reached through the anonymous exchange): on a
    Redis where no queue or binding was ever declared each message still lands in its own queue alone,
    and carries its arguments' display."""
    import json

    settings = dataclasses.replace(system.settings, redis_key_prefix="meterai-undeclared-test:")
    app = make_celery_app(settings)  # also this process's publisher, until restored below
    client = redis.Redis.from_url(settings.redis_url)
    try:
        assert not list(client.scan_iter(match=f"{settings.redis_key_prefix}*"))
        for name, queue in jobs.QUEUES.items():
            jobs.publish(name, "x", 7)
            lengths = {q: client.llen(f"{settings.redis_key_prefix}{q}") for q in jobs.ALL_QUEUES}
            assert lengths[queue] == 1 and sum(lengths.values()) == 1, (name, lengths)
            message = json.loads(client.rpop(f"{settings.redis_key_prefix}{queue}"))
            assert message["headers"]["task"] == name
            assert message["headers"]["argsrepr"] == "['x', 7]"
        long = "y" * (jobs.ARGSREPR_MAX + 10)
        jobs.publish(jobs.SEND_MAIL, long, "receipt")
        message = json.loads(client.rpop(f"{settings.redis_key_prefix}mail"))
        shown = message["headers"]["argsrepr"]  # left to saferepr, which shortens it
        assert "..." in shown and len(shown) < len(repr([long, "receipt"]))
        # No binding table was written: nothing was declared.
        assert not [key for key in client.scan_iter(match=f"{settings.redis_key_prefix}*") if b"binding" in key]
    finally:
        _clean_up(client, settings.redis_key_prefix, app, system)
