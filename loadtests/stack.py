"""A whole meterai system for one drill or benchmark, brought up and torn down by one Python object.

It reuses what ``./dev`` uses (:mod:`shared.devenv`): the configured PostgreSQL when it answers (and
``PRIVATE_SERVICES`` is not 1), else a private cluster under ``DATA_DIR/loadtests``; a fresh database with
the migrations applied (:func:`shared.db.migrate.apply_migrations`), dropped again afterwards; a private
memory-only Redis; and the processes exactly as the ``Procfile`` names them (gunicorn web, one Celery
worker per queue group, beat), plus the stand-in gateway from ``Procfile.dev``, each in its own process
group, with its output in ``<workdir>/logs/<name>.log``.
Benchmarks can also start processes of their own (a baseline app under the same gunicorn flags).

Everything started here is stopped by :meth:`Stack.close` (SIGTERM to each process group, SIGKILL after
a grace period), also when the caller is interrupted.
"""
from __future__ import annotations

import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import psycopg
import requests
from psycopg import sql

from shared import devenv
from shared.config import load_settings
from shared.db.migrate import apply_migrations

ROOT = devenv.ROOT
REPORTS = ROOT / "reports"
STOP_GRACE_SECONDS = 15.0


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def procfile_commands() -> dict[str, str]:
    """Every process ``./dev up`` runs: the Procfile's, then Procfile.dev's (the stand-in gateway)."""
    return {spec.name: spec.command for spec in devenv.process_specs()}


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


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """User+system CPU of this process and all its descendants still alive (from /proc)."""
        return sum(cpu_seconds_of(pid) for pid in descendants(self.popen.pid, include_self=True))


def descendants(pid: int, include_self: bool = False) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = ([pid] if include_self else []), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


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
    gateway_port: int = 0
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    processes: dict[str, Process] = field(default_factory=dict)
    _private: list = field(default_factory=list)
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
        settings = load_settings()
        data_dir = Path(settings.data_dir).absolute()
        self._database_name = f"meterai_{self.label}_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"
        wanted = psycopg.conninfo.make_conninfo(settings.database_url, dbname=self._database_name)
        self.database_url, pg = devenv.ensure_postgres(wanted, data_dir / "loadtests",
                                                       force_private=bool(settings.private_services))
        if pg is not None:
            self._private.append(pg)
        applied = apply_migrations(self.database_url)
        say(f"database {self._database_name}: {len(applied)} migrations applied")
        redis_handle = devenv.start_private_redis(self.workdir)
        self._private.append(redis_handle)
        self.redis_url = redis_handle.url
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.web_port = devenv.free_port()
        self.gateway_port = devenv.free_port()

    @property
    def redis_pids(self) -> list[int]:
        return [h.process.pid for h in self._private if isinstance(h, devenv.RedisHandle) and h.process]

    def process_pids(self, *names: str) -> list[int]:
        """Pids of the named processes and all their descendants (gunicorn workers, Celery pool children)."""
        pids: list[int] = []
        for name in names:
            if name in self.processes:
                pids += descendants(self.processes[name].popen.pid, include_self=True)
        return pids

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
            DATA_DIR=str(self.workdir / "data"), PORT=str(self.web_port), PUBLIC_BASE_URL=self.web_url,
            GATEWAY_URL=self.gateway_url, GATEWAY_PORT=str(self.gateway_port),
            NOTIFICATION_URL=f"{self.web_url}/api/v1/payments/notifications", SECRET_KEY=self.secret_key,
            PYTHONUNBUFFERED="1",
        )
        env.update(overrides or {})
        return env

    # -- processes ------------------------------------------------------------------------------
    def start(self, name: str, command: str | list[str], env: dict[str, str]) -> Process:
        log = self.workdir / "logs" / f"{name}.log"
        argv = ["bash", "-c", command] if isinstance(command, str) else command
        with open(log, "ab") as out:
            popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        process = Process(name, popen, log)
        self.processes[name] = process
        return process

    def start_procfile(self, names: Iterable[str] | None = None, overrides: dict[str, str] | None = None) -> None:
        commands = procfile_commands()
        wanted = list(names) if names is not None else list(commands)
        unknown = [n for n in wanted if n not in commands]
        if unknown:
            raise ValueError(f"not in the Procfile or Procfile.dev: {', '.join(unknown)}")
        env = self.env(overrides)
        for name in wanted:
            self.start(name, commands[name], env)
        say(f"started {', '.join(wanted)} (logs in {self.workdir / 'logs'})")

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until web answers /readyz, the gateway answers, and every Celery worker logged "ready"."""
        deadline = time.monotonic() + timeout
        checks: dict[str, Callable[[], bool]] = {}
        for name in self.processes:
            if name == "web":
                checks[name] = lambda: _http_ok(f"{self.web_url}/readyz")
            elif name == "gateway":
                checks[name] = lambda: _http_ok(f"{self.gateway_url}/sandbox/faults")
            elif name != "beat" and "celery" in " ".join(self.processes[name].popen.args):
                checks[name] = (lambda p=self.processes[name]: re.search(rb"\bready\.", p.log.read_bytes()) is not None)
        pending = dict(checks)
        while pending:
            for name, check in list(pending.items()):
                if check():
                    del pending[name]
            dead = [p for p in self.processes.values() if not p.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with {dead[0].popen.returncode}:\n{dead[0].tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout:.0f} s: {', '.join(pending)}\n"
                                   + "\n".join(f"--- {n}:\n{self.processes[n].tail()}" for n in pending))
            time.sleep(0.25)
        say(f"ready: {', '.join(checks)}")

    def dead_processes(self) -> list[Process]:
        return [p for p in self.processes.values() if not p.alive()]

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            _stop_groups([process])

    def stop_all(self) -> None:
        processes, self.processes = list(self.processes.values()), {}
        _stop_groups(processes)

    # -- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        self.stop_all()
        from shared.db import close_pools

        close_pools()
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


def _http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _stop_groups(processes: list[Process]) -> None:
    for process in processes:
        if process.alive():
            try:
                os.killpg(process.popen.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while any(p.alive() for p in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    for process in processes:
        try:
            os.killpg(process.popen.pid, signal.SIGKILL)  # and whatever it left behind in its group
        except (ProcessLookupError, PermissionError):
            pass
        process.popen.wait()


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
