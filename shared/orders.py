"""Orders repository: creating an order from an upload, reading it back, and the access-token rules.

Creating is idempotent by ``Idempotency-Key``, scoped to the buyer's e-mail address: the same key with
the same request returns the order it made the first time; the same key with a different request is a
conflict; someone else's e-mail under the same key is someone else's order.

Access tokens are random (:func:`new_access_token`) and only their SHA-256 hashes are stored, so nothing
the server knows, its secrets included, lets anyone compute a token from an order id. A replayed create
can't hand the first token back (nobody has it), so it gets a fresh one for the same order; an order keeps
its newest :data:`MAX_ACCESS_TOKENS` hashes.

The e-mails a buyer gets carry a link to the order page with a token the mail worker mints once per
e-mail (:func:`add_link_token`), kept apart (``link_token_hashes``) so replays of the create never trim a link in
someone's mailbox away. Every check accepts either kind (:func:`order_token_hashes`).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import psycopg

from shared import jobs
from shared.config import Settings
from shared.db import get_pool
from shared.errors import DomainError
from shared.lifecycle import Status, insert_order
from shared.store import DocumentStore, upload_key


class IdempotencyConflict(DomainError):
    code = "idempotency_conflict"


@dataclass(frozen=True)
class NewOrder:
    idempotency_key: str
    email: str
    page: int
    x: float
    y: float
    document: bytes

    @cached_property  # the fingerprint and the row both need it; a 2 MB upload is worth hashing once
    def document_sha256(self) -> str:
        return hashlib.sha256(self.document).hexdigest()

    def fingerprint(self) -> str:
        """What makes two creates "the same request" for idempotency."""
        body = json.dumps(
            [self.document_sha256, self.page, round(self.x, 3), round(self.y, 3), self.email.lower()]
        )
        return hashlib.sha256(body.encode()).hexdigest()


# Tokens an order keeps at once: the first one and those handed to replays of its create (a client that
# lost the answer and retried). More replays than this push out the oldest.
MAX_ACCESS_TOKENS = 8


def new_access_token() -> str:
    """256 random bits, URL-safe: the buyer's only key to their order and document."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def order_token_hashes(order: dict[str, Any]) -> list[str]:
    """Every token hash the order accepts: those handed to the creates, and those sent in its e-mails."""
    return [*order["access_token_hashes"], *(order.get("link_token_hashes") or ())]


def token_matches(order: dict[str, Any], token: str) -> bool:
    return token_hash_matches(order_token_hashes(order), token)


def token_hash_matches(stored_hashes: list[str], token: str) -> bool:
    """Whether ``token`` is one of the order's; every stored hash is compared, in constant time each."""
    wanted = token_hash(token)
    found = False
    for stored in stored_hashes:
        found |= hmac.compare_digest(stored, wanted)
    return found


# Link tokens an order holds at most: one per kind of e-mail. The mail worker makes an outbox row's token
# once, with its first claim, and every attempt of that row sends the same one, so retries, sends whose
# outcome was in doubt and redeliveries never add another, and nothing is ever trimmed: a link that was
# delivered keeps working. The migration's CHECK says the same.
MAX_LINK_TOKENS = 6

_ADD_LINK_TOKEN = """
UPDATE orders SET link_token_hashes = link_token_hashes || %(hash)s::text WHERE id = %(id)s RETURNING id
"""


def link_token(settings: Settings, order_id: uuid.UUID | str, kind: str, salt: str) -> str:
    """The token of one e-mail's link, made from the outbox row's random ``salt`` with SECRET_KEY. Every
    attempt of the row remakes the same token, so the row keeps only the salt: what the database (its
    backups, its WAL) holds is no bearer credential without the key, unlike a stored token. The order
    keeps the token's hash, like every access token's; rotating SECRET_KEY only changes the links of
    e-mails not yet sent."""
    digest = hmac.new(settings.secret_key.encode(), f"meterai-mail-link|{order_id}|{kind}|{salt}".encode(),
                      hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def add_link_token(conn: Any, order_id: uuid.UUID | str, token: str) -> None:
    """Let ``token`` open the order (its hash stored), before the e-mail carrying it is sent."""
    conn.execute(_ADD_LINK_TOKEN, {"hash": token_hash(token), "id": str(order_id)})


def drop_link_token(conn: Any, order_id: uuid.UUID | str, token: str) -> None:
    """Forget a link token whose e-mail certainly never left (its row failed and no attempt of it may have
    reached a server)."""
    conn.execute("UPDATE orders SET link_token_hashes = array_remove(link_token_hashes, %s) WHERE id = %s",
                 (token_hash(token), str(order_id)))


def order_page_url(settings: Settings, order_id: uuid.UUID | str, token: str) -> str:
    """The buyer's order page with its token in the fragment (``#t=``), which browsers never send to a
    server, so the token stays out of every access log; never in a query string."""
    return f"{settings.public_base_url.rstrip('/')}/pesanan/{order_id}#t={token}"


@dataclass(frozen=True)
class Created:
    """What a create answers: the order, whether this request made it, and the token for this answer."""

    order: dict[str, Any]
    created: bool
    access_token: str


def find_by_idempotency_key(settings: Settings, email: str, key: str) -> dict[str, Any] | None:
    with get_pool(settings.database_url).connection() as conn:
        return conn.execute("SELECT * FROM orders WHERE lower(email) = lower(%s) AND idempotency_key = %s",
                            (email, key)).fetchone()


# A replay that made it this far is the same buyer sending the same request again: a fresh token for it,
# keeping the newest MAX_ACCESS_TOKENS.
_ADD_TOKEN = f"""
UPDATE orders SET access_token_hashes = (access_token_hashes || %(hash)s::text)[
        greatest(1, cardinality(access_token_hashes) + 2 - {MAX_ACCESS_TOKENS}):]
WHERE id = %(id)s RETURNING *
"""


def _replay(settings: Settings, existing: dict[str, Any], new: NewOrder) -> Created:
    if existing["request_fingerprint"] != new.fingerprint():
        raise IdempotencyConflict(
            "This Idempotency-Key was already used for a different request; use a new key."
        )
    token = new_access_token()
    with get_pool(settings.database_url).connection() as conn:
        order = conn.execute(_ADD_TOKEN, {"hash": token_hash(token), "id": str(existing["id"])}).fetchone()
    return Created(order, False, token)


_LOOK_IT_UP: Any = object()

def create_order(
    settings: Settings, store: DocumentStore, new: NewOrder, *, existing: Any = _LOOK_IT_UP
) -> Created:
    """Store the upload durably, insert the order, and queue its checkout.

    ``existing`` is the order already under this buyer's Idempotency-Key (or ``None``) when the caller
    has just looked it up, so the request path doesn't query twice.
    """
    if existing is _LOOK_IT_UP:
        existing = find_by_idempotency_key(settings, new.email, new.idempotency_key)
    if existing is not None:
        return _replay(settings, existing, new)
    order_id = uuid.uuid4()
    key = upload_key(order_id)
    token = new_access_token()
    store.put(key, new.document)
    # One statement, so one round trip and atomic on its own (the pool's connections are autocommit):
    # the order and its first event, or (a concurrent create under the same key won) neither.
    with get_pool(settings.database_url).connection() as conn:
        try:
            row = insert_order(conn, {
                "id": str(order_id), "idempotency_key": new.idempotency_key,
                "request_fingerprint": new.fingerprint(), "access_token_hashes": [token_hash(token)],
                "email": new.email, "amount_idr": settings.price, "page": new.page, "x": new.x, "y": new.y,
                "document_key": key, "document_sha256": new.document_sha256,
                "document_bytes": len(new.document),
            })
        except psycopg.OperationalError:
            if conn.broken:
                # The connection was lost with the statement sent: it may have committed, the answer lost
                # (shared.db.transaction says why its follow-ups go out anyway). The buyer is answered 503
                # and sends the same Idempotency-Key again, which finds the order if it is there.
                _queue_checkout(order_id)
            raise
    if row is None:  # lost a race with a concurrent create under the same key
        store.delete(key)
        existing = find_by_idempotency_key(settings, new.email, new.idempotency_key)
        assert existing is not None
        return _replay(settings, existing, new)
    _queue_checkout(order_id)
    return Created(row, True, token)


def _queue_checkout(order_id: uuid.UUID) -> None:
    """A created order's follow-ups, for its committed (or perhaps committed) rows: both tasks read their
    rows first (an order that isn't there is skipped, so is a receipt not in the outbox)."""
    jobs.publish_committed(jobs.PREPARE_ORDER, str(order_id))  # committed: the checkout may run
    jobs.publish_committed(jobs.SEND_MAIL, str(order_id), "receipt")  # and the receipt be sent


def get_order(settings: Settings, order_id: uuid.UUID | str) -> dict[str, Any] | None:
    with get_pool(settings.database_url).connection() as conn:
        return conn.execute("SELECT * FROM orders WHERE id = %s", (str(order_id),)).fetchone()


# The buyer's status poll is the hottest read of a surge (every buyer, every few seconds), so the order
# and everything its view shows come back in one statement on an autocommit connection: one round trip,
# no BEGIN/COMMIT around it. Timestamps travel as arrays, not JSON, so they keep Python's isoformat.
_ORDER_WITH_VIEW = """
SELECT o.*,
       p.gateway_order_id AS payment_gateway_order_id, p.redirect_url AS payment_redirect_url,
       p.captured_at AS payment_captured_at,
       r.status AS refund_status, r.amount_idr AS refund_amount_idr,
       e.statuses AS event_statuses, e.ats AS event_ats, e.last_event_id
FROM orders o
LEFT JOIN LATERAL (
    SELECT gateway_order_id, redirect_url, captured_at FROM payments
    WHERE order_id = o.id AND token IS NOT NULL ORDER BY captured_at IS NULL, created_at DESC LIMIT 1
) p ON true
LEFT JOIN LATERAL (  -- the refund of the order's own capture (one at most): an extra capture's is not the order's
    SELECT rf.status, rf.amount_idr FROM refunds rf
    JOIN payments rp ON rp.gateway_order_id = rf.gateway_order_id AND rp.capture_role = 'order'
    WHERE rf.order_id = o.id
) r ON true
LEFT JOIN LATERAL (
    SELECT array_agg(to_status ORDER BY id) AS statuses, array_agg(at ORDER BY id) AS ats,
           max(id) AS last_event_id
    FROM order_events WHERE order_id = o.id
) e ON true
WHERE o.id = %s
"""


def get_order_with_view(settings: Settings, order_id: uuid.UUID | str) -> dict[str, Any] | None:
    """The order row plus what :func:`order_view` shows, read in one statement (see above)."""
    with get_pool(settings.database_url).connection() as conn:
        return conn.execute(_ORDER_WITH_VIEW, (str(order_id),)).fetchone()


def order_view(order: dict[str, Any]) -> dict[str, Any]:
    """The buyer-facing JSON of an order (API.md, GET /api/v1/orders/{id}), from a row of
    :func:`get_order_with_view`."""
    statuses, ats = order["event_statuses"] or [], order["event_ats"] or []
    view: dict[str, Any] = {
        "order_id": str(order["id"]),
        "status": order["status"],
        "amount": order["amount_idr"],
        "currency": "IDR",
        "page": order["page"],
        "x": order["x"],
        "y": order["y"],
        "created_at": order["created_at"].isoformat(),
        "events": [{"status": status, "at": at.isoformat()} for status, at in zip(statuses, ats)],
    }
    if order["status"] == Status.STAMPED and order["serial"]:
        view["serial"] = order["serial"]
        view["stamped_at"] = order["stamped_at"].isoformat()
    # A payment link only while it can be used, or once it was: never on a rejected or expired order.
    if order["payment_gateway_order_id"] is not None and (
            order["status"] == Status.AWAITING_PAYMENT or order["payment_captured_at"]):
        view["payment"] = {
            "redirect_url": order["payment_redirect_url"],
            "gateway_order_id": order["payment_gateway_order_id"],
        }
    if order["refund_status"] is not None:
        view["refund"] = {"status": order["refund_status"], "amount": order["refund_amount_idr"]}
    if order["reason_code"]:
        view["reason"] = {"code": order["reason_code"], "message": order["reason_message"]}
    return view
