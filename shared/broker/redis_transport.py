"""kombu's Redis transports with one repair (a channel of a closed connection fails like a broker
outage) and one saving (a publish reuses its channel's Redis client instead of building one each time).

Why this exists: with Celery 5.7 a worker whose Redis restarts while acks_late tasks run could die with
``Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")``. On a lost
broker connection, Celery 5.7's ``Consumer.on_connection_error_after_connected`` first calls
``connection.collect()`` and then, new in 5.7, ``connection.close()`` under ``ignore_errors``. The Redis
transport has no ``_collect``, so ``collect()`` closes the channels itself and then drops the transport's
``client`` (``Connection._do_close_transport``). When Redis is still down at that moment, closing an
earlier channel (gossip's or the remote-control fanout) raises a connection error that ends
``close_connection``'s loop early, so the task channel is left open with its unacknowledged messages.
The second ``close()`` then closes it: ``QoS.restore_unacked`` needs a Redis client, the channel's pool
was just disconnected, and building a new one reads ``self.connection.client.hostname`` from a transport
whose client is ``None``. That ``AttributeError`` is not one of the connection errors ``ignore_errors``
swallows, so it escapes the consumer and stops the worker. It only happens when a message is in flight
and Redis is not back yet when the consumer notices the loss: timing-dependent, as seen.

The repair is the smallest one that keeps everything else as kombu does it: building a Redis client for a
channel whose connection is already closed raises ``redis.exceptions.ConnectionError`` instead. That is
the truth (there is no connection to restore through), and a connection error is what kombu and Celery
already handle everywhere on that path: ``ignore_errors`` swallows it, the consumer reconnects. What such
a close could not restore stays recoverable: while Redis kept its data, the messages are still in the
transport's unacked index and come back after the visibility timeout; when Redis lost them, the periodic
redrive re-publishes the work from PostgreSQL (DESIGN: nothing lives only in Redis).

Used through ``broker_transport`` in :func:`shared.broker.broker_config` for ``redis://``,
``rediss://`` and ``sentinel://`` broker URLs. kombu turns TLS on from the ``rediss`` scheme only when it
picks the transport itself, so for a TLS broker the config also sets ``broker_use_ssl`` (and verifies the
server's certificate, where kombu's own default would not). ``tests/test_broker_restart.py`` runs a real worker
through Redis restarts; drop this module once kombu/Celery no longer take this path.
"""
from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError


class ClosedConnectionError(RedisConnectionError):
    """The channel's broker connection has been closed; nothing can be sent or restored through it."""


class _ClosedConnectionAwareChannel:
    """Mixin for kombu's Redis channels: no client for a channel whose connection was closed."""

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        transport = getattr(self, "connection", None)
        if transport is None or transport.client is None:
            raise ClosedConnectionError(
                "the broker connection of this channel is closed (unacknowledged messages are left to "
                "the visibility timeout and the redrive)"
            )
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[misc]

    def _create_client(self, asynchronous: bool = False) -> Any:
        """kombu builds a new Redis client object for every publish (``conn_or_acquire``), and redis-py's
        client constructor fills a table of ~170 response callbacks each time: a third of a publish's CPU
        (0.2 of 0.6 ms, loadtests/bench/e2e.py profiles). The synchronous client is kept per channel and
        per pool instead (a redis-py client is thread-safe, and holds no connection of its own: the pool
        does). A new pool, after a reconnect, gets a new client; no pool yet still goes through
        :meth:`_connparams` (the closed-connection check above)."""
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        pool = self.pool  # type: ignore[attr-defined]
        kept = self.__dict__.get("_meterai_client")
        if kept is not None and kept[0] is pool:
            return kept[1]
        client = super()._create_client()  # type: ignore[misc]
        self.__dict__["_meterai_client"] = (pool, client)
        return client


class Channel(_ClosedConnectionAwareChannel, kombu_redis.Channel):
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(_ClosedConnectionAwareChannel, kombu_redis.SentinelChannel):
    pass


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def transport_for(broker_url: str) -> str | None:
    """The ``broker_transport`` setting for ``broker_url``: ours for ``redis``/``rediss``/``sentinel``,
    else None (kombu picks its own from the URL's scheme)."""
    scheme = broker_url.split("://", 1)[0].lower() if "://" in broker_url else ""
    return {"redis": f"{__name__}:Transport", "rediss": f"{__name__}:Transport",
            "sentinel": f"{__name__}:SentinelTransport"}.get(scheme)
