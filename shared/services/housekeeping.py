"""Periodic safety nets: the refund sweep and the redrive.

The sweep turns paid work that missed its deadline into refunds; the redrive re-publishes every piece of
work the database says is due (checkouts within their deadline, notifications, stamps, every pending
refund of a transaction, every e-mail not sent yet), so a Redis that restarted empty loses nothing. The watch of gateway
transactions and the expiry scan need no redrive: a claimed row whose task was lost is simply due again
at its next check. Both take rows with
``FOR UPDATE SKIP LOCKED`` in bounded batches (Warehouse's pattern): two beat processes, or a beat and a
cron run, split the work instead of fighting over it, and the state machine's compare-and-set makes each
refund happen once whatever overlaps. Both read through partial indexes, so their cost follows the work
found, not the size of the orders table.
"""
from __future__ import annotations

import logging

from shared import jobs
from shared.config import Settings
from shared.db import get_pool, transaction
from shared.lifecycle import Status, lease_free, past_deadline
from shared.logs import log_event
from shared.services.refunds import begin_refund

log = logging.getLogger(__name__)


def sweep_refunds(settings: Settings, *, batch_size: int | None = None) -> int:
    """Move paid/stamping orders past their deadline with no live lease to refund_pending."""
    batch = batch_size or settings.sweep_batch_size
    total = 0
    while True:
        with transaction(settings.database_url) as tx:
            rows = tx.execute(
                """
                SELECT id, status FROM orders
                WHERE status IN ('paid', 'stamping')
                  AND refund_due_at <= now()
                  AND (lease_expires_at IS NULL OR lease_expires_at < now())
                ORDER BY refund_due_at
                LIMIT %s
                FOR UPDATE SKIP LOCKED
                """,
                (batch,),
            ).fetchall()
            for row in rows:
                if begin_refund(tx, str(row["id"]), Status(row["status"]), reason="stamp_deadline",
                                guards=(lease_free(), past_deadline())):
                    total += 1
        if len(rows) < batch:
            break
    if total:
        log_event(log, "sweep_refunds", count=total)
    return total


# Each query's columns are its task's arguments, in order.
REDRIVE_QUERIES: tuple[tuple[str, str], ...] = (
    # Past the checkout deadline an order is expired by the expiry scan, never checked out again.
    (jobs.PREPARE_ORDER,
     "SELECT id::text AS id FROM orders WHERE status = 'created'"
     " AND updated_at < now() - make_interval(secs => %(grace)s)"
     " AND created_at > now() - make_interval(secs => %(checkout_deadline)s)"
     " ORDER BY created_at LIMIT %(limit)s"),
    (jobs.PROCESS_NOTIFICATION,
     "SELECT id FROM payment_notifications WHERE processed_at IS NULL"
     " AND received_at < now() - make_interval(secs => %(grace)s) ORDER BY received_at LIMIT %(limit)s"),
    (jobs.STAMP_ORDER,
     "SELECT id::text AS id FROM orders WHERE status IN ('paid', 'stamping')"
     " AND refund_due_at > now() AND (lease_expires_at IS NULL OR lease_expires_at < now())"
     " AND updated_at < now() - make_interval(secs => %(grace)s) ORDER BY refund_due_at LIMIT %(limit)s"),
    # Per refund, so the extra capture of an order that is stamped is refunded too.
    (jobs.REFUND_ORDER,
     "SELECT gateway_order_id AS id FROM refunds WHERE status = 'pending'"
     " AND requested_at < now() - make_interval(secs => %(grace)s) ORDER BY requested_at LIMIT %(limit)s"),
    # E-mails still to send: waiting for longer than any retry's backoff (so its message was lost, and a
    # live retry chain is never doubled) or claimed by a worker whose lease ran out (it died mid-send). A
    # failed one stays failed.
    (jobs.SEND_MAIL,
     "SELECT order_id::text AS id, kind FROM mail_outbox"
     " WHERE (status = 'pending' AND updated_at < now() - make_interval(secs => %(grace)s + %(retry_max)s))"
     "    OR (status = 'sending' AND lease_expires_at < now())"
     " ORDER BY updated_at LIMIT %(limit)s"),
)


def redrive(settings: Settings, *, grace_seconds: float | None = None, limit: int = 5000) -> dict[str, int]:
    """Re-publish due work found in PostgreSQL alone. Tasks are idempotent, so a duplicate is harmless."""
    grace = settings.redrive_grace_seconds if grace_seconds is None else grace_seconds
    counts: dict[str, int] = {}
    with get_pool(settings.database_url).connection() as conn:
        due = {
            name: [tuple(row.values()) for row in conn.execute(
                query, {"grace": grace, "limit": limit, "retry_max": settings.retry_max_seconds,
                        "checkout_deadline": settings.checkout_deadline_seconds})]
            for name, query in REDRIVE_QUERIES
        }
    for name, items in due.items():
        for args in items:
            jobs.publish(name, *args)
        counts[name] = len(items)
    if any(counts.values()):
        log_event(log, "redrive", **{name.rsplit(".", 1)[-1]: n for name, n in counts.items()})
    return counts
