"""Benchmark: what handing one e-mail to the SMTP server costs the mail worker, a session per e-mail
against the session kept per thread (``shared/services/mail.py``, SMTP_SESSION_MESSAGES), in the clear and
over STARTTLS with the certificate verified as production verifies it.

Every order sends two e-mails; before sessions were kept, each one connected, said EHLO (with STARTTLS: a
TLS handshake and EHLO again) and QUIT. This sends the receipt e-mail ``--count`` times per case from this
process to an aiosmtpd mailbox in a process of its own (``--serve``, what ``./dev up`` and the tests run),
the four cases interleaved in ``--rounds`` rounds, and prints this process's CPU per e-mail (the mail
worker's side: what is ours) and the mailbox's (the relay's side, not ours), medians of the rounds.

    python -m loadtests.bench.smtp [--count 300] [--rounds 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

CASES = (("none", 1), ("none", 0), ("starttls", 1), ("starttls", 0))  # (security, messages per session; 0: kept)


def _serve(plain_port: int, tls_port: int, cert: str, key: str) -> None:
    """The mailbox: in the clear on ``plain_port``, STARTTLS offered (and required) on ``tls_port``."""
    from shared.devtools.smtp import Mailbox

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    boxes = [Mailbox(plain_port).start(), Mailbox(tls_port, tls_context=context).start()]
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    print("ready", flush=True)
    stopped.wait()
    for box in boxes:
        box.stop()


def _label(security: str, per_session: int) -> str:
    return f"{security}, {'a session per e-mail' if per_session == 1 else 'session kept'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench.smtp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="e-mails per case per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", nargs=4, metavar=("PORT", "TLS_PORT", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(int(args.serve[0]), int(args.serve[1]), args.serve[2], args.serve[3])
        return 0

    from loadtests.stack import REPORTS, cpu_seconds_of, say, workdir_for
    from shared.config import load_settings
    from shared.devtools.services import free_port
    from shared.devtools.tlscert import make_server_cert
    from shared.lifecycle import Mail
    from shared.services import mail

    workdir = workdir_for("bench-smtp")
    cert = make_server_cert(workdir / "tls")
    os.environ["SSL_CERT_FILE"] = str(cert.ca)  # the client verifies the mailbox's certificate against it
    mail._tls_context.cache_clear()
    plain_port, tls_port = free_port(), free_port()
    root = Path(__file__).resolve().parents[2]
    server = subprocess.Popen([sys.executable, "-m", "loadtests.bench.smtp", "--serve", str(plain_port), str(tls_port),
                               str(cert.cert), str(cert.key)], cwd=root, env={**os.environ, "DEVELOPMENT": "1"},
                              stdout=subprocess.PIPE, text=True)
    results: dict[str, dict[str, list[float]]] = {
        _label(*case): {"ours": [], "mailbox": []} for case in CASES}
    try:
        if server.stdout is None or server.stdout.readline().strip() != "ready":
            raise RuntimeError("the mailbox did not start")
        base = dataclasses.replace(load_settings({"DEVELOPMENT": "1"}), smtp_host="127.0.0.1")
        facts = mail.Facts(order_id="1b4e28ba-2fa1-11d2-883f-0016d3cca427", email="pelamar@example.id",
                           amount=10900, link="https://meterai.example.id/pesanan/1b4e28ba#t=abc")
        message = mail.compose(base, Mail.RECEIPT, facts)
        for number in range(1, args.rounds + 1):
            for security, per_session in CASES:
                settings = dataclasses.replace(base, smtp_security=security,
                                               smtp_port=tls_port if security == "starttls" else plain_port,
                                               smtp_session_messages=per_session or base.smtp_session_messages)
                mail.deliver(settings, message)  # warm: the TLS context, the first session
                served = cpu_seconds_of(server.pid)
                started = time.process_time()
                for _ in range(args.count):
                    mail.deliver(settings, message)
                ours = time.process_time() - started
                theirs = cpu_seconds_of(server.pid) - served
                label = _label(security, per_session)
                results[label]["ours"].append(1000 * ours / args.count)
                results[label]["mailbox"].append(1000 * theirs / args.count)
                say(f"round {number}, {label}: ours {1000 * ours / args.count:.3f} ms, mailbox "
                    f"{1000 * theirs / args.count:.3f} ms per e-mail")
                if mail._kept.smtp is not None:  # the next case starts with no session
                    mail._end(mail._kept.smtp)
                    mail._kept.smtp = None
    finally:
        server.terminate()
        server.wait(timeout=30)
    print()
    print(f"CPU ms per e-mail handed over (median of {args.rounds} rounds of {args.count}):")
    print(f"  {'case':<38} {'ours':>7} {'mailbox':>8}")
    medians = {}
    for label, figures in results.items():
        medians[label] = {k: statistics.median(v) for k, v in figures.items()}
        print(f"  {label:<38} {medians[label]['ours']:7.3f} {medians[label]['mailbox']:8.3f}")
    for security in ("none", "starttls"):
        fresh, kept = (medians[_label(security, n)]["ours"] for n in (1, 0))
        print(f"  {security}: a session per e-mail / kept = {fresh / kept:.2f}")
    out = {"benchmark": "smtp", "command": "python -m loadtests.bench.smtp " + " ".join(argv or sys.argv[1:]),
           "when": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": vars(args), "median_ms": medians,
           "rounds": results}
    (REPORTS / "bench").mkdir(parents=True, exist_ok=True)
    (REPORTS / "bench" / "smtp.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
