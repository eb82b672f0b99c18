"""Verification, public and unauthenticated: anyone holding a stamped PDF or a serial can check it.

JSON for programs (``/api/v1/verify``…) and pages in Bahasa Indonesia for people (``/verify``…; the QR
code on every stamp leads to ``/verify/<serial>``). Both sides call the same service, so a page can
never say something the API doesn't. Uploads are capped at ``verify_max_bytes`` before anything parses
them; the heavy checking itself is bounded in :mod:`shared.services.verification`.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from flask import Blueprint, jsonify, redirect, render_template, request, url_for
from werkzeug.exceptions import RequestEntityTooLarge

from shared.errors import DomainError
from shared.services.verification import SerialRecord, Verdict, lookup_serial, verify_document
from shared.stamping.header import quick_check
from web.context import settings
from web.errors import status_for
from web.limits import rate_limited

bp = Blueprint("verify", __name__)

_SERIAL = re.compile(r"^[0-9A-Z]{22}$")
_WIB = timezone(timedelta(hours=7), "WIB")  # Jakarta time; Indonesia keeps no daylight saving
_MONTHS = ("Januari", "Februari", "Maret", "April", "Mei", "Juni", "Juli", "Agustus", "September",
           "Oktober", "November", "Desember")
_UPLOAD_OVERHEAD = 64 * 1024  # multipart framing around the file


class UnknownSerial(DomainError):
    code = "unknown_serial"


def indonesian_time(moment: datetime | None) -> str:
    """``28 November 2026, 22.21 WIB``, as Indonesian readers write it."""
    if moment is None:
        return "-"
    local = moment.astimezone(_WIB)
    return f"{local.day} {_MONTHS[local.month - 1]} {local.year}, {local:%H.%M} WIB"


def _megabytes(limit: int) -> str:
    """``8`` or ``2,5``: Indonesian writes a decimal comma."""
    return f"{limit / 2**20:.1f}".rstrip("0").rstrip(".").replace(".", ",")


def _find_serial(serial: str) -> SerialRecord | None:
    return lookup_serial(settings(), serial) if _SERIAL.match(serial) else None


def _read_upload() -> bytes:
    """The multipart ``document``, at most ``verify_max_bytes``, starting like a PDF (413/415 if not)."""
    limit = settings().verify_max_bytes
    request.max_content_length = limit + _UPLOAD_OVERHEAD  # stamped files outgrow order uploads
    upload = request.files.get("document")
    if upload is None:
        raise DomainError("Multipart field 'document' (a PDF) is required.", code="missing_document")
    document = upload.read(limit + 1)
    quick_check(document, max_bytes=limit)
    return document


# --- JSON ----------------------------------------------------------------------------------------

@bp.get("/api/v1/verify/<serial>")
def verify_serial(serial: str):
    record = _find_serial(serial)
    if record is None:
        raise UnknownSerial("Unknown serial.")
    return jsonify(record.as_json())


@bp.post("/api/v1/verify")
@rate_limited("verify", "rate_limit_verify")
def verify_upload():
    verdict = verify_document(settings(), _read_upload())
    response = jsonify(verdict.as_json())
    response.headers["Cache-Control"] = "no-store"
    return response


# --- pages ---------------------------------------------------------------------------------------

def _verdict_view(verdict: Verdict) -> dict[str, object]:
    return {
        "valid": verdict.valid,
        "message": verdict.message,
        "reason": verdict.reason,
        "serial": verdict.serial,
        "stamped_at": indonesian_time(verdict.stamped_at) if verdict.valid else None,
        "document_sha256": verdict.document_sha256,
        "signer": verdict.signer,
    }


@bp.get("/verify")
def verify_form():
    serial = request.args.get("serial", "").strip().upper().replace(" ", "").replace("-", "")
    if serial:
        return redirect(url_for("verify.verify_serial_page", serial=serial), code=303)
    return render_template("verify_upload.html", verdict=None, error=None,
                           max_mb=_megabytes(settings().verify_max_bytes))


@rate_limited("verify", "rate_limit_verify")
def _verify_upload_page():
    verdict = verify_document(settings(), _read_upload())
    return render_template("verify_upload.html", verdict=_verdict_view(verdict), error=None,
                           max_mb=_megabytes(settings().verify_max_bytes))


@bp.post("/verify")
def verify_upload_page():
    max_mb = _megabytes(settings().verify_max_bytes)
    try:
        return _verify_upload_page()
    except RequestEntityTooLarge:
        error, status = f"Ukuran berkas melebihi batas {max_mb} MB.", 413
    except DomainError as exc:
        error, status = exc.message, status_for(exc)
        if exc.code == "missing_document":
            error = "Pilih berkas PDF yang akan diperiksa."
        elif exc.code == "rate_limited":
            error = "Terlalu banyak permintaan dari perangkat Anda. Tunggu sebentar, lalu coba lagi."
    response = render_template("verify_upload.html", verdict=None, error=error, max_mb=max_mb)
    return response, status


@bp.get("/verify/<serial>")
def verify_serial_page(serial: str):
    record = _find_serial(serial)
    if record is None:
        return render_template("verify_serial.html", serial=serial[:64], record=None), 404
    return render_template(
        "verify_serial.html", serial=record.serial, record=record,
        stamped_at=indonesian_time(record.stamped_at) if record.status == "used" else None,
    )
