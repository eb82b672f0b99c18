"""Checkout task: preflight an upload and open its payment; when it can't, the order expires."""
from __future__ import annotations

from celery import shared_task
from celery.signals import worker_process_shutdown

from shared import jobs
from shared.services import checkout
from shared.sandbox import shutdown_children


@worker_process_shutdown.connect
def _retire_sandbox_children(**_: object) -> None:
    """A pool process leaves with os._exit (no atexit): take its reused sandbox children along
    rather than leave them to the death signal and whoever adopts them."""
    shutdown_children()


def _expire(task, exc, order_id: str) -> str:
    """Retries ran out: the order gets a final state the buyer can read, instead of waiting."""
    return checkout.give_up(task.settings, task.gateway, order_id, getattr(exc, "code", type(exc).__name__))


@shared_task(name=jobs.PREPARE_ORDER, bind=True, retries_setting="checkout_max_retries", exhausted=_expire)
def prepare_order(self, order_id: str) -> str:
    return checkout.prepare_order(self.settings, self.store, self.gateway, order_id)
