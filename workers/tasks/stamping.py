"""Stamping task: one attempt per run, retried with backoff until the order's deadline.

When retries run out the order keeps no lease, so the redrive may try it again later and, once the
deadline passes, the sweep refunds it: a paid order never just stops.
"""
from __future__ import annotations

import logging

import redis
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from shared import jobs
from shared.logs import log_event
from shared.services import stamping
from workers.tasks.base import admission, backoff_seconds, settings, store, worker_id

log = logging.getLogger(__name__)


@shared_task(name=jobs.STAMP_ORDER, bind=True, max_retries=None)
def stamp_order(self, order_id: str) -> str:
    s = settings()
    try:
        outcome = stamping.stamp_order(s, store(), order_id, worker_id(self.request.id))
    except (Exception, SoftTimeLimitExceeded) as exc:  # transient: the lease is already released
        attempt = self.request.retries + 1
        if attempt > s.stamp_max_retries:
            log_event(log, "stamp_retries_exhausted", logging.ERROR, order_id=order_id,
                      task=self.name, attempt=attempt, error=type(exc).__name__)
            return "retries_exhausted"
        log_event(log, "stamp_retry", logging.WARNING, order_id=order_id, task=self.name,
                  attempt=attempt, error=f"{type(exc).__name__}: {exc}")
        raise self.retry(exc=exc, countdown=backoff_seconds(self.request.retries,
                                                            s.retry_base_seconds, s.retry_max_seconds))
    if outcome == "stamped":
        _record_throughput()
    return outcome


def _record_throughput() -> None:
    """Feed the waiting room's default outflow; best effort, a Redis blip must not fail a stamp."""
    try:
        admission().record_stamped()
    except redis.RedisError as exc:
        log_event(log, "throughput_not_recorded", logging.WARNING, error=type(exc).__name__)
