"""The stand-in's Midtrans protocol endpoints: what our gateway adapter talks to.

HTTP Basic with the server key as username: ``POST /snap/v1/transactions``, ``GET /v2/<order_id>/status``,
``POST /v2/<order_id>/refund``, ``POST /v2/<order_id>/expire``, ``POST /v2/<order_id>/cancel``. Like
Midtrans' v2 API, refusals are HTTP 200 with ``status_code: "412"`` in the body; unknown orders get HTTP
404 with ``status_code: "404"`` (so does an id no real order can have, e.g. one with a NUL byte); a merchant
expiry answers ``status_code: "407"``. Injected faults come first, as an outage happens before auth.
"""
from __future__ import annotations

import hmac
import time
import uuid
from functools import wraps
from typing import Any, Callable

from flask import Flask, Response, jsonify, request

from shared.devtools.standin.records import NOT_FOUND
from shared.devtools.standin.transactions import StandinGateway

def json_error(status: int, message: str) -> Response:
    response = jsonify({"status_code": str(status), "status_message": message, "error_messages": [message]})
    response.status_code = status
    return response


def _protocol(gateway: StandinGateway, endpoint: str) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """Wrap a protocol endpoint: injected faults first (an outage happens before auth), then HTTP Basic
    with the server key. A "timeout" sleeps past the client's patience and then still does the work,
    like a real gateway that was slow rather than down."""
    def decorate(view: Callable[..., Response]) -> Callable[..., Response]:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Response:
            pause, fault = gateway.faults.draw(endpoint)
            if pause:
                time.sleep(pause)
            if fault == "error":
                return json_error(500, "Sorry, we encountered internal server error. We will fix this soon.")
            if not authorized(gateway.server_key):
                return json_error(401, "Unknown Merchant server_key/id")
            return view(*args, **kwargs)
        return wrapped
    return decorate


def storable_text(value: str) -> bool:
    """Text PostgreSQL can hold: no NUL byte, nothing UTF-8 can't encode (a lone surrogate)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Midtrans' order_id: at most 50 characters, letters, digits and - _ ~ .
_ORDER_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_~.")


def authorized(server_key: str) -> bool:
    auth = request.authorization
    if auth is None or auth.type != "basic" or auth.username is None:
        return False
    return hmac.compare_digest(auth.username.encode("utf-8"), server_key.encode("utf-8"))


def _snap_request(body: Any) -> tuple[str, int, str | None, str | None]:
    """(order_id, gross_amount, email, item_name) from a Snap create body; ValueError says what's wrong."""
    details = body.get("transaction_details") if isinstance(body, dict) else None
    if not isinstance(details, dict):
        raise ValueError("transaction_details is required")
    order_id, gross = details.get("order_id"), details.get("gross_amount")
    if not isinstance(order_id, str) or not order_id or len(order_id) > 50:
        raise ValueError("transaction_details.order_id is required (at most 50 characters)")
    if not set(order_id) <= _ORDER_ID_CHARS:
        raise ValueError("transaction_details.order_id may hold only letters, digits and - _ ~ .")
    if isinstance(gross, bool) or not isinstance(gross, (int, float)) or gross != int(gross) or gross < 1:
        raise ValueError("transaction_details.gross_amount must be a positive whole number")
    items = body.get("item_details")
    if items is not None:
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ValueError("item_details must be a list of objects")
        try:
            total = sum(int(i.get("price") or 0) * int(i.get("quantity") or 0) for i in items)
        except (TypeError, ValueError):
            raise ValueError("item_details price and quantity must be numbers") from None
        if total != gross:
            raise ValueError("transaction_details.gross_amount is not equal to the sum of item_details")
    customer = body.get("customer_details") or {}
    email = customer.get("email") if isinstance(customer, dict) else None
    item_name = items[0].get("name") if items else None
    for name, value in (("customer_details.email", email), ("item_details.name", item_name)):
        if value is not None and (not isinstance(value, str) or not storable_text(value)):
            raise ValueError(f"{name} must be text without NUL bytes")
    return order_id, int(gross), email, item_name


def json_answer(http_status: int, body: dict[str, Any]) -> Response:
    response = jsonify(body)
    response.status_code = http_status
    return response


def register_protocol(app: Flask, gateway: StandinGateway) -> None:
    @app.before_request
    def unknown_unless_storable() -> Response | None:
        """An id no transaction can have (a NUL byte, a lone surrogate) names nothing: 404, as for any
        unknown order, instead of an error from the database."""
        if any(isinstance(v, str) and not storable_text(v) for v in (request.view_args or {}).values()):
            return json_error(404, NOT_FOUND["status_message"])
        return None

    @app.post("/snap/v1/transactions")
    @_protocol(gateway, "create")
    def snap_create() -> Response:
        try:
            order_id, gross, email, item_name = _snap_request(request.get_json(silent=True))
        except ValueError as exc:
            return json_error(400, str(exc))
        tx = gateway.create(order_id, gross, email, item_name)
        if tx is None:
            return json_error(409, "transaction_details.order_id has already been taken")
        return json_answer(201, {"token": tx.token, "redirect_url": gateway.redirect_url(tx)})

    @app.get("/v2/<order_id>/status")
    @_protocol(gateway, "status")
    def status(order_id: str) -> Response:
        body = gateway.status(order_id)
        if body is None:
            return json_error(404, NOT_FOUND["status_message"])
        return jsonify(body)

    @app.post("/v2/<order_id>/refund")
    @_protocol(gateway, "refund")
    def refund(order_id: str) -> Response:
        body = request.get_json(silent=True) or {}
        amount = body.get("amount")
        if amount is not None and (isinstance(amount, bool) or not isinstance(amount, int)):
            return json_error(400, "amount must be a whole number of rupiah")
        refund_key = str(body.get("refund_key") or uuid.uuid4())
        reason = str(body.get("reason") or "")
        if not (storable_text(refund_key) and storable_text(reason)) or len(refund_key) > 100:
            return json_error(400, "refund_key (at most 100 characters) and reason must be text without NUL bytes")
        http_status, answer, deliveries = gateway.refund(order_id, refund_key, amount, reason)
        gateway.send(deliveries)
        return json_answer(http_status, answer)

    @app.post("/v2/<order_id>/expire")
    @_protocol(gateway, "expire")
    def merchant_expire(order_id: str) -> Response:
        http_status, answer, deliveries = gateway.close_transaction(order_id, "expire")
        gateway.send(deliveries)
        return json_answer(http_status, answer)

    @app.post("/v2/<order_id>/cancel")
    @_protocol(gateway, "cancel")
    def merchant_cancel(order_id: str) -> Response:
        http_status, answer, deliveries = gateway.close_transaction(order_id, "cancel")
        gateway.send(deliveries)
        return json_answer(http_status, answer)
