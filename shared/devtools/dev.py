"""The project's two commands, ``./dev up`` and ``./dev test`` (``python -m shared.devtools.dev``).

``up`` finds or starts PostgreSQL and Redis (:mod:`shared.devtools.services`), applies the migrations, gives
the data folder a secret key of its own, and runs every ``Procfile`` and ``Procfile.dev`` process (or the
ones named) under the launcher (:mod:`shared.devtools.launcher`) with restarts on, until Ctrl-C or SIGTERM.
``test`` hands the same servers to pytest through the environment; the fixtures start the rest.
"""
from __future__ import annotations

import os
import secrets
import shlex
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from shared.devtools.launcher import LaunchError, Launcher
from shared.devtools.procfile import ROOT, UnknownProcess, process_specs, select_processes
from shared.devtools.services import ServiceError, Services, ensure_services, say

if TYPE_CHECKING:
    from shared.config import Settings

SECRET_KEY_FILE = "secret-key"
SECRET_KEY_MIN_LENGTH = 32
WEB_PORT = 8000
POLLS_PORT = 8002  # the poll server (web/pollserver.py); without the proxy, web answers polls too
DEV_SMTP_PORT = 8025  # Procfile.dev's mailbox (shared/devtools/smtp.py)
PYTEST_NO_TESTS_COLLECTED = 5
USAGE = "usage: ./dev up [process ...]   |   ./dev test [pytest args ...]"


def _configured_services(min_connections: int | None = None) -> tuple[Settings, Services]:
    from shared.config import load_settings

    settings = load_settings()
    data_dir = Path(settings.data_dir).absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    return settings, ensure_services(settings.database_url, settings.redis_url, data_dir,
                                     force_private=bool(settings.private_services), min_connections=min_connections)


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


def port_clash(env: dict[str, str], settings: Settings) -> str | None:
    """Two of ``./dev up``'s listeners given one port (say POLLS_PORT=8001, the stand-in gateway's): the
    second would restart for ever while the first answers the other's requests. What clashes, or None."""
    ports = {"PORT (web)": env.get("PORT"), "POLLS_PORT (poll server)": env.get("POLLS_PORT"),
             "GATEWAY_PORT (stand-in gateway)": env.get("GATEWAY_PORT") or str(settings.gateway_port),
             "SMTP_PORT (mailbox)": env.get("SMTP_PORT") if env.get("SMTP_HOST") == "127.0.0.1" else None}
    seen: dict[str, str] = {}
    for name, port in ports.items():
        if not port:
            continue
        if port in seen:
            return f"{seen[port]} and {name} are both {port}: give one of them another port"
        seen[port] = name
    return None


def worker_metrics_ports(launcher: Launcher, names: list[str], base: int) -> dict[str, int]:
    """Each Celery worker group named in ``names`` its own metrics port: ``base`` plus its place among the
    Procfile's worker groups (on one machine they can't share one; a production node sets METRICS_PORT
    in its environment)."""
    workers = [name for name, spec in launcher.specs.items()
               if " worker " in f" {spec.command} " and "celery" in spec.command]
    # Numbered over every worker group, so a group keeps its port whichever processes are started.
    return {name: base + index for index, name in enumerate(workers) if name in names}


def announce_when_up(launcher: Launcher, settings: Settings, ports: dict[str, int] | None = None,
                     timeout: float = 60.0) -> None:
    """Once every process is up (web and the stand-in answer, the workers are ready), say where to go and
    how to stop."""
    names = [name for name in ("web", "gateway") if name in launcher.processes]
    try:
        launcher.wait_ready(timeout=timeout)
    except LaunchError:
        return  # the launcher says what went wrong with the process itself
    if launcher.stop_requests:
        return
    launcher.emit("dev", "everything is up")
    if "web" in names:
        launcher.emit("dev", f"  web:              {launcher.processes['web'].url}")
    if "polls" in launcher.processes:
        launcher.emit("dev", f"  poll server:      {launcher.processes['polls'].url}/api/v1/queue/<ticket> "
                             "(the proxy's target for place-in-line reads; web answers them too)")
    if "gateway" in names:
        launcher.emit("dev", f"  stand-in gateway: {settings.gateway_url}")
    if "mailbox" in launcher.processes:
        launcher.emit("dev", f"  mailbox:          smtp://127.0.0.1:{launcher.env.get('SMTP_PORT')}, "
                             f"e-mails in {Path(launcher.env.get('DATA_DIR', '.data')) / 'mail'}")
    if ports:
        listing = ", ".join(f"{name} {port}" for name, port in ports.items())
        launcher.emit("dev", f"  worker metrics:   http://127.0.0.1:<port>/metrics ({listing})")
    launcher.emit("dev", "  stop:             Ctrl-C (stops every process, then the private servers)")


def _ensure_dev_pki(env: dict[str, str]) -> None:
    """The development CA, made once here before any process that signs or verifies starts (production
    only ever loads key material)."""
    from shared.config import load_settings
    from shared.devtools.pki import ensure_dev_pki

    if ensure_dev_pki(load_settings(env)):
        say(f"made a development CA under {env.get('DATA_DIR', '.data')}/pki")


def cmd_up(args: list[str]) -> int:
    """Run the whole system: services, migrations, then the Procfile's and Procfile.dev's processes (those
    named, or all) until Ctrl-C or SIGTERM, restarting any that dies by itself."""
    names = [spec.name for spec in select_processes(process_specs(), args)]
    settings, services = _configured_services()
    try:
        _apply_migrations(services.database_url)
        env = services.env()
        if not os.environ.get("SECRET_KEY"):
            env["SECRET_KEY"] = data_dir_secret_key(services.data_dir)
        env["PORT"] = os.environ.get("PORT") or str(WEB_PORT)  # the Procfile convention: PORT for web
        env["POLLS_PORT"] = os.environ.get("POLLS_PORT") or str(POLLS_PORT)
        if not os.environ.get("SMTP_HOST"):  # e-mail goes to Procfile.dev's mailbox, unless told otherwise
            env.update(SMTP_HOST="127.0.0.1", SMTP_PORT=os.environ.get("SMTP_PORT") or str(DEV_SMTP_PORT),
                       SMTP_SECURITY="none", SMTP_USERNAME="", SMTP_PASSWORD="")
        _ensure_dev_pki(env)
        clash = port_clash(env, settings)
        if clash:
            raise ServiceError(clash)
        launcher = Launcher(env, restart=True)
        ports = worker_metrics_ports(launcher, names, int(os.environ.get("DEV_METRICS_PORT_BASE") or 9101))
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: launcher.request_stop())
        return launcher.run(names, env_for={name: {"METRICS_PORT": str(port)} for name, port in ports.items()},
                            on_started=lambda: threading.Thread(
                                target=announce_when_up, args=(launcher, settings, ports), daemon=True).start())
    finally:
        services.stop()


def pytest_exit_code(code: int) -> int:
    """Our exit code for pytest's: "no tests collected" (5) is a failure for us, with a message."""
    if code == PYTEST_NO_TESTS_COLLECTED:
        print("[dev] pytest collected no tests; treating that as a failure", file=sys.stderr, flush=True)
        return 1
    return code


def _wait_forwarding_signals(process: subprocess.Popen[bytes], *, group: bool = False) -> int:
    """Wait for pytest, so it stops the way it does on Ctrl-C (fixture teardown included). In the terminal's
    process group (``group`` False: one process, maybe a debugger reading the terminal) Ctrl-C reaches it
    directly and SIGTERM/SIGHUP to us become SIGINT to it; in a group of its own (xdist: the workers must
    hear it too) Ctrl-C, SIGTERM and SIGHUP to us become SIGINT to the whole group."""
    def forward(signum: int, frame: object) -> None:
        try:
            if group:
                os.killpg(process.pid, signal.SIGINT)
            else:
                process.send_signal(signal.SIGINT)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, forward if group else signal.SIG_IGN)
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# Two pytest-xdist workers, each taking whole test files: most of the suite's time is waiting (for worker
# processes, retries' back-off, failovers, a browser), so two files at a time fill the two cores that one
# left mostly idle (689 tests: 14:46 one at a time, 9:35 two at a time, same machine, same commit). Whole
# files, because a file's tests share module fixtures and some run in the order they are written. Each
# worker makes its own session fixtures (database, private Redis, the Procfile's processes): nothing is
# shared between them but the PostgreSQL server, on which every database has a name of its own.
TEST_WORKERS_DEFAULT = 2
# PostgreSQL connections one worker's systems may hold at once (two systems of the Procfile's processes,
# each process with its own pool, plus the tests' own): one worker nearly fills a default server's 100.
TEST_CONNECTIONS_PER_WORKER = 100
# Arguments after which one process is wanted (a debugger), or that choose the distribution themselves.
_ONE_PROCESS = ("--pdb", "--trace", "--looponfail", "-f", "no:xdist", "-pno:xdist")
_DISTRIBUTION = ("-n", "--numprocesses", "-d", "--tx", "--dist", "--maxprocesses")


def _words(args: list[str], environ: Mapping[str, str]) -> list[str]:
    return [*shlex.split(environ.get("PYTEST_ADDOPTS", "")), *args]


def _xdist_off(words: list[str]) -> bool:
    return any(a in _ONE_PROCESS or a.startswith("--pdbcls=") for a in words)


def pytest_args(args: list[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """pytest's arguments for ``./dev test ARGS``: ARGS, run on TEST_WORKERS xdist workers (default
    :data:`TEST_WORKERS_DEFAULT`, ``auto``: one per core; 0 or 1: in this process, one test at a time)
    unless ARGS (or PYTEST_ADDOPTS) choose the distribution themselves (``-n``, ``--numprocesses``,
    ``--dist``, ``-d``/``--tx``), turn xdist off (``-p no:xdist``) or want one process (``--pdb``,
    ``--trace``)."""
    words = _words(args, environ)
    if _xdist_off(words) or any(a.startswith(_DISTRIBUTION) for a in words):
        return list(args)
    workers = (environ.get("TEST_WORKERS") or str(TEST_WORKERS_DEFAULT)).strip().lower()
    if workers != "auto" and not workers.isdigit():
        raise ServiceError(f"TEST_WORKERS={workers!r} must be a whole number or auto")
    if workers != "auto" and int(workers) <= 1:
        return list(args)
    return ["-n", workers, "--dist", "loadfile", *args]


def workers_of(args: list[str], environ: Mapping[str, str] = os.environ) -> int:
    """How many xdist workers pytest will run for these arguments and PYTEST_ADDOPTS (1: none), at
    least: for ``auto`` the machine's CPUs (xdist may count physical cores, fewer), and ``--tx N*popen``."""
    words = _words(args, environ)
    if _xdist_off(words):
        return 1
    count = 1
    for i, arg in enumerate(words):
        value = None
        if arg in ("-n", "--numprocesses", "--tx") and i + 1 < len(words):
            value = words[i + 1]
        elif arg.startswith(("--numprocesses=", "--tx=")):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-n") and len(arg) > 2:
            value = arg[2:]
        if value is None:
            continue
        if arg.startswith("--tx"):
            times, _, kind = value.partition("*")
            count = int(times) if kind and times.isdigit() else 1
        elif value in ("auto", "logical"):
            count = os.cpu_count() or 1
        else:
            count = max(1, int(value)) if value.isdigit() else 1
    return count


def cmd_test(args: list[str]) -> int:
    """Run the test suite. The database in DATABASE_URL is only the tests' way into the server: they create
    and drop databases of their own there (and start their own private redis-server). A server that allows
    too few connections for the workers (a default one has 100) is replaced by a private one that allows
    enough, rather than failing tests at random with "too many clients"."""
    args = pytest_args(args)
    workers = workers_of(args)
    _, services = _configured_services(TEST_CONNECTIONS_PER_WORKER * workers + 50 if workers > 1 else None)
    process: subprocess.Popen[bytes] | None = None
    try:
        # With xdist, a process group of its own, so a stop reaches the workers too (each tears its
        # systems down): Ctrl-C and SIGTERM/SIGHUP to us become SIGINT to the whole group.
        process = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=ROOT, env=services.env(),
                                   process_group=0 if workers > 1 else None)
        return pytest_exit_code(_wait_forwarding_signals(process, group=workers > 1))
    finally:
        if process is not None and process.poll() is None:  # we were stopped before we could wait for it
            try:
                os.killpg(process.pid, signal.SIGINT) if workers > 1 else process.send_signal(signal.SIGINT)
                process.wait(timeout=120)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
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
    except UnknownProcess as exc:
        print(f"[dev] {exc}\n{USAGE}", file=sys.stderr)
        return 2
    except (ServiceError, LaunchError) as exc:
        print(f"[dev] {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
