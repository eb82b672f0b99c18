"""``python -m shared.devtools.standin``: serve the stand-in gateway, configured like every other process.

It listens on ``GATEWAY_PORT``, posts notifications to ``NOTIFICATION_URL``, retries each delivery after
``STANDIN_NOTIFICATION_RETRY_DELAYS`` seconds, and keeps its state in ``STANDIN_SCHEMA`` of
``STANDIN_DATABASE_URL`` (default ``DATABASE_URL``). Without ``DEVELOPMENT=1`` it refuses to start (exit 2).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from shared.devtools.standin.app import create_standin_app, parse_delays
from shared.logs import log_event

log = logging.getLogger("shared.devtools.standin")

REFUSAL = ("The stand-in payment gateway is a sandbox: it takes no money, and its sandbox endpoints let "
           "anyone pay for stamps and read buyers' details. It starts only with DEVELOPMENT=1 (a "
           "development machine, tests, drills); production uses the real gateway (GATEWAY_URL).")


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the stand-in with werkzeug's threaded server, configured like every other process."""
    from shared.config import get_settings
    from werkzeug.serving import run_simple

    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not settings.development:
        log_event(log, "standin_refused", logging.ERROR, reason="DEVELOPMENT is not 1")
        print(f"python -m shared.devtools.standin: {REFUSAL}", file=sys.stderr)
        raise SystemExit(2)
    parser = argparse.ArgumentParser(prog="python -m shared.devtools.standin",
                                     description="Stand-in Midtrans payment gateway (a sandbox).")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=settings.gateway_port)
    parser.add_argument("--seed", type=int, default=None, help="seed for injected faults")
    parser.add_argument("--notification-retry-delays", type=parse_delays, default=None,
                        help="seconds between notification delivery attempts, comma-separated "
                             "(default STANDIN_NOTIFICATION_RETRY_DELAYS)")
    args = parser.parse_args(argv)
    try:
        delays = args.notification_retry_delays or parse_delays(settings.standin_notification_retry_delays)
    except ValueError as exc:
        parser.error(f"STANDIN_NOTIFICATION_RETRY_DELAYS: {exc}")
    app = create_standin_app(
        settings.gateway_server_key, settings.notification_url, settings.gateway_url, sandbox=True,
        database_url=settings.standin_database_url or settings.database_url,
        schema=settings.standin_schema, seed=args.seed, notification_retry_delays=delays,
    )
    log_event(log, "standin_listening", host=args.host, port=args.port, notify=settings.notification_url,
              schema=settings.standin_schema, notification_retry_delays=list(delays))
    run_simple(args.host, args.port, app, threaded=True)


if __name__ == "__main__":
    main()
