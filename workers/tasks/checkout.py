"""Checkout tasks: preflight an upload and open its payment."""
from __future__ import annotations

import logging

from celery import shared_task

from shared import jobs
from shared.errors import TransientError
from shared.logs import log_event
from shared.services import checkout
from workers.tasks.base import backoff_seconds, gateway, settings, store

log = logging.getLogger(__name__)


@shared_task(name=jobs.PREPARE_ORDER, bind=True, max_retries=10)
def prepare_order(self, order_id: str) -> str:
    s = settings()
    try:
        return checkout.prepare_order(s, store(), gateway(), order_id)
    except TransientError as exc:
        log_event(log, "checkout_retry", logging.WARNING, order_id=order_id, task=self.name,
                  attempt=self.request.retries + 1, error=exc.code)
        raise self.retry(exc=exc, countdown=backoff_seconds(self.request.retries,
                                                            s.retry_base_seconds, s.retry_max_seconds))
