"""Refund task: give one captured transaction's money back, idempotently by its refund key."""
from __future__ import annotations

import logging
import uuid

from celery import shared_task

from shared import jobs
from shared.errors import TransientError
from shared.logs import log_event
from shared.services import refunds
from workers.tasks.base import backoff_seconds, gateway, settings

log = logging.getLogger(__name__)


def _is_order_id(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


@shared_task(name=jobs.REFUND_ORDER, bind=True, max_retries=None)
def refund_order(self, gateway_order_id: str) -> str:
    s = settings()
    if _is_order_id(gateway_order_id):
        # Queued before refunds were per transaction: the argument is an order; queue each refund of it.
        for pending in refunds.pending_refunds_of(s, gateway_order_id):
            jobs.publish(jobs.REFUND_ORDER, pending)
        return "requeued"
    try:
        return refunds.refund_payment(s, gateway(), gateway_order_id)
    except TransientError as exc:
        attempt = self.request.retries + 1
        if attempt > s.refund_max_retries:
            # Stays pending: the redrive picks it up again, so the refund is delayed, not lost.
            log_event(log, "refund_retries_exhausted", logging.ERROR, gateway_order_id=gateway_order_id,
                      task=self.name, attempt=attempt, error=exc.code)
            return "retries_exhausted"
        log_event(log, "refund_retry", logging.WARNING, gateway_order_id=gateway_order_id, task=self.name,
                  attempt=attempt, error=exc.code)
        raise self.retry(exc=exc, countdown=backoff_seconds(self.request.retries,
                                                            s.retry_base_seconds, s.retry_max_seconds))
