"""A private PgBouncer in transaction mode in front of a PostgreSQL server, for the tests and the drills.

Why this exists: production runs PostgreSQL behind a pooler (DESIGN.md, "Configuration and running"), and
transaction pooling breaks code that leans on session state (prepared statements, advisory locks, ``SET``)
only when a real pooler sits in between. Debian 12's ``pgbouncer`` (1.18) has no prepared-statement
support at all, which is what makes it a strict judge. :func:`start_pgbouncer` runs one as our child
process on a free loopback port with ``pool_mode = transaction``; every database of the server behind it
is reachable under its own name, so the handle's ``url`` is the given URL with PgBouncer's address.

Only the standard library and psycopg, like :mod:`shared.devtools.services` (whose helpers it uses): the
drills may start one and must stay clients of the system. Development only: clients are trusted (the
listener is on 127.0.0.1); the login to PostgreSQL is the URL's own user and password.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from shared.devtools.services import (POSTGRES_USER, ServiceError, _as_postgres_user, _give_to_postgres, _tail,
                                      free_port, port_accepts)


def find_pgbouncer() -> str:
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).exists()), None)
    if found is None:
        raise ServiceError("pgbouncer not found: install it (Debian: apt-get install pgbouncer)")
    return found


def _quoted(value: str) -> str:
    """A value for PgBouncer's connection string syntax (single quotes, backslash-escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class PgBouncerHandle:
    """A running PgBouncer of ours. ``url`` leads through it to the database of the URL it was started with."""

    dir: Path
    port: int
    user: str
    dbname: str
    password: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        secret = f":{quote(self.password, safe='')}" if self.password else ""
        return f"postgresql://{quote(self.user, safe='')}{secret}@127.0.0.1:{self.port}/{quote(self.dbname, safe='')}"

    @property
    def admin_url(self) -> str:
        """PgBouncer's admin console (``SHOW POOLS``, ``SHOW SERVERS``...)."""
        return f"postgresql://{quote(self.user, safe='')}@127.0.0.1:{self.port}/pgbouncer"

    @property
    def config(self) -> Path:
        return self.dir / "pgbouncer.ini"

    @property
    def log(self) -> Path:
        return self.dir / "pgbouncer.log"

    def start(self, timeout: float = 15.0) -> None:
        # As root, PgBouncer's own -u drops to the postgres user (runuser would sit between our signals
        # and it, and wait two seconds before passing a SIGTERM on).
        command = [find_pgbouncer(), *(["-u", POSTGRES_USER] if _as_postgres_user() else []), str(self.config)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"pgbouncer on port {self.port} did not start; {self.log}:\n{_tail(self.log)}")
            time.sleep(0.05)

    def answers(self) -> bool:
        if not port_accepts(self.port):
            return False
        try:
            with psycopg.connect(self.url, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM): every client and server connection is cut, as when a pooler dies."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port: every client holding a connection finds it dead."""
        self.stop()
        self.start()


def _config(handle: PgBouncerHandle, host: str, port: int) -> str:
    server = f"host={host} port={port} user={_quoted(handle.user)}"
    if handle.password:
        server += f" password={_quoted(handle.password)}"
    return "\n".join([
        "[databases]",
        # Any database name a client asks for is the server's database of that name.
        f"* = {server}",
        "",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {handle.port}",
        "unix_socket_dir =",
        "auth_type = trust",
        "auth_file = userlist.txt",
        f"admin_users = {handle.user}",
        f"stats_users = {handle.user}",
        "pool_mode = transaction",
        "max_client_conn = 1000",
        "default_pool_size = 40",
        # After one failed server login PgBouncer refuses new ones for server_login_retry (15 s by default):
        # a PostgreSQL restart of under a second stopped orders for ~15 s in the failover drill; at 1 s it
        # went unnoticed.
        "server_login_retry = 1",
        # A PostgreSQL gone without a word: PgBouncer acknowledges our statements itself, so our own
        # libpq bounds (DATABASE_TCP_USER_TIMEOUT_SECONDS) can't see the server's silence; these make
        # PgBouncer drop the server connection (and fail the client's statement) as ours would.
        "server_connect_timeout = 5",
        "tcp_user_timeout = 10000",
        "tcp_keepalive = 1",
        "tcp_keepidle = 30",
        "tcp_keepintvl = 5",
        "tcp_keepcnt = 3",
        # psycopg sends none of these; other clients (and libpq's options) may.
        "ignore_startup_parameters = extra_float_digits",
        # No logfile: in the foreground PgBouncer logs to stderr, which start() sends to pgbouncer.log.
        "pidfile = pgbouncer.pid",
        "log_connections = 0",
        "log_disconnections = 0",
        "",
    ])


def start_pgbouncer(data_dir: Path, database_url: str, *, port: int | None = None) -> PgBouncerHandle:
    """Start PgBouncer (transaction pooling) on 127.0.0.1:``port`` (a free one when None), in front of the
    server of ``database_url``, working in ``data_dir``. As root it runs as the ``postgres`` user."""
    params = conninfo_to_dict(database_url)
    host, server_port = params.get("host") or "127.0.0.1", int(params.get("port") or 5432)
    if host.startswith("/"):
        raise ServiceError(f"start_pgbouncer wants a TCP address, not the socket folder {host}")
    user = params.get("user") or "postgres"
    data_dir = Path(data_dir).absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    attempts = 1 if port else 3  # a free port can be taken by someone else before pgbouncer binds it
    for attempt in range(attempts):
        handle = PgBouncerHandle(data_dir, port or free_port(), user, params.get("dbname") or user,
                                 params.get("password") or "")
        handle.config.write_text(_config(handle, host, server_port), encoding="utf-8")
        (data_dir / "userlist.txt").write_text(f'"{user}" ""\n', encoding="utf-8")
        _give_to_postgres(data_dir)
        try:
            handle.start()
            return handle
        except ServiceError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
