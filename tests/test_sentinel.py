"""Redis through Sentinel, on real servers: a private primary, replica and three Sentinels
(shared/devtools/sentinel.py) under a system of its own (web under gunicorn, the Procfile's Celery workers,
the stand-in gateway) whose REDIS_URL is ``redis+sentinel://`` (the broker follows it).

The primary is SIGKILLed while orders are in flight. What must hold: Sentinel promotes the replica; web
and workers reconnect by themselves (same processes, nothing restarted); buyers meanwhile get 202 or 503
with Retry-After (the waiting room fails closed), never a hang or a bare 500, and their status polls keep
answering (the cache fails open to the database); no order is lost (the redrive covers what only the old
primary held) and none is stamped twice; new orders flow afterwards. Then the two known traps: the old
primary comes back (empty, saying it is a master) and must get no write of ours (redis/redis-py#3560),
and a graceful failover demotes a live primary under open connections (READONLY) and every client
must move to the promoted one; the workers consume after each reconnect (celery#8030, #10205).
"""
from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import pytest
import redis
import requests

from conftest import WORKERS, System, _run_system, _test_database, wait_until
from shared import jobs, statuscache
from shared.broker import broker_config
from shared.config import load_settings
from shared.devtools.sentinel import SentinelSet, start_sentinel_set
from shared.redisconn import eviction_policy_problem, parse_redis_url, redis_client

PREFIX = "meterai-sentinel-test:"


# ---------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("url, problem", [
    ("sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379", "kombu's own Sentinel form"),
    ("redis+sentinel://10.0.0.1:26379,10.0.0.2:26379", "master name is missing"),
    ("redis+sentinel://10.0.0.1:26379/mymaster/x", "only a database number"),
    ("redis+sentinel://10.0.0.1:0/mymaster", "not a number from 1 to 65535"),
    ("redis+sentinel://,10.0.0.2/mymaster", "every Sentinel needs a host"),
    ("redis+sentinel://10.0.0.1/mymaster?db=1", "no query"),
    ("rediss+sentinel://10.0.0.1/mymaster", "TLS through Sentinel is not supported"),
    ("memcached://10.0.0.1", "must start with redis://"),
    ("redis://:secret@cache:port/0", "the port"),
])
def test_a_bad_redis_url_is_refused_at_start_with_what_is_wrong(url: str, problem: str) -> None:
    for name in ("REDIS_URL", "BROKER_URL"):
        with pytest.raises(ValueError, match=problem) as caught:
            load_settings({name: url})
        assert name in str(caught.value) and "secret" not in str(caught.value)


def test_the_broker_follows_redis_url_unless_broker_url_says_otherwise() -> None:
    sentinel = "redis+sentinel://:pa%3Ass@10.0.0.1:26379,10.0.0.2/mymaster/2"
    config = broker_config(load_settings({"REDIS_URL": sentinel}))
    assert config["broker_url"] == "sentinel://:pa%3Ass@10.0.0.1:26379/2;sentinel://:pa%3Ass@10.0.0.2:26379/2"
    assert config["broker_transport"] == "shared.broker.redis_transport:SentinelTransport"
    options = config["broker_transport_options"]
    assert options["master_name"] == "mymaster" and "password" not in options["sentinel_kwargs"]
    assert options["socket_timeout"] and options["socket_keepalive"] and options["health_check_interval"]
    assert config["broker_use_ssl"] is None

    split = load_settings({"REDIS_URL": sentinel, "BROKER_URL": "rediss://broker.internal:6380/0",
                           "REDIS_SENTINEL_PASSWORD": "s3ntinel"})
    config = broker_config(split)
    assert config["broker_url"] == "rediss://broker.internal:6380/0" and config["broker_use_ssl"]
    assert "master_name" not in config["broker_transport_options"]
    assert parse_redis_url(split.redis_url).password == "pa:ss"
    with_password = broker_config(load_settings({"BROKER_URL": sentinel, "REDIS_SENTINEL_PASSWORD": "s3ntinel"}))
    assert with_password["broker_transport_options"]["sentinel_kwargs"]["password"] == "s3ntinel"


def test_workers_retry_channel_errors_while_reconnecting() -> None:
    from workers.celery_app import celery_config

    assert celery_config(load_settings({}))["broker_channel_error_retry"] is True


# ---------------------------------------------------------------------------------------------- the set


@dataclass
class SentinelHandle:
    """What the conftest's system runner expects of its Redis: a URL (here the Sentinel set's)."""

    set: SentinelSet

    @property
    def url(self) -> str:
        return self.set.url


@pytest.fixture(scope="module")
def sentinel_system(postgres_admin, mailbox, tmp_path_factory) -> Iterator[tuple[System, SentinelSet]]:
    """A system of its own on a private Sentinel set; the test process's publisher and status cache are
    given back to whoever had them before."""
    saved_publisher, saved_cache = jobs._publisher, dict(statuscache._state)
    sentinels = start_sentinel_set(tmp_path_factory.mktemp("sentinel"))
    try:
        for database_url in _test_database(postgres_admin):
            for system in _run_system(database_url, SentinelHandle(sentinels),
                                      tmp_path_factory.mktemp("sentinel-system"), prefix=PREFIX, store_env={},
                                      store_kind="fs", mailbox=mailbox):
                yield system, sentinels
    finally:
        sentinels.stop()
        assert not sentinels.processes(), "a Sentinel-set process outlived the test"
        jobs._publisher = saved_publisher
        statuscache._state.clear()
        statuscache._state.update(saved_cache)


def _flow(sys_: System, order_id: str, token: str) -> None:
    view = sys_.wait_status(order_id, token, "awaiting_payment", "paid", "stamping", "stamped", timeout=60)
    if view["status"] == "awaiting_payment":
        sys_.pay(view["payment"]["gateway_order_id"])
    sys_.wait_status(order_id, token, "stamped", timeout=90)


def _new_order(sys_: System) -> tuple[str, str]:
    r = sys_.create()
    assert r.status_code == 202, r.text
    return r.json()["order_id"], r.json()["access_token"]


def _answer(sys_: System, answers: Counter, made: list[tuple[str, str]]) -> int:
    """One buyer's create, counted by what came back: 202, 503 with Retry-After, or anything else
    (a hang is a ReadTimeout after the client's 10 s and is counted too)."""
    try:
        r = sys_.create()
    except requests.RequestException as exc:
        answers[f"no answer: {type(exc).__name__}"] += 1
        return 0
    if r.status_code == 503 and r.headers.get("Retry-After"):
        answers["503 Retry-After"] += 1
    else:
        answers[str(r.status_code)] += 1
    if r.status_code == 202:
        made.append((r.json()["order_id"], r.json()["access_token"]))
    return r.status_code


def _stamped_once(sys_: System, orders: list[tuple[str, str]]) -> None:
    ids = [order_id for order_id, _ in orders]
    rows = sys_.query("SELECT o.id::text AS id, o.status, count(e.id) FILTER (WHERE e.to_status = 'stamped') AS "
                      "stamps FROM orders o LEFT JOIN order_events e ON e.order_id = o.id WHERE o.id = ANY(%s::uuid[]) "
                      "GROUP BY o.id, o.status", (ids,))
    assert {row["id"]: (row["status"], row["stamps"]) for row in rows} == {i: ("stamped", 1) for i in ids}


def _write_across(client, restart, restarted, old_role) -> list[tuple[str, str | None]]:
    """Write keys of unique names through ``client`` from a thread, from before ``restart()`` until
    after ``restarted()`` returns; each acknowledged key with what the old node said it was just after."""
    acked: list[tuple[str, str | None]] = []
    stop = threading.Event()

    def write() -> None:
        for n in itertools.count():
            if stop.is_set():
                return
            key = f"{PREFIX}trap:{n}"
            client.connection_pool.disconnect()  # a new connection for each write
            try:
                client.set(key, "1")
            except redis.RedisError:
                continue
            acked.append((key, old_role()))

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        wait_until(lambda: acked, message="a first write")
        restart()
        restarted()
        done = len(acked)
        wait_until(lambda: len(acked) > done, message="a write after the old primary became a replica")
    finally:
        stop.set()
        writer.join(timeout=30)
    return acked


def test_orders_survive_the_primary_being_killed_and_buyers_only_wait(sentinel_system) -> None:
    from shared.services import housekeeping

    sys_, sentinels = sentinel_system
    started = time.monotonic()
    def pids() -> dict[str, int | None]:  # stamping is stopped and started by the test itself
        return {name: process.pid for name, process in sys_.launcher.processes.items() if name != "stamping"}

    running = pids()
    probe = redis_client(sentinels.url, timeout=0.5)  # one of our clients, as the web builds them
    assert eviction_policy_problem(probe) is None  # noeviction on the private servers

    first = _new_order(sys_)
    _flow(sys_, *first)

    # Paid work whose stamping message only the primary holds (no stamping worker takes it), and
    # checkouts created just before the kill.
    sys_.stop("stamping")
    paid_id, paid_token, view = sys_.order_awaiting_payment()
    sys_.pay(view["payment"]["gateway_order_id"])
    sys_.wait_status(paid_id, paid_token, "paid", timeout=30)
    before = [_new_order(sys_) for _ in range(3)]
    probe.set(f"{PREFIX}probe:before", "1")

    consumers = [process for name, process in sys_.launcher.processes.items() if name in WORKERS and name != "stamping"]
    seen = {process.name: process.log.stat().st_size for process in consumers}
    old = sentinels.kill_primary()
    killed = time.monotonic()
    answers: Counter = Counter()
    polls: Counter = Counter()
    during: list[tuple[str, str]] = []

    def web_back() -> bool:
        status = _answer(sys_, answers, during)
        polls[sys_.http.get(f"{sys_.web_url}/api/v1/orders/{paid_id}",
                            headers={"Authorization": f"Bearer {paid_token}"}, timeout=10).status_code] += 1
        return status == 202 and old.port not in sentinels.reported_primary()

    wait_until(web_back, timeout=90, interval=0.05, message="the web to take orders again after the failover")
    new = sentinels.wait_promoted(old)
    outage = time.monotonic() - killed
    assert new is not old and sentinels.primary is new
    assert set(answers) <= {"202", "503 Retry-After"}, answers  # never a bare 500, never a hang
    assert answers["503 Retry-After"] >= 1, answers  # the waiting room failed closed while there was no primary
    assert set(polls) == {200}, polls  # status polls answered from the database meanwhile

    # The workers reconnected by themselves; the redrive (beat's job) re-publishes what only the old
    # primary held; every order made before, during and after the outage is stamped exactly once.
    assert pids() == running
    def reconnected(process) -> bool:  # it noticed the loss and reconnected, through Sentinel, by itself
        log = process.log.read_bytes()[seen[process.name]:]
        return b"Connection to broker lost" in log and b"Connected to" in log.split(b"Connection to broker lost")[-1]

    for process in consumers:
        wait_until(lambda: reconnected(process), timeout=60, message=f"{process.name} to reconnect")
    sys_.start("stamping")
    housekeeping.redrive(sys_.settings)
    after = [_new_order(sys_) for _ in range(2)]
    orders = [first, (paid_id, paid_token), *before, *during, *after]
    for order in orders[1:]:
        _flow(sys_, *order)
    _stamped_once(sys_, orders)
    assert all(process.alive() for process in sys_.launcher.processes.values())

    # The old primary comes back empty, first calling itself a master for some seconds, until Sentinel
    # makes it a replica: our clients must not write to it (a write there is lost in its resync). A
    # writer runs across its restart, each write on a new connection (which asks the Sentinels again).
    acked = _write_across(probe, lambda: sentinels.revive(old, wait=False),
                          lambda: sentinels.wait_replica(old), lambda: sentinels.role(old))
    keys = [key for key, _ in acked]
    in_window = sum(role == "master" for _, role in acked)
    assert in_window, "no write met the old primary's window as a master: this test proved nothing"
    on_new = new.client()
    lost = len(keys) - sum(on_new.exists(*keys[n:n + 500]) for n in range(0, len(keys), 500))
    assert lost == 0, f"{lost} of {len(keys)} writes were acknowledged by the old primary and lost in its resync"
    later = _new_order(sys_)
    _flow(sys_, *later)
    assert sentinels.primary is new

    outage_answers = dict(answers)

    # A graceful failover demotes the live primary under our open connections (READONLY, or Sentinel
    # closing them): every client moves to the promoted node, the workers keep consuming.
    answers.clear()
    promoted = sentinels.failover()
    assert promoted is old
    probe.set(f"{PREFIX}probe:graceful", "1")
    assert promoted.client().get(f"{PREFIX}probe:graceful") == "1"
    made: list[tuple[str, str]] = []
    wait_until(lambda: _answer(sys_, answers, made) == 202, timeout=60, interval=0.05,
               message="the web to take orders on the promoted primary")
    assert set(answers) <= {"202", "503 Retry-After"}, answers
    for order in made:
        _flow(sys_, *order)
    _stamped_once(sys_, [*orders, later, *made])
    assert pids() == running and all(process.alive() for process in sys_.launcher.processes.values())
    print(f"\nsentinel failover: primary killed, {outage:.1f}s until the web took orders again; creates meanwhile "
          f"{outage_answers}; after a graceful failover {dict(answers)}; across the old primary's restart {len(acked)} "
          f"writes acknowledged, {in_window} while it called itself a master, all on the new primary; test body "
          f"{time.monotonic() - started:.0f}s")


def test_a_client_follows_the_primary_without_any_process_restarting(sentinel_system) -> None:
    """The factory's client in this process: a write right after a failover lands on the promoted node,
    with at most the one retry, and the client never needs to be rebuilt."""
    _, sentinels = sentinel_system
    client = redis_client(sentinels.url, timeout=0.5, retries=1)
    key = f"{PREFIX}follow:{uuid.uuid4().hex}"
    client.set(key, "before")
    promoted = sentinels.failover()
    client.set(key, "after")  # the old connection was closed or answers READONLY: the retry reconnects
    assert promoted.client().get(key) == "after"
    assert client.execute_command("ROLE")[0] == b"master"


def test_a_redis_that_may_evict_is_named_at_start(tmp_path) -> None:
    """The web warns at start-up when Redis could drop our keys under memory pressure (its policy is the
    operator's to set, so a warning, not a refusal)."""
    from shared.devtools.services import start_private_redis

    server = start_private_redis(tmp_path)
    try:
        client = redis_client(server.url, timeout=1)
        assert eviction_policy_problem(client) is None  # Redis's own default, and what we run
        client.config_set("maxmemory-policy", "allkeys-lru")
        assert "allkeys-lru" in eviction_policy_problem(client) and "noeviction" in eviction_policy_problem(client)
    finally:
        server.stop()
