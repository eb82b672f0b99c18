"""Housekeeping tasks run by beat: the refund sweep, the redrive, and the payment scans (which only
claim rows and queue per-row work on ``reconcile``; they never call the gateway themselves)."""
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
    return reconcile.schedule_watch(settings())


@shared_task(name=jobs.EXPIRE_UNPAID)
def expire_unpaid() -> int:
    s = settings()
    return len(reconcile.expire_stalled_checkouts(s)) + reconcile.schedule_expiry(s)
