"""The stand-in's sandbox endpoints: they stand for the buyer, the banks and the test harness (no auth).

``GET /snap/v2/vtweb/<token>`` (the pay page), ``POST /sandbox/pay/<order_id>`` (``{"payment_type": …,
"after_expiry": true}`` is a bank settling after the gateway expired the transaction), ``POST
/sandbox/expire/<order_id>`` (the gateway's own expiry), ``POST /sandbox/notify/<order_id>`` (re-send;
``{"transaction_status": "pending"}`` sends a stale one, for out-of-order drills), ``POST
/sandbox/settle/<order_id>`` (a card capture settles now), ``GET|POST|DELETE /sandbox/faults``, ``GET
/sandbox/transactions/<order_id>``, and ``GET /sandbox/captures?from=&to=`` (HTTP Basic: it is the
merchant's list of captures, what Midtrans offers only as a settlement report file).
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Flask, Response, jsonify, request
from markupsafe import escape

from shared.devtools.standin.protocol import authorized, json_answer, json_error
from shared.devtools.standin.records import NOT_FOUND, PAYMENT_TYPES, VA_BANKS
from shared.devtools.standin.transactions import StandinGateway

PAY_PAGE = """<!doctype html>
<html lang="id"><head><meta charset="utf-8"><title>Pembayaran (simulasi)</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; max-width: 28rem; margin: 2rem auto">
<h1>Pembayaran e-Meterai</h1>
<p><small>Gateway simulasi untuk demo &mdash; tidak ada uang sungguhan yang berpindah.</small></p>
<p>Nomor pesanan: <code>{order_id}</code><br>Total: <strong>{amount}</strong><br>Status: {status}</p>
{form}
</body></html>"""

PAY_FORM = """<form method="post" action="/sandbox/pay/{order_id}">
<label>Metode pembayaran
<select name="payment_type">
<option value="qris">QRIS</option><option value="gopay">GoPay</option>
<option value="shopeepay">ShopeePay</option>
<option value="credit_card">Kartu kredit</option><option value="bank_transfer">Transfer bank (VA)</option>
</select></label>
<button type="submit">Bayar sekarang</button>
</form>"""

STATUS_WORDS = {
    "pending": "menunggu pembayaran", "settlement": "lunas", "capture": "lunas", "expire": "kedaluwarsa",
    "refund": "dana dikembalikan", "partial_refund": "dana dikembalikan sebagian",
    "cancel": "dibatalkan", "deny": "ditolak",
}


def _rupiah(amount: int) -> str:
    return "Rp" + f"{amount:,}".replace(",", ".")


def _html(text: str, status: int = 200) -> Response:
    return Response(text, status=status, mimetype="text/html")


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"))


def register_sandbox(app: Flask, gateway: StandinGateway) -> None:
    @app.get("/snap/v2/vtweb/<token>")
    def pay_page(token: str) -> Response:
        tx = gateway.order_for_token(token)
        if tx is None:
            return _html("<p>Tautan pembayaran tidak ditemukan.</p>", 404)
        form = PAY_FORM.format(order_id=escape(tx.order_id)) if tx.transaction_status == "pending" else ""
        return _html(PAY_PAGE.format(
            order_id=escape(tx.order_id), amount=_rupiah(tx.gross_amount),
            status=STATUS_WORDS.get(tx.transaction_status, tx.transaction_status), form=form,
        ))

    @app.post("/sandbox/pay/<order_id>")
    def sandbox_pay(order_id: str) -> Response:
        from_form = not request.is_json
        body = request.form if from_form else (request.get_json(silent=True) or {})
        payment_type = body.get("payment_type") or "qris"
        if payment_type not in PAYMENT_TYPES:
            return json_error(400, f"payment_type must be one of {', '.join(PAYMENT_TYPES)}")
        bank = body.get("bank") or "bca"
        if bank not in VA_BANKS:
            return json_error(400, f"bank must be one of {', '.join(VA_BANKS)}")
        outcome, status_body, deliveries = gateway.pay(
            order_id, payment_type, bank=bank, after_expiry=_truthy(body.get("after_expiry")))
        gateway.send(deliveries)
        if from_form:
            return _pay_outcome_page(outcome)
        return _sandbox_answer(outcome, status_body)

    @app.post("/sandbox/expire/<order_id>")
    def sandbox_expire(order_id: str) -> Response:
        outcome, status_body, deliveries = gateway.expire(order_id)
        gateway.send(deliveries)
        return _sandbox_answer(outcome, status_body)

    @app.post("/sandbox/notify/<order_id>")
    def sandbox_notify(order_id: str) -> Response:
        status = (request.get_json(silent=True) or {}).get("transaction_status")
        outcome, deliveries = gateway.renotify(order_id, status)
        if outcome == "bad_status":
            return json_error(400, f"unknown transaction_status: {status}")
        gateway.send(deliveries)
        if outcome == "not_found":
            return json_error(404, NOT_FOUND["status_message"])
        first = deliveries[0].body if deliveries else None
        return json_answer(202, {"queued": len(deliveries), "notification": first})

    @app.post("/sandbox/settle/<order_id>")
    def sandbox_settle(order_id: str) -> Response:
        outcome, status_body, deliveries = gateway.settle(order_id)
        gateway.send(deliveries)
        return _sandbox_answer(outcome, status_body)

    @app.get("/sandbox/captures")
    def sandbox_captures() -> Response:
        if not authorized(gateway.server_key):
            return json_error(401, "Unknown Merchant server_key/id")
        try:
            start, end = (_moment(request.args.get(name, "")) for name in ("from", "to"))
        except ValueError:
            return json_error(400, "from and to must be ISO 8601 date-times with an offset")
        if end <= start:
            return json_error(400, "to must be later than from")
        return jsonify({"status_code": "200", "captures": gateway.captures(start, end)})

    @app.route("/sandbox/faults", methods=["GET", "POST", "DELETE"])
    def sandbox_faults() -> Response:
        if request.method == "DELETE":
            return jsonify(gateway.faults.reset())
        if request.method == "GET":
            return jsonify(gateway.faults.view())
        try:
            return jsonify(gateway.faults.set(request.get_json(silent=True)))
        except ValueError as exc:
            return json_error(400, str(exc))

    @app.get("/sandbox/transactions/<order_id>")
    def sandbox_transaction(order_id: str) -> Response:
        record = gateway.record(order_id)
        if record is None:
            return json_error(404, NOT_FOUND["status_message"])
        return jsonify(record)


def _moment(text: str) -> datetime:
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        raise ValueError("no offset")
    return moment


def _sandbox_answer(outcome: str, status_body: dict[str, Any] | None) -> Response:
    if outcome == "not_found":
        return json_error(404, NOT_FOUND["status_message"])
    return json_answer(200 if outcome == "ok" else 409, status_body or {})


def _pay_outcome_page(outcome: str) -> Response:
    if outcome == "ok":
        return _html("<p>Pembayaran berhasil. Silakan kembali ke halaman pesanan Anda.</p>")
    if outcome == "not_pending":
        return _html("<p>Transaksi ini tidak lagi menunggu pembayaran.</p>", 409)
    return _html("<p>Transaksi tidak ditemukan.</p>", 404)
