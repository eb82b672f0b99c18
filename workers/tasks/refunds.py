"""Refund task: give one captured transaction's money back, idempotently by its refund key."""
from __future__ import annotations

import uuid

from celery import shared_task

from shared import jobs
from shared.services import refunds


def _is_order_id(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _left_pending(task, exc, gateway_order_id: str) -> str:
    """Stays pending: the redrive picks it up again, so the refund is delayed, not lost."""
    return "retries_exhausted"


@shared_task(name=jobs.REFUND_ORDER, bind=True, retries_setting="refund_max_retries", exhausted=_left_pending)
def refund_order(self, gateway_order_id: str) -> str:
    if _is_order_id(gateway_order_id):
        # Queued before refunds were per transaction: the argument is an order; queue each refund of it.
        for pending in refunds.pending_refunds_of(self.settings, gateway_order_id):
            jobs.publish(jobs.REFUND_ORDER, pending)
        return "requeued"
    return refunds.refund_payment(self.settings, self.gateway, gateway_order_id)
