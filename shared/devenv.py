"""The local development and test environment behind ``./dev up`` and ``./dev test``.

Why this exists: the README promises two commands that work on a fresh machine. Nobody should have to
install, configure or start PostgreSQL and Redis by hand first, nor install a Procfile runner. So:

* when ``DATABASE_URL`` / ``REDIS_URL`` answer, we use them as they are;
* when they don't, or ``PRIVATE_SERVICES=1`` says never to touch them, we start private servers under the
  data folder (``DATA_DIR``, default ``.data``) on free ports of 127.0.0.1, and stop them again when we
  are done;
* ``up`` applies the migrations and runs every ``Procfile`` process under a small supervisor that prefixes
  their output, restarts a process that dies by itself (with back-off, giving up only on one that can't
  stay up), and stops them all together on Ctrl-C or SIGTERM;
* ``test`` hands the servers to pytest through the environment.

The helpers (:func:`start_private_postgres`, :func:`start_private_redis`, :func:`free_port`, ...) are the
same ones the test suite uses to get throw-away servers of its own.
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TextIO
from urllib.parse import quote

if TYPE_CHECKING:
    from shared.config import Settings

ROOT = Path(__file__).resolve().parent.parent
PROCFILE = ROOT / "Procfile"
# Processes that exist only to develop, test and demo (the stand-in payment gateway): ./dev up and the
# drills run them next to the Procfile's, a production process manager never sees them.
PROCFILE_DEV = ROOT / "Procfile.dev"
SECRET_KEY_FILE = "secret-key"
SECRET_KEY_MIN_LENGTH = 32
WEB_PORT = 8000
STOP_GRACE_SECONDS = 10.0
POSTGRES_USER = "postgres"
PYTEST_NO_TESTS_COLLECTED = 5
USAGE = "usage: ./dev up [process ...]   |   ./dev test [pytest args ...]"


class ServiceError(RuntimeError):
    """A private PostgreSQL or Redis could not be started (the message says why and what to do)."""


class UsageError(ValueError):
    """The command line asks for something that doesn't exist."""


def say(message: str) -> None:
    print(f"[dev] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_accepts(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


# ---------------------------------------------------------------------------------------------- PostgreSQL


def postgres_answers(url: str) -> bool:
    """Whether the PostgreSQL server named in ``url`` accepts us (on its ``postgres`` maintenance database)."""
    return _postgres_problem(url) is None


def _postgres_problem(url: str) -> str | None:
    import psycopg

    try:
        with psycopg.connect(url, dbname="postgres", connect_timeout=2):
            return None
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def database_name(url: str) -> str | None:
    from psycopg.conninfo import conninfo_to_dict

    name = conninfo_to_dict(url).get("dbname")
    return str(name) if name else None


def create_database(url: str) -> None:
    """Create the database ``url`` names on its server, unless it exists already."""
    import psycopg
    from psycopg import sql

    name = database_name(url)
    if not name or name == "postgres":
        return
    with psycopg.connect(url, dbname="postgres", connect_timeout=2, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            pass  # somebody else created it meanwhile


def find_pg_bin(name: str) -> str:
    """Path of the PostgreSQL server program ``name`` (initdb, pg_ctl, ...).

    Debian keeps them off PATH in /usr/lib/postgresql/<version>/bin, so look where ``pg_config`` says, then
    there (newest version first), then on PATH.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()) / name)
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    versioned.sort(key=lambda p: [int(x) if x.isdigit() else 0 for x in re.split(r"[^0-9]+", p)], reverse=True)
    candidates += [Path(d) / name for d in versioned]
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ServiceError(
        f"PostgreSQL's {name} was not found (looked in pg_config --bindir, /usr/lib/postgresql/*/bin, PATH); "
        "install the PostgreSQL server (Debian: apt-get install postgresql) or point DATABASE_URL at a running one"
    )


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _as_postgres_user() -> list[str]:
    """Command prefix that runs a program as the ``postgres`` user when we are root (PostgreSQL refuses root)."""
    if not _running_as_root():
        return []
    try:
        pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        raise ServiceError(
            "running as root, and PostgreSQL refuses to run as root: create a 'postgres' user "
            "(Debian's postgresql package does) or run as a normal user"
        ) from None
    return ["runuser", "-u", POSTGRES_USER, "--"]


def _give_to_postgres(*paths: Path) -> None:
    """When root: hand ``paths`` (recursively) to the postgres user, and let it reach them through their parents."""
    if not _running_as_root():
        return
    user = pwd.getpwnam(POSTGRES_USER)
    for path in paths:
        for parent in reversed(path.absolute().parents):
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                say(f"letting the postgres user through {parent} (chmod o+x)")
                parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        if path.stat().st_uid == user.pw_uid:
            continue
        os.chown(path, user.pw_uid, user.pw_gid)
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                os.lchown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)


def _run_pg(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _as_postgres_user() + args, cwd=cwd, capture_output=True, text=True, start_new_session=True
    )


@dataclass
class PostgresHandle:
    """A private PostgreSQL cluster. ``url`` points at its ``postgres`` database, as the ``postgres`` superuser."""

    cluster: Path
    port: int
    owned: bool = True  # False when we found it already running (another ./dev started it): we leave it be

    @property
    def url(self) -> str:
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/postgres"

    def database_url(self, dbname: str) -> str:
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    def stop(self) -> None:
        if not self.owned:
            return
        result = _run_pg([find_pg_bin("pg_ctl"), "stop", "-D", str(self.cluster), "-m", "fast", "-w"], self.cluster)
        if result.returncode != 0 and "Is server running?" not in result.stderr:
            say(f"pg_ctl stop failed: {result.stderr.strip()}")
        self.owned = False


def _initdb(cluster: Path) -> None:
    result = _run_pg(
        [find_pg_bin("initdb"), "-D", str(cluster), "-U", POSTGRES_USER, "--auth=trust", "--encoding=UTF8",
         "--no-locale", "--no-sync"],
        cluster,
    )
    if result.returncode != 0:
        raise ServiceError(f"initdb in {cluster} failed:\n{result.stdout}{result.stderr}")


def _running_cluster_port(cluster: Path) -> int | None:
    """Port of the server already running on ``cluster``, if one is."""
    status = _run_pg([find_pg_bin("pg_ctl"), "status", "-D", str(cluster)], cluster)
    if status.returncode != 0:
        return None
    try:
        return int((cluster / "postmaster.pid").read_text().splitlines()[3])
    except (OSError, IndexError, ValueError):
        return None


def _prepare_cluster_dirs(dir: Path) -> tuple[Path, Path]:
    cluster, log = dir / "postgres", dir / "postgres.log"
    dir.mkdir(parents=True, exist_ok=True)
    cluster.mkdir(exist_ok=True)
    log.touch(exist_ok=True)
    _give_to_postgres(cluster, log)
    return cluster, log


def start_private_postgres(dir: Path, port: int | None = None) -> PostgresHandle:
    """Start (initialising on first use) a PostgreSQL cluster in ``dir/postgres``, logging to ``dir/postgres.log``.

    Listens on 127.0.0.1:``port`` (a free one when None) with trust auth; its unix socket stays inside the
    cluster folder. A cluster already running there is reused and left running by ``stop()``.
    """
    dir = Path(dir).absolute()
    cluster, log = _prepare_cluster_dirs(dir)
    if not (cluster / "PG_VERSION").exists():
        _initdb(cluster)
    running = _running_cluster_port(cluster)
    if running is not None:
        return PostgresHandle(cluster, running, owned=False)
    port = port or free_port()
    options = f"-p {port} -k {shlex.quote(str(cluster))} -c listen_addresses=127.0.0.1"
    result = _run_pg(
        [find_pg_bin("pg_ctl"), "start", "-w", "-t", "60", "-D", str(cluster), "-l", str(log), "-o", options],
        cluster,
    )
    if result.returncode != 0:
        raise ServiceError(
            f"PostgreSQL in {cluster} did not start:\n{result.stdout}{result.stderr}\n--- {log}:\n{_tail(log)}"
        )
    return PostgresHandle(cluster, port)


def ensure_postgres(
    database_url: str, data_dir: str | Path, *, force_private: bool = False
) -> tuple[str, PostgresHandle | None]:
    """A PostgreSQL URL that answers, with its database created: ``database_url`` itself if its server answers
    (and ``force_private`` is off), else one on a private server under ``data_dir`` (whose handle is returned
    so the caller can stop it)."""
    if force_private:
        say(f"PRIVATE_SERVICES=1: not using PostgreSQL at {_redact(database_url)}; using a private one in {data_dir}")
    else:
        problem = _postgres_problem(database_url)
        if problem is None:
            create_database(database_url)
            return database_url, None
        say(f"PostgreSQL at {_redact(database_url)} does not answer ({problem}); using a private one in {data_dir}")
    handle = start_private_postgres(Path(data_dir))
    url = handle.database_url(database_name(database_url) or "meterai")
    try:
        create_database(url)
    except Exception:
        handle.stop()
        raise
    return url, handle


# ---------------------------------------------------------------------------------------------- Redis


def redis_answers(url: str) -> bool:
    """Whether the Redis server at ``url`` answers PING within 2 seconds."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _redis_server() -> str:
    path = shutil.which("redis-server")
    if not path:
        raise ServiceError(
            "redis-server was not found on PATH; install it (Debian: apt-get install redis-server) "
            "or point REDIS_URL at a running Redis"
        )
    return path


@dataclass
class RedisHandle:
    """A private, memory-only redis-server run as our child process."""

    dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def start(self, timeout: float = 10.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        command = [_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", str(self.dir)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not redis_answers(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"redis-server on port {self.port} did not start; {self.log}:\n{_tail(self.log)}")
            time.sleep(0.05)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port (empty: nothing is kept on disk)."""
        self.stop()
        self.start()


def start_private_redis(dir: Path, port: int | None = None) -> RedisHandle:
    """Start a memory-only redis-server on 127.0.0.1:``port`` (a free one when None), working in ``dir/redis``."""
    attempts = 1 if port else 3  # a free port can be taken by someone else before redis binds it
    for attempt in range(1, attempts + 1):
        handle = RedisHandle(Path(dir).absolute() / "redis", port or free_port())
        try:
            handle.start()
        except ServiceError:
            if attempt == attempts:
                raise
            continue
        return handle
    raise ServiceError("redis-server did not start")


def ensure_redis(redis_url: str, data_dir: str | Path, *, force_private: bool = False) -> tuple[str, RedisHandle | None]:
    """A Redis URL that answers: ``redis_url`` itself (unless ``force_private``), or a private server's under
    ``data_dir``."""
    if force_private:
        say(f"PRIVATE_SERVICES=1: not using Redis at {_redact(redis_url)}; using a private one in {data_dir}")
    elif redis_answers(redis_url):
        return redis_url, None
    else:
        say(f"Redis at {_redact(redis_url)} does not answer; using a private one in {data_dir}")
    handle = start_private_redis(Path(data_dir))
    return handle.url, handle


# ---------------------------------------------------------------------------------------------- supervisor


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    command: str


def process_specs(procfile: Path = PROCFILE, development: Path | None = PROCFILE_DEV) -> list[ProcessSpec]:
    """The Procfile's processes, then the development ones of ``Procfile.dev`` (``development=None``: only the
    production ones). A name in both is an error: one name, one process."""
    specs = parse_procfile(procfile.read_text())
    if development is not None and development.exists():
        extra = parse_procfile(development.read_text())
        clash = sorted({s.name for s in specs} & {s.name for s in extra})
        if clash:
            raise ValueError(f"{development.name} names processes the {procfile.name} has already: {', '.join(clash)}")
        specs += extra
    return specs


def parse_procfile(text: str) -> list[ProcessSpec]:
    """``name: command`` lines; blank lines and ``#`` comments are skipped."""
    specs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line)
        if not match:
            raise ValueError(f"Procfile line {number} is not 'name: command': {line!r}")
        specs.append(ProcessSpec(match.group(1), match.group(2).strip()))
    return specs


COLOURS = ["36", "33", "32", "35", "34", "96", "93", "92", "95", "94"]


@dataclass(frozen=True)
class RestartPolicy:
    """How the supervisor brings back a process that exited by itself, as a process manager would.

    One dead worker (say, after a Redis blip) must not take the whole system down, and a process that
    cannot start at all (a port in use, a broken setting) must not be restarted in a tight loop forever:
    so the delay doubles from ``initial_delay`` up to ``max_delay``, starts again from ``initial_delay``
    once a process has stayed up ``stable_after`` seconds, and after ``max_quick_deaths`` deaths in a row,
    each sooner than ``stable_after`` after its start, the supervisor gives up and stops everything.
    """

    initial_delay: float = 1.0
    max_delay: float = 30.0
    stable_after: float = 60.0
    max_quick_deaths: int = 5


@dataclass
class _Supervised:
    """One process slot: the running process (or the dead one awaiting its restart) and its back-off."""

    spec: ProcessSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    delay: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None
    restarts: int = 0


class Supervisor:
    """Runs processes together, each in its own process group, restarts the ones that die, and stops them
    together.

    A process that exits by itself is started again after a back-off (:class:`RestartPolicy`), with a line
    saying so. ``run()`` returns when a stop was requested (:meth:`request_stop`, safe from signal handlers;
    the result is 0) or when a process keeps dying (non-zero: its exit code); either way every process group
    gets SIGTERM, then SIGKILL after ``grace`` seconds.
    """

    def __init__(
        self,
        specs: list[ProcessSpec],
        env_for: Callable[[str], dict[str, str]],
        cwd: Path = ROOT,
        out: TextIO | None = None,
        grace: float = STOP_GRACE_SECONDS,
        on_started: Callable[[], None] | None = None,
        restart: RestartPolicy | None = None,
    ) -> None:
        self.specs = specs
        self.env_for = env_for
        self.cwd = cwd
        self.out = out if out is not None else sys.stdout
        self.grace = grace
        self.on_started = on_started
        self.policy = restart if restart is not None else RestartPolicy()
        self._slots: dict[str, _Supervised] = {}
        self.stop_requests = 0
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._width = max([len(s.name) for s in specs] + [3])
        colour = getattr(self.out, "isatty", lambda: False)()
        self._colours = {s.name: COLOURS[i % len(COLOURS)] for i, s in enumerate(specs)} if colour else {}

    @property
    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        """The current process of each slot (the last one, while a dead process waits for its restart)."""
        return {name: slot.process for name, slot in self._slots.items() if slot.process is not None}

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.processes.items()}

    @property
    def restarts(self) -> dict[str, int]:
        return {name: slot.restarts for name, slot in self._slots.items()}

    def request_stop(self) -> None:
        self.stop_requests += 1

    def emit(self, name: str, line: str) -> None:
        prefix = f"{name:<{self._width}} |"
        if name in self._colours:
            prefix = f"\033[{self._colours[name]}m{prefix}\033[0m"
        with self._lock:
            self.out.write(f"{prefix} {line}\n")
            self.out.flush()

    def run(self) -> int:
        try:
            self._start_all()
            gave_up = self._watch()
        finally:
            self._stop_all()
        if gave_up is None:
            return 0
        return self._slots[gave_up].process.returncode or 1  # type: ignore[union-attr]

    def _start_all(self) -> None:
        for spec in self.specs:
            if self.stop_requests:
                return
            slot = _Supervised(spec, delay=self.policy.initial_delay)
            self._slots[spec.name] = slot
            self._spawn(slot)
        if self.on_started:
            self.on_started()

    def _spawn(self, slot: _Supervised) -> None:
        process = subprocess.Popen(
            ["bash", "-c", slot.spec.command], cwd=self.cwd, env=self.env_for(slot.spec.name),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        slot.process, slot.started_at, slot.restart_at = process, time.monotonic(), None
        reader = threading.Thread(target=self._pump, args=(slot.spec.name, process), daemon=True)
        reader.start()
        self._readers.append(reader)

    def _pump(self, name: str, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in iter(process.stdout.readline, b""):
            self.emit(name, raw.decode("utf-8", errors="replace").rstrip("\r\n"))

    def _watch(self) -> str | None:
        """Restart what dies until a stop request (-> None) or a process that can't stay up (-> its name)."""
        while not self.stop_requests:
            now = time.monotonic()
            for name, slot in self._slots.items():
                if slot.restart_at is not None:
                    if now >= slot.restart_at:
                        slot.restarts += 1
                        self._spawn(slot)
                    continue
                assert slot.process is not None
                if slot.process.poll() is None:
                    continue
                if self._schedule_restart(slot, now) is None:
                    return name
            time.sleep(0.1)
        return None

    def _schedule_restart(self, slot: _Supervised, now: float) -> float | None:
        """Note a death and pick the restart time, or None when the process has died too often too soon."""
        assert slot.process is not None
        name, code, policy = slot.spec.name, slot.process.returncode, self.policy
        self._killpg(slot.process, signal.SIGKILL)  # whatever it left behind in its group goes with it
        if now - slot.started_at >= policy.stable_after:
            slot.quick_deaths, slot.delay = 0, policy.initial_delay
        else:
            slot.quick_deaths += 1
        if slot.quick_deaths >= policy.max_quick_deaths:
            self.emit("dev", f"{name} exited with code {code}, {slot.quick_deaths} times in a row within "
                             f"{policy.stable_after:g} s of starting; giving up, stopping everything")
            return None
        delay = slot.delay
        slot.delay = min(policy.max_delay, slot.delay * 2)
        slot.restart_at = now + delay
        self.emit("dev", f"{name} exited with code {code}; restarting in {delay:g} s")
        return slot.restart_at

    @staticmethod
    def _killpg(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _signal_groups(self, sig: signal.Signals) -> None:
        for process in self.processes.values():
            self._killpg(process, sig)

    def _stop_all(self) -> None:
        if not self.processes:
            return
        requests_before = self.stop_requests
        self.emit("dev", f"stopping {', '.join(self.processes)}")
        self._signal_groups(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while any(p.poll() is None for p in self.processes.values()):
            if time.monotonic() > deadline or self.stop_requests > requests_before:
                stubborn = [name for name, p in self.processes.items() if p.poll() is None]
                self.emit("dev", f"killing {', '.join(stubborn)} (still running)")
                break
            time.sleep(0.05)
        self._signal_groups(signal.SIGKILL)  # also whatever a process left behind in its group
        for process in self.processes.values():
            process.wait()
        for reader in self._readers:
            reader.join(timeout=2)


# ---------------------------------------------------------------------------------------------- commands


@dataclass
class Services:
    """The PostgreSQL and Redis a command runs against, and the private ones it must stop afterwards."""

    database_url: str
    redis_url: str
    data_dir: Path
    private: list[PostgresHandle | RedisHandle] = field(default_factory=list)
    forced_private: bool = False

    def env(self) -> dict[str, str]:
        """The process environment plus the service settings, with the venv's programs first on PATH."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        env.update(
            DATABASE_URL=self.database_url, REDIS_URL=self.redis_url, DATA_DIR=str(self.data_dir),
            PYTHONUNBUFFERED="1",
        )
        env.setdefault("DEVELOPMENT", "1")  # ./dev runs on the development defaults, knowingly
        if self.forced_private:
            # DATABASE_URL and REDIS_URL now name the private servers: the test fixtures must use them,
            # not start yet another pair.
            env["PRIVATE_SERVICES"] = "0"
        return env

    def stop(self) -> None:
        for handle in reversed(self.private):
            handle.stop()
        self.private.clear()


def ensure_services(database_url: str, redis_url: str, data_dir: Path, *, force_private: bool = False) -> Services:
    """PostgreSQL and Redis that answer: the configured ones, or private ones under ``data_dir`` (always,
    with ``force_private``)."""
    database_url, pg = ensure_postgres(database_url, data_dir, force_private=force_private)
    services = Services(database_url, redis_url, data_dir, [pg] if pg else [], forced_private=force_private)
    try:
        services.redis_url, redis_handle = ensure_redis(redis_url, data_dir, force_private=force_private)
    except BaseException:
        services.stop()
        raise
    if redis_handle:
        services.private.append(redis_handle)
    return services


def _configured_services() -> tuple[Settings, Services]:
    from shared.config import load_settings

    settings = load_settings()
    data_dir = Path(settings.data_dir).absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    return settings, ensure_services(settings.database_url, settings.redis_url, data_dir,
                                     force_private=bool(settings.private_services))


def select_processes(specs: list[ProcessSpec], names: list[str]) -> list[ProcessSpec]:
    """The processes named (all when ``names`` is empty), in Procfile order."""
    known = {s.name for s in specs}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"no such process in the Procfile or Procfile.dev: {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    return [s for s in specs if not names or s.name in names]


def announce_when_listening(supervisor: Supervisor, settings: Settings, timeout: float = 60.0,
                            web_port: int = WEB_PORT) -> None:
    """Once web and the stand-in gateway accept connections, say where to go and how to stop."""
    names = {s.name for s in supervisor.specs}
    ports = [port for name, port in (("web", web_port), ("gateway", settings.gateway_port)) if name in names]
    deadline = time.monotonic() + timeout
    while not all(port_accepts(port) for port in ports):
        if supervisor.stop_requests or time.monotonic() > deadline:
            return
        time.sleep(0.25)
    supervisor.emit("dev", "everything is up")
    if "web" in names:
        supervisor.emit("dev", f"  web:              http://127.0.0.1:{web_port}")
    if "gateway" in names:
        supervisor.emit("dev", f"  stand-in gateway: {settings.gateway_url}")
    supervisor.emit("dev", "  stop:             Ctrl-C (stops every process, then the private servers)")


def _apply_migrations(database_url: str) -> None:
    from shared.db.migrate import apply_migrations

    applied = apply_migrations(database_url)
    say(f"applied migrations: {', '.join(applied)}" if applied else "database schema is up to date")


def data_dir_secret_key(data_dir: Path) -> str:
    """This data folder's own random SECRET_KEY (``<data_dir>/secret-key``, mode 0600), made on first use.

    Why: with the built-in development key, anyone who has read the source can mint buyer tokens for a
    ``./dev up`` system that is reachable from elsewhere; a random key per data folder costs nothing, and
    reusing it keeps tokens and waiting-room tickets valid across restarts. Made atomically: written to a
    private temporary file, then hard-linked into place, so a second ``./dev up`` starting at the same moment
    either makes the key or reads the complete one the first made, never half a file or a different key.
    """
    path = Path(data_dir) / SECRET_KEY_FILE
    if not path.exists():
        candidate = path.with_name(f".{SECRET_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (secrets.token_urlsafe(48) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(candidate, path)
            say(f"made a random SECRET_KEY for this data folder in {path}")
        except FileExistsError:
            pass  # another ./dev made it meanwhile: theirs is the key
        finally:
            candidate.unlink()
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        say(f"{path} was readable by others (mode {mode:o}); making it 0600")
        path.chmod(0o600)
    key = path.read_text().strip()
    if len(key) < SECRET_KEY_MIN_LENGTH:
        raise ServiceError(f"{path} holds no usable key (shorter than {SECRET_KEY_MIN_LENGTH} characters); "
                           "delete it and ./dev up makes a new one (buyer tokens signed with the old one stop working)")
    return key


def cmd_up(args: list[str]) -> int:
    """Run the whole system: services, migrations, then the Procfile's and Procfile.dev's processes (those
    named, or all) until Ctrl-C or SIGTERM, restarting any that dies by itself."""
    specs = select_processes(process_specs(), args)
    settings, services = _configured_services()
    try:
        _apply_migrations(services.database_url)
        env = services.env()
        if not os.environ.get("SECRET_KEY"):
            env["SECRET_KEY"] = data_dir_secret_key(services.data_dir)
        web_port = int(os.environ.get("PORT") or WEB_PORT)  # the Procfile convention: PORT for web
        supervisor = Supervisor(specs, lambda name: {**env, "PORT": str(web_port)} if name == "web" else dict(env))
        supervisor.on_started = lambda: threading.Thread(
            target=announce_when_listening, args=(supervisor, settings, 60.0, web_port), daemon=True
        ).start()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: supervisor.request_stop())
        return supervisor.run()
    finally:
        services.stop()


def pytest_exit_code(code: int) -> int:
    """Our exit code for pytest's: "no tests collected" (5) is a failure for us, with a message."""
    if code == PYTEST_NO_TESTS_COLLECTED:
        print("[dev] pytest collected no tests; treating that as a failure", file=sys.stderr, flush=True)
        return 1
    return code


def _wait_forwarding_signals(process: subprocess.Popen[bytes]) -> int:
    """Wait for pytest. Ctrl-C in the terminal reaches it directly; SIGTERM/SIGHUP to us become SIGINT to it,
    so it stops the way it does on Ctrl-C (fixture teardown included)."""
    def forward(signum: int, frame: object) -> None:
        process.send_signal(signal.SIGINT)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_test(args: list[str]) -> int:
    """Run the test suite. The database in DATABASE_URL is only the tests' way into the server: they create
    and drop databases of their own there (and start their own private redis-server)."""
    _, services = _configured_services()
    try:
        process = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=ROOT, env=services.env())
        return pytest_exit_code(_wait_forwarding_signals(process))
    finally:
        services.stop()


COMMANDS: dict[str, Callable[[list[str]], int]] = {"up": cmd_up, "test": cmd_test}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # so the finally blocks stop the private servers
    try:
        return COMMANDS[argv[0]](argv[1:])
    except UsageError as exc:
        print(f"[dev] {exc}\n{USAGE}", file=sys.stderr)
        return 2
    except ServiceError as exc:
        print(f"[dev] {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
