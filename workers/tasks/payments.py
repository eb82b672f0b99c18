"""Payment tasks: confirm and apply a gateway notification."""
from __future__ import annotations

import logging

from celery import shared_task

from shared import jobs
from shared.errors import TransientError
from shared.logs import log_event
from shared.services import payments
from workers.tasks.base import backoff_seconds, gateway, settings

log = logging.getLogger(__name__)


@shared_task(name=jobs.PROCESS_NOTIFICATION, bind=True, max_retries=12)
def process_notification(self, notification_id: int) -> str:
    s = settings()
    try:
        return payments.process_notification(s, gateway(), int(notification_id))
    except TransientError as exc:
        log_event(log, "notification_retry", logging.WARNING, task=self.name,
                  notification_id=notification_id, attempt=self.request.retries + 1, error=exc.code)
        raise self.retry(exc=exc, countdown=backoff_seconds(self.request.retries,
                                                            s.retry_base_seconds, s.retry_max_seconds))
