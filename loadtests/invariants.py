"""The design's invariants, read from PostgreSQL after a drill: the inputs of :func:`loadtests.slo.evaluate`.

The queries read whole tables: a drill's database holds thousands of orders, not millions.
"""
from __future__ import annotations

import time
from typing import Callable

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from loadtests.slo import STUCK_STATUSES, InvariantReport, OrderLedger

LEDGER_SQL = """
SELECT o.id::text AS order_id, o.status,
       coalesce(sum(l.amount_idr) FILTER (WHERE l.kind = 'captured'), 0) AS captured,
       coalesce(sum(l.amount_idr) FILTER (WHERE l.kind = 'revenue'), 0) AS revenue,
       coalesce(sum(l.amount_idr) FILTER (WHERE l.kind = 'refunded'), 0) AS refunded
FROM orders o LEFT JOIN ledger_entries l ON l.order_id = o.id
GROUP BY o.id, o.status
"""

SERIALS_SQL = """
SELECT o.id::text AS order_id, o.status, o.serial,
       count(s.serial) FILTER (WHERE s.status = 'used') AS used,
       count(s.serial) FILTER (WHERE s.status = 'reserved') AS reserved,
       coalesce(bool_or(s.status = 'used' AND s.serial = o.serial
                        AND s.document_sha256 = o.stamped_sha256), false) AS matches
FROM orders o LEFT JOIN serials s ON s.order_id = o.id
GROUP BY o.id, o.status, o.serial
HAVING (o.status = 'stamped' AND NOT (count(s.serial) FILTER (WHERE s.status = 'used') = 1
                                      AND coalesce(bool_or(s.status = 'used' AND s.serial = o.serial
                                                           AND s.document_sha256 = o.stamped_sha256), false)))
    OR (o.status <> 'stamped' AND count(s.serial) FILTER (WHERE s.status = 'used') > 0)
    OR (o.status IN ('refund_pending', 'refund_manual', 'refunded')
        AND count(s.serial) FILTER (WHERE s.status = 'reserved') > 0)
LIMIT 20
"""

# Money the gateway holds (settled, not refunded) must belong to a stamped order (or one ops pays out
# by hand); money the gateway gave back must belong to a refunded order; and every settled transaction
# must be one of ours.
GATEWAY_SQL = """
SELECT t.order_id AS gateway_order_id, t.transaction_status, o.id::text AS order_id, o.status
FROM {schema}.transactions t
LEFT JOIN payments p ON p.gateway_order_id = t.order_id
LEFT JOIN orders o ON o.id = p.order_id
WHERE (t.transaction_status IN ('settlement', 'capture')
       AND (o.id IS NULL OR o.status NOT IN ('stamped', 'refund_manual')))
   OR (t.transaction_status = 'refund' AND (o.id IS NULL OR o.status <> 'refunded'))
   OR (o.status = 'refunded' AND t.transaction_status <> 'refund'
       AND p.captured_at IS NOT NULL)
LIMIT 20
"""


# Paid at the gateway, but the order has not heard yet (its notification is still on its way).
UNHEARD_SQL = """
SELECT count(*) FROM {schema}.transactions t
JOIN payments p ON p.gateway_order_id = t.order_id
JOIN orders o ON o.id = p.order_id
WHERE t.transaction_status IN ('settlement', 'capture') AND o.status IN ('created', 'awaiting_payment')
"""


def work_left(conn: psycopg.Connection, standin_schema: str = "standin") -> int:
    """Paid orders without their outcome yet: in paid/stamping/refund_pending, or paid at the gateway and
    still awaiting payment here."""
    left = conn.execute("SELECT count(*) FROM orders WHERE status = ANY(%s)", (list(STUCK_STATUSES),)).fetchone()[0]
    if conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{standin_schema}.transactions",)).fetchone()[0]:
        left += conn.execute(sql.SQL(UNHEARD_SQL).format(schema=sql.Identifier(standin_schema))).fetchone()[0]
    return int(left)


def wait_for_drain(database_url: str, window_seconds: float, *, interval: float = 2.0, standin_schema: str = "standin",
                   progress: Callable[[str], None] | None = None) -> float:
    """Wait until every paid order has its outcome (:func:`work_left` is 0), at most ``window_seconds``;
    returns the seconds waited."""
    started = time.monotonic()
    last = None
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            left = work_left(conn, standin_schema)
            waited = time.monotonic() - started
            if left == 0 or waited >= window_seconds:
                return waited
            if progress and left != last:
                progress(f"draining: {left} paid orders not yet stamped or refunded ({waited:.0f} s)")
                last = left
            time.sleep(min(interval, max(0.1, window_seconds - waited)))


def read_invariants(database_url: str, *, standin_schema: str = "standin", drain_seconds: float = 0.0) -> InvariantReport:
    report = InvariantReport(drain_seconds=drain_seconds)
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        report.orders_by_status = {r["status"]: r["n"] for r in conn.execute(
            "SELECT status, count(*) AS n FROM orders GROUP BY status")}
        report.ledger = [OrderLedger(**r) for r in conn.execute(LEDGER_SQL)]
        report.serial_problems = [
            f"order {r['order_id']} ({r['status']}, serial {r['serial']}): used={r['used']} reserved={r['reserved']}"
            f" matches={r['matches']}" for r in conn.execute(SERIALS_SQL)]
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL AS ok",
                              (f"{standin_schema}.transactions",)).fetchone()["ok"]
        if exists:
            query = sql.SQL(GATEWAY_SQL).format(schema=sql.Identifier(standin_schema))
            report.gateway_problems = [
                f"gateway {r['gateway_order_id']} is {r['transaction_status']} but order "
                f"{r['order_id'] or '(none)'} is {r['status'] or '(missing)'}" for r in conn.execute(query)]
        else:
            report.gateway_problems = [f"no {standin_schema}.transactions table to reconcile against"]
    return report
