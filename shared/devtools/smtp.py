"""A private SMTP server (aiosmtpd) that keeps what it receives: the tests' mailbox and ``./dev up``'s.

The tests run one per session in their own process (:class:`Mailbox`) and read the messages the mail
workers sent, as a buyer's mail server would have received them; a test can stop it (an SMTP outage) and
start it again on the same port. ``python -m shared.devtools.smtp`` (``Procfile.dev``'s ``mailbox``)
serves the same for ``./dev up``: each message is written to ``<DATA_DIR>/mail/`` as a ``.eml`` file and
summed up in one line, with the link it carries, so a developer can follow it. Development only: it
refuses to start without ``DEVELOPMENT=1``, and production code never imports it.
"""
from __future__ import annotations

import argparse
import email
import email.policy
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Sequence

from aiosmtpd.controller import Controller

DEFAULT_DEV_PORT = 8025
_LINK = re.compile(r"https?://[^\s\"'<>]+/pesanan/[^\s\"'<>]+")


def parse(raw: bytes) -> EmailMessage:
    """A received message, parsed with the modern policy (``get_body``, decoded headers)."""
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


def body_text(message: EmailMessage, subtype: str = "plain") -> str:
    part = message.get_body(preferencelist=(subtype,))
    return part.get_content() if part is not None else ""


def order_link(message: EmailMessage) -> str:
    """The order page link in a message's plain-text part (``…/pesanan/<id>#t=<token>``)."""
    found = _LINK.search(body_text(message))
    if found is None:
        raise ValueError(f"no order page link in {message['Subject']!r}")
    return found.group(0)


class _Handler:
    def __init__(self, on_message: Callable[[bytes, str, list[str]], None]) -> None:
        self.on_message = on_message

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.on_message(bytes(envelope.original_content or envelope.content), envelope.mail_from,
                        list(envelope.rcpt_tos))
        return "250 Message accepted for delivery"


class Mailbox:
    """An SMTP server on ``host:port`` that keeps every message it accepts (and, with ``folder``, writes
    each there as a ``.eml``). :meth:`stop` and :meth:`start` again keep the port and the messages."""

    def __init__(self, port: int, host: str = "127.0.0.1", folder: Path | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.host, self.port, self.folder, self.echo = host, port, folder, echo
        self._controller: Controller | None = None
        self._lock = threading.Lock()
        self._received: list[tuple[bytes, str, list[str]]] = []

    # -- the server ----------------------------------------------------------------------------------
    def start(self) -> "Mailbox":
        if self._controller is None:
            controller = Controller(_Handler(self._keep), hostname=self.host, port=self.port)
            controller.start()
            self._controller = controller
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def env(self) -> dict[str, str]:
        """The settings that point the mail workers here."""
        return {"SMTP_HOST": self.host, "SMTP_PORT": str(self.port), "SMTP_SECURITY": "none",
                "SMTP_USERNAME": "", "SMTP_PASSWORD": ""}

    def _keep(self, raw: bytes, sender: str, recipients: list[str]) -> None:
        with self._lock:
            self._received.append((raw, sender, recipients))
            count = len(self._received)
        message = parse(raw)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            (self.folder / f"{stamp}-{count:05d}.eml").write_bytes(raw)
        if self.echo is not None:
            try:
                link = order_link(message)
            except ValueError:
                link = "-"
            self.echo(f"mail to {', '.join(recipients)}: {message['Subject']} {link}")

    # -- what arrived ----------------------------------------------------------------------------------
    def messages(self, to: str | None = None) -> list[EmailMessage]:
        """Every message received so far (to ``to`` only, if given), oldest first."""
        with self._lock:
            received = list(self._received)
        return [parse(raw) for raw, _, recipients in received
                if to is None or to.lower() in (r.lower() for r in recipients)]

    def clear(self) -> None:
        with self._lock:
            self._received.clear()

    def wait_for(self, predicate: Callable[[list[EmailMessage]], Any], timeout: float = 30.0,
                 message: str = "mail") -> Any:
        """Poll :meth:`messages` until ``predicate(messages)`` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self.messages())
            if value:
                return value
            if time.monotonic() > deadline:
                subjects = [m["Subject"] for m in self.messages()]
                raise AssertionError(f"timed out after {timeout}s waiting for {message}; received: {subjects}")
            time.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m shared.devtools.smtp``: the development mailbox of ``./dev up``."""
    parser = argparse.ArgumentParser(prog="python -m shared.devtools.smtp",
                                     description="Development mailbox: keeps every e-mail as a .eml file.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("SMTP_PORT") or DEFAULT_DEV_PORT))
    parser.add_argument("--dir", type=Path,
                        default=Path(os.environ.get("DATA_DIR") or ".data") / "mail")
    args = parser.parse_args(argv)
    if os.environ.get("DEVELOPMENT") != "1":
        print("python -m shared.devtools.smtp: the development mailbox keeps buyers' e-mails (and their "
              "access links) in a folder; it starts only with DEVELOPMENT=1", file=sys.stderr)
        raise SystemExit(2)
    mailbox = Mailbox(args.port, args.host, folder=args.dir.resolve(), echo=lambda line: print(line, flush=True))
    mailbox.start()
    print(f"development mailbox on smtp://{args.host}:{args.port}, writing to {args.dir.resolve()}", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    mailbox.stop()


if __name__ == "__main__":
    main()
