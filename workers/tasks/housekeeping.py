"""Housekeeping tasks run by beat: the refund sweep and the redrive."""
from __future__ import annotations

from celery import shared_task

from shared import jobs
from shared.services import housekeeping
from workers.tasks.base import settings


@shared_task(name=jobs.SWEEP_REFUNDS)
def sweep_refunds() -> int:
    return housekeeping.sweep_refunds(settings())


@shared_task(name=jobs.REDRIVE)
def redrive() -> dict[str, int]:
    return housekeeping.redrive(settings())
