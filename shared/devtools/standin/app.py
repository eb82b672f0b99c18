"""The stand-in gateway as a Flask app, and only ever as a sandbox.

Its sandbox endpoints let anyone "pay" for stamps and read buyers' e-mails, virtual-account numbers and
signed notifications: it is a free-stamps machine if it ever faces buyers. So :func:`create_standin_app`
must be asked for a sandbox in so many words, and ``python -m shared.devtools.standin`` starts only with
``DEVELOPMENT=1``.
"""
from __future__ import annotations

from typing import Sequence

from flask import Flask

from shared.devtools.standin.protocol import register_protocol
from shared.devtools.standin.sandbox import register_sandbox
from shared.devtools.standin.store import DEFAULT_SCHEMA
from shared.devtools.standin.transactions import StandinGateway


class NotASandbox(RuntimeError):
    """The stand-in was asked to start without being configured as a sandbox."""


def create_standin_app(
    server_key: str,
    notification_url: str,
    public_url: str,
    *,
    sandbox: bool,
    database_url: str,
    schema: str = DEFAULT_SCHEMA,
    seed: int | None = None,
    notification_retry_delays: Sequence[float] = (0.5, 2.0, 5.0),
    notification_timeout: float = 5.0,
) -> Flask:
    """The stand-in gateway as a Flask app, its state in ``schema`` of ``database_url`` (created and
    migrated here). ``public_url`` is where buyers' browsers reach it (used in ``redirect_url``);
    ``seed`` makes injected faults reproducible. Notifications a previous run left undelivered are
    sent again. ``app.extensions["standin_gateway"].close()`` releases the database.

    ``sandbox=True`` is required, and says the caller knows what this is: its sandbox endpoints let
    anyone "pay" for stamps, and read buyers' e-mails, virtual-account numbers and signed notifications.
    """
    if sandbox is not True:
        raise NotASandbox("the stand-in gateway starts only as a sandbox (sandbox=True): its sandbox "
                          "endpoints take no money and hand out paid stamps")
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    gateway = StandinGateway(
        server_key, notification_url, public_url, database_url=database_url, schema=schema, seed=seed,
        notification_retry_delays=notification_retry_delays, notification_timeout=notification_timeout,
    )
    app.extensions["standin_gateway"] = gateway
    register_protocol(app, gateway)
    register_sandbox(app, gateway)
    gateway.resume_deliveries()
    gateway.start_settling()
    return app


def parse_delays(text: str) -> tuple[float, ...]:
    """``"0.5,2,5"`` -> ``(0.5, 2.0, 5.0)``: seconds before each further delivery attempt."""
    delays = tuple(float(part) for part in text.split(",") if part.strip())
    if not delays or any(d < 0 or d != d for d in delays):
        raise ValueError(f"not a list of non-negative seconds: {text!r}")
    return delays
