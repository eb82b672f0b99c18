"""Every Redis client of ours is built here, for a plain server and for one found through Sentinel alike.

Why one factory: the waiting room, the rate limits, the status cache, readiness and the CLI each used to
call ``redis.Redis.from_url`` with their own timeouts, which can't follow a failover and, with redis-py's
default retry (three attempts with up to 10 s of backoff), could hold a buyer's request for seconds. Here
every client gets a bounded blocking pool (a storm waits a bounded time for a connection, then fails
like an outage), socket timeouts, TCP keepalive and ``health_check_interval`` (an idle connection is
PINGed before use, so one the server or a NAT dropped is noticed before a command is lost on it), and at
most ``retries`` immediate retries on a connection error, never on a timeout: a command whose reply timed
out may well have run (the server was slow, not gone), and running a write twice (a ticket's INCR, a
token's spend, a rate-limit count) is worse than one quick "come back".

A URL names where Redis is (``REDIS_URL`` for our own clients, ``BROKER_URL`` for Celery):

* ``redis://[[user]:password@]host[:port][/db]`` and ``rediss://…`` (TLS, certificate verified): one
  server, as redis-py reads them.
* ``redis+sentinel://[[user]:password@]host1[:port],host2[:port],…/master-name[/db]``: the primary of
  ``master-name`` as the listed Sentinels report it (port 26379 by default). The credentials are the data
  nodes'; the Sentinels' own password, if they have one, is ``REDIS_SENTINEL_PASSWORD``. TLS through
  Sentinel is refused for now rather than half done.

Through Sentinel, redis-py's ``SentinelConnectionPool`` asks the Sentinels for the primary on every new
connection, so a connection error (the primary died) or a ``READONLY`` answer (the old primary came back
as a replica) drops the connection and the retry connects to the promoted one. redis-py >= 8.1 asks again
on each connect attempt; older releases kept retrying the old address (redis/redis-py#3560), which
``tests/test_sentinel.py`` guards against on real servers.

Production Redis must run with ``maxmemory-policy noeviction``: an evicted broker message or waiting-room
key is silently lost work or a skipped buyer (:func:`eviction_policy_problem` says so at start-up).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import BlockingConnectionPool
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
SCHEMES = ("redis", "rediss", SENTINEL_SCHEME)
# An idle connection older than this is PINGed before it is used again (seconds).
HEALTH_CHECK_INTERVAL_SECONDS = 15
_MASTER_NAME = re.compile(r"[A-Za-z0-9._-]+")
# What a client retries: a connection refused, reset or closed (a READONLY answer through Sentinel too,
# which redis-py turns into one), never a TimeoutError (not a ConnectionError in redis-py).
RETRIED_ERRORS: tuple[type[Exception], ...] = (redis.ConnectionError,)


@dataclass(frozen=True)
class RedisLocation:
    """A parsed Redis URL: ``kind`` "redis" (``url`` as given, redis-py reads it) or "sentinel"
    (``sentinels``, ``master_name``, ``db``, the data nodes' ``username``/``password``)."""

    kind: str
    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    db: int = 0
    username: str = ""
    password: str = ""
    tls: bool = False


def parse_redis_url(url: str, name: str = "REDIS_URL") -> RedisLocation:
    """``url`` as a :class:`RedisLocation`; ValueError names the setting and what is wrong with it."""
    url = url.strip()
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("redis", "rediss"):
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"{name}={_redact(url)!r}: a host is missing ({scheme}://host:port/db)")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"{name}={_redact(url)!r}: the port is not a number from 1 to 65535") from None
        db = parts.path.strip("/") or "0"
        if not db.isdigit():
            raise ValueError(f"{name}={_redact(url)!r}: the database after the host must be a number")
        return RedisLocation("redis", url, db=int(db), tls=scheme == "rediss")
    if scheme == "rediss+sentinel":
        raise ValueError(f"{name}: TLS through Sentinel is not supported yet; use redis+sentinel:// on a "
                         "private network, or rediss:// to one server")
    if scheme == "sentinel":
        raise ValueError(f"{name}={_redact(url)!r} is kombu's own Sentinel form, which names no master: write "
                         f"{SENTINEL_SCHEME}://host1:26379,host2:26379/master-name/0 (the broker is given kombu's "
                         "form from it)")
    if scheme != SENTINEL_SCHEME:
        raise ValueError(f"{name}={_redact(url)!r} must start with redis://, rediss:// or {SENTINEL_SCHEME}:// "
                         f"({SENTINEL_SCHEME}://host1:26379,host2:26379/master-name/0)")
    rest = url.split("://", 1)[1]
    netloc, _, path = rest.partition("/")
    if "?" in path or "#" in path or "?" in netloc:
        raise ValueError(f"{name}: a {SENTINEL_SCHEME}:// URL takes no query or fragment")
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not host:
            raise ValueError(f"{name}={_redact(url)!r}: every Sentinel needs a host (host:port, "
                             "comma-separated)")
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"{name}={_redact(url)!r}: Sentinel port {port!r} is not a number from 1 to 65535")
        sentinels.append((host, int(port) if port else DEFAULT_SENTINEL_PORT))
    segments = path.strip("/").split("/") if path.strip("/") else []
    if not segments or not _MASTER_NAME.fullmatch(segments[0]):
        raise ValueError(f"{name}={_redact(url)!r}: the master name is missing after the Sentinels "
                         f"({SENTINEL_SCHEME}://host1:26379,host2:26379/master-name/0)")
    if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ValueError(f"{name}={_redact(url)!r}: after the master name only a database number may follow")
    return RedisLocation("sentinel", url, sentinels=tuple(sentinels), master_name=segments[0],
                         db=int(segments[1]) if len(segments) == 2 else 0,
                         username=unquote(username), password=unquote(password))


def _redact(url: str) -> str:
    """``url`` without its password, for error messages and logs."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


class SentinelBlockingConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool, bounded like :class:`~redis.BlockingConnectionPool`: at most
    ``max_connections``, a caller waits ``timeout`` seconds for one, then gets a ConnectionError."""


def redis_client(url: str, *, timeout: float, max_connections: int = 64, retries: int = 1,
                 sentinel_password: str = "", name: str = "REDIS_URL") -> redis.Redis:
    """A client for ``url`` (a plain server or through Sentinel): every wait bounded by ``timeout``
    seconds (connect, each reply, a free connection from the pool), ``retries`` immediate retries on a
    connection error (0: none, for callers that have a fallback of their own). A timeout is never
    retried, for reads and writes alike: redis-py's retry can't tell them apart, and a write that timed
    out may have happened."""
    location = parse_redis_url(url, name)
    common = dict(
        socket_timeout=timeout, socket_connect_timeout=timeout, socket_keepalive=True,
        health_check_interval=HEALTH_CHECK_INTERVAL_SECONDS,
        retry=Retry(NoBackoff(), retries, supported_errors=RETRIED_ERRORS) if retries else None,
    )
    if location.kind == "redis":
        pool = BlockingConnectionPool.from_url(location.url, max_connections=max_connections, timeout=timeout,
                                               **common)
        return redis.Redis(connection_pool=pool)
    # No retries on a Sentinel: the next one in the list is asked instead.
    sentinel_kwargs = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "socket_keepalive": True,
                       "retry": None}
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password
    sentinel = Sentinel(list(location.sentinels), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(
        location.master_name, connection_pool_class=SentinelBlockingConnectionPool,
        max_connections=max_connections, timeout=timeout, db=location.db,
        username=location.username or None, password=location.password or None, **common)


def kombu_broker(url: str, sentinel_password: str = "", name: str = "BROKER_URL", *,
                 timeout: float = 2.0) -> tuple[str, dict]:
    """The Celery ``broker_url`` for ``url`` and the transport options it needs on top of ours.

    A ``redis+sentinel://`` URL becomes kombu's form (``sentinel://h1:p1/db;sentinel://h2:p2/db``, the
    data nodes' credentials on each) with ``master_name`` and ``sentinel_kwargs`` (the questions to the
    Sentinels bounded by ``timeout`` too, and their password if they have one) in the transport options.
    """
    location = parse_redis_url(url, name)
    if location.kind == "redis":
        return location.url, {}
    auth = ""
    if location.username or location.password:
        auth = f"{quote(location.username, safe='')}:{quote(location.password, safe='')}@"
    broker_url = ";".join(f"sentinel://{auth}{host}:{port}/{location.db}" for host, port in location.sentinels)
    sentinel_kwargs: dict = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "socket_keepalive": True,
                             "retry": None}
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password
    return broker_url, {"master_name": location.master_name, "sentinel_kwargs": sentinel_kwargs}


def eviction_policy_problem(client: redis.Redis) -> str | None:
    """What is wrong with the server's ``maxmemory-policy`` (None: ``noeviction``, or it can't be read,
    e.g. a managed Redis that forbids CONFIG). Callers log it; the server is not ours to change."""
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.RedisError:
        return None
    if policy in (None, "noeviction"):
        return None
    return (f"Redis runs with maxmemory-policy {policy}: under memory pressure it would drop broker "
            "messages and waiting-room places without a word; set maxmemory-policy noeviction")
