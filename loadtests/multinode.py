"""The multi-node drill's parts (``python -m loadtests.drill --profile multi``): the layout, the failures,
and what the report says about them.

:func:`start_multi` lays the system out as on many machines, on one box: every node a process group of
its own with its own ``DATA_DIR`` (:meth:`loadtests.stack.Stack.start_node`), documents only in the
shared store, the signing files made once before any node starts and handed to every node by path, the
web nodes behind the private nginx. :class:`Chaos` SIGKILLs the victims mid-run (a stamping node once it
holds a lease, so the takeover is exercised) and brings them back. The rest reads what happened: the
requests the proxy carried to another web node (its JSON access log), the claims taken over after a
lease ran out, and the history of each order a killed node held.

A client like the rest of the drill: HTTP, the database and the devtools launcher and services only.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.devtools.services import free_port


@dataclass(frozen=True)
class MultiNode:
    """The multi-node layout and its failures: ``victims`` are SIGKILLed ``kill_at`` seconds into the
    load and brought back ``down_seconds`` later."""

    web_nodes: int = 2
    stamping_nodes: int = 2
    kill_at: float = 50.0
    down_seconds: float = 30.0
    victims: tuple[str, ...] = ("web-2", "stamping-2")


def start_multi(stack: Any, plan: MultiNode, overrides: dict[str, str]) -> dict[str, Any]:
    """The system as on many machines, on this one: every node a process group with its own DATA_DIR,
    documents in the shared store only, the signing files made once before any node starts, the web
    nodes behind the private nginx. Returns what was laid out (for the report)."""
    from loadtests.stack import say

    store = stack.open_document_store()
    stack.make_shared_pki(overrides)
    web_ports = [free_port() for _ in range(plan.web_nodes)]
    polls_port = free_port()
    front = stack.start_proxy(web_ports, trust_forwarded_from="127.0.0.1", polls_ports=[polls_port])
    nodes = [(f"web-{i}", "web", port) for i, port in enumerate(web_ports, start=1)]
    nodes += [("polls-1", "polls", polls_port)]
    nodes += [(f"stamping-{i}", "stamping", None) for i in range(1, plan.stamping_nodes + 1)]
    nodes += [(g, g, None) for g in ("checkout", "payments", "refunds", "housekeeping", "reconcile", "beat", "gateway")]
    for name, group, port in nodes:
        stack.start_node(group, name, overrides=overrides, port=port)
    say(f"started {', '.join(n for n, _, _ in nodes)}; each with its own DATA_DIR under {stack.workdir / 'nodes'}")
    return {"front": front, "store": store, "nodes": [n for n, _, _ in nodes],
            "overrides": overrides}


class Chaos:
    """Kills the plan's victims at ``kill_at`` and brings them back ``down_seconds`` later; logs when."""

    def __init__(self, stack: Any, plan: MultiNode, victims: tuple[str, ...]) -> None:
        self.stack, self.plan, self.victims = stack, plan, victims
        self.down: set[str] = set()
        self.timeline: list[dict[str, Any]] = []
        self.held_when_killed: list[str] = []
        self.origin: float | None = None
        self.state = "before"

    def note(self, t: float, event: str, node: str) -> None:
        from loadtests.stack import say

        t = time.monotonic() - self.origin if self.origin is not None else t  # after any wait for a lease
        self.timeline.append({"t": round(t, 1), "at": time.strftime("%H:%M:%S"), "event": event, "node": node})
        say(f"t={t:5.1f}s {event}: {node}")

    def holding_lease(self, name: str, patience: float = 10.0) -> list[str]:
        """Wait (at most ``patience`` seconds) until node ``name`` holds a stamping lease, so the kill
        lands mid-stamp and the takeover is exercised; the orders it held (none: it had no lease)."""
        import psycopg

        deadline = time.monotonic() + patience
        with psycopg.connect(self.stack.database_url, autocommit=True) as conn:
            while True:
                pids = [str(pid) for pid in self.stack.process_pids(name)]
                held = [r[0] for r in conn.execute(
                    "SELECT id::text FROM orders WHERE status = 'stamping' AND lease_expires_at > now()"
                    " AND split_part(lease_owner, ':', 2) = ANY(%s)", (pids,))]
                if held or time.monotonic() > deadline:
                    return held
                time.sleep(0.02)

    def __call__(self, t: float) -> set[str]:
        if t != float("inf"):
            self.origin = time.monotonic() - t
        if self.state == "before" and t >= self.plan.kill_at:
            for name in self.victims:
                held = self.holding_lease(name) if name.startswith("stamping") else []
                self.stack.kill(name)
                self.down.add(name)
                self.held_when_killed += held
                self.note(t, "SIGKILL (whole process group)" + (f" holding the lease of {', '.join(held)}" if held else ""),
                          name)
            self.state = "down"
        elif self.state == "down" and t >= self.plan.kill_at + self.plan.down_seconds:
            for name in self.victims:
                self.stack.bring_back(name)
                self.note(t, "started again", name)
            self.state = "coming back"
        elif self.state == "coming back":
            for name in sorted(self.down):
                if self.stack.launcher.up(name):
                    self.down.discard(name)
                    self.note(t, "up again", name)
            if not self.down:
                self.state = "after"
        return set(self.down)


def wait_answers(url: str, timeout: float = 30.0) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} does not answer 200 after {timeout:.0f} s")
        time.sleep(0.2)


# Orders whose stamping changed hands: a claim taken over after a lease ran out (the stamping node died
# holding it), and orders stamped more than once (must be none: the commit is a CAS on one's own lease).
TAKEOVERS_SQL = """
SELECT (SELECT count(*) FROM order_events WHERE from_status = 'stamping' AND to_status = 'stamping') AS reclaims,
       (SELECT count(*) FROM (SELECT order_id FROM order_events WHERE to_status = 'stamped'
                              GROUP BY order_id HAVING count(*) > 1) d) AS stamped_twice,
       (SELECT count(*) FROM orders WHERE status = 'stamped' AND stamp_attempts > 1) AS stamped_after_retry
"""


def takeovers(database_url: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        reclaims, twice, retried = conn.execute(TAKEOVERS_SQL).fetchone()
    return {"reclaimed_after_lease_expiry": int(reclaims), "stamped_twice": int(twice),
            "stamped_after_more_than_one_attempt": int(retried)}


def order_histories(database_url: str, order_ids: list[str]) -> dict[str, list[str]]:
    """Each order's events (``from → to (worker) at``): what became of the orders a killed node held."""
    import psycopg

    if not order_ids:
        return {}
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT order_id::text, coalesce(from_status, '') || ' → ' || to_status"
            " || coalesce(' (' || (detail->>'worker') || ')', '') || ' at ' || to_char(at, 'HH24:MI:SS.MS')"
            " FROM order_events WHERE order_id = ANY(%s::uuid[]) ORDER BY order_id, id", (order_ids,)).fetchall()
    histories: dict[str, list[str]] = {order: [] for order in order_ids}
    for order, line in rows:
        histories[order].append(line)
    return histories


def proxy_retries(stack: Any) -> dict[str, Any]:
    """What the proxy hid from the buyers: requests it sent to a second web node after the first failed
    (its access log lists every upstream tried, comma-separated), by the first upstream's status."""
    proxy = getattr(stack, "proxy", None)
    log = getattr(proxy, "access_log", None) if proxy is not None else None
    if log is None:
        candidates = sorted((stack.workdir / "nginx").rglob("access*.log")) if proxy is not None else []
        log = candidates[0] if candidates else None
    if log is None or not Path(log).exists():
        return {"access_log": None, "retried": None}
    retried, by_status, answered_5xx = 0, {}, 0
    for line in Path(log).read_text(errors="replace").splitlines():
        fields = _upstream_fields(line)
        if fields is None:
            continue
        statuses, final = fields
        if final >= 500:
            answered_5xx += 1
        if len(statuses) > 1:
            retried += 1
            by_status[statuses[0]] = by_status.get(statuses[0], 0) + 1
    return {"access_log": str(log), "retried": retried, "first_upstream_status": by_status,
            "answered_5xx": answered_5xx}


def _upstream_fields(line: str) -> tuple[list[str], int] | None:
    """(each upstream's status, the status the client got) from one line of the proxy's JSON access log
    (``deploy/nginx/meterai.conf``'s ``meterai_json``: ``"upstream_status":"502, 202"`` when it tried two)."""
    import re

    try:
        record = json.loads(line)
        statuses = [part.strip() for part in re.split(r"[,:]", str(record.get("upstream_status", ""))) if part.strip()]
        return statuses, int(record["status"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def print_multi(multi: dict[str, Any]) -> None:
    print(f"nodes: {', '.join(multi['nodes'])}; documents in the {multi['store']} store; "
          f"front: nginx at {multi['front']}")
    for event in multi["timeline"]:
        print(f"  t={event['t']:6.1f}s ({event['at']})  {event['event']}: {event['node']}")
    proxy = multi["proxy"]
    if proxy.get("retried") is not None:
        print(f"proxy: {proxy['retried']} requests carried over to another web node after the first failed "
              f"(first upstream answered {json.dumps(proxy['first_upstream_status'])}), "
              f"{proxy['answered_5xx']} answered 5xx to the client")
    t = multi["takeovers"]
    print(f"stamping: {t['reclaimed_after_lease_expiry']} claims taken over after a lease ran out, "
          f"{t['stamped_after_more_than_one_attempt']} orders stamped on a later attempt, "
          f"{t['stamped_twice']} stamped twice")
    for order, events in multi["killed_mid_stamp"].items():
        print(f"order {order}, held by the killed stamping node: " + "; ".join(events[-3:]))
