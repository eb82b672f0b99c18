"""A private SMTP server (aiosmtpd) that keeps what it receives: the tests' mailbox and ``./dev up``'s.

The tests run one per session in their own process (:class:`Mailbox`) and read the messages the mail
workers sent, as a buyer's mail server would have received them; a test can stop it (an SMTP outage) and
start it again on the same port, or make it misbehave for a while (:meth:`Mailbox.fault`: refuse a
recipient, answer late). ``python -m shared.devtools.smtp`` (``Procfile.dev``'s ``mailbox``) serves the
same for ``./dev up``: each message is written to ``<DATA_DIR>/mail/`` as a ``.eml`` file and
summed up in one line, with the link it carries, so a developer can follow it. Development only: it
refuses to start without ``DEVELOPMENT=1``, and production code never imports it.
"""
from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import os
import re
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class Fault:
    """How the mailbox misbehaves, the next ``times`` times a message to ``to`` (any, if None) reaches
    ``stage``: at ``"mail"`` (``to`` must be None: no recipient is known yet) and at ``"rcpt"`` it waits
    ``delay`` seconds, then answers ``reply`` (a refusal such as ``"554 5.7.1 relaying denied"``, or a
    ``"421"`` closing the session) or accepts; at ``"data"`` a ``reply`` refuses the message, and
    without one the message is kept and the answer comes ``delay`` seconds late (a relay that took it but
    answered after the client's timeout). ``hits`` counts the times it acted."""

    stage: str
    to: str | None = None
    reply: str | None = None
    delay: float = 0.0
    times: int = 1
    hits: int = 0


class _Handler:
    def __init__(self, on_message: Callable[[bytes, str, list[str], tuple[str, int]], None],
                 take_fault: Callable[[str, list[str]], Fault | None]) -> None:
        self.on_message = on_message
        self.take_fault = take_fault

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        fault = self.take_fault("mail", [])
        if fault is not None:
            await asyncio.sleep(fault.delay)
            if fault.reply:
                return fault.reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        fault = self.take_fault("rcpt", [address])
        if fault is not None:
            await asyncio.sleep(fault.delay)
            if fault.reply:
                return fault.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        fault = self.take_fault("data", list(envelope.rcpt_tos))
        if fault is not None and fault.reply:
            return fault.reply
        self.on_message(bytes(envelope.original_content or envelope.content), envelope.mail_from,
                        list(envelope.rcpt_tos), tuple(session.peer[:2]))
        if fault is not None:
            await asyncio.sleep(fault.delay)
        return "250 Message accepted for delivery"


class Mailbox:
    """An SMTP server on ``host:port`` that keeps every message it accepts (and, with ``folder``, writes
    each there as a ``.eml``). :meth:`stop` and :meth:`start` again keep the port and the messages."""

    def __init__(self, port: int, host: str = "127.0.0.1", folder: Path | None = None,
                 echo: Callable[[str], None] | None = None, tls_context: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.folder, self.echo = host, port, folder, echo
        self.tls_context = tls_context  # offers STARTTLS with it (and then requires it) when given
        self._controller: Controller | None = None
        self._lock = threading.Lock()
        self._received: list[tuple[bytes, str, list[str]]] = []
        self._peers: list[tuple[str, int]] = []  # the client address each message came from, in order
        self._faults: list[Fault] = []

    # -- the server ----------------------------------------------------------------------------------
    def start(self) -> "Mailbox":
        if self._controller is None:
            tls = {"tls_context": self.tls_context, "require_starttls": True} if self.tls_context else {}
            controller = Controller(_Handler(self._keep, self._take_fault), hostname=self.host, port=self.port,
                                    **tls)
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

    def _keep(self, raw: bytes, sender: str, recipients: list[str], peer: tuple[str, int] = ("", 0)) -> None:
        with self._lock:
            self._received.append((raw, sender, recipients))
            self._peers.append(peer)
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

    # -- faults (tests: a relay that refuses, or answers late) -------------------------------------------
    def fault(self, stage: str, *, to: str | None = None, reply: str | None = None, delay: float = 0.0,
              times: int = 1) -> Fault:
        """Misbehave as :class:`Fault` says, the next ``times`` times; returns it (its ``hits`` count)."""
        if stage not in ("mail", "rcpt", "data"):
            raise ValueError(f"stage must be 'mail', 'rcpt' or 'data', not {stage!r}")
        fault = Fault(stage, to, reply, delay, times)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, stage: str, recipients: list[str]) -> Fault | None:
        wanted = {r.lower() for r in recipients}
        with self._lock:
            for fault in self._faults:
                if fault.stage == stage and fault.hits < fault.times and (
                        fault.to is None or fault.to.lower() in wanted):
                    fault.hits += 1
                    return fault
        return None

    # -- what arrived ----------------------------------------------------------------------------------
    def messages(self, to: str | None = None) -> list[EmailMessage]:
        """Every message received so far (to ``to`` only, if given), oldest first."""
        with self._lock:
            received = list(self._received)
        return [parse(raw) for raw, _, recipients in received
                if to is None or to.lower() in (r.lower() for r in recipients)]

    def peers(self) -> list[tuple[str, int]]:
        """The client address (host, port) each message so far came in on, oldest first: messages
        that share one came on one SMTP session."""
        with self._lock:
            return list(self._peers)

    def clear(self) -> None:
        with self._lock:
            self._received.clear()
            self._peers.clear()

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
