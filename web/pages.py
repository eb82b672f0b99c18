"""Pages for buyers, in Bahasa Indonesia: the checkout page and the order page.

The page is static HTML plus a little script that speaks the same JSON API as every other client, so
the waiting room, idempotency and rate limits apply to people and programs alike. The upload stays in
the page while the buyer waits in the queue and is re-sent with the admission token once admitted.
"""
from __future__ import annotations

import hashlib
import secrets
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from flask import Blueprint, current_app, g, render_template, request, url_for

from web.context import settings
from web.security import csp_nonce

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


# Stand-ins rendered into a page once, replaced per response: the CSP nonce (URL-safe base64, as
# ``secrets.token_urlsafe`` makes it) and the order's id (a UUID: the route's converter made it one, so
# it reads the same escaped for HTML or as JSON). Neither can occur in a template by chance.
_NONCE_MARK = "pagenonce" + secrets.token_hex(8)
_ORDER_MARK = "00000000-0000-4000-8000-" + secrets.token_hex(6)
# Kept copies per process: the two pages under the script root or two (SCRIPT_NAME can come from a
# trusted peer's header); past that, pages are rendered as before, not kept.
_KEPT_MAX = 8


def _page(template: str, *, order_id: str | None = None, **context) -> str:
    """``render_template``, rendered once per process and kept, with only the nonce and the order's id
    replaced per response.

    The two buyer pages are the same for every buyer but those two values (their data comes from the
    API), and rendering one through Jinja was about half of what the web spends on it
    (docs/benchmarks.md, "2026-12-03"). The kept copy is keyed by its context and the request's script
    root (the only part of a request ``url_for`` reads for these relative links); with template
    auto-reload on (debug) every response is rendered afresh, so an edited template shows at once, and
    so is every page past the cap (a client naming script roots at will keeps nothing more).
    """
    app = current_app
    kept = app.extensions.setdefault("meterai.pages", {})
    key = (template, request.script_root, tuple(sorted(context.items())))
    page = kept.get(key)
    if app.debug or app.jinja_env.auto_reload or (page is None and len(kept) >= _KEPT_MAX):
        return render_template(template, order_id=order_id, **context)
    if page is None:
        nonce = g.get("csp_nonce")
        g.csp_nonce = _NONCE_MARK
        try:
            page = render_template(template, order_id=_ORDER_MARK if order_id is not None else None, **context)
        finally:
            if nonce is None:
                g.pop("csp_nonce", None)
            else:
                g.csp_nonce = nonce
        kept[key] = page
    page = page.replace(_NONCE_MARK, csp_nonce())
    return page.replace(_ORDER_MARK, order_id) if order_id is not None else page


@bp.get("/")
def checkout():
    s = settings()
    return _page("checkout.html", price=s.price, max_mb=round(s.max_document_bytes / 2**20, 1),
                 max_bytes=s.max_document_bytes, abandon_seconds=s.admission_abandon_seconds,
                 max_retry_after_seconds=s.admission_max_retry_after_seconds)


@bp.get("/pesanan/<uuid:order_id>")
def order_page(order_id):
    """The page a buyer comes back to. It carries no data: the access token is in the URL fragment
    (never sent to us, so never in a log), and the page's script asks the API with it as the bearer."""
    s = settings()
    gateway = urlsplit(s.gateway_url)
    return _page("order.html", order_id=str(order_id), price=s.price,
                 pay_origin=f"{gateway.scheme}://{gateway.netloc}")
