"""Liveness and readiness. ``/readyz`` names each dependency's state so ops see which one is down."""
from __future__ import annotations

from functools import lru_cache

from flask import Blueprint, jsonify

from shared.db import get_pool
from shared.redisconn import redis_client
from web.context import settings, store

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


def _database_ok() -> bool:
    try:
        with get_pool(settings().database_url).connection(timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        return False


@lru_cache(maxsize=4)
def _redis(url: str, sentinel_password: str):
    """One small client per process, kept, so a probe reuses its connection; one retry, so a connection
    Redis dropped (a restart, a failover) doesn't report Redis down once it is back."""
    return redis_client(url, timeout=1, retries=1, max_connections=2, sentinel_password=sentinel_password)


def _redis_ok() -> bool:
    try:
        return bool(_redis(settings().redis_url, settings().redis_sentinel_password).ping())
    except Exception:  # noqa: BLE001
        return False


@bp.get("/readyz")
def readyz():
    checks = {
        "database": "ok" if _database_ok() else "down",
        "redis": "ok" if _redis_ok() else "down",
        "document_store": "ok" if store().writable() else "down",
    }
    ready = all(state == "ok" for state in checks.values())
    response = jsonify({"status": "ready" if ready else "not_ready", "checks": checks})
    response.status_code = 200 if ready else 503
    if not ready:
        response.headers["Retry-After"] = "5"
    return response
