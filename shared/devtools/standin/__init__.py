"""The stand-in payment gateway: a separate process that speaks the Midtrans Core/Snap protocol.

Why it exists: tests, load drills and the demo need a gateway that behaves like Midtrans on the wire
(HTTP Basic with the server key, ``"12500.00"`` amounts, SHA512-signed notifications, refunds idempotent
by ``refund_key``, virtual accounts that can't be refunded by API) *and* that can be made to misbehave
on demand: latency, 500s, timeouts, dropped, duplicated and out-of-order notifications, refused refunds.
Our adapter (:mod:`shared.payments.gateway`) can't tell it from the real thing except by ``GATEWAY_URL``.

A card payment is ``capture`` until it settles (``card_settlement_seconds`` later, a day by default, or at
once with ``POST /sandbox/settle/<order_id>``): like Midtrans, a capture can't be refunded, only voided
with ``/cancel``, and a settled payment can't be voided, only refunded.

The modules, by job: :mod:`.app` (the Flask app, a sandbox only), :mod:`.__main__` (the process),
:mod:`.protocol` and :mod:`.sandbox` (the endpoints), :mod:`.transactions` (the gateway's behaviour),
:mod:`.delivery` (notifications), :mod:`.faults` (the fault knobs), :mod:`.records` (what a transaction
is and how Midtrans shows it), :mod:`.store` (its own PostgreSQL schema; migrations in ``migrations/``).
State is durable: a restarted stand-in still knows every transaction, answers a repeated ``refund_key``
with the first answer, and resumes notifications it had not delivered yet. Fault knobs are per process
and start cleared: a restart is a healthy gateway.
"""
from shared.devtools.standin.app import NotASandbox, create_standin_app

__all__ = ["NotASandbox", "create_standin_app"]
