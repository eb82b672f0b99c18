"""Pages for buyers, in Bahasa Indonesia: the checkout page and the order page.

The page is static HTML plus a little script that speaks the same JSON API as every other client, so
the waiting room, idempotency and rate limits apply to people and programs alike. The upload stays in
the page while the buyer waits in the queue and is re-sent with the admission token once admitted.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from flask import Blueprint, current_app, render_template, url_for

from web.context import settings

bp = Blueprint("pages", __name__)


@lru_cache(maxsize=64)
def _static_version(folder: str, filename: str) -> str:
    try:
        return hashlib.sha256((Path(folder) / filename).read_bytes()).hexdigest()[:12]
    except OSError:
        return "missing"


@bp.app_template_global()
def static_url(filename: str) -> str:
    """A static file's address with its content's hash (``?v=``): files are cached an hour
    (SEND_FILE_MAX_AGE_DEFAULT), so a page after a deploy must not import the modules it had before."""
    return url_for("static", filename=filename, v=_static_version(current_app.static_folder or "", filename))


@bp.get("/")
def checkout():
    s = settings()
    return render_template("checkout.html", price=s.price, max_mb=round(s.max_document_bytes / 2**20, 1),
                           max_bytes=s.max_document_bytes, abandon_seconds=s.admission_abandon_seconds,
                           max_retry_after_seconds=s.admission_max_retry_after_seconds)


@bp.get("/pesanan/<uuid:order_id>")
def order_page(order_id):
    """The page a buyer comes back to. It carries no data: the access token is in the URL fragment
    (never sent to us, so never in a log), and the page's script asks the API with it as the bearer."""
    s = settings()
    gateway = urlsplit(s.gateway_url)
    return render_template("order.html", order_id=str(order_id), price=s.price,
                           pay_origin=f"{gateway.scheme}://{gateway.netloc}")
