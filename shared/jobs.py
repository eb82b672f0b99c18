"""The names of our Celery tasks and the queue each runs on, plus publishing after commit.

Task names are explicit strings (as GOV.UK Notify does), so the web process can enqueue work without
importing the worker code, and the Procfile, the routes and the tests can be checked against one table.
Paid work (payment confirmation, stamping, refunds) has its own queues and worker processes so new
demand, and the polling of unpaid orders, can never starve it; e-mail to buyers has its own too, so an
SMTP outage never holds up anything but e-mail.
"""
from __future__ import annotations

import logging
from typing import Any, Protocol

from shared.db import Tx
from shared.logs import log_event

log = logging.getLogger(__name__)

PREPARE_ORDER = "meterai.checkout.prepare_order"
PROCESS_NOTIFICATION = "meterai.payments.process_notification"
STAMP_ORDER = "meterai.stamping.stamp_order"
# One refund per captured gateway transaction: the argument is that transaction's gateway order id (a
# message queued before refunds were per transaction carries an order id: each pending refund of it).
REFUND_ORDER = "meterai.refunds.refund_order"
SWEEP_REFUNDS = "meterai.housekeeping.sweep_refunds"
REDRIVE = "meterai.housekeeping.redrive"
# The scans only claim rows and publish one task per row; those gateway calls run on their own
# ``reconcile`` queue, so watching transactions never delays confirming paid ones.
RECONCILE_PAYMENTS = "meterai.housekeeping.reconcile_payments"
EXPIRE_UNPAID = "meterai.housekeeping.expire_unpaid"
POLL_PAYMENT = "meterai.payments.poll_payment"
EXPIRE_ORDER = "meterai.payments.expire_order"
# One sample of the waiting line for the ops page's last-hour chart, so minutes nobody watched are drawn.
OPS_SAMPLE = "meterai.housekeeping.ops_sample"
# One e-mail to a buyer (arguments: order id, kind): its own queue and workers, so an SMTP server that is
# slow or down delays only e-mail, never stamping or refunds.
SEND_MAIL = "meterai.mail.send_mail"

QUEUES: dict[str, str] = {
    PREPARE_ORDER: "checkout",
    PROCESS_NOTIFICATION: "payments",
    STAMP_ORDER: "stamping",
    REFUND_ORDER: "refunds",
    SWEEP_REFUNDS: "housekeeping",
    REDRIVE: "housekeeping",
    RECONCILE_PAYMENTS: "housekeeping",
    OPS_SAMPLE: "housekeeping",
    EXPIRE_UNPAID: "housekeeping",
    POLL_PAYMENT: "reconcile",
    EXPIRE_ORDER: "reconcile",
    SEND_MAIL: "mail",
}

ALL_QUEUES: tuple[str, ...] = tuple(sorted(set(QUEUES.values())))


class Publisher(Protocol):
    def send_task(self, name: str, args: Any = ..., queue: str | None = ..., **options: Any) -> Any: ...


_publisher: Publisher | None = None


def set_publisher(publisher: Publisher) -> None:
    """Called once by the Celery app factory; until then nothing can be published."""
    global _publisher
    _publisher = publisher


# Longer shown arguments are left to Celery's saferepr, which shortens them (its argsrepr_maxsize).
ARGSREPR_MAX = 1024


def publish(name: str, *args: Any, countdown: float | None = None) -> None:
    """Publish ``name(*args)`` on its queue. Two of Celery's per-publish costs are skipped (0.28 → 0.21 ms
    of CPU a publish, docs/benchmarks.md): ``declare=[]``, because every queue of ours is a direct
    exchange of its own name, which Celery sends through the anonymous exchange straight onto the
    queue's list (kombu's virtual ``basic_publish``), so declaring it (a copy and a bind of the queue
    per publish) changes nothing; and the arguments' display (``argsrepr``) is ``repr``, not ``saferepr``,
    for our short ids."""
    if _publisher is None:
        raise RuntimeError("no Celery app initialised: call workers.celery_app.make_celery_app first")
    options: dict[str, Any] = {"declare": []}
    shown = repr(list(args))
    if len(shown) <= ARGSREPR_MAX:
        options.update(argsrepr=shown, kwargsrepr="{}")
    if countdown:
        options["countdown"] = countdown
    _publisher.send_task(name, args=list(args), queue=QUEUES[name], **options)


def publish_committed(name: str, *args: Any) -> None:
    """Publish work for rows already committed (an autocommit statement), or perhaps committed (its answer
    lost with the connection: the task reads its rows first). A failure is logged, never raised: the rows
    are safe in PostgreSQL and the periodic redrive publishes what is still due."""
    try:
        publish(name, *args)
    except Exception as exc:  # noqa: BLE001
        log_event(log, "after_commit_failed", logging.ERROR, task=name, error=repr(exc))


def enqueue_after_commit(tx: Tx, name: str, *args: Any) -> None:
    """Publish ``name(*args)`` once ``tx`` commits (or once its COMMIT's outcome is unknown:
    :func:`shared.db.transaction`); if publishing fails then, redrive recovers it."""
    tx.after_commit(lambda: publish(name, *args))
