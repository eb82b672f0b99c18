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

# Per order, the money of its own capture (legacy rows that name no transaction count as the order's);
# and each extra capture (a second payment of one order, refunded on its own) as a row of its own, named
# "<order>/<gateway order id>", whose status is its refund's: in flight until the refund is done.
LEDGER_SQL = """
SELECT o.id::text AS order_id, o.status,
       coalesce(sum(l.amount_idr) FILTER (WHERE l.kind = 'captured'), 0) AS captured,
       coalesce(sum(l.amount_idr) FILTER (WHERE l.kind = 'revenue'), 0) AS revenue,
       coalesce(sum(l.amount_idr) FILTER (WHERE l.kind = 'refunded'), 0) AS refunded
FROM orders o
LEFT JOIN ledger_entries l ON l.order_id = o.id AND NOT EXISTS (
    SELECT 1 FROM payments x WHERE x.gateway_order_id = l.gateway_order_id AND x.capture_role = 'extra')
GROUP BY o.id, o.status
UNION ALL
SELECT p.order_id::text || '/' || p.gateway_order_id,
       CASE r.status WHEN 'succeeded' THEN 'refunded' WHEN 'manual' THEN 'refund_manual'
                     WHEN 'pending' THEN 'refund_pending' ELSE 'paid' END,
       coalesce(sum(l.amount_idr) FILTER (WHERE l.kind = 'captured'), 0),
       coalesce(sum(l.amount_idr) FILTER (WHERE l.kind = 'revenue'), 0),
       coalesce(sum(l.amount_idr) FILTER (WHERE l.kind = 'refunded'), 0)
FROM payments p
LEFT JOIN refunds r ON r.gateway_order_id = p.gateway_order_id
LEFT JOIN ledger_entries l ON l.gateway_order_id = p.gateway_order_id
WHERE p.capture_role = 'extra'
GROUP BY p.order_id, p.gateway_order_id, r.status
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

# Per gateway transaction: money the gateway holds (settled or captured, not given back) must be the
# stamp of its order (the order's own capture, order stamped) or waiting for a manual payout; money the
# gateway gave back (refund, or a voided capture: cancel) must be a refund we booked as done by the
# gateway; a refund we booked as done by the gateway must show there; every captured transaction must
# be one of ours.
GATEWAY_SQL = """
SELECT t.order_id AS gateway_order_id, t.transaction_status, o.id::text AS order_id, o.status,
       p.capture_role, r.status AS refund_status
FROM {schema}.transactions t
LEFT JOIN payments p ON p.gateway_order_id = t.order_id
LEFT JOIN orders o ON o.id = p.order_id
LEFT JOIN refunds r ON r.gateway_order_id = t.order_id
WHERE (t.transaction_status IN ('settlement', 'capture')
       AND NOT coalesce((p.capture_role = 'order' AND o.status = 'stamped' AND r.gateway_order_id IS NULL)
                        OR r.status = 'manual'
                        OR (r.status = 'succeeded' AND r.manual_reference IS NOT NULL), false))
   OR ((t.transaction_status = 'refund' OR (t.transaction_status = 'cancel' AND p.captured_at IS NOT NULL))
       AND (r.status IS DISTINCT FROM 'succeeded' OR r.manual_reference IS NOT NULL))
   OR (r.status = 'succeeded' AND r.manual_reference IS NULL AND t.transaction_status NOT IN ('refund', 'cancel'))
LIMIT 20
"""


# Paid at the gateway, and not booked here yet (its notification, or the watch's next look, is still to
# come); or an extra capture's refund still pending (the order's own pending refunds are counted by
# their status).
UNHEARD_SQL = """
SELECT (SELECT count(*) FROM {schema}.transactions t
        JOIN payments p ON p.gateway_order_id = t.order_id
        WHERE t.transaction_status IN ('settlement', 'capture') AND p.captured_at IS NULL)
     + (SELECT count(*) FROM refunds r JOIN payments p ON p.gateway_order_id = r.gateway_order_id
        WHERE r.status = 'pending' AND p.capture_role = 'extra')
"""


def work_left(conn: psycopg.Connection, standin_schema: str = "standin") -> int:
    """Paid orders without their outcome yet: in paid/stamping/refund_pending, paid at the gateway and
    not booked here yet, or an extra capture whose refund is still pending."""
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
                f"{r['order_id'] or '(none)'} is {r['status'] or '(missing)'}"
                f" ({r['capture_role'] or 'not captured'} capture, refund {r['refund_status'] or 'none'})"
                for r in conn.execute(query)]
        else:
            report.gateway_problems = [f"no {standin_schema}.transactions table to reconcile against"]
    return report
