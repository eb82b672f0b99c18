"""Housekeeping tasks run by beat: the refund sweep, the redrive, and the payment scans (which only
claim rows and queue per-row work on ``reconcile``; they never call the gateway themselves)."""
from __future__ import annotations

from celery import shared_task

from shared import jobs
from shared.services import housekeeping, opsview, reconcile


@shared_task(name=jobs.SWEEP_REFUNDS, bind=True)
def sweep_refunds(self) -> int:
    return housekeeping.sweep_refunds(self.settings)


@shared_task(name=jobs.REDRIVE, bind=True)
def redrive(self) -> dict[str, int]:
    return housekeeping.redrive(self.settings)


@shared_task(name=jobs.RECONCILE_PAYMENTS, bind=True)
def reconcile_payments(self) -> int:
    return reconcile.schedule_watch(self.settings)


@shared_task(name=jobs.EXPIRE_UNPAID, bind=True)
def expire_unpaid(self) -> int:
    return len(reconcile.expire_stalled_checkouts(self.settings)) + reconcile.schedule_expiry(self.settings)


@shared_task(name=jobs.OPS_SAMPLE, bind=True, expires=15)
def ops_sample(self) -> bool:
    """At most one sample per interval across every beat and page (a Redis lock): two beats stay harmless."""
    return opsview.record_sample(self.settings, self.admission.redis, self.admission)
