"""The buyer JSON API (``/api/v1``), per ``shared/API.md``."""
from __future__ import annotations

import json
import math
import re
import uuid

from flask import Blueprint, Response, jsonify, request, url_for

from shared import statuscache
from shared.admission import Admitted, Queued, retry_after_seconds
from shared.errors import DomainError
from shared.lifecycle import Status
from shared.orders import (NewOrder, create_order, find_by_idempotency_key, get_order, get_order_with_view,
                           order_token_hashes, order_view, token_hash_matches, token_matches)
from shared.stamping.header import quick_check
from web.context import admission, settings, store
from web.errors import error_response
from web.limits import browser_id, client_id, drain_request_body, rate_limited
from web.statuspoll import CANONICAL_UUID, LOOKED_UP, bearer

bp = Blueprint("api", __name__, url_prefix="/api/v1")

_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,64}")
# Linear by construction: each domain label ends at its own dot, so no part of the address can be
# matched two ways (a pattern like "[^@]+\.[^@]+" backtracks quadratically on a long dotless field). The
# length is checked before the pattern runs at all.
_EMAIL = re.compile(r"[^@\s.\x00-\x1f\x7f][^@\s\x00-\x1f\x7f]{0,63}@(?:[^@\s.\x00-\x1f\x7f]+\.)+"
                    r"[^@\s.\x00-\x1f\x7f]{2,}")
MAX_EMAIL_LENGTH = 254
# Every text field we take is a few dozen characters; anything longer is refused unread.
MAX_TEXT_FIELD_CHARACTERS = 1024


# PDF user space is at most 14,400 units a side; no page or coordinate beyond it can be valid.
_MAX_COORDINATE = 14_400


class BadRequest(DomainError):
    code = "bad_request"


class InvalidField(DomainError):
    code = "invalid_field"


def _number(name: str, *, integer: bool = False) -> float:
    raw = request.form.get(name, "").strip()
    if not raw:
        raise InvalidField(f"Field '{name}' is required.", code=f"missing_{name}")
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise InvalidField(f"Field '{name}' must be a {'whole ' if integer else ''}number.",
                           code=f"invalid_{name}") from None
    if not math.isfinite(value) or value < (1 if integer else 0) or value > _MAX_COORDINATE:
        raise InvalidField(f"Field '{name}' is out of range.", code=f"invalid_{name}")
    return value


def _new_order_from_request(key: str) -> NewOrder:
    upload = request.files.get("document")
    if upload is None:
        raise BadRequest("Multipart field 'document' (a PDF) is required.", code="missing_document")
    for name, value in request.form.items(multi=True):
        if len(value) > MAX_TEXT_FIELD_CHARACTERS:
            raise InvalidField(f"Field '{name[:40]}' is longer than {MAX_TEXT_FIELD_CHARACTERS} characters.",
                               code="field_too_long")
    email = request.form.get("email", "").strip()
    if len(email) > MAX_EMAIL_LENGTH or not _EMAIL.fullmatch(email):
        raise InvalidField("Field 'email' must be a valid e-mail address.", code="invalid_email")
    if not email.isascii():  # plain SMTP carries ASCII addresses only (we don't depend on SMTPUTF8)
        raise InvalidField("Field 'email' must be written in ASCII characters only: e-mail to an address "
                           "with accents or other non-ASCII characters (such as 'josé@contoh.id') can't be "
                           "delivered.", code="invalid_email")
    page, x, y = int(_number("page", integer=True)), _number("x"), _number("y")
    document = upload.read(settings().max_document_bytes + 1)
    quick_check(document, max_bytes=settings().max_document_bytes)
    return NewOrder(idempotency_key=key, email=email, page=page, x=x, y=y, document=document)


def _links(order_id: str) -> dict[str, str]:
    return {
        "self": url_for("api.get_order_status", order_id=order_id),
        "document": url_for("api.download_document", order_id=order_id),
        "payment": url_for("api.get_order_status", order_id=order_id) + "#payment",
    }


def _queued_response(queued: Queued):
    drain_request_body()
    response = error_response(
        "queued",
        "Many buyers are checking out right now; you have a place in the queue. Poll the ticket and "
        "repeat this request with the Admission-Token header once admitted.",
        429,
        retry_after=retry_after_seconds(queued.eta_seconds, settings().admission_max_retry_after_seconds),
        queue={"ticket": queued.ticket, "position": queued.position, "eta_seconds": queued.eta_seconds,
               "status_url": url_for("queue.queue_status", ticket=queued.ticket),
               "page_url": url_for("queue.queue_page", ticket=queued.ticket)},
    )
    return response


@bp.post("/orders")
@rate_limited("create", "rate_limit_create")
def create_order_endpoint():
    """Validate everything cheap first, then admit (or queue), then create.

    Validation comes before the waiting room so a request that can't become an order never takes a
    place in line or an active-checkout slot; a create that fails after admission gives its admission
    back. A replay of an order we already have is never queued: the buyer is already in.
    """
    key = request.headers.get("Idempotency-Key", "")
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        drain_request_body()
        raise BadRequest("Header Idempotency-Key is required: 1-64 printable ASCII characters.",
                         code="missing_idempotency_key")
    new = _new_order_from_request(key)
    existing = find_by_idempotency_key(settings(), new.email, key)
    claims: dict | None = None
    admitted: Admitted | None = None
    if existing is None:
        token = request.headers.get("Admission-Token", "").strip()
        if token:
            claims = admission().check_token(token)
            admission().spend_token(claims, new.email, key)
        else:
            decision = admission().admit_or_queue(client_id(), browser_id())
            if isinstance(decision, Queued):
                return _queued_response(decision)
            admitted = decision
    try:
        result = create_order(settings(), store(), new, existing=existing)
    except BaseException:
        if claims is not None:
            admission().unspend_token(claims, new.email, key)
        if admitted is not None:
            admission().release(admitted)
        raise
    order_id = str(result.order["id"])
    body = {
        "order_id": order_id,
        "access_token": result.access_token,
        "status": result.order["status"],
        "links": _links(order_id),
    }
    response = jsonify(body)
    response.status_code = 202 if result.created or result.order["status"] == Status.CREATED else 200
    response.headers["Location"] = body["links"]["self"]
    response.headers["Cache-Control"] = "no-store"
    return response


def _bearer_token() -> str:
    token = bearer(request.headers.get("Authorization", ""))
    if token is None:
        raise DomainError("Send the order's access token as 'Authorization: Bearer <token>'.",
                          code="unauthorized")
    return token


def _authorised_order(order_id: str, load=get_order) -> dict:
    try:
        order_id = str(uuid.UUID(order_id))
    except ValueError:
        raise DomainError("No such order.", code="not_found") from None
    token = _bearer_token()
    order = load(settings(), order_id)
    if order is None:
        raise DomainError("No such order.", code="not_found")
    if not token_matches(order, token):
        raise DomainError("This access token is not valid for this order.", code="forbidden")
    return order


@bp.get("/orders/<order_id>")
def get_order_status(order_id: str):
    """The hottest read of a surge: answered from the status cache when it can (shared/statuscache.py),
    with the same 401/403/404 rules as from the database."""
    cached = None
    if LOOKED_UP in request.environ:  # web/statuspoll.py asked the cache already: not twice
        cached = request.environ.pop(LOOKED_UP)
    elif CANONICAL_UUID.fullmatch(order_id):
        _bearer_token()  # no token, no look in Redis: the 401 the row would give
        cached = statuscache.get(order_id)
    if cached is not None and token_hash_matches(cached[0], _bearer_token()):
        body = cached[1]
    else:  # not cached, or a token the entry doesn't know: the row decides
        order = _authorised_order(order_id, get_order_with_view)
        body = json.dumps(order_view(order), separators=(",", ":")).encode() + b"\n"
        statuscache.put(str(order["id"]), order["last_event_id"] or 0, order_token_hashes(order), body)
    return Response(body, mimetype="application/json", headers={"Cache-Control": "no-store"})


@bp.get("/orders/<order_id>/document")
def download_document(order_id: str):
    """The stamped file, only if its bytes are the ones the stamper recorded (``stamped_sha256``): a file
    changed or lost behind the store's back is a 500 (``document_corrupt``/``document_missing``, logged
    at ERROR by the store), nothing served, and the order stays stamped."""
    order = _authorised_order(order_id)
    if order["status"] != Status.STAMPED:
        raise DomainError(f"The document is not stamped yet (status: {order['status']}).",
                          code="not_stamped")
    data = store().get(order["stamped_document_key"], sha256=order["stamped_sha256"])
    return Response(
        data, mimetype="application/pdf",
        headers={"Content-Disposition": f'attachment; filename="meterai-{order["serial"]}.pdf"',
                 "Cache-Control": "no-store"},
    )
