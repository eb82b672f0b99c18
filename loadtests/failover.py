"""The dependency-failover drill's parts (``python -m loadtests.drill --profile failover``): the system on
its production arrangement of dependencies, the faults, and how long each kept new orders out.

:class:`HAStack` is a :class:`loadtests.stack.Stack` whose dependencies are all ours to break: a private
PostgreSQL (restartable), reached by web and workers through a private PgBouncer in transaction mode
(``DATABASE_POOLED=1``; ``meterai migrate``, the drill's own queries and the stand-in gateway go to
PostgreSQL directly: the stand-in's connection ``options`` are refused by PgBouncer 1.18); Redis as a
Sentinel set (a primary, a replica, three Sentinels; ``REDIS_URL`` and ``BROKER_URL`` through Sentinel);
documents on a private SeaweedFS over S3.

:class:`Faults` breaks them in turn during the load, each in a thread of its own so the drill's clock and
its look at the processes go on meanwhile: the Redis primary SIGKILLed (Sentinel promotes the replica;
the old primary is started again later and becomes a replica), PostgreSQL restarted (fast stop, start),
PgBouncer restarted, the document store stopped for a while and started again. Each step is written to
the timeline with its wall-clock time.

:func:`outages` reads the buyers' request log (the locustfile's ``DRILL_REQUEST_LOG``: one JSON line per
request with its end time and status) and says, per fault, how long new orders were not accepted: from
the first create-order refused after the fault (503, any other 5xx, or no answer) to the first one
accepted (2xx) after it. Locust's own log rather than a probe of the drill's: it is what the buyers saw,
and a probe's creates would have to pass the waiting room like everyone else's. Its resolution is the
rate at which creates are accepted at all (the waiting room's outflow), so about a second at the drill's
90 admissions a minute.

A client like the rest of the drill: HTTP, the database and the devtools services only.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psycopg

from loadtests.slo import CREATE
from loadtests.stack import Stack, migrate, say
from shared.devtools.launcher import Launcher
from shared.devtools.pgbouncer import PgBouncerHandle, start_pgbouncer
from shared.devtools.sentinel import SentinelSet, start_sentinel_set
from shared.devtools.services import PostgresHandle, create_database, start_private_postgres

# BROKER_URL given apart from REDIS_URL (here the same Sentinel set), as deploy.md recommends: the drill
# runs the production arrangement. (The celery command reads BROKER_URL as its own --broker; the broker
# config says our URL for reads and writes too, so that can't displace it: shared/broker.)
SEPARATE_BROKER_URL = True

# The order the faults come in; names as in the report.
FAULTS = ("redis-primary", "postgresql", "pgbouncer", "document-store")


@dataclass(frozen=True)
class FailoverPlan:
    """When the faults come: the first ``first_at`` seconds into the load (the spike at its peak), the
    next ones ``spacing`` seconds apart so each recovers before the next; the store is down
    ``store_down_seconds``; the killed Redis primary comes back ``revive_after`` seconds after its kill."""

    first_at: float = 45.0
    spacing: float = 40.0
    store_down_seconds: float = 30.0
    revive_after: float = 15.0

    def at(self, fault: str) -> float:
        return self.first_at + FAULTS.index(fault) * self.spacing


class _Postgres:
    """The private PostgreSQL, restartable on its port; ``stop()`` for the stack's teardown."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.handle: PostgresHandle = start_private_postgres(dir)
        self.port = self.handle.port

    def restart(self) -> None:
        self.handle.stop()  # pg_ctl stop -m fast -w: sessions cut, in-flight transactions rolled back
        self.handle = start_private_postgres(self.dir, port=self.port)

    def stop(self) -> None:
        self.handle.stop()
        shutil.rmtree(self.dir / "postgres", ignore_errors=True)  # the cluster; its log stays in the report


class HAStack(Stack):
    """The stack on PgBouncer + private PostgreSQL, a Sentinel set and SeaweedFS (see the module doc)."""

    postgres: _Postgres
    pgbouncer: PgBouncerHandle
    sentinels: SentinelSet
    pooled_url: str = ""
    # Settings added to the private PgBouncer's (``--pgbouncer NAME=VALUE``), e.g. server_login_retry.
    pgbouncer_settings: dict[str, str] = {}

    def open_services(self) -> None:
        self.postgres = _Postgres(self.workdir / "postgresql")
        self._private.append(self.postgres)
        self._database_name = f"meterai_{self.label}_{time.strftime('%Y%m%d_%H%M%S')}"
        self.database_url = self.postgres.handle.database_url(self._database_name)
        create_database(self.database_url)
        applied = migrate(self.database_url)
        say(f"database {self._database_name} on a private PostgreSQL (port {self.postgres.port}): "
            f"{len(applied)} migrations applied")
        self.pgbouncer = start_pgbouncer(self.workdir / "pgbouncer", self.database_url)
        self._private.append(self.pgbouncer)
        if self.pgbouncer_settings:  # [pgbouncer] is the config's last section: lines appended land in it
            with open(self.pgbouncer.config, "a", encoding="utf-8") as config:
                config.writelines(f"{name} = {value}\n" for name, value in self.pgbouncer_settings.items())
            self.pgbouncer.restart()
        self.pooled_url = self.pgbouncer.url
        say(f"PgBouncer (transaction mode) on port {self.pgbouncer.port}")
        self.sentinels = start_sentinel_set(self.workdir / "sentinel")
        self._private.append(self.sentinels)
        self.redis_url = self.sentinels.url
        say(f"Redis: primary port {self.sentinels.primary.port}, replica, 3 Sentinels: {self.redis_url}")
        self.open_document_store()
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        self.take_ports()
        self.launcher = Launcher(self.env(), logs=self.workdir / "logs")

    def env(self, overrides: dict[str, str] | None = None) -> dict[str, str]:
        env = super().env()
        env.update(self.store_env)
        if self.pooled_url:
            env.update(DATABASE_URL=self.pooled_url, DATABASE_POOLED="1", MIGRATE_DATABASE_URL=self.database_url,
                       STANDIN_DATABASE_URL=self.database_url)
            if SEPARATE_BROKER_URL:
                env["BROKER_URL"] = self.redis_url
        env.update(overrides or {})
        return env

    def redis_client(self) -> Any:
        from redis.sentinel import Sentinel

        hosts = [("127.0.0.1", node.port) for node in self.sentinels.sentinels]
        return Sentinel(hosts, socket_timeout=1).master_for("meterai", socket_timeout=1)

    def store_handle(self) -> Any:
        return next(h for h in self._private if hasattr(h, "endpoint_url"))


class Faults:
    """The drill's ``on_tick``: starts each fault at its time, in a thread; notes every step."""

    def __init__(self, stack: HAStack, plan: FailoverPlan) -> None:
        self.stack, self.plan = stack, plan
        self.timeline: list[dict[str, Any]] = []
        self.started: set[str] = set()
        self.threads: list[threading.Thread] = []
        self.errors: list[str] = []
        self.origin: float | None = None

    def note(self, fault: str, event: str, **detail: Any) -> None:
        now = time.time()
        t = now - self.origin if self.origin is not None else 0.0
        self.timeline.append({"fault": fault, "event": event, "t": round(t, 2), "wall": now,
                              "at": time.strftime("%H:%M:%S", time.localtime(now)), **detail})
        say(f"t={t:5.1f}s {fault}: {event}" + (f" {json.dumps(detail)}" if detail else ""))

    def __call__(self, t: float) -> set[str]:
        if t == float("inf"):
            self.finish()
            return set()
        if self.origin is None:
            self.origin = time.time() - t
        for fault in FAULTS:
            if fault not in self.started and t >= self.plan.at(fault):
                self.started.add(fault)
                thread = threading.Thread(target=self._run, args=(fault,), name=f"fault-{fault}", daemon=True)
                thread.start()
                self.threads.append(thread)
        return set()  # no process of the system is down on purpose: every one must ride it out

    def finish(self, timeout: float = 120.0) -> None:
        for thread in self.threads:
            thread.join(timeout)

    @property
    def complete(self) -> bool:
        return len(self.started) == len(FAULTS) and not any(t.is_alive() for t in self.threads)

    def _run(self, fault: str) -> None:
        try:
            getattr(self, "_" + fault.replace("-", "_"))(fault)
        except Exception as exc:  # a fault that could not be done (or undone) fails the gate, named
            self.errors.append(f"{fault}: {type(exc).__name__}: {exc}")
            self.note(fault, "could not be done", error=str(exc))

    def _redis_primary(self, fault: str) -> None:
        sentinels = self.stack.sentinels
        old = sentinels.kill_primary()
        self.note(fault, "SIGKILL", port=old.port)
        new = sentinels.wait_promoted(old, timeout=60)
        self.note(fault, "replica promoted by Sentinel", port=new.port)
        time.sleep(max(0.0, self.plan.revive_after - (time.time() - self.timeline[-2]["wall"])))
        sentinels.revive(old, timeout=60)
        self.note(fault, "old primary back as a replica", port=old.port)

    def _postgresql(self, fault: str) -> None:
        self.note(fault, "fast stop")
        self.stack.postgres.restart()
        self.note(fault, "started again", port=self.stack.postgres.port)

    def _pgbouncer(self, fault: str) -> None:
        self.note(fault, "stop (SIGTERM: every client and server connection cut)")
        self.stack.pgbouncer.restart()
        self.note(fault, "started again", port=self.stack.pgbouncer.port)

    def _document_store(self, fault: str) -> None:
        store = self.stack.store_handle()
        store.stop()
        self.note(fault, "stopped")
        time.sleep(self.plan.store_down_seconds)
        self.note(fault, "starting")
        store.start()
        self.note(fault, "answering again")


# -- what the buyers saw ------------------------------------------------------------------------------

REFUSED = "refused"


def _kind(status: int) -> str:
    if 200 <= status < 300:
        return "accepted"
    if status == 429:
        return "queued"
    return REFUSED if status == 0 or status >= 500 else "other"


def read_request_log(path: Path) -> list[dict[str, Any]]:
    """The locustfile's request log (every process's lines), in order of end time."""
    rows = []
    for file in sorted(path.parent.glob(path.name + "*")):
        for line in file.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return sorted(rows, key=lambda r: r["end"])


def outages(timeline: list[dict[str, Any]], requests: list[dict[str, Any]], *, until: float) -> list[dict[str, Any]]:
    """Per fault: how long new orders were not accepted (first refused create at or after the fault's
    first step, to the first accepted create after that), how many were refused and until when,
    and when the first order was accepted after the fault."""
    creates = [r for r in requests if r["name"] == CREATE]
    starts = {}
    for event in timeline:
        starts.setdefault(event["fault"], event["wall"])
    order = sorted(starts.items(), key=lambda kv: kv[1])
    result = []
    if order:
        calm = [r["end"] for r in creates if _kind(r["status"]) == "accepted" and order[0][1] - 30 <= r["end"] < order[0][1]]
        gaps = [b - a for a, b in zip(calm, calm[1:])]
        result.append({"fault": "(none: the 30 s before the first)", "accepted_creates": len(calm),
                       "longest_without_an_accepted_order_s": round(max(gaps, default=0.0), 2)})
    for i, (fault, start) in enumerate(order):
        end = order[i + 1][1] if i + 1 < len(order) else until
        window = [r for r in creates if start <= r["end"] < end]
        refused = [r for r in window if _kind(r["status"]) == REFUSED]
        entry: dict[str, Any] = {"fault": fault, "refused_creates": len(refused),
                                 "refused_by_status": _by_status(refused)}
        if refused:
            first = refused[0]["end"]
            accepted = next((r["end"] for r in creates if r["end"] > first and _kind(r["status"]) == "accepted"), None)
            entry["first_refused_after_fault_s"] = round(first - start, 2)
            entry["last_refused_after_fault_s"] = round(refused[-1]["end"] - start, 2)
            entry["orders_not_accepted_s"] = round(accepted - first, 2) if accepted is not None else None
        else:
            entry["orders_not_accepted_s"] = 0.0
        # The longest stretch after the fault with no create accepted at all (a hang shows here, a refusal
        # too): from the last accepted before the fault (or the fault) to each next one, within the window.
        accepted_ends = [r["end"] for r in creates if _kind(r["status"]) == "accepted" and r["end"] < end]
        before = [t for t in accepted_ends if t < start]
        previous, longest = (before[-1] if before else start), 0.0
        for t in (t for t in accepted_ends if t >= start):
            longest, previous = max(longest, t - previous), t
        entry["longest_without_an_accepted_order_s"] = round(longest, 2)
        entry["slowest_create_ms"] = max((r.get("ms", 0) for r in window), default=0)
        after = next((r["end"] for r in window if _kind(r["status"]) == "accepted"), None)
        entry["first_accepted_after_fault_s"] = round(after - start, 2) if after is not None else None
        entry["accepted_creates"] = sum(1 for r in window if _kind(r["status"]) == "accepted")
        result.append(entry)
    return result


def _by_status(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        key = str(r["status"]) + ("" if r["status"] != 503 or r.get("retry_after") else " (no Retry-After)")
        counts[key] = counts.get(key, 0) + 1
    return counts


def accepted_order_ids(requests: list[dict[str, Any]]) -> set[str]:
    return {r["order_id"] for r in requests if r["name"] == CREATE and r.get("order_id")}


# Orders answered 202 that the database does not have (lost), and orders with more than one stamped event
# or more than one serial used (doubled).
def lost_or_doubled(database_url: str, accepted: set[str]) -> dict[str, Any]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        known = {r[0] for r in conn.execute("SELECT id::text FROM orders WHERE id = ANY(%s::uuid[])", (list(accepted),))}
        stamped_twice = conn.execute(
            "SELECT count(*) FROM (SELECT order_id FROM order_events WHERE to_status = 'stamped'"
            " GROUP BY order_id HAVING count(*) > 1) d").fetchone()[0]
        serials_twice = conn.execute(
            "SELECT count(*) FROM (SELECT order_id FROM serials WHERE status = 'used'"
            " GROUP BY order_id HAVING count(*) > 1) d").fetchone()[0]
        refunds_twice = conn.execute(
            "SELECT count(*) FROM (SELECT order_id FROM ledger_entries WHERE kind = 'refunded'"
            " GROUP BY order_id, gateway_order_id HAVING count(*) > 1) d").fetchone()[0]
        in_db = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    lost = sorted(accepted - known)
    return {"accepted_by_web": len(accepted), "orders_in_database": int(in_db), "lost": len(lost),
            "lost_examples": lost[:5], "stamped_twice": int(stamped_twice),
            "serial_used_twice": int(serials_twice), "refunded_twice": int(refunds_twice)}


def status_counts(requests: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per request name, answers by status ("503" only with Retry-After; "503 (no Retry-After)" apart)."""
    counts: dict[str, dict[str, int]] = {}
    for r in requests:
        key = str(r["status"]) + ("" if r["status"] != 503 or r.get("retry_after") else " (no Retry-After)")
        per = counts.setdefault(r["name"], {})
        per[key] = per.get(key, 0) + 1
    return counts


def print_failover(report: dict[str, Any], say_line: Callable[[str], None] = print) -> None:
    for event in report["timeline"]:
        say_line(f"  t={event['t']:6.1f}s ({event['at']})  {event['fault']}: {event['event']}")
    for o in report["outages"]:
        if "orders_not_accepted_s" not in o:
            say_line(f"{o['fault']}: longest without an accepted order {o['longest_without_an_accepted_order_s']:.1f} s")
            continue
        not_accepted = o["orders_not_accepted_s"]
        say_line(f"{o['fault']:<15} new orders not accepted for "
                 f"{'(never again)' if not_accepted is None else f'{not_accepted:.1f} s'}; "
                 f"longest without an accepted order {o['longest_without_an_accepted_order_s']:.1f} s, "
                 f"slowest create {o['slowest_create_ms'] / 1000:.1f} s; "
                 f"{o['refused_creates']} creates refused {json.dumps(o['refused_by_status'])}, "
                 f"{o['accepted_creates']} accepted before the next fault")
    d = report["orders"]
    say_line(f"orders: {d['accepted_by_web']} accepted (202), {d['lost']} of them missing from the database; "
             f"{d['stamped_twice']} stamped twice, {d['serial_used_twice']} with two serials, "
             f"{d['refunded_twice']} refunded twice")


def failover_report(stack: HAStack, faults: Faults, report: Path, result: Any) -> dict[str, Any]:
    """What the failover drill adds to gate.json, and its checks added to ``result`` (the SLO gate)."""
    from loadtests.slo import Check

    requests = read_request_log(report / "requests.jsonl")
    until = requests[-1]["end"] if requests else time.time()
    found = outages(faults.timeline, requests, until=until)
    orders = lost_or_doubled(stack.database_url, accepted_order_ids(requests))
    result.checks.append(Check(
        "every dependency lost and brought back", faults.complete and not faults.errors,
        f"{len(faults.started)} of {len(FAULTS)} faults done" + (f"; {faults.errors[0]}" if faults.errors else "")))
    result.checks.append(Check(
        "no order lost or doubled",
        orders["lost"] == 0 and not (orders["stamped_twice"] or orders["serial_used_twice"] or orders["refunded_twice"]),
        f"{orders['accepted_by_web']} orders answered 202, {orders['lost']} missing from the database"
        + (f" (e.g. {orders['lost_examples'][0]})" if orders["lost_examples"] else "")
        + f"; stamped twice {orders['stamped_twice']}, two serials {orders['serial_used_twice']},"
          f" refunded twice {orders['refunded_twice']}"))
    losses = [o for o in found if "orders_not_accepted_s" in o]
    never = [o["fault"] for o in losses if o["orders_not_accepted_s"] is None or not o["accepted_creates"]]
    result.checks.append(Check(
        "new orders accepted again after every loss", len(losses) == len(FAULTS) and not never,
        "; ".join(f"{o['fault']}: refused→accepted {o['orders_not_accepted_s']} s, none accepted for "
                  f"{o['longest_without_an_accepted_order_s']} s" for o in losses)
        + (f"; none accepted after {', '.join(never)}" if never else "")))
    return {"timeline": faults.timeline, "outages": found, "orders": orders,
            "status_counts": status_counts(requests),
            "layout": {"postgresql_port": stack.postgres.port, "pgbouncer_port": stack.pgbouncer.port,
                       "redis_url": stack.redis_url, "document_store": stack.store_env.get("S3_ENDPOINT_URL"),
                       "pgbouncer_pool_mode": "transaction", "database_pooled": True}}
