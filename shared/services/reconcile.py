"""Reconciliation: every transaction we opened is watched at the gateway, and no order waits for ever.

A notification is a courtesy, not a guarantee: it can be dropped, or our endpoint can be down for
longer than the gateway retries. And a transaction can change after its order stopped waiting: a bank
transfer settles after the gateway expired it, a card is captured on a link of an order that expired.
So nothing here waits for a notification:

* **the watch** — every ``payments`` row (one per gateway transaction we opened, whatever its order's
  status) is asked about at the gateway (``GET /v2/<id>/status``) ``RECONCILE_AFTER_SECONDS`` after it
  was opened, then after doubling intervals (capped at ``RECONCILE_MAX_INTERVAL_SECONDS``), until the
  gateway calls it final, and for ``PAYMENT_WATCH_SECONDS`` after that (intervals capped at
  ``PAYMENT_WATCH_MAX_INTERVAL_SECONDS``). Whatever it reports is applied through the same status table
  as notifications (:func:`shared.services.payments.apply_gateway_status`): paid → stamped; a capture of
  an expired order → refunded (late payment); a capture of an order another transaction already paid →
  refunded on its own. A transaction still payable whose order no longer takes payment is cancelled.
* **expire-unpaid** — an order waiting longer than ``PAYMENT_TIMEOUT_SECONDS``: close its transactions at
  the gateway *first*, so they can no longer be paid, then apply whatever the gateway says is true:
  expired (``awaiting_payment → expired``), or paid meanwhile (the capture is applied, the document
  stamped). The same scan expires orders still ``created`` after ``CHECKOUT_DEADLINE_SECONDS``
  (:func:`expire_stalled_checkouts`): their checkout never opened a payment, nothing was charged.

Each scan *claims* a bounded batch in one short transaction — ``SELECT … FOR UPDATE SKIP LOCKED`` over
partial indexes, then moving the row's next check forward — and publishes one task per row on the
``reconcile`` queue. Two beats (or beat and cron) therefore split the work instead of doing it twice, no
transaction is held open across a gateway call, and a claimed row whose task is lost (Redis restarted)
is simply due again at its next check. The per-row work is idempotent: every move is the state
machine's compare-and-set.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Mapping

from shared import jobs
from shared.config import Settings
from shared.db import Tx, get_pool, transaction
from shared.errors import DomainError, TransientError
from shared.lifecycle import Status, transition
from shared.logs import log_event
from shared.payments.gateway import PaymentGateway
from shared.services.payments import apply_gateway_status

log = logging.getLogger(__name__)

# A scan run claims at most this many batches (RECONCILE_BATCH_SIZE each): after an outage the backlog
# is handed out over a few runs instead of flooding the queue at once.
MAX_BATCHES_PER_RUN = 20

CHECKOUT_FAILED_CODE = "payment_not_opened"
CHECKOUT_FAILED_MESSAGE = ("Pesanan tidak dapat diproses karena layanan kami sedang terganggu. Anda tidak "
                           "dikenai biaya; silakan buat pesanan baru.")
PAYMENT_TIMEOUT_MESSAGE = "Batas waktu pembayaran telah habis. Anda tidak dikenai biaya."

# Orders in which a pending transaction may still be paid; any other status takes no payment.
_PAYABLE = frozenset({Status.CREATED, Status.AWAITING_PAYMENT})

# --- the watch of every transaction ----------------------------------------------------------------

_WATCH_DUE = """
    SELECT gateway_order_id FROM payments
    WHERE next_poll_at <= now()
    ORDER BY next_poll_at LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
"""
# The next poll: doubling per poll from RECONCILE_AFTER_SECONDS, capped lower while the gateway has not
# called the transaction final (it may be paid any moment) than after.
_WATCH_CLAIM = """
    UPDATE payments SET polls = polls + 1,
        next_poll_at = now() + make_interval(secs => least(
            CASE WHEN final_at IS NULL THEN %(cap)s ELSE %(final_cap)s END,
            %(after)s * power(2, least(polls, 20))))
    WHERE gateway_order_id = ANY(%(ids)s)
"""
# The watch ends once the gateway has called the transaction final for PAYMENT_WATCH_SECONDS.
_WATCH_END = """
    UPDATE payments SET next_poll_at = NULL
    WHERE gateway_order_id = %(id)s AND final_at <= now() - make_interval(secs => %(watch)s)
"""


def _watch_params(settings: Settings) -> dict[str, Any]:
    return {"after": settings.reconcile_after_seconds, "cap": settings.reconcile_max_interval_seconds,
            "final_cap": settings.payment_watch_max_interval_seconds}


def _claim_payments(settings: Settings, limit: int | None, publish: bool) -> list[str]:
    wanted = limit or settings.reconcile_batch_size * MAX_BATCHES_PER_RUN
    ids: list[str] = []
    while len(ids) < wanted:
        batch = min(settings.reconcile_batch_size, wanted - len(ids))
        with transaction(settings.database_url) as tx:
            rows = [row["gateway_order_id"] for row in tx.execute(_WATCH_DUE, {"limit": batch})]
            if rows:
                tx.execute(_WATCH_CLAIM, _watch_params(settings) | {"ids": rows})
                if publish:
                    for gateway_order_id in rows:
                        jobs.enqueue_after_commit(tx, jobs.POLL_PAYMENT, gateway_order_id)
        ids.extend(rows)
        if len(rows) < batch:
            break
    return ids


def claim_for_watch(settings: Settings, *, limit: int | None = None) -> list[str]:
    """Claim transactions due for a status query (without publishing anything): for running inline."""
    return _claim_payments(settings, limit, publish=False)


def schedule_watch(settings: Settings, *, limit: int | None = None) -> int:
    """The beat job: claim the transactions due for a status query and queue :func:`poll_payment` for
    each."""
    ids = _claim_payments(settings, limit, publish=True)
    if ids:
        log_event(log, "watch_scheduled", count=len(ids))
    return len(ids)


_PAYMENT_AND_ORDER = """
    SELECT p.*, o.status AS order_status FROM payments p JOIN orders o ON o.id = p.order_id
    WHERE p.gateway_order_id = %s
"""


def _nobody_should_pay(row: Mapping[str, Any]) -> bool:
    """A pending transaction nobody should pay: its order takes no payment any more, or the order is
    waiting for another one (this one's link was never shown)."""
    status = Status(row["order_status"])
    return status not in _PAYABLE or (status is Status.AWAITING_PAYMENT and not row["token"])


def poll_payment(settings: Settings, gateway: PaymentGateway, gateway_order_id: str) -> str:
    """Ask the gateway about one transaction and apply what it says; close it if it is still payable
    and nobody should pay it. A :class:`~shared.payments.gateway.GatewayUnavailable` propagates (the
    task retries a few times, then leaves it to its next check)."""
    with get_pool(settings.database_url).connection() as conn:
        payment = conn.execute(_PAYMENT_AND_ORDER, (gateway_order_id,)).fetchone()
    if payment is None:
        return "skipped"
    status = gateway.get_status(gateway_order_id)
    with transaction(settings.database_url) as tx:
        if status is None:
            # Midtrans answers 404 for a Snap transaction until the buyer picks a way to pay, so "not
            # found" is final only once the order takes no payment any more (still watched a while, in
            # case a create whose answer we lost shows up late).
            if Status(payment["order_status"]) not in _PAYABLE:
                tx.execute("UPDATE payments SET final_at = COALESCE(final_at, now())"
                           " WHERE gateway_order_id = %s", (gateway_order_id,))
            outcome = "not_found"
        else:
            outcome = apply_gateway_status(tx, settings, payment, status)
        tx.execute(_WATCH_END, {"id": gateway_order_id, "watch": settings.payment_watch_seconds})
        now = tx.execute(_PAYMENT_AND_ORDER, (gateway_order_id,)).fetchone()
    if status is not None and status.transaction_status == "pending" and _nobody_should_pay(now):
        outcome = _close(gateway, now)
    log_event(log, "payment_polled", order_id=str(payment["order_id"]), gateway_order_id=gateway_order_id,
              status=status.transaction_status if status else None, outcome=outcome)
    return outcome


def _close(gateway: PaymentGateway, payment: Mapping[str, Any]) -> str:
    """Cancel a payable transaction of an order that takes no payment; the next poll sees the result
    (or the capture that beat us to it, which is then refunded)."""
    try:
        result = gateway.cancel_transaction(payment["gateway_order_id"])
    except DomainError as exc:
        log_event(log, "dead_transaction_not_cancelled", logging.WARNING, order_id=str(payment["order_id"]),
                  gateway_order_id=payment["gateway_order_id"], error=exc.code)
        return "cancel_failed"
    return "cancelled" if result.closed else "cancel_refused"


# --- expiry of unpaid orders -----------------------------------------------------------------------

_EXPIRY_DUE = """
    SELECT id FROM orders
    WHERE status = 'awaiting_payment'
      AND updated_at <= now() - make_interval(secs => %(timeout)s)
      AND (payment_next_check_at IS NULL OR payment_next_check_at <= now())
    ORDER BY updated_at LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
"""
# If closing at the gateway fails (gateway down), try again after RECONCILE_AFTER_SECONDS.
_EXPIRY_CLAIM = """
    UPDATE orders SET payment_checks = payment_checks + 1,
        payment_next_check_at = now() + make_interval(secs => %(after)s)
    WHERE id = ANY(%(ids)s::uuid[]) AND status = 'awaiting_payment'
"""


def _claim_expiry(settings: Settings, limit: int | None, publish: bool) -> list[str]:
    params: dict[str, Any] = {"after": settings.reconcile_after_seconds,
                              "timeout": settings.payment_timeout_seconds,
                              "limit": limit or settings.reconcile_batch_size}
    with transaction(settings.database_url) as tx:
        ids = [str(row["id"]) for row in tx.execute(_EXPIRY_DUE, params)]
        if ids:
            tx.execute(_EXPIRY_CLAIM, params | {"ids": ids})
            if publish:
                for order_id in ids:
                    jobs.enqueue_after_commit(tx, jobs.EXPIRE_ORDER, order_id)
    return ids


def claim_for_expiry(settings: Settings, *, limit: int | None = None) -> list[str]:
    """Claim orders past their payment deadline (without publishing anything)."""
    return _claim_expiry(settings, limit, publish=False)


def schedule_expiry(settings: Settings, *, limit: int | None = None) -> int:
    """The beat job: claim a batch of orders past their payment deadline and queue :func:`expire_order`."""
    ids = _claim_expiry(settings, limit, publish=True)
    if ids:
        log_event(log, "expiry_scheduled", count=len(ids))
    return len(ids)


def _uncaptured_payments(settings: Settings, order_id: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
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


def expire_order(settings: Settings, gateway: PaymentGateway, order_id: str) -> str:
    """Close an unpaid order's transactions at the gateway, then apply what the gateway says.

    The gateway refuses to expire a transaction that was paid meanwhile, and the status query that
    follows then reports the capture, which is applied like any other: the buyer who paid at the last
    second gets the stamp. If the gateway never heard of any of the order's payments, nobody can pay
    them and the order expires here. Every transaction stays watched, so a bank that settles after
    this is still found and refunded.
    """
    order, payments = _uncaptured_payments(settings, order_id)
    if order is None or order["status"] != Status.AWAITING_PAYMENT:
        return "skipped"
    outcomes = []
    for payment in payments:
        gateway.expire_transaction(payment["gateway_order_id"])
        outcomes.append(_apply_status(settings, gateway, payment))
    if all(outcome == "not_found" for outcome in outcomes):
        with transaction(settings.database_url) as tx:
            moved = transition(tx, order_id, Status.AWAITING_PAYMENT, Status.EXPIRED,
                               changes={"reason_code": "payment_timeout",
                                        "reason_message": PAYMENT_TIMEOUT_MESSAGE},
                               reason="unpaid too long; the gateway has no transaction for it")
        outcomes.append("expired" if moved else "no_change")
    outcome = _summary(outcomes)
    log_event(log, "expire_unpaid", order_id=order_id, outcome=outcome)
    return outcome


# --- checkouts that never opened a payment ---------------------------------------------------------

def expire_checkout(tx: Tx, order_id: str, why: str) -> bool:
    """``created → expired`` with the reason the buyer reads; False if the order had moved on."""
    return transition(
        tx, order_id, Status.CREATED, Status.EXPIRED,
        changes={"reason_code": CHECKOUT_FAILED_CODE, "reason_message": CHECKOUT_FAILED_MESSAGE},
        detail={"why": why},
    ) is not None


def expire_stalled_checkouts(settings: Settings, *, limit: int | None = None) -> list[str]:
    """Expire orders still ``created`` past ``CHECKOUT_DEADLINE_SECONDS``, whatever stopped their
    checkout (a worker that died with the last retry, a message lost with Redis). No gateway call here:
    their transactions, if any, are the watch's (which cancels what is still payable)."""
    with transaction(settings.database_url) as tx:
        rows = tx.execute(
            "SELECT id::text AS id FROM orders WHERE status = 'created'"
            " AND created_at <= now() - make_interval(secs => %s)"
            " ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (settings.checkout_deadline_seconds, limit or settings.reconcile_batch_size),
        ).fetchall()
        expired = [row["id"] for row in rows if expire_checkout(tx, row["id"], "checkout deadline passed")]
    if expired:
        log_event(log, "stalled_checkouts_expired", logging.WARNING, count=len(expired))
    return expired


def run_inline(
    settings: Settings, gateway: PaymentGateway, ids: list[str],
    work: Callable[[Settings, PaymentGateway, str], str],
) -> dict[str, int]:
    """Do the per-row work in this process (the CLI's ``--inline``), counting outcomes. A gateway that
    is unavailable for one row is counted and the rest still tried: the breaker makes them fail fast,
    and every claimed row is due again at its next check."""
    counts: Counter[str] = Counter()
    for item in ids:
        try:
            counts[work(settings, gateway, item)] += 1
        except TransientError as exc:
            log_event(log, "reconcile_unavailable", logging.WARNING, item=item, error=exc.code)
            counts["unavailable"] += 1
    return dict(counts)
