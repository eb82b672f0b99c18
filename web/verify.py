"""Verification, public and unauthenticated: anyone holding a stamped PDF or a serial can check it."""
from __future__ import annotations

import re

from flask import Blueprint, jsonify

from shared.db import get_pool
from shared.errors import DomainError
from web.context import settings

bp = Blueprint("verify", __name__)

_SERIAL = re.compile(r"^[0-9A-Z]{22}$")


@bp.get("/api/v1/verify/<serial>")
def verify_serial(serial: str):
    if not _SERIAL.match(serial):
        raise DomainError("Unknown serial.", code="unknown_serial", status=404)
    with get_pool(settings().database_url).connection() as conn:
        row = conn.execute(
            "SELECT s.serial, s.status, s.document_sha256, o.stamped_at FROM serials s"
            " JOIN orders o ON o.id = s.order_id WHERE s.serial = %s",
            (serial,),
        ).fetchone()
    if row is None:
        raise DomainError("Unknown serial.", code="unknown_serial", status=404)
    body = {"serial": row["serial"], "status": row["status"]}
    if row["status"] == "used":
        body.update(stamped_at=row["stamped_at"].isoformat(), document_sha256=row["document_sha256"])
    return jsonify(body)
