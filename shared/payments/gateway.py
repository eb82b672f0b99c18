"""The payment gateway adapter: the one place that speaks Midtrans Core/Snap over HTTP.

It implements :class:`~shared.payments.protocol.PaymentGateway` (records and errors live there, the
circuit breaker in :mod:`shared.payments.breaker`), built by :func:`gateway_from_settings`. The stand-in
gateway (development tooling) speaks the very same protocol, so pointing ``GATEWAY_URL`` at it is the
whole difference between a drill and production.

Midtrans quirks mirrored here:

* amounts are integer rupiah on the way in (``gross_amount: 12500``) and ``"12500.00"`` on the way out;
  the notification signature is computed over that exact text;
* the v2 endpoints answer HTTP 200 with the real outcome in the body's ``status_code`` (``"404"`` for an
  unknown order, ``"412"`` for a refund that isn't allowed), so both the HTTP status and the body code
  are read;
* refunds are idempotent by ``refund_key``: sending the same key again reports success without paying
  twice, which is what makes retrying a refund after a timeout safe.
* an unpaid transaction is closed with ``POST /v2/<id>/expire`` (body code ``"407"``) or ``/cancel``;
  one paid meanwhile is refused with ``"412"``, so "expire at the gateway, then ask its status" can
  never throw away a payment;
* a card payment is ``capture`` until it settles (the next day): it can't be refunded then, only voided
  with ``/cancel``; once ``settlement`` it can only be refunded;
* there is no API that lists a period's captures (Midtrans offers a settlement report file): the
  stand-in serves one (:meth:`MidtransGateway.list_captures`), production reads the file.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
from datetime import datetime
from typing import Any, Callable, Mapping

import requests

from shared.logs import log_event
from shared.payments.breaker import CircuitBreaker, breaker_for
from shared.payments.protocol import (
    CloseResult,
    GatewayCapture,
    GatewayRejected,
    GatewayStatus,
    GatewayUnavailable,
    PaymentGateway,
    RefundResult,
    Transaction,
)

log = logging.getLogger(__name__)

__all__ = [  # the adapter, and the protocol's names its callers use with it
    "CircuitBreaker", "CloseResult", "GatewayCapture", "GatewayRejected", "GatewayStatus",
    "GatewayUnavailable", "MidtransGateway", "PaymentGateway", "RefundResult", "Transaction",
    "breaker_for", "format_gross_amount", "gateway_from_settings", "notification_signature",
    "parse_gross_amount", "require_rupiah", "verify_notification",
]

_GROSS_AMOUNT = re.compile(r"^(\d+)(?:\.(\d+))?$")
# Midtrans rejects item names longer than this.
_ITEM_NAME_MAX = 50
_SNAP_CREATED = {200, 201}
_NOTIFICATION_FIELDS = ("order_id", "status_code", "gross_amount", "signature_key")


# --- amounts and signatures ------------------------------------------------------------------------

def require_rupiah(amount: object) -> int:
    """``amount`` if it is a non-negative integer number of rupiah; a float or Decimal never gets this
    far, because a rounded amount is a wrong amount."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"amount must be integer rupiah, got {type(amount).__name__}")
    if amount < 0:
        raise ValueError(f"amount must not be negative, got {amount}")
    return amount


def format_gross_amount(amount: int) -> str:
    """Integer rupiah as Midtrans writes it: ``12500`` -> ``"12500.00"``."""
    return f"{require_rupiah(amount)}.00"


def parse_gross_amount(text: str) -> int:
    """``"12500.00"`` -> ``12500``. Rupiah has no minor unit in practice, so a fraction other than zeros
    means we misunderstood the gateway and must not silently round."""
    match = _GROSS_AMOUNT.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"not a gross amount: {text!r}")
    whole, fraction = match.groups()
    if fraction is not None and fraction.strip("0"):
        raise ValueError(f"gross amount has a non-zero fraction: {text!r}")
    return int(whole)


def notification_signature(order_id: str, status_code: str, gross_amount: str, server_key: str) -> str:
    """``SHA512(order_id + status_code + gross_amount + server_key)`` as lowercase hex."""
    payload = f"{order_id}{status_code}{gross_amount}{server_key}".encode("utf-8", "surrogatepass")
    return hashlib.sha512(payload).hexdigest()


def verify_notification(body: Mapping[str, object], server_key: str) -> bool:
    """True only if the notification carries every signed field as text and its signature matches.

    The comparison is constant-time so a forger learns nothing from response timing.
    """
    values = [body.get(name) for name in _NOTIFICATION_FIELDS]
    if not all(isinstance(value, str) and value for value in values):
        return False
    order_id, status_code, gross_amount, signature = values  # type: ignore[misc]
    expected = notification_signature(order_id, status_code, gross_amount, server_key)
    return hmac.compare_digest(expected.encode("ascii"), signature.lower().encode("utf-8"))


# --- the HTTP adapter ------------------------------------------------------------------------------

def _body_status_code(payload: Any) -> str | None:
    if isinstance(payload, dict) and payload.get("status_code") is not None:
        return str(payload["status_code"])
    return None


def _message(payload: Any, fallback: str) -> str:
    if isinstance(payload, dict):
        if payload.get("status_message"):
            return str(payload["status_message"])
        errors = payload.get("error_messages")
        if isinstance(errors, list) and errors:
            return "; ".join(str(e) for e in errors)
    return fallback


def _is_unavailable_code(code: int) -> bool:
    return code >= 500 or code == 429


class MidtransGateway:
    """:class:`PaymentGateway` over HTTP: HTTP Basic with the server key as username and an empty
    password, JSON both ways, a timeout on every call, and a per-process circuit breaker."""

    def __init__(
        self,
        base_url: str,
        server_key: str,
        timeout: float,
        *,
        breaker: CircuitBreaker | None = None,
        session: requests.Session | None = None,
        payment_window_minutes: int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # Snap's own expiry for a payment link: no longer than we keep an order open, so a link can't
        # be paid after we expired the order (Snap's default window is longer).
        self.payment_window_minutes = payment_window_minutes
        self._breaker = breaker if breaker is not None else breaker_for(self.base_url)
        self._session = session if session is not None else requests.Session()
        self._session.auth = (server_key, "")
        self._session.headers.update({"Accept": "application/json"})
        if session is None:
            self._settle_environment()

    def _settle_environment(self) -> None:
        """What the environment says about reaching the gateway (an egress proxy from HTTPS_PROXY /
        HTTP_PROXY / ALL_PROXY unless NO_PROXY names its host; a CA bundle from REQUESTS_CA_BUNDLE or
        CURL_CA_BUNDLE), read once here instead of by requests on every call: a fifth of the adapter's
        own CPU per call
        (``python -m loadtests.bench.gateway_client``: 0.425 → 0.337 ms). A process's environment doesn't
        change while it runs, and every call goes to ``base_url``'s host, so the answer is the same."""
        settled = self._session.merge_environment_settings(self.base_url, {}, None, None, None)
        self._session.proxies.update(settled["proxies"])
        self._session.verify = settled["verify"]
        self._session.trust_env = False

    def create_transaction(
        self, gateway_order_id: str, amount: int, *, email: str, item_name: str
    ) -> Transaction:
        """Open a Snap payment. A taken order id is a :class:`GatewayRejected`: callers use a fresh id
        per attempt, so a retry after a timeout never collides with the attempt that did get through."""
        require_rupiah(amount)
        body = {
            "transaction_details": {"order_id": gateway_order_id, "gross_amount": amount},
            "customer_details": {"email": email},
            "item_details": [
                {"id": "e-meterai", "price": amount, "quantity": 1, "name": item_name[:_ITEM_NAME_MAX]}
            ],
        }
        if self.payment_window_minutes:
            body["expiry"] = {"unit": "minute", "duration": self.payment_window_minutes}
        response, payload = self._call("POST", "/snap/v1/transactions", gateway_order_id, json=body)
        if response.status_code not in _SNAP_CREATED:
            raise GatewayRejected(
                _message(payload, f"create transaction answered HTTP {response.status_code}"),
                code="gateway_rejected",
            )
        token, redirect_url = self._fields(payload, "token", "redirect_url", gateway_order_id)
        return Transaction(gateway_order_id=gateway_order_id, token=token, redirect_url=redirect_url)

    def get_status(self, gateway_order_id: str) -> GatewayStatus | None:
        """The gateway's current view of the order, or None if it has never heard of it."""
        response, payload = self._call("GET", f"/v2/{gateway_order_id}/status", gateway_order_id)
        code = _body_status_code(payload)
        if response.status_code == 404 or code == "404":
            return None
        self._raise_for_failure(response.status_code, code, payload, gateway_order_id)
        if response.status_code >= 300 or not isinstance(payload, dict):
            raise GatewayRejected(_message(payload, f"status query answered HTTP {response.status_code}"))
        try:
            va_bank, va_number = _virtual_account(payload)
            return GatewayStatus(
                gateway_order_id=str(payload.get("order_id") or gateway_order_id),
                transaction_status=str(payload["transaction_status"]),
                status_code=code or str(response.status_code),
                gross_amount=parse_gross_amount(str(payload["gross_amount"])),
                payment_type=_optional_text(payload.get("payment_type")),
                transaction_id=_optional_text(payload.get("transaction_id")),
                fraud_status=_optional_text(payload.get("fraud_status")),
                va_bank=va_bank,
                va_number=va_number,
            )
        except (KeyError, ValueError) as exc:
            raise GatewayRejected(
                f"Unexpected status answer for {gateway_order_id}: {exc}", code="gateway_bad_response"
            ) from exc

    def refund(self, gateway_order_id: str, *, refund_key: str, amount: int, reason: str) -> RefundResult:
        """Refund ``amount``. Safe to repeat with the same ``refund_key``: the gateway refunds once.

        Body codes 400/401/403 are our mistake (:class:`GatewayRejected`); any other 4xx code, e.g.
        ``"412"`` for a virtual-account payment, means "not refundable by API" -> ``refunded=False``.
        """
        body = {"refund_key": refund_key, "amount": require_rupiah(amount), "reason": reason}
        response, payload = self._call("POST", f"/v2/{gateway_order_id}/refund", gateway_order_id, json=body)
        code = _body_status_code(payload) or str(response.status_code)
        message = _message(payload, f"HTTP {response.status_code}")
        if response.status_code < 300 and code.startswith("2"):
            return RefundResult(refunded=True, refund_key=refund_key, status_code=code, message=message)
        self._raise_for_failure(response.status_code, code, payload, gateway_order_id)
        log_event(log, "gateway_refund_refused", logging.WARNING,
                  gateway_order_id=gateway_order_id, status_code=code)
        return RefundResult(refunded=False, refund_key=refund_key, status_code=code, message=message)

    def expire_transaction(self, gateway_order_id: str) -> CloseResult:
        """Close an unpaid transaction so it can no longer be paid (``POST /v2/<id>/expire``)."""
        return self._close(gateway_order_id, "expire")

    def cancel_transaction(self, gateway_order_id: str) -> CloseResult:
        """Cancel an unpaid transaction (``POST /v2/<id>/cancel``)."""
        return self._close(gateway_order_id, "cancel")

    def list_captures(self, start: datetime, end: datetime) -> list[GatewayCapture]:
        """Every capture in ``[start, end)``, from the stand-in's ``GET /sandbox/captures``. Midtrans has
        no such API: a gateway that answers 404 raises :class:`GatewayRejected` (``no_capture_list``) and
        its settlement report must be read instead."""
        params = {"from": start.isoformat(), "to": end.isoformat()}
        response, payload = self._call("GET", "/sandbox/captures", "-", params=params)
        if response.status_code == 404:
            raise GatewayRejected("This gateway has no API listing its captures (Midtrans has none): use its "
                                  "settlement report.", code="no_capture_list")
        self._raise_for_failure(response.status_code, _body_status_code(payload), payload, "-")
        if response.status_code >= 300 or not isinstance(payload, dict) or not isinstance(
                payload.get("captures"), list):
            raise GatewayRejected(_message(payload, f"capture list answered HTTP {response.status_code}"),
                                  code="gateway_bad_response")
        try:
            return [GatewayCapture(
                gateway_order_id=str(c["order_id"]), gross_amount=parse_gross_amount(str(c["gross_amount"])),
                transaction_status=str(c["transaction_status"]), payment_type=_optional_text(c.get("payment_type")),
                transaction_id=_optional_text(c.get("transaction_id")),
                captured_at=datetime.fromisoformat(c["captured_at"]) if c.get("captured_at") else None,
                refunded=parse_gross_amount(str(c.get("refund_amount") or "0")),
            ) for c in payload["captures"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise GatewayRejected(f"Unexpected capture list: {exc}", code="gateway_bad_response") from exc

    def _close(self, gateway_order_id: str, how: str) -> CloseResult:
        response, payload = self._call("POST", f"/v2/{gateway_order_id}/{how}", gateway_order_id)
        code = _body_status_code(payload) or str(response.status_code)
        message = _message(payload, f"HTTP {response.status_code}")
        status = _optional_text(payload.get("transaction_status")) if isinstance(payload, dict) else None
        if response.status_code == 404 or code == "404":
            return CloseResult(closed=False, status_code="404", message=message)
        self._raise_for_failure(response.status_code, code, payload, gateway_order_id)
        # Midtrans answers an expiry with body code 407 and a cancel with 200; both say it is closed.
        closed = response.status_code < 300 and code in ("200", "407") and status in ("expire", "cancel")
        if not closed:
            log_event(log, "gateway_close_refused", gateway_order_id=gateway_order_id, how=how,
                      status_code=code)
        return CloseResult(closed=closed, status_code=code, message=message, transaction_status=status)

    # --- plumbing ---

    def _call(
        self, method: str, path: str, gateway_order_id: str, **kwargs: Any
    ) -> tuple[requests.Response, Any]:
        return self._breaker.call(lambda: self._send(method, path, gateway_order_id, **kwargs))

    def _send(
        self, method: str, path: str, gateway_order_id: str, **kwargs: Any
    ) -> tuple[requests.Response, Any]:
        """One HTTP exchange. Network trouble and 5xx/429 become :class:`GatewayUnavailable` here, the
        only place that knows about ``requests``."""
        try:
            response = self._session.request(method, self.base_url + path, timeout=self.timeout, **kwargs)
        except requests.Timeout as exc:
            raise self._unavailable(gateway_order_id, path, "timeout") from exc
        except requests.RequestException as exc:
            raise self._unavailable(gateway_order_id, path, type(exc).__name__) from exc
        if _is_unavailable_code(response.status_code):
            raise self._unavailable(gateway_order_id, path, f"http_{response.status_code}")
        if response.status_code in (401, 403):
            raise GatewayRejected(
                f"Payment gateway refused our credentials (HTTP {response.status_code}).",
                code="gateway_auth_failed",
            )
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if payload is None and response.status_code < 300:
            # A 2xx without JSON is a proxy or a half-deployed gateway, not an answer.
            raise self._unavailable(gateway_order_id, path, "non_json_answer")
        return response, payload

    def _unavailable(self, gateway_order_id: str, path: str, reason: str) -> GatewayUnavailable:
        log_event(log, "gateway_unavailable", logging.WARNING,
                  gateway_order_id=gateway_order_id, path=path.split("/")[-1], reason=reason)
        return GatewayUnavailable(f"Payment gateway unavailable ({reason}).")

    def _raise_for_failure(
        self, http_status: int, code: str | None, payload: Any, gateway_order_id: str
    ) -> None:
        """Raise for outcomes that are failures on every endpoint: a 5xx/429 reported only in the body
        (Midtrans answers HTTP 200 with ``status_code: "500"``), or a bad request / bad key."""
        if code is not None and code.isdigit() and _is_unavailable_code(int(code)):
            raise self._unavailable(gateway_order_id, "body", f"status_code_{code}")
        if code in ("401", "403"):
            raise GatewayRejected(_message(payload, f"status_code {code}"), code="gateway_auth_failed")
        if code == "400" or http_status == 400:
            raise GatewayRejected(_message(payload, "bad request"), code="gateway_rejected")

    @staticmethod
    def _fields(payload: Any, first: str, second: str, gateway_order_id: str) -> tuple[str, str]:
        if not isinstance(payload, dict) or not payload.get(first) or not payload.get(second):
            raise GatewayRejected(
                f"Gateway answer for {gateway_order_id} lacks {first}/{second}.", code="gateway_bad_response"
            )
        return str(payload[first]), str(payload[second])


def _optional_text(value: object) -> str | None:
    return None if value is None or value == "" else str(value)


def _virtual_account(payload: dict[str, Any]) -> tuple[str | None, str | None]:
    """(bank, number) of a bank-transfer payment, from whichever field Midtrans uses for that bank."""
    numbers = payload.get("va_numbers")
    if isinstance(numbers, list) and numbers and isinstance(numbers[0], dict):
        return _optional_text(numbers[0].get("bank")), _optional_text(numbers[0].get("va_number"))
    if payload.get("permata_va_number"):
        return "permata", _optional_text(payload["permata_va_number"])
    if payload.get("bill_key"):  # Mandiri bill payment: biller code + bill key
        return "mandiri", f"{payload.get('biller_code', '')}{payload['bill_key']}"
    return None, None


# --- factory ---------------------------------------------------------------------------------------

def _midtrans_from_settings(settings: Any) -> PaymentGateway:
    breaker = breaker_for(
        settings.gateway_url.rstrip("/"),
        int(getattr(settings, "gateway_breaker_threshold", 5)),
        float(getattr(settings, "gateway_breaker_cooldown_seconds", 30.0)),
    )
    return MidtransGateway(
        settings.gateway_url, settings.gateway_server_key, settings.gateway_timeout_seconds,
        breaker=breaker,
        payment_window_minutes=max(1, int(getattr(settings, "payment_timeout_seconds", 86400)) // 60),
    )


_PROVIDERS: dict[str, Callable[[Any], PaymentGateway]] = {"midtrans": _midtrans_from_settings}


def gateway_from_settings(settings: Any) -> PaymentGateway:
    """The configured gateway. Only Midtrans exists; the stand-in speaks its protocol, so using the
    stand-in is just another ``gateway_url``. ``settings.gateway_provider`` (default ``"midtrans"``)
    picks the implementation once there is more than one."""
    provider = str(getattr(settings, "gateway_provider", "midtrans") or "midtrans").lower()
    try:
        factory = _PROVIDERS[provider]
    except KeyError:
        raise ValueError(f"unknown payment gateway provider: {provider!r}") from None
    return factory(settings)
