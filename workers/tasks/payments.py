"""Payment tasks: confirm and apply a gateway notification; poll one transaction or expire one order at
the gateway."""
from __future__ import annotations

import logging

from celery import shared_task

from shared import jobs
from shared.errors import TransientError
from shared.logs import log_event
from shared.services import payments, reconcile
from workers.tasks.base import backoff_seconds, gateway, settings

log = logging.getLogger(__name__)

CONFIRM_RETRIES = 6


@shared_task(name=jobs.PROCESS_NOTIFICATION, bind=True, max_retries=12)
def process_notification(self, notification_id: int) -> str:
    s = settings()
    try:
        # The last tries accept the gateway's word even if it doesn't (yet) confirm a notified capture;
        # reconciliation keeps polling the order after that.
        return payments.process_notification(s, gateway(), int(notification_id),
                                              final_attempt=self.request.retries >= CONFIRM_RETRIES)
    except TransientError as exc:
        log_event(log, "notification_retry", logging.WARNING, task=self.name,
                  notification_id=notification_id, attempt=self.request.retries + 1, error=exc.code)
        raise self.retry(exc=exc, countdown=backoff_seconds(self.request.retries,
                                                            s.retry_base_seconds, s.retry_max_seconds))


def _retry_or_leave(task, exc: TransientError, item: str) -> str:
    """Retry a few times with backoff; after that, leave it: the row is claimed only until its next
    check, when the scan hands it out again."""
    s = settings()
    attempt = task.request.retries + 1
    if attempt > 5:
        log_event(log, "payment_check_deferred", logging.WARNING, item=item, task=task.name,
                  attempt=attempt, error=exc.code)
        return "deferred"
    log_event(log, "payment_check_retry", logging.WARNING, item=item, task=task.name,
              attempt=attempt, error=exc.code)
    raise task.retry(exc=exc, countdown=backoff_seconds(task.request.retries,
                                                        s.retry_base_seconds, s.retry_max_seconds))


@shared_task(name=jobs.POLL_PAYMENT, bind=True, max_retries=None)
def poll_payment(self, gateway_order_id: str) -> str:
    try:
        return reconcile.poll_payment(settings(), gateway(), gateway_order_id)
    except TransientError as exc:
        return _retry_or_leave(self, exc, gateway_order_id)


@shared_task(name=jobs.EXPIRE_ORDER, bind=True, max_retries=None)
def expire_order(self, order_id: str) -> str:
    try:
        return reconcile.expire_order(settings(), gateway(), order_id)
    except TransientError as exc:
        return _retry_or_leave(self, exc, order_id)
