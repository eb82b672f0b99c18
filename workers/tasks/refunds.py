"""Refund task: ask the gateway to refund, idempotently by refund key."""
from __future__ import annotations

import logging

from celery import shared_task

from shared import jobs
from shared.errors import TransientError
from shared.logs import log_event
from shared.services import refunds
from workers.tasks.base import backoff_seconds, gateway, settings

log = logging.getLogger(__name__)


@shared_task(name=jobs.REFUND_ORDER, bind=True, max_retries=None)
def refund_order(self, order_id: str) -> str:
    s = settings()
    try:
        return refunds.refund_order(s, gateway(), order_id)
    except TransientError as exc:
        attempt = self.request.retries + 1
        if attempt > s.refund_max_retries:
            # Stays refund_pending: the redrive picks it up again, so the refund is delayed, not lost.
            log_event(log, "refund_retries_exhausted", logging.ERROR, order_id=order_id,
                      task=self.name, attempt=attempt, error=exc.code)
            return "retries_exhausted"
        log_event(log, "refund_retry", logging.WARNING, order_id=order_id, task=self.name,
                  attempt=attempt, error=exc.code)
        raise self.retry(exc=exc, countdown=backoff_seconds(self.request.retries,
                                                            s.retry_base_seconds, s.retry_max_seconds))
