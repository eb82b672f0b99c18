"""``meterai`` command line: migrations, the periodic jobs for cron, and the finance commands.

``meterai sweep-refunds``, ``reconcile`` and ``expire-unpaid`` run the same scans as the beat tasks, so a
cron entry can stand in for (or run beside) beat: overlapping runs split the work (``FOR UPDATE SKIP
LOCKED``) and every order moves once. ``--inline`` does the per-order gateway work in this process
instead of queueing it, for a machine without workers or for looking at outcomes by hand.

``meterai reconcile`` asks the gateway about every transaction due for a look (the watch of every
transaction we opened); ``meterai expire-unpaid`` closes orders past their payment deadline and expires
checkouts past theirs.

Finance: ``meterai manual-refunds`` lists the refunds to pay out by hand (``--csv FILE`` exports them),
``meterai mark-refund-paid ID --reference REF`` books one as paid out (ID: the order, or the gateway order
id of the refunded transaction), ``meterai ledger-report`` totals a period and exits 1 if any order's
money doesn't balance, and ``meterai gateway-reconcile`` proves every capture the gateway made in a
period has its outcome here (exit 1 if one hasn't).

Ops: ``meterai admission [auto|queue_all|paused]`` shows or switches the waiting room; ``meterai mail-retry
[--kind KIND] [--since WHEN]`` sends failed e-mails to buyers again once what failed them is fixed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from shared import statuscache
from shared.config import Settings, UnsafeSettings, get_settings, refuse_unsafe
from shared.errors import DomainError
from shared.logs import configure_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meterai")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply database migrations")
    sub.add_parser("sweep-refunds", help="refund paid orders not stamped before their deadline")
    sub.add_parser("redrive", help="re-publish due work found in PostgreSQL (after a Redis loss)")
    for name, text in (
        ("reconcile", "ask the gateway about every transaction we opened that is due for a look (until "
                      "the gateway calls it final, and PAYMENT_WATCH_SECONDS after), and apply what it says"),
        ("expire-unpaid", "expire orders unpaid after PAYMENT_TIMEOUT_SECONDS (at the gateway first) and "
                          "checkouts still open after CHECKOUT_DEADLINE_SECONDS"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("--inline", action="store_true",
                             help="call the gateway from this process instead of queueing a task per row")
        command.add_argument("--limit", type=int, default=None,
                             help="at most this many transactions or orders")
    manual = sub.add_parser("manual-refunds", help="list refunds waiting for a manual payout")
    manual.add_argument("--csv", metavar="FILE", help="write them as CSV to FILE ('-' for standard output)")
    paid = sub.add_parser("mark-refund-paid", help="book a manual refund as paid out (manual → refunded)")
    paid.add_argument("order_id", metavar="ID",
                      help="the order id, or the gateway order id of the refunded transaction (needed when "
                           "the order has more than one refund)")
    paid.add_argument("--reference", required=True, help="the bank transfer's reference")
    mail_retry = sub.add_parser(
        "mail-retry", help="send failed e-mails to buyers again (after fixing what failed them)",
        description="Puts mail_outbox rows that failed back to pending with their attempts renewed and queues "
                    "their sends; each keeps its Message-ID (and the link of an e-mail that may have arrived).")
    from shared.lifecycle import Mail  # the kinds an outbox row can be

    mail_retry.add_argument("--kind", choices=[kind.value for kind in Mail],
                            help="only e-mails of this kind")
    mail_retry.add_argument("--since", metavar="WHEN",
                            help="only rows failed from (YYYY-MM-DD or ISO date-time; WIB unless an offset is given)")
    mail_retry.add_argument("--limit", type=int, default=None, help="at most this many e-mails")
    admission = sub.add_parser("admission", help="show the waiting room, or switch it (ops)")
    admission.add_argument("mode", nargs="?", choices=["auto", "queue_all", "paused"],
                           help="auto: admit at the outflow; queue_all: everyone new waits; paused: no sales")
    report = sub.add_parser("ledger-report", help="totals for a period, and exit 1 if the ledger doesn't balance")
    report.add_argument("--from", dest="start", metavar="WHEN",
                        help="orders created from (YYYY-MM-DD or ISO date-time; WIB unless an offset is given)")
    report.add_argument("--to", dest="end", metavar="WHEN",
                        help="orders created before (a date alone includes that whole day)")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    gateway = sub.add_parser(
        "gateway-reconcile",
        help="prove every capture the gateway made in a period has its outcome here; exit 1 if one hasn't",
        description="Lists the gateway's captures for the period (from the stand-in, or from --report) and "
                    "checks each against our books: revenue, refunded, or in flight with what it waits for.")
    gateway.add_argument("--from", dest="start", metavar="WHEN", required=True,
                         help="captures from (YYYY-MM-DD or ISO date-time; WIB unless an offset is given)")
    gateway.add_argument("--to", dest="end", metavar="WHEN", required=True,
                         help="captures before (a date alone includes that whole day)")
    gateway.add_argument("--report", metavar="FILE",
                         help="the gateway's settlement report as CSV (Midtrans has no API that lists "
                              "captures); columns: " + "; ".join(f"{k}: {v}" for k, v in _report_columns()))
    gateway.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _report_columns() -> list[tuple[str, str]]:
    from shared.services.gateway_reconcile import REPORT_COLUMNS

    return list(REPORT_COLUMNS.items())


# Commands that only read (or, migrate, set up the schema): they run wherever an operator has a database
# URL. Every other command changes orders, money or the waiting room, so, like web and workers, it refuses
# to run on development defaults outside development.
READ_ONLY = frozenset({"migrate", "manual-refunds", "ledger-report", "gateway-reconcile"})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()  # the same JSON lines as web and workers (shared/logs.py)
    settings = get_settings()
    if args.command not in READ_ONLY:
        try:
            refuse_unsafe(settings, f"CLI ({args.command})")  # it moves money and orders like a worker
        except UnsafeSettings as exc:
            print(exc, file=sys.stderr)
            return 2
    statuscache.configure(settings)  # orders changed here must drop their cached status answers
    try:
        return COMMANDS[args.command](settings, args)
    except DomainError as exc:
        print(f"meterai {args.command}: {exc.message}", file=sys.stderr)
        return 2


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from shared.db.migrate import apply_migrations, migration_database_url

    # The primary itself when MIGRATE_DATABASE_URL says so: web and workers may go through a pooler.
    print(json.dumps({"applied": apply_migrations(migration_database_url(settings))}))
    return 0


def _publisher(settings: Settings) -> None:
    """What queued tasks go out through (the CLI runs no tasks, so it needs no workers' app)."""
    from shared.broker import use_broker

    use_broker(settings)


def _sweep_refunds(settings: Settings, args: argparse.Namespace) -> int:
    from shared.services import housekeeping

    _publisher(settings)
    print(json.dumps({"moved_to_refund": housekeeping.sweep_refunds(settings)}))
    return 0


def _redrive(settings: Settings, args: argparse.Namespace) -> int:
    from shared.services import housekeeping

    _publisher(settings)
    print(json.dumps({"republished": housekeeping.redrive(settings)}))
    return 0


def _payment_scan(settings: Settings, args: argparse.Namespace) -> int:
    from shared.payments.gateway import gateway_from_settings
    from shared.services import reconcile

    expiring = args.command == "expire-unpaid"
    _publisher(settings)  # inline work may still queue stamping or refunds
    extra: dict[str, Any] = {}
    if expiring:
        extra["checkouts_expired"] = len(reconcile.expire_stalled_checkouts(settings, limit=args.limit))
    if not args.inline:
        schedule = reconcile.schedule_expiry if expiring else reconcile.schedule_watch
        print(json.dumps({"queued": schedule(settings, limit=args.limit), **extra}))
        return 0
    claim = reconcile.claim_for_expiry if expiring else reconcile.claim_for_watch
    work = reconcile.expire_order if expiring else reconcile.poll_payment
    ids = claim(settings, limit=args.limit)
    outcomes = reconcile.run_inline(settings, gateway_from_settings(settings), ids, work)
    print(json.dumps({"checked": len(ids), "outcomes": outcomes, **extra}))
    return 0


def _manual_refunds(settings: Settings, args: argparse.Namespace) -> int:
    from shared.services import manual_refunds

    refunds = manual_refunds.list_manual_refunds(settings)
    if args.csv == "-":
        manual_refunds.write_csv(refunds, sys.stdout)
    elif args.csv:
        with open(args.csv, "w", encoding="utf-8", newline="") as out:
            manual_refunds.write_csv(refunds, out)
        print(f"{len(refunds)} manual refund(s) written to {args.csv}")
    else:
        from shared.services.ledger import rupiah

        for r in refunds:
            va = f" VA {r.va_bank} {r.va_number}" if r.va_number else ""
            print(f"{r.order_id}  {rupiah(r.amount_idr):>10}  {r.payment_type or '-'}{va}  {r.buyer_email}"
                  f"  since {r.manual_since:%Y-%m-%d %H:%M %Z}  {r.refund_reason}: {r.why_manual or '-'}")
        total = sum(r.amount_idr for r in refunds)
        print(f"{len(refunds)} manual refund(s), {rupiah(total)} to pay out")
    return 0


def _mark_refund_paid(settings: Settings, args: argparse.Namespace) -> int:
    from shared.services import manual_refunds

    outcome = manual_refunds.mark_paid_out(settings, args.order_id, args.reference)
    print(json.dumps({"order_id": args.order_id, "outcome": outcome, "reference": args.reference.strip()}))
    return 0


def _ledger_report(settings: Settings, args: argparse.Namespace) -> int:
    from shared.services import ledger

    try:
        start = ledger.parse_bound(args.start) if args.start else None
        end = ledger.parse_bound(args.end, end=True) if args.end else None
    except ValueError as exc:
        print(f"meterai ledger-report: {exc}", file=sys.stderr)
        return 2
    report = ledger.ledger_report(settings, start, end)
    print(json.dumps(report.as_json(), indent=2) if args.json else ledger.format_report(report))
    return 0 if report.balanced else 1


def _gateway_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    from shared.payments.gateway import gateway_from_settings
    from shared.services import gateway_reconcile, ledger

    try:
        start, end = ledger.parse_bound(args.start), ledger.parse_bound(args.end, end=True)
    except ValueError as exc:
        print(f"meterai gateway-reconcile: {exc}", file=sys.stderr)
        return 2
    if args.report:
        try:
            with open(args.report, encoding="utf-8-sig", newline="") as stream:
                captures = gateway_reconcile.read_settlement_report(stream, start, end)
        except (OSError, gateway_reconcile.ReportError) as exc:
            print(f"meterai gateway-reconcile: {args.report}: {exc}", file=sys.stderr)
            return 2
        source = f"report {args.report}"
    elif not settings.development:
        print("meterai gateway-reconcile: Midtrans has no API that lists captures; download the settlement "
              "report for the period from its dashboard and pass it with --report FILE.", file=sys.stderr)
        return 2
    else:
        captures = gateway_from_settings(settings).list_captures(start, end)
        source = f"gateway {settings.gateway_url}"
    report = gateway_reconcile.reconcile_captures(settings, captures, start=start, end=end, source=source)
    print(json.dumps(report.as_json(), indent=2, default=str) if args.json
          else gateway_reconcile.format_gateway_report(report))
    return 0 if report.ok else 1


def _mail_retry(settings: Settings, args: argparse.Namespace) -> int:
    from shared.services import ledger, mail

    try:
        since = ledger.parse_bound(args.since) if args.since else None
    except ValueError as exc:
        print(f"meterai mail-retry: {exc}", file=sys.stderr)
        return 2
    _publisher(settings)
    queued = mail.requeue_failed(settings, kind=args.kind, since=since, limit=args.limit)
    print(json.dumps({"requeued": len(queued), "mails": [{"order_id": o, "kind": k} for o, k in queued]}))
    return 0


def _admission(settings: Settings, args: argparse.Namespace) -> int:
    from shared.admission import AdmissionController, Mode
    from shared.redisconn import redis_client

    controller = AdmissionController(settings, redis_client(settings.redis_url, timeout=5,
                                                            sentinel_password=settings.redis_sentinel_password))
    if args.mode:
        import getpass
        import logging
        import os

        from shared.logs import log_event

        before = controller.mode()
        controller.set_mode(Mode(args.mode))
        log_event(logging.getLogger("meterai.cli"), "admission_mode_changed", logging.WARNING, mode=args.mode,
                  previous=before.value, user=getpass.getuser(), host=os.uname().nodename, via="cli")
    print(json.dumps({"mode": controller.mode().value, "outflow_per_minute": controller.outflow_per_minute()}))
    return 0


COMMANDS: dict[str, Any] = {
    "migrate": _migrate,
    "sweep-refunds": _sweep_refunds,
    "redrive": _redrive,
    "reconcile": _payment_scan,
    "expire-unpaid": _payment_scan,
    "manual-refunds": _manual_refunds,
    "mark-refund-paid": _mark_refund_paid,
    "ledger-report": _ledger_report,
    "gateway-reconcile": _gateway_reconcile,
    "admission": _admission,
    "mail-retry": _mail_retry,
}


if __name__ == "__main__":
    sys.exit(main())
