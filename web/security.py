"""Security headers on every answer, and a content security policy that lets only our own scripts run.

Pages carry tickets, tokens and order ids in their URLs, so no referrer ever leaves (``no-referrer``);
no page may be framed (clickjacking the pay button); browsers must not guess content types. The pages'
inline script and style blocks carry a per-response nonce (``csp_nonce()`` in templates): anything
injected without it doesn't run.
"""
from __future__ import annotations

import hmac
import secrets

from flask import Flask, Response, g

_COMMON = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# JSON and files: nothing in them may load or run anything, nor be framed.
_API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
# What an answer that isn't a page carries when it is made before Flask (web/staticfiles.py,
# web/queuepoll.py, web/statuspoll.py), as this module's hook would add.
NON_PAGE_HEADERS = {**_COMMON, "Content-Security-Policy": _API_POLICY}


# Wrong ops tokens a client may send in its window before it is answered 429 (web/ops.py, web/metrics.py,
# web/pollserver.py): the token can't be guessed online.
OPS_TOKEN_ATTEMPTS = "10/600"


def bearer_token_matches(authorization: str, expected: str) -> bool:
    """Whether an ``Authorization: Bearer <token>`` header carries ``expected`` (compared in constant time;
    an empty expected token matches nothing)."""
    given = authorization[len("Bearer "):].strip() if authorization.startswith("Bearer ") else ""
    return bool(expected and given) and hmac.compare_digest(given.encode(), expected.encode())


def csp_nonce() -> str:
    """This response's nonce, made on first use (API answers never need one)."""
    nonce = g.get("csp_nonce")
    if nonce is None:
        nonce = g.csp_nonce = secrets.token_urlsafe(16)
    return nonce


def _page_policy(nonce: str) -> str:
    # Modules imported by a nonced module script inherit its nonce (the checkout's preview imports pdf.js
    # from our static files); pdf.js parses in a worker, which needs worker-src: our origin only.
    return ("default-src 'none'; "
            f"script-src 'nonce-{nonce}'; worker-src 'self'; style-src 'nonce-{nonce}'; "
            "img-src 'self' data: blob:; font-src 'self' data: blob:; connect-src 'self'; form-action 'self'; "
            "base-uri 'none'; frame-ancestors 'none'")


def add_security_headers(response: Response) -> Response:
    for name, value in _COMMON.items():
        response.headers.setdefault(name, value)
    nonce = g.get("csp_nonce")
    policy = _page_policy(nonce) if nonce and response.mimetype == "text/html" else _API_POLICY
    response.headers.setdefault("Content-Security-Policy", policy)
    return response


def register(app: Flask) -> None:
    app.jinja_env.globals["csp_nonce"] = csp_nonce
    app.after_request(add_security_headers)
