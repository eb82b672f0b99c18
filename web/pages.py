"""Pages for buyers, in Bahasa Indonesia: the checkout page and the order page.

The page is static HTML plus a little script that speaks the same JSON API as every other client, so
the waiting room, idempotency and rate limits apply to people and programs alike. The upload stays in
the page while the buyer waits in the queue and is re-sent with the admission token once admitted.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, render_template

from web.context import settings

bp = Blueprint("pages", __name__)


@bp.get("/")
def checkout():
    s = settings()
    return render_template("checkout.html", price=s.price, max_mb=round(s.max_document_bytes / 2**20, 1),
                           max_bytes=s.max_document_bytes, abandon_seconds=s.admission_abandon_seconds)


@bp.get("/pesanan/<uuid:order_id>")
def order_page(order_id):
    """The page a buyer comes back to. It carries no data: the access token is in the URL fragment
    (never sent to us, so never in a log), and the page's script asks the API with it as the bearer."""
    s = settings()
    gateway = urlsplit(s.gateway_url)
    return render_template("order.html", order_id=str(order_id), price=s.price,
                           pay_origin=f"{gateway.scheme}://{gateway.netloc}")
