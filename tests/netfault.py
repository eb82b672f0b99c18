"""Network faults for tests, on real sockets: a TCP proxy that cuts connections at a chosen moment, and
a port whose packets are dropped (a host that stops answering without a word)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class CuttingProxy:
    """Forwards TCP to PostgreSQL; armed, it drops a connection at the COMMIT's answer or at the next
    statement a client sends."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode: str | None = None  # "commit_answer", "next_statement" or None
        self.marker = b"COMMIT\x00"  # what a statement whose answer is dropped contains
        self.cuts = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def in_front_of(cls, database_url: str) -> tuple["CuttingProxy", str]:
        """A proxy to ``database_url``'s server and the URL that leads through it (in the clear, so the
        proxy can see the statements go by)."""
        import psycopg

        params = psycopg.conninfo.conninfo_to_dict(database_url)
        proxy = cls(params.get("host") or "127.0.0.1", int(params.get("port") or 5432))
        return proxy, psycopg.conninfo.make_conninfo(database_url, host="127.0.0.1", port=proxy.port,
                                                     sslmode="disable")

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            state = {"drop_answer": False}
            threading.Thread(target=self._upstream, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, state), daemon=True).start()

    def _cut(self, *socks: socket.socket) -> None:
        with self._lock:
            self.mode = None
            self.cuts += 1
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _upstream(self, client: socket.socket, server: socket.socket, state: dict) -> None:
        try:
            while data := client.recv(65536):
                if self.mode == "next_statement" and data[:1] in (b"Q", b"P"):
                    self._cut(client, server)  # never reaches the server
                    return
                if self.mode == "commit_answer" and self.marker in data:
                    state["drop_answer"] = True  # before the server can answer
                server.sendall(data)
        except OSError:
            pass

    def _downstream(self, server: socket.socket, client: socket.socket, state: dict) -> None:
        try:
            while data := server.recv(65536):
                if state["drop_answer"]:
                    self._cut(client, server)  # the server has committed and answered; the client never hears
                    return
                client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


def _iptables_binary() -> str | None:
    return shutil.which("iptables") or next(
        (path for path in ("/usr/sbin/iptables", "/sbin/iptables") if Path(path).exists()), None)


def _iptables(*args: str) -> None:
    subprocess.run([_iptables_binary() or "iptables", "-w", *args], check=True, capture_output=True)


def need_iptables() -> None:
    """Skip, as the suite does for a missing Chromium or qpdf, where packets can't be dropped: no iptables
    (Debian package iptables; .ci/run installs it) or no right to change the rules (root, CAP_NET_ADMIN)."""
    import pytest

    if _iptables_binary() is None:
        pytest.skip("iptables not installed (Debian: apt-get install iptables): a silent port can't be made")
    probe = subprocess.run([_iptables_binary(), "-w", "-S", "INPUT"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"iptables can't be used here (root with CAP_NET_ADMIN needed): {probe.stderr[:200]!r}")


@contextmanager
def silent(port: int) -> Iterator[None]:
    """Every packet to or from loopback ``port`` dropped (no refusal, no reset): to its clients, the
    other end is a host that vanished. Connections made before stay open and get no answer. (A test
    process killed inside leaves the two rules behind: ``iptables -S INPUT`` shows them, on a port no
    longer in use.)"""
    need_iptables()
    rules = [("INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"),
             ("INPUT", "-i", "lo", "-p", "tcp", "--sport", str(port), "-j", "DROP")]
    added = []
    try:
        for chain, *rule in rules:
            _iptables("-I", chain, *rule)
            added.append((chain, *rule))
        yield
    finally:
        for chain, *rule in added:
            _iptables("-D", chain, *rule)


def in_thread(call, wait: float) -> dict:
    """``call()``'s outcome, or {} if it is still running after ``wait`` seconds (left behind, daemon)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except Exception as exc:  # noqa: BLE001 - what the test looks at
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(wait)
    return outcome
