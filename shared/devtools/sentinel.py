"""A private Redis Sentinel set for tests and drills: a primary, a replica and three Sentinels on free
loopback ports, run with Debian's ``redis-server`` (``redis-server <conf> --sentinel`` for the Sentinels).

Why: failing Redis over is only believable on real servers, with Sentinel's own election. The set is
tuned to fail over fast (``down-after-milliseconds`` and ``failover-timeout`` small) so a test can kill the
primary and wait for the promotion in a few seconds. Data nodes run memory-only with ``maxmemory-policy
noeviction`` (what production must use: an evicted broker message is silently lost work).

:meth:`SentinelSet.kill_primary` SIGKILLs the current primary; :meth:`SentinelSet.wait_promoted` waits
until every Sentinel names another node and that node says it is a master; :meth:`SentinelSet.revive`
starts a killed node again on its port (Sentinel makes it a replica of the new primary, as it does with a
crashed primary that comes back); :meth:`SentinelSet.stop` stops every process it started.

Only the standard library, redis-py and the private services' helpers: drills may use it and stay clients.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from shared.devtools.services import ServiceError, _redis_server, _tail, free_port, terminate

MASTER_NAME = "meterai"
QUORUM = 2


@dataclass
class Node:
    """One redis-server of the set (a data node or a Sentinel), our child in a session of its own."""

    name: str
    dir: Path
    port: int
    sentinel: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}.log"

    def client(self, timeout: float = 1.0) -> redis.Redis:
        return redis.Redis("127.0.0.1", self.port, socket_timeout=timeout, socket_connect_timeout=timeout,
                           retry=None, decode_responses=True)

    def answers(self) -> bool:
        client = self.client()
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def start(self, args: list[str], timeout: float = 10.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([_redis_server(), *args], stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"{self.name} on port {self.port} did not start; {self.log}:\n{_tail(self.log)}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to replicas or clients (a crashed machine)."""
        if self.alive():
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        process, self.process = self.process, None
        terminate(process)


class SentinelSet:
    """A primary, one replica and three Sentinels (quorum 2) watching them as :data:`MASTER_NAME`."""

    def __init__(self, dir: Path, *, down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        self.dir = Path(dir).absolute()
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.data = [Node(f"redis-{n}", self.dir / f"redis-{n}", free_port()) for n in (1, 2)]
        self.sentinels = [Node(f"sentinel-{n}", self.dir / f"sentinel-{n}", free_port(), sentinel=True)
                          for n in (1, 2, 3)]

    # -- what clients are given ------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The REDIS_URL / BROKER_URL of this set (shared/redisconn.py's redis+sentinel:// form)."""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def env(self) -> dict[str, str]:
        return {"REDIS_URL": self.url}

    # -- running ---------------------------------------------------------------------------------
    def _data_args(self, node: Node) -> list[str]:
        return ["--port", str(node.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(node.dir), "--maxmemory-policy", "noeviction",
                # A replica that lost its primary keeps answering reads only; writes go to the promoted one.
                "--replica-serve-stale-data", "yes"]

    def _write_sentinel_config(self, node: Node, primary: Node) -> Path:
        node.dir.mkdir(parents=True, exist_ok=True)
        config = node.dir / "sentinel.conf"  # Sentinel rewrites it with what it learns
        config.write_text("\n".join([
            f"port {node.port}", "bind 127.0.0.1", f"dir {node.dir}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary.port} {QUORUM}",
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {MASTER_NAME} 1", "",
        ]))
        return config

    def start(self) -> "SentinelSet":
        primary, replica = self.data
        try:
            primary.start(self._data_args(primary))
            replica.start([*self._data_args(replica), "--replicaof", "127.0.0.1", str(primary.port)])
            self._wait(lambda: self._role(replica) == "slave" and self._link_up(replica), 15,
                       "the replica to sync with the primary")
            for node in self.sentinels:
                node.start([str(self._write_sentinel_config(node, primary)), "--sentinel"])
            self._wait(lambda: all(self._sentinel_sees(node, primary, peers=2, replicas=1)
                                   for node in self.sentinels), 30, "the Sentinels to find each other and the replica")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in [*self.sentinels, *self.data]:
            node.stop()

    def processes(self) -> list[Node]:
        return [node for node in [*self.data, *self.sentinels] if node.alive()]

    # -- what the set says -------------------------------------------------------------------------
    @staticmethod
    def _role(node: Node) -> str | None:
        client = node.client()
        try:
            return client.execute_command("ROLE")[0]
        except (redis.RedisError, OSError):
            return None
        finally:
            client.close()

    @staticmethod
    def _link_up(node: Node) -> bool:
        client = node.client()
        try:
            return client.info("replication").get("master_link_status") == "up"
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    @staticmethod
    def _sentinel_sees(node: Node, primary: Node, *, peers: int, replicas: int) -> bool:
        client = node.client()
        try:
            state = client.execute_command("SENTINEL", "MASTER", MASTER_NAME)
            info = state if isinstance(state, dict) else dict(zip(state[::2], state[1::2]))
            return (int(info.get("port", 0)) == primary.port and int(info.get("num-other-sentinels", 0)) >= peers
                    and int(info.get("num-slaves", 0)) >= replicas)
        except (redis.RedisError, OSError, ValueError, TypeError):
            return False
        finally:
            client.close()

    def reported_primary(self) -> set[int | None]:
        """The primary's port as each live Sentinel reports it (None where one doesn't answer)."""
        ports: set[int | None] = set()
        for node in self.sentinels:
            client = node.client()
            try:
                address = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
                ports.add(int(address[1]) if address else None)
            except (redis.RedisError, OSError):
                ports.add(None)
            finally:
                client.close()
        return ports

    @property
    def primary(self) -> Node:
        """The data node the Sentinels agree is the primary (they must agree)."""
        [port] = self.reported_primary()
        return next(node for node in self.data if node.port == port)

    def node_on(self, port: int) -> Node:
        return next(node for node in self.data if node.port == port)

    # -- failing over ------------------------------------------------------------------------------
    def kill_primary(self) -> Node:
        """SIGKILL the current primary; returns it (see :meth:`revive`)."""
        primary = self.primary
        primary.kill()
        return primary

    def wait_promoted(self, old: Node, timeout: float = 60.0) -> Node:
        """Wait until every Sentinel names a primary other than ``old`` and it says it is a master."""
        def promoted() -> Node | None:
            ports = self.reported_primary()
            if len(ports) != 1 or None in ports or old.port in ports:
                return None
            node = self.node_on(next(iter(ports)))  # type: ignore[arg-type]
            return node if self._role(node) == "master" else None
        return self._wait(promoted, timeout, f"a replica of {old.name} to be promoted")

    def revive(self, node: Node, timeout: float = 60.0, *, wait: bool = True) -> None:
        """Start a killed data node again on its port, empty (it first calls itself a master, until
        Sentinel reconfigures it some seconds later) and, unless ``wait`` is false, wait until Sentinel
        has made it a replica of the current primary with its link up (:meth:`wait_replica`)."""
        node.start(self._data_args(node))
        if wait:
            self.wait_replica(node, timeout)

    def wait_replica(self, node: Node, timeout: float = 60.0) -> None:
        """Wait until ``node`` is a replica with its link to the primary up."""
        self._wait(lambda: self._role(node) == "slave" and self._link_up(node), timeout,
                   f"{node.name} to come back as a replica")

    def role(self, node: Node) -> str | None:
        """What ``node`` says it is (ROLE: "master", "slave"), None when it doesn't answer."""
        return self._role(node)

    def failover(self, timeout: float = 60.0) -> Node:
        """A graceful failover (``SENTINEL FAILOVER``: the primary is alive and is demoted to a replica);
        returns the new primary once it is promoted and the old one follows it."""
        old = self.primary
        client = self.sentinels[0].client()
        try:
            client.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        finally:
            client.close()
        new = self.wait_promoted(old, timeout)
        self._wait(lambda: self._role(old) == "slave" and self._link_up(old), timeout,
                   f"{old.name} to follow {new.name}")
        return new

    @staticmethod
    def _wait(predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise ServiceError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.05)


def start_sentinel_set(dir: Path, **options: int) -> SentinelSet:
    """A started :class:`SentinelSet` in ``dir`` (stop it with :meth:`SentinelSet.stop`)."""
    return SentinelSet(dir, **options).start()
