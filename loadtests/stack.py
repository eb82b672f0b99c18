"""A whole meterai system for one drill or benchmark, brought up and torn down by one Python object.

It reuses what ``./dev`` uses: the configured PostgreSQL when it answers (and ``PRIVATE_SERVICES`` is
not 1), else a private cluster under ``DATA_DIR/loadtests`` (:mod:`shared.devtools.services`); a fresh
database migrated by ``meterai migrate`` and dropped again afterwards; a private memory-only Redis; and
the processes exactly as the ``Procfile`` and ``Procfile.dev`` name them, run by the one launcher
(:mod:`shared.devtools.launcher`) with restarts off, each process's output in ``<workdir>/logs/<name>.log``.
Benchmarks can also start processes of their own (a baseline app under the same gunicorn flags).

Many nodes on one machine (the multi-node drill, the scaling benchmark): :meth:`Stack.start_node`
starts a copy of a Procfile group as a node of its own, with its own ``DATA_DIR`` under
``<workdir>/nodes/<name>`` and nothing shared with the other nodes but what every node of a real
deployment shares: PostgreSQL, Redis, the document store (a private SeaweedFS over S3,
:meth:`Stack.open_document_store`) and the signing key and certificates, made once up front into ``<workdir>/shared/pki`` and handed to every
node by path (``SIGNING_*_PATH``). :meth:`Stack.start_proxy` puts the private nginx in front of the web
nodes (:mod:`shared.devtools.proxy`), and from then on :attr:`Stack.web_url` is the proxy's.

A drill is a client: this module sees the system only through its environment, HTTP and the database,
and imports nothing of the core, web or workers (an import-linter contract says so).
Everything started here is stopped by :meth:`Stack.close`, also when the caller is interrupted.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import psycopg
from psycopg import sql

from shared.devtools.launcher import CELERY_WORKER, Launcher, Process
from shared.devtools.procfile import ROOT, process_specs, select_processes
from shared.devtools.proxy import start_nginx
from shared.devtools.services import (Configured, RedisHandle, ensure_postgres, free_port, start_private_redis,
                                      start_seaweedfs)

REPORTS = ROOT / "reports"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def procfile_commands() -> dict[str, str]:
    """Every process ``./dev up`` runs: the Procfile's, then Procfile.dev's (the stand-in gateway)."""
    return {spec.name: spec.command for spec in process_specs()}


def gunicorn_flags() -> list[str]:
    """The Procfile web command's gunicorn flags (worker class, workers, threads, timeout), without
    ``--bind`` and the app: a baseline app is served exactly the same way."""
    words = shlex.split(procfile_commands()["web"])
    flags, skip = [], False
    for i, word in enumerate(words[1:-1], start=1):
        if skip:
            skip = False
            continue
        if word == "--bind" or word == "-b":
            skip = True
            continue
        if word.startswith("--bind="):
            continue
        flags.append(word)
    return flags


def workdir_for(label: str, base: Path | None = None) -> Path:
    path = (base or REPORTS) / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds_of(pid: int) -> float:
    """User+system CPU of ``pid`` plus that of its children it has already reaped (short-lived children,
    such as the preflight's isolated parser, are only ever seen this way)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return sum(int(v) for v in fields[11:15]) / _TICKS


@dataclass
class Stack:
    """Services plus processes for one run. Use as a context manager."""

    workdir: Path
    label: str = "drill"
    keep_database: bool = False
    database_url: str = ""
    redis_url: str = ""
    web_port: int = 0
    polls_port: int = 0
    gateway_port: int = 0
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    # The ops endpoints' bearer token (the drill scrapes GET /metrics with it: loadtests/scrapes.py).
    ops_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    launcher: Launcher | None = None
    # Multi-node runs: where every node's documents are (S3 settings or DOCUMENT_DIR), the proxy.
    store_env: dict[str, str] = field(default_factory=dict)
    store_kind: str = ""
    proxy: Any = None
    _private: list[Any] = field(default_factory=list)
    _database_name: str = ""

    # -- services -------------------------------------------------------------------------------
    def __enter__(self) -> "Stack":
        try:
            self.open_services()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_services(self) -> None:
        configured = Configured.from_environment()
        self._database_name = f"meterai_{self.label}_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"
        wanted = psycopg.conninfo.make_conninfo(configured.database_url, dbname=self._database_name)
        self.database_url, pg = ensure_postgres(wanted, configured.data_dir / "loadtests",
                                                force_private=configured.force_private)
        if pg is not None:
            self._private.append(pg)
        applied = migrate(self.database_url)
        say(f"database {self._database_name}: {len(applied)} migrations applied")
        redis_handle = start_private_redis(self.workdir)
        self._private.append(redis_handle)
        self.redis_url = redis_handle.url
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        self.take_ports()
        self.launcher = Launcher(self.env(), logs=self.workdir / "logs")

    def take_ports(self) -> None:
        """A free port for each listening process of the Procfiles (every stack on this box has its own)."""
        self.web_port = free_port()
        self.polls_port = free_port()  # the Procfile's poll server (web/pollserver.py)
        self.gateway_port = free_port()
        self.smtp_port = free_port()  # Procfile.dev's mailbox: the mail workers send buyers' e-mails there

    def redis_client(self) -> Any:
        """A client of the stack's Redis for the drill's own look at the waiting room."""
        import redis

        return redis.Redis.from_url(self.redis_url, socket_timeout=1)

    @property
    def processes(self) -> dict[str, Process]:
        return self.launcher.processes if self.launcher is not None else {}

    @property
    def redis_pids(self) -> list[int]:
        return [h.process.pid for h in self._private if isinstance(h, RedisHandle) and h.process]

    def process_pids(self, *names: str) -> list[int]:
        """Pids of the named processes and all their descendants (gunicorn workers, Celery pool children)."""
        return [pid for name in names if name in self.processes for pid in self.processes[name].pids()]

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def env(self, overrides: dict[str, str] | None = None) -> dict[str, str]:
        """The process environment for every meterai process of this stack."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        env.update(
            DEVELOPMENT="1",
            DATABASE_URL=self.database_url, REDIS_URL=self.redis_url, REDIS_KEY_PREFIX="meterai:",
            DATA_DIR=str(self.workdir / "data"), PORT=str(self.web_port), POLLS_PORT=str(self.polls_port), PUBLIC_BASE_URL=self.web_url,
            GATEWAY_URL=self.gateway_url, GATEWAY_PORT=str(self.gateway_port),
            NOTIFICATION_URL=f"{self.web_url}/api/v1/payments/notifications", SECRET_KEY=self.secret_key,
            OPS_TOKEN=self.ops_token, PYTHONUNBUFFERED="1",
            SMTP_HOST="127.0.0.1", SMTP_PORT=str(self.smtp_port), SMTP_SECURITY="none", SMTP_USERNAME="",
            SMTP_PASSWORD="",
        )
        env.update(overrides or {})
        return env

    # -- processes ------------------------------------------------------------------------------
    def start(self, name: str, command: str, env: dict[str, str]) -> Process:
        """A process of the benchmark's own (not in the Procfile), run and stopped like the others."""
        assert self.launcher is not None
        return self.launcher.start(name, command=command, env=env)

    def start_procfile(self, names: Iterable[str] | None = None, overrides: dict[str, str] | None = None) -> None:
        assert self.launcher is not None
        dev_pki({**self.env(), **(overrides or {})})
        specs = select_processes(list(self.launcher.specs.values()), list(names or []))
        started = [self.launcher.start(spec.name, env=self.metrics_env(spec.name, overrides)) for spec in specs]
        say(f"started {', '.join(p.name for p in started)} (logs in {self.workdir / 'logs'})")

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until web answers /readyz, the gateway answers, and every Celery worker logged "ready"."""
        assert self.launcher is not None
        self.launcher.wait_ready(timeout=timeout)
        say(f"ready: {', '.join(self.processes)}")

    def dead_processes(self) -> list[Process]:
        return [p for p in self.processes.values() if p.wanted and not p.alive()]

    def stop(self, name: str) -> None:
        if self.launcher is not None:
            self.launcher.stop(name)

    def stop_all(self) -> None:
        if self.launcher is not None:
            self.launcher.stop_all()

    # -- many nodes -----------------------------------------------------------------------------
    @property
    def shared_dir(self) -> Path:
        """What every node of a deployment is handed alike (here: the signing key and certificates);
        no node's DATA_DIR is inside it."""
        return self.workdir / "shared"

    def node_dir(self, name: str) -> Path:
        return self.workdir / "nodes" / name / "data"

    def pki_env(self) -> dict[str, str]:
        """The signing key and certificates by path, the same files for every node."""
        folder = self.shared_dir / "pki"
        return {"SIGNING_KEY_PATH": str(folder / "issuer-key.pem"),
                "SIGNING_CERT_PATH": str(folder / "issuer-cert.pem"),
                "SIGNING_CA_CERT_PATH": str(folder / "ca-cert.pem")}

    def open_document_store(self) -> str:
        """The document store every node uses: a private SeaweedFS over S3 (its settings go into every
        node's environment). Returns the store's kind for reports."""
        handle = start_seaweedfs(self.workdir / "seaweedfs")
        self._private.append(handle)
        self.store_env, self.store_kind = dict(handle.env()), "s3"
        say(f"document store: SeaweedFS S3 at {handle.endpoint_url}, bucket {handle.bucket}")
        return self.store_kind

    def make_shared_pki(self, overrides: dict[str, str] | None = None) -> None:
        """The development CA, made once, before any node starts, where every node reads it."""
        dev_pki({**self.env(), **(overrides or {}), **self.pki_env()})

    def node_env(self, name: str, overrides: dict[str, str] | None = None) -> dict[str, str]:
        """A node's settings on top of the stack's: its own DATA_DIR, the shared PKI and store."""
        folder = self.node_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        return {**(overrides or {}), **self.pki_env(), **self.store_env, "DATA_DIR": str(folder)}

    def start_node(self, group: str, name: str, *, overrides: dict[str, str] | None = None,
                   port: int | None = None, command: str | None = None) -> Process:
        """A copy of Procfile group ``group`` as node ``name`` (its own process group, DATA_DIR and, for
        web, port). ``command`` replaces the Procfile's (e.g. pinned with taskset)."""
        assert self.launcher is not None
        return self.launcher.start(group, name=name, env=self.metrics_env(group, self.node_env(name, overrides)),
                                   port=port, command=command)

    def metrics_env(self, group: str, overrides: dict[str, str] | None = None) -> dict[str, str]:
        """``overrides`` plus, for a Celery worker node, a free ``METRICS_PORT`` of its own (the drill scrapes
        it), unless the caller set one (``--set METRICS_PORT=0`` keeps them off)."""
        env = dict(overrides or {})
        spec = self.launcher.specs.get(group) if self.launcher is not None else None
        if spec is not None and CELERY_WORKER.search(spec.command) and "METRICS_PORT" not in env:
            env["METRICS_PORT"] = str(free_port())
        return env

    def start_proxy(self, web_ports: list[int], *, trust_forwarded_from: str | None = None,
                    polls_ports: list[int] | None = None) -> str:
        """The private nginx in front of the web nodes, on the stack's web port (so PUBLIC_BASE_URL and
        the gateway's NOTIFICATION_URL already name it). ``trust_forwarded_from``: the address of a front
        proxy whose X-Forwarded-For nginx believes (a drill's buyers pose as one). ``polls_ports``: poll
        servers (web/pollserver.py) for the place-in-line reads. Returns its URL."""
        self.proxy = start_nginx(self.workdir / "nginx", [f"127.0.0.1:{p}" for p in web_ports], port=self.web_port,
                                 trust_forwarded_from=trust_forwarded_from,
                                 polls=[f"127.0.0.1:{p}" for p in polls_ports or []])
        self._private.append(self.proxy)
        say(f"proxy: nginx at {self.proxy.url} over {', '.join(str(p) for p in web_ports)}"
            + (f", polls to {', '.join(str(p) for p in polls_ports)}" if polls_ports else ""))
        return str(self.proxy.url)

    def kill(self, name: str) -> None:
        """SIGKILL node ``name``'s whole process group, as a lost machine would."""
        if self.launcher is not None:
            self.launcher.kill(name)

    def bring_back(self, name: str) -> Process:
        """Start a killed or stopped node again exactly as it was."""
        assert self.launcher is not None
        return self.launcher.start(name)

    # -- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        self.stop_all()
        if self.database_url and not self.keep_database:
            try:
                admin = psycopg.conninfo.make_conninfo(self.database_url, dbname="postgres")
                with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(self._database_name)))
            except psycopg.Error as exc:
                say(f"could not drop database {self._database_name}: {exc}")
        elif self.database_url:
            say(f"kept database: {self.database_url}")
        for handle in reversed(self._private):
            handle.stop()
        self._private.clear()


def dev_pki(env: dict[str, str]) -> None:
    """The development CA for the processes about to start, made by its command (a drill imports no part
    of the core): ``python -m shared.devtools.pki``."""
    result = subprocess.run([sys.executable, "-m", "shared.devtools.pki"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"making the development CA failed:\n{result.stdout}{result.stderr}")


def migrate(database_url: str) -> list[str]:
    """``meterai migrate`` on ``database_url``, run as a command: the drill side never imports the core."""
    env = {**os.environ, "DATABASE_URL": database_url, "DEVELOPMENT": "1"}
    result = subprocess.run([sys.executable, "-m", "shared.cli", "migrate"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"meterai migrate failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return list(json.loads(result.stdout.strip().splitlines()[-1])["applied"])


def postgres_backend_pids(database_url: str) -> list[int]:
    """The server processes serving connections to ``database_url``'s database right now (when the server
    runs on this machine, their CPU time is readable in /proc)."""
    try:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=3) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                                " AND pid <> pg_backend_pid()").fetchall()
    except psycopg.Error:
        return []
    return [int(r[0]) for r in rows]


class CpuMeter:
    """CPU seconds used by named groups of processes between :meth:`start` and :meth:`stop`.

    Groups are functions returning pids (called at both ends, so processes that come and go in between,
    such as short-lived children, are only partly seen: the figures are a profile, not an invoice)."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._start: dict[str, dict[int, float]] = {}
        self.used: dict[str, float] = {}

    def _sample(self) -> dict[str, dict[int, float]]:
        return {name: {pid: cpu_seconds_of(pid) for pid in pids()} for name, pids in self.groups.items()}

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        self.used = {name: sum(t - self._start.get(name, {}).get(pid, 0.0) for pid, t in end[name].items())
                     for name in self.groups}
        return self.used
