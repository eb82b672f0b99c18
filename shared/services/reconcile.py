"""Reconciliation: orders whose payment notification never came, and orders nobody paid.

A notification is a courtesy, not a guarantee: it can be dropped, or our endpoint can be down for
longer than the gateway retries. So two periodic scans look at orders still ``awaiting_payment``:

* **reconcile** — waiting longer than ``RECONCILE_AFTER_SECONDS``: ask the gateway for the status and
  apply it through the same status table as notifications (:func:`shared.services.payments.apply_gateway_status`).
  An order nobody pays is asked again after doubling intervals (capped at
  ``RECONCILE_MAX_INTERVAL_SECONDS``, and never later than its payment deadline).
* **expire-unpaid** — waiting longer than ``PAYMENT_TIMEOUT_SECONDS``: close the transaction at the
  gateway *first*, so it can no longer be paid, then apply whatever the gateway says is true: expired
  (``awaiting_payment → expired``), or paid meanwhile (the capture is applied, the document stamped).

Each scan *claims* a bounded batch in one short transaction — ``SELECT … FOR UPDATE SKIP LOCKED`` over
partial indexes, then moving ``payment_next_check_at`` forward — and publishes one task per order on the
``payments`` queue. Two beats (or beat and cron) therefore split the work instead of doing it twice, no
transaction is held open across a gateway call, and a claimed order whose task is lost (Redis restarted)
is simply due again at its next check. The per-order work is idempotent: it acts only on an order
still awaiting payment, and every move is the state machine's compare-and-set.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Mapping

from shared import jobs
from shared.config import Settings
from shared.db import get_pool, transaction
from shared.errors import TransientError
from shared.lifecycle import Status, transition
from shared.logs import log_event
from shared.payments.gateway import PaymentGateway
from shared.services.payments import apply_gateway_status

log = logging.getLogger(__name__)

# Orders due for a status poll: never polled and waiting longer than RECONCILE_AFTER_SECONDS, or due
# again. Orders past their payment deadline belong to the expiry scan.
_RECONCILE_DUE = (
    """
    SELECT id FROM orders
    WHERE status = 'awaiting_payment' AND payment_next_check_at IS NULL
      AND updated_at <= now() - make_interval(secs => %(after)s)
      AND updated_at > now() - make_interval(secs => %(timeout)s)
    ORDER BY updated_at LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
    """,
    """
    SELECT id FROM orders
    WHERE status = 'awaiting_payment' AND payment_next_check_at <= now()
      AND updated_at > now() - make_interval(secs => %(timeout)s)
    ORDER BY payment_next_check_at LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
    """,
)
# The next poll: after RECONCILE_AFTER_SECONDS, doubling per poll, capped, and at the latest when the
# payment deadline comes (so the expiry scan finds it then).
_RECONCILE_CLAIM = """
    UPDATE orders SET payment_checks = payment_checks + 1,
        payment_next_check_at = least(
            now() + make_interval(secs => least(%(cap)s, %(after)s * power(2, least(payment_checks, 20)))),
            updated_at + make_interval(secs => %(timeout)s))
    WHERE id = ANY(%(ids)s::uuid[]) AND status = 'awaiting_payment'
"""

_EXPIRY_DUE = (
    """
    SELECT id FROM orders
    WHERE status = 'awaiting_payment'
      AND updated_at <= now() - make_interval(secs => %(timeout)s)
      AND (payment_next_check_at IS NULL OR payment_next_check_at <= now())
    ORDER BY updated_at LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
    """,
)
# If closing at the gateway fails (gateway down), try again after RECONCILE_AFTER_SECONDS.
_EXPIRY_CLAIM = """
    UPDATE orders SET payment_checks = payment_checks + 1,
        payment_next_check_at = now() + make_interval(secs => %(after)s)
    WHERE id = ANY(%(ids)s::uuid[]) AND status = 'awaiting_payment'
"""


def _claim(
    settings: Settings, due: tuple[str, ...], claim: str, limit: int | None, publish: str | None
) -> list[str]:
    """Claim up to ``limit`` due orders in one transaction; publish ``publish`` for each once it commits."""
    params: dict[str, Any] = {
        "after": settings.reconcile_after_seconds,
        "cap": settings.reconcile_max_interval_seconds,
        "timeout": settings.payment_timeout_seconds,
    }
    wanted = limit or settings.reconcile_batch_size
    ids: list[str] = []
    with transaction(settings.database_url) as tx:
        for query in due:
            if len(ids) >= wanted:
                break
            rows = tx.execute(query, params | {"limit": wanted - len(ids)}).fetchall()
            ids.extend(str(row["id"]) for row in rows)
        if ids:
            tx.execute(claim, params | {"ids": ids})
            if publish is not None:
                for order_id in ids:
                    jobs.enqueue_after_commit(tx, publish, order_id)
    return ids


def claim_for_reconcile(settings: Settings, *, limit: int | None = None) -> list[str]:
    """Claim orders due for a status poll (without publishing anything): for running them inline."""
    return _claim(settings, _RECONCILE_DUE, _RECONCILE_CLAIM, limit, None)


def claim_for_expiry(settings: Settings, *, limit: int | None = None) -> list[str]:
    """Claim orders past their payment deadline (without publishing anything)."""
    return _claim(settings, _EXPIRY_DUE, _EXPIRY_CLAIM, limit, None)


def schedule_reconcile(settings: Settings, *, limit: int | None = None) -> int:
    """The beat job: claim a batch of orders due for a poll and queue :func:`reconcile_order` for each."""
    ids = _claim(settings, _RECONCILE_DUE, _RECONCILE_CLAIM, limit, jobs.RECONCILE_ORDER)
    if ids:
        log_event(log, "reconcile_scheduled", count=len(ids))
    return len(ids)


def schedule_expiry(settings: Settings, *, limit: int | None = None) -> int:
    """The beat job: claim a batch of orders past their payment deadline and queue :func:`expire_order`."""
    ids = _claim(settings, _EXPIRY_DUE, _EXPIRY_CLAIM, limit, jobs.EXPIRE_ORDER)
    if ids:
        log_event(log, "expiry_scheduled", count=len(ids))
    return len(ids)


def _order_and_payments(settings: Settings, order_id: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The order and its uncaptured payments, the one the buyer was sent to pay first."""
    with get_pool(settings.database_url).connection() as conn:
        order = conn.execute("SELECT id, status FROM orders WHERE id = %s", (order_id,)).fetchone()
        payments = conn.execute(
            "SELECT * FROM payments WHERE order_id = %s AND captured_at IS NULL"
            " ORDER BY token IS NULL, created_at DESC",
            (order_id,),
        ).fetchall() if order else []
    return order, payments


# When an order has several payment attempts, the outcome that matters most is reported.
_OUTCOME_WEIGHT = {"not_found": 0, "no_change": 1, "pending": 2}


def _summary(outcomes: list[str]) -> str:
    return max(outcomes, key=lambda o: _OUTCOME_WEIGHT.get(o, 9)) if outcomes else "not_found"


def _apply_status(settings: Settings, gateway: PaymentGateway, payment: Mapping[str, Any]) -> str:
    status = gateway.get_status(payment["gateway_order_id"])
    if status is None:
        return "not_found"
    with transaction(settings.database_url) as tx:
        return apply_gateway_status(tx, settings, payment, status)


def reconcile_order(settings: Settings, gateway: PaymentGateway, order_id: str) -> str:
    """Poll the gateway for an order still awaiting payment and apply the confirmed status."""
    order, payments = _order_and_payments(settings, order_id)
    if order is None or order["status"] != Status.AWAITING_PAYMENT:
        return "skipped"
    outcome = _summary([_apply_status(settings, gateway, payment) for payment in payments])
    log_event(log, "reconciled", order_id=order_id, outcome=outcome)
    return outcome


def expire_order(settings: Settings, gateway: PaymentGateway, order_id: str) -> str:
    """Close an unpaid order's transactions at the gateway, then apply what the gateway says.

    The gateway refuses to expire a transaction that was paid meanwhile, and the status query that
    follows then reports the capture, which is applied like any other: the buyer who paid at the last
    second gets the stamp. If the gateway never heard of any of the order's payments, nobody can pay
    them and the order expires here.
    """
    order, payments = _order_and_payments(settings, order_id)
    if order is None or order["status"] != Status.AWAITING_PAYMENT:
        return "skipped"
    outcomes = []
    for payment in payments:
        gateway.expire_transaction(payment["gateway_order_id"])
        outcomes.append(_apply_status(settings, gateway, payment))
    if all(outcome == "not_found" for outcome in outcomes):
        with transaction(settings.database_url) as tx:
            moved = transition(tx, order_id, Status.AWAITING_PAYMENT, Status.EXPIRED,
                               changes={"reason_code": "payment_timeout"},
                               reason="unpaid too long; the gateway has no transaction for it")
        outcomes.append("expired" if moved else "no_change")
    outcome = _summary(outcomes)
    log_event(log, "expire_unpaid", order_id=order_id, outcome=outcome)
    return outcome


def run_inline(
    settings: Settings, gateway: PaymentGateway, order_ids: list[str],
    work: Callable[[Settings, PaymentGateway, str], str],
) -> dict[str, int]:
    """Do the per-order work in this process (the CLI's ``--inline``), counting outcomes. A gateway
    that is unavailable for one order is counted and the rest still tried: the breaker makes them
    fail fast, and every claimed order is due again at its next check."""
    counts: Counter[str] = Counter()
    for order_id in order_ids:
        try:
            counts[work(settings, gateway, order_id)] += 1
        except TransientError as exc:
            log_event(log, "reconcile_unavailable", logging.WARNING, order_id=order_id, error=exc.code)
            counts["unavailable"] += 1
    return dict(counts)
