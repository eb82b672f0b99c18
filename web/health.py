"""Liveness and readiness. ``/readyz`` names each dependency's state so ops see which one is down."""
from __future__ import annotations

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


def _redis_ok() -> bool:
    try:
        client = redis_client(settings().redis_url, timeout=1, retries=0, max_connections=1,
                              sentinel_password=settings().redis_sentinel_password)
        try:
            return bool(client.ping())
        finally:
            client.close()
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
