"""``meterai`` command line: migrations, and the periodic jobs for cron.

``meterai sweep-refunds`` runs the same sweep as the beat task, so a cron entry can stand in for (or run
beside) beat: overlapping runs split the work and refund each order once.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from shared.config import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meterai")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply database migrations")
    sub.add_parser("sweep-refunds", help="refund paid orders not stamped before their deadline")
    sub.add_parser("redrive", help="re-publish due work found in PostgreSQL (after a Redis loss)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()

    if args.command == "migrate":
        from shared.db.migrate import apply_migrations

        print(json.dumps({"applied": apply_migrations(settings.database_url)}))
        return 0

    from workers.celery_app import make_celery_app
    from shared.services import housekeeping

    make_celery_app(settings)  # the publisher the refund tasks go out through
    if args.command == "sweep-refunds":
        print(json.dumps({"moved_to_refund": housekeeping.sweep_refunds(settings)}))
    else:
        print(json.dumps({"republished": housekeeping.redrive(settings)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
