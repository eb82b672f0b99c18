"""Mail task: send one e-mail of an order (its receipt, or what a move of it owes the buyer), once.

The service claims the outbox row before sending, so a redelivered or duplicated message sends nothing
more; a failed attempt is retried with the base task's backoff, and when retries run out the row is left
``failed`` (logged), never waiting for ever.
"""
from __future__ import annotations

from celery import shared_task

from shared import jobs
from shared.services import mail
from workers.tasks.base import worker_id


def _failed(task, exc, order_id: str, kind: str) -> str:
    mail.give_up(task.settings, order_id, kind, str(exc))
    return "failed"


@shared_task(name=jobs.SEND_MAIL, bind=True, retries_setting="mail_max_retries", exhausted=_failed)
def send_mail(self, order_id: str, kind: str) -> str:
    return mail.send_mail(self.settings, order_id, kind, worker_id(self.request.id))
