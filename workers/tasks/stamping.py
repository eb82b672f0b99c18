"""Stamping task: one attempt per run, retried with backoff.

Any failure the service lets out is transient (it has already released its lease; a permanent one it
refunds itself). When retries run out the order keeps no lease, so the redrive may try it again later
and, once the deadline passes, the sweep refunds it: a paid order never just stops.
"""
from __future__ import annotations

import logging

import redis
from celery import shared_task

from shared import jobs
from shared.logs import log_event
from shared.services import stamping
from workers.tasks.base import worker_id

log = logging.getLogger(__name__)


@shared_task(name=jobs.STAMP_ORDER, bind=True, retries_setting="stamp_max_retries", transient=(Exception,))
def stamp_order(self, order_id: str) -> str:
    outcome = stamping.stamp_order(self.settings, self.store, order_id, worker_id(self.request.id))
    if outcome == "stamped":
        try:  # feeds the waiting room's default outflow; a Redis blip must not fail a stamp
            self.admission.record_stamped()
        except redis.RedisError as exc:
            log_event(log, "throughput_not_recorded", logging.WARNING, error=type(exc).__name__)
    return outcome
