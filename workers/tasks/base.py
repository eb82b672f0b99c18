"""What every task needs: the process's settings, store and gateway, and the retry policy.

Retries use exponential backoff with full jitter and a cap (the AWS architecture blog's "full jitter"):
many orders failing at once spread their retries instead of returning together as a second surge.
"""
from __future__ import annotations

import os
import random
import socket
from functools import lru_cache

import redis
from celery import current_app

from shared.admission import AdmissionController
from shared.config import Settings
from shared.payments.gateway import PaymentGateway, gateway_from_settings
from shared.store import DocumentStore, store_from_settings


def settings() -> Settings:
    return current_app.conf.meterai_settings


@lru_cache(maxsize=4)
def _store(s: Settings) -> DocumentStore:
    return store_from_settings(s)


@lru_cache(maxsize=4)
def _gateway(s: Settings, pid: int) -> PaymentGateway:
    return gateway_from_settings(s)


@lru_cache(maxsize=4)
def _admission(s: Settings, pid: int) -> AdmissionController:
    client = redis.Redis.from_url(s.redis_url, socket_timeout=1, socket_connect_timeout=1)
    return AdmissionController(s, client)


def admission() -> AdmissionController:
    return _admission(settings(), os.getpid())


def store() -> DocumentStore:
    return _store(settings())


def gateway() -> PaymentGateway:
    return _gateway(settings(), os.getpid())


def backoff_seconds(attempt: int, base: float, cap: float) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)], never below 0.1 s."""
    return max(0.1, random.uniform(0, min(cap, base * (2 ** attempt))))


def worker_id(task_id: str | None) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{task_id or '-'}"
