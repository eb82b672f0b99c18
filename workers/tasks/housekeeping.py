"""Housekeeping tasks run by beat: the refund sweep, the redrive, and the payment scans (which only
claim orders and queue per-order work on ``payments``; they never call the gateway themselves)."""
from __future__ import annotations

from celery import shared_task

from shared import jobs
from shared.services import housekeeping, reconcile
from workers.tasks.base import settings


@shared_task(name=jobs.SWEEP_REFUNDS)
def sweep_refunds() -> int:
    return housekeeping.sweep_refunds(settings())


@shared_task(name=jobs.REDRIVE)
def redrive() -> dict[str, int]:
    return housekeeping.redrive(settings())


@shared_task(name=jobs.RECONCILE_PAYMENTS)
def reconcile_payments() -> int:
    return reconcile.schedule_reconcile(settings())


@shared_task(name=jobs.EXPIRE_UNPAID)
def expire_unpaid() -> int:
    return reconcile.schedule_expiry(settings())
