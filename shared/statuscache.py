"""The buyers' order-status answers, cached in Redis and replaced whenever the order changes.

Why: in a deadline surge every buyer's page polls its order every few seconds, and the answer only
changes a handful of times in an order's life. Reading it from PostgreSQL on every poll makes the
database's busiest query the one whose answer is almost always the same, and a status poll costs several
times a no-op request. Here a poll that finds its order's answer in Redis is one GET.

Correctness rules, in order of importance:

* **Never stale after a change we know of.** Every status change goes through :mod:`shared.lifecycle`,
  which tells its listeners, this module's :func:`mark_changed` among them, the id of the newest event
  it wrote per order once the transaction commits; the order's entry is then replaced by a change
  marker carrying that id.
  Entries carry the id of the newest event they show, and one script decides every write: nothing
  replaces a newer entry or marker with an older one. (Event ids grow with time, and the changes of
  one order are serialised by its row lock, so a later change always has a larger id.) So a poll that
  read the row just before a commit can't put its old answer back over the marker, while a poll that
  read after the commit caches at once.
* **Bounded staleness when Redis misses the change** (a blip exactly at commit, or a process that never
  configured the cache): every entry expires after ``status_cache_seconds``. Every process that changes
  orders configures it: the web and the workers through their app factories, the ``meterai`` CLI in its
  ``main`` (configuring is what makes this module listen); for one that doesn't, :mod:`shared.lifecycle`
  says so in its log, once.
* **The cache never decides who may read.** The entry holds every token hash the order accepts (the
  creates' and its e-mail links', :func:`shared.orders.order_token_hashes`); the token
  is checked against them as against the row, and a token the entry doesn't know is checked against
  the row (a replayed create may just have added one). And a Redis that doesn't answer just means the database
  answers (fail open to the source of truth): a poll never fails because of the cache.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import redis

from shared import lifecycle
from shared.config import Settings
from shared.logs import log_event
from shared.redisconn import redis_client

log = logging.getLogger(__name__)

# The cache's own Redis client gives up this fast, and after a failure leaves Redis alone this long.
CACHE_TIMEOUT_SECONDS = 0.1
REST_AFTER_FAILURE_SECONDS = 5.0
# How long a change's marker outlives the change: far longer than any read-to-put gap of a request.
MARKER_SECONDS = 60
_SEP = b"\n"

# KEYS: the order's entry. ARGV: version (newest event id), value ('' for a change marker), ttl.
# An entry is "<version>\n<token hashes, comma-separated>\n<body>", a change marker "d<version>". A write never replaces a
# newer version; a marker doesn't replace an entry of its own version (that entry shows the change).
_WRITE = """
local version = tonumber(ARGV[1])
local current = redis.call('GET', KEYS[1])
if current then
  local seen = tonumber(string.match(current, '^d?(%d+)'))
  if seen then
    if seen > version then return 0 end
    if ARGV[2] == '' and seen == version then return 0 end
  end
end
if ARGV[2] == '' then
  redis.call('SET', KEYS[1], 'd' .. ARGV[1], 'EX', tonumber(ARGV[3]))
else
  redis.call('SET', KEYS[1], ARGV[1] .. '\\n' .. ARGV[2], 'EX', tonumber(ARGV[3]))
end
return 1
"""

_state: dict[str, Any] = {}


def configure(settings: Settings) -> None:
    """Called by the app factories (web and Celery): where the cache lives and for how long.

    With ``status_cache_seconds`` 0 nothing is cached, but changes still mark their orders dirty, so a
    mixed fleet during a roll-out never serves a stale answer from a process that still caches.
    """
    # redis-py's pool notices a fork and opens new sockets in the child, so Celery's prefork children
    # can share this module state. The cache is an optimisation: a Redis slower than this answers
    # "miss" (the database answers instead), and no retries.
    client = redis_client(settings.redis_url, timeout=CACHE_TIMEOUT_SECONDS, retries=0,
                          sentinel_password=settings.redis_sentinel_password)
    _state.update(client=client, prefix=f"{settings.redis_key_prefix}status:",
                  ttl=settings.status_cache_seconds, write=client.register_script(_WRITE), skip_until=0.0)
    lifecycle.add_listener(mark_changed)


def _client() -> tuple[redis.Redis, str] | None:
    """The client, unless unconfigured or resting after a failure (see :func:`_failed`)."""
    if not _state or time.monotonic() < _state["skip_until"]:
        return None
    return _state["client"], _state["prefix"]


def _failed() -> None:
    """A Redis that just failed or stalled is left alone for a moment: while it recovers, polls go
    straight to the database instead of each waiting out the timeout first."""
    _state["skip_until"] = time.monotonic() + REST_AFTER_FAILURE_SECONDS


def get(order_id: str) -> tuple[list[str], bytes] | None:
    """The cached answer for ``order_id`` as (access-token hashes, JSON body), or ``None``."""
    found = _client()
    if found is None or not _state["ttl"]:
        return None
    client, prefix = found
    try:
        raw = client.get(f"{prefix}{order_id}")
    except redis.RedisError:
        _failed()
        return None
    if not raw or raw.startswith(b"d"):
        return None
    try:
        _, token_hashes, body = raw.split(_SEP, 2)
        return token_hashes.decode("ascii").split(","), body
    except ValueError:  # not an entry of ours: a miss, never an error for the buyer
        return None


def put(order_id: str, version: int, token_hashes: list[str], body: bytes) -> None:
    """Cache an answer just read from the database (``version``: its newest event id), unless the
    order has changed since. ``token_hashes``: every hash the row accepts (access and link tokens)."""
    found = _client()
    if found is None or not _state["ttl"]:
        return
    client, prefix = found
    try:
        _state["write"](keys=[f"{prefix}{order_id}"],
                        args=[version, ",".join(token_hashes).encode() + _SEP + body, _state["ttl"]],
                        client=client)
    except redis.RedisError:
        _failed()


def mark_changed(versions: Mapping[str, int]) -> None:
    """Write the change markers (``versions``: order id -> newest event id, committed). Tried even while
    reads rest after a failure: this is what keeps answers fresh, and it runs once per transaction, not
    once per poll."""
    client, prefix = _state["client"], _state["prefix"]  # a listener only once configure() ran
    try:
        pipe = client.pipeline(transaction=False)
        for order_id, version in versions.items():
            _state["write"](keys=[f"{prefix}{order_id}"], args=[version, "", MARKER_SECONDS], client=pipe)
        pipe.execute()
    except redis.RedisError as exc:
        # The entries expire on their own within status_cache_seconds.
        log_event(log, "status_cache_not_invalidated", logging.WARNING, error=type(exc).__name__)

