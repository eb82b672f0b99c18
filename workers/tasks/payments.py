"""Payment tasks: confirm and apply a gateway notification; poll one transaction or expire one order at
the gateway."""
from __future__ import annotations

from celery import shared_task

from shared import jobs
from shared.services import payments, reconcile

# From this attempt on, a notified capture is applied as the gateway's status query reports it, even if
# that doesn't confirm it yet; the payment watch keeps asking about the transaction after that. Attempts
# the database being away ended count too: each took at least DATABASE_POOL_TIMEOUT_SECONDS and its
# backoff, time the gateway had to catch up as much as in an attempt that asked it.
CONFIRM_ATTEMPTS = 7


def _leave_to_the_watch(task, exc, notification_id: int) -> str:
    return payments.leave_notification(task.settings, int(notification_id), getattr(exc, "code", "error"))


def _until_next_check(task, exc, item: str) -> str:
    """The row is claimed only until its next check, when the scan hands it out again."""
    return "deferred"


@shared_task(name=jobs.PROCESS_NOTIFICATION, bind=True, retries_setting="notification_max_retries",
             exhausted=_leave_to_the_watch)
def process_notification(self, notification_id: int) -> str:
    return payments.process_notification(self.settings, self.gateway, int(notification_id),
                                          final_attempt=self.attempt >= CONFIRM_ATTEMPTS)


@shared_task(name=jobs.POLL_PAYMENT, bind=True, retries_setting="payment_check_max_retries",
             exhausted=_until_next_check)
def poll_payment(self, gateway_order_id: str) -> str:
    return reconcile.poll_payment(self.settings, self.gateway, gateway_order_id)


@shared_task(name=jobs.EXPIRE_ORDER, bind=True, retries_setting="payment_check_max_retries",
             exhausted=_until_next_check)
def expire_order(self, order_id: str) -> str:
    return reconcile.expire_order(self.settings, self.gateway, order_id)
