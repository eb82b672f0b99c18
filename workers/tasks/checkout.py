"""Checkout tasks: preflight an upload and open its payment."""
from __future__ import annotations

import logging

from celery import shared_task
from celery.signals import worker_process_shutdown

from shared import jobs
from shared.errors import TransientError
from shared.logs import log_event
from shared.services import checkout
from shared.sandbox import shutdown_children as shutdown_preflight_children
from workers.tasks.base import backoff_seconds, gateway, settings, store

log = logging.getLogger(__name__)


@worker_process_shutdown.connect
def _retire_preflight_children(**_: object) -> None:
    """A pool process leaves with os._exit (no atexit): take its reused preflight children along
    rather than leave them to the death signal and whoever adopts them."""
    shutdown_preflight_children()


@shared_task(name=jobs.PREPARE_ORDER, bind=True, max_retries=10)
def prepare_order(self, order_id: str) -> str:
    s = settings()
    try:
        return checkout.prepare_order(s, store(), gateway(), order_id)
    except TransientError as exc:
        if self.request.retries >= self.max_retries:
            # Retries ran out: the order gets a final state the buyer can read, instead of waiting.
            return checkout.give_up(s, gateway(), order_id, exc.code)
        log_event(log, "checkout_retry", logging.WARNING, order_id=order_id, task=self.name,
                  attempt=self.request.retries + 1, error=exc.code)
        raise self.retry(exc=exc, countdown=backoff_seconds(self.request.retries,
                                                            s.retry_base_seconds, s.retry_max_seconds))
