"""The one launcher for "the whole system": ``./dev up``, the test fixtures and the drills all start it here.

Why our own and not honcho: all three need the processes exactly as the ``Procfile`` (and ``Procfile.dev``)
names them, and more than honcho 2.0 does: bring back a process that dies during a day of development
(with back-off), run several copies of a process group under names and ports of their own (two web nodes,
a second stamping worker), stop or kill one of them, and say when each one is up. One module doing that
for everyone means the tests and the drills exercise the system the way ``./dev up`` runs it.

Every process runs its command under bash, in a process group of its own (so stopping it takes its
gunicorn workers or Celery pool children along), with the launcher's environment, the caller's overrides
and ``PS`` set to its name (foreman's convention; the Procfile names Celery nodes with it, so copies don't
share a node name). Its output goes to ``<logs>/<name>.log``, or, without a log folder, to one stream with
a ``name |`` prefix per line.

Stopping is systemd's ``KillMode=mixed``: SIGTERM to the main process (Celery's warm shutdown, gunicorn's
graceful stop), to the rest of the group once it ended, SIGKILL after the grace. So a Procfile line is one
simple command, which bash replaces itself with; a compound one (``cd x && celery …``) leaves bash as the
main process, which dies of the SIGTERM at once, and the group's SIGTERM then reaches a prefork node's
pool children mid-task.

"Up" is alive and ready: web and the stand-in gateway answer HTTP on their port, a Celery worker has logged
its "ready." line since it started, anything else is up while it runs.

Only the standard library: drills use this module and must stay clients of the system.
"""
from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from shared.devtools.procfile import ROOT, ProcessSpec, UnknownProcess, process_specs, select_processes

STOP_GRACE_SECONDS = 10.0
# Process groups that answer HTTP when ready: the variable that holds their port, and the path to ask.
HTTP_READY: dict[str, tuple[str, str]] = {"web": ("PORT", "/readyz"), "polls": ("POLLS_PORT", "/healthz"),
                                           "gateway": ("GATEWAY_PORT", "/sandbox/faults")}
# What a Celery worker logs once it consumes its queues.
CELERY_READY = re.compile(rb"\bready\.")
CELERY_WORKER = re.compile(r"\bcelery\b.*\bworker\b")
COLOURS = ["36", "33", "32", "35", "34", "96", "93", "92", "95", "94"]


class LaunchError(RuntimeError):
    """A process could not be started, or did not come up (the message carries the end of its log)."""


# ---------------------------------------------------------------------------------------------- processes


def descendants(pid: int, include_self: bool = False) -> list[int]:
    """Every process below ``pid`` (from /proc): a gunicorn master's workers, a Celery node's pool."""
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


@dataclass(frozen=True)
class RestartPolicy:
    """How a process that exited by itself is brought back, as a process manager would.

    One dead worker (say, after a Redis blip) must not take the whole system down, and a process that
    cannot start at all (a port in use, a broken setting) must not be restarted in a tight loop forever:
    so the delay doubles from ``initial_delay`` up to ``max_delay``, starts again from ``initial_delay``
    once a process has stayed up ``stable_after`` seconds, and after ``max_quick_deaths`` deaths in a row,
    each sooner than ``stable_after`` after its start, the launcher gives up on it.
    """

    initial_delay: float = 1.0
    max_delay: float = 30.0
    stable_after: float = 60.0
    max_quick_deaths: int = 5


class Process:
    """One named process of the system (a copy of a process group), its state and its back-off."""

    def __init__(self, name: str, group: str, command: str, env: dict[str, str], *, restart: bool,
                 log: Path | None, delay: float) -> None:
        self.name, self.group, self.command, self.env = name, group, command, env
        self.overrides: dict[str, str] = {}  # what the caller set on top of the launcher's environment
        self.restart = restart
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self.wanted = True  # False once stopped on purpose: never brought back
        self.started_at = 0.0
        self.restarts = 0
        self.quick_deaths = 0
        self.delay = delay
        self.restart_at: float | None = None
        self.gave_up = False
        self._started_offset = 0  # where in the log this run's output starts
        self._scan_from = 0  # how far this run's output was searched for the ready line
        self._ready_line = False

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def port(self) -> int | None:
        """The port an HTTP process group listens on (from its environment), else None."""
        variable = HTTP_READY.get(self.group, ("", ""))[0]
        value = self.env.get(variable) if variable else None
        return int(value) if value else None

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port else None

    def pids(self) -> list[int]:
        """This process and everything below it."""
        return descendants(self.pid, include_self=True) if self.alive() and self.pid else []

    def up(self) -> bool:
        """Alive and ready now (an HTTP answer, or the worker's "ready." line since this start)."""
        if not self.alive():
            return False
        if self.group in HTTP_READY and self.port:
            return _http_ok(self.port, HTTP_READY[self.group][1])
        if CELERY_WORKER.search(self.command):
            return self._saw_ready_line()
        return True

    def output(self) -> bytes:
        """What this run wrote to its log so far (empty without a log file)."""
        if self.log is None:
            return b""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._started_offset)
                return f.read()
        except OSError:
            return b""

    def tail(self, lines: int = 15) -> str:
        text = self.output().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _begin(self, popen: subprocess.Popen[bytes], offset: int) -> None:
        self.popen, self.started_at, self.restart_at = popen, time.monotonic(), None
        self._started_offset = self._scan_from = offset
        self._ready_line = False

    def _saw_ready_line(self) -> bool:
        if self._ready_line or self.log is None:
            return self._ready_line
        try:
            with open(self.log, "rb") as f:
                f.seek(self._scan_from)
                chunk = f.read()
        except OSError:
            return False
        if CELERY_READY.search(chunk):
            self._ready_line = True
        else:
            self._scan_from += max(0, len(chunk) - 16)  # read on from here next time; a line may be half written
        return self._ready_line


def _http_ok(port: int, path: str) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def _killpg(process: Process, sig: signal.Signals) -> None:
    if process.popen is None:
        return
    try:
        os.killpg(process.popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_main(process: Process, sig: signal.Signals) -> None:
    """Popen's own send_signal: it signals nothing once the process is reaped (its pid may be another's)."""
    if process.popen is not None:
        process.popen.send_signal(sig)


def _group_alive(process: Process) -> bool:
    """Whether anything is left in the process's group (its main process already reaped or not)."""
    if process.popen is None:
        return False
    try:
        os.killpg(process.popen.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# ---------------------------------------------------------------------------------------------- launcher


class Launcher:
    """Starts, watches and stops the system's processes.

    ``env`` is every process's environment (default: ours), with the running Python's folder first on
    PATH so the Procfile's ``gunicorn``, ``celery`` and ``python`` are this virtualenv's. ``restart`` is
    the default for bringing back processes that die by themselves, under ``policy``: off for tests and
    drills that kill on purpose, on for ``./dev up``; :meth:`start` can say otherwise per process.
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, specs: Iterable[ProcessSpec] | None = None,
                 cwd: Path = ROOT, logs: Path | None = None, out: TextIO | None = None,
                 restart: bool = False, policy: RestartPolicy | None = None,
                 grace: float = STOP_GRACE_SECONDS) -> None:
        self.specs = {s.name: s for s in (process_specs() if specs is None else specs)}
        base = dict(os.environ if env is None else env)
        base["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", os.defpath)])
        self.env = base
        self.cwd = cwd
        self.logs = logs
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
        self.out = out if out is not None or logs is not None else sys.stdout
        self.restart_by_default = restart
        self.policy = policy if policy is not None else RestartPolicy()
        self.grace = grace
        self.processes: dict[str, Process] = {}
        self.stop_requests = 0
        self.gave_up: str | None = None
        self._lock = threading.RLock()
        self._out_lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self._watcher: threading.Thread | None = None
        self._closed = False
        self._width = max([len(n) for n in self.specs] + [3])
        self._colours: dict[str, str] = {}

    # -- starting --------------------------------------------------------------------------------
    def start(self, group: str, *, name: str | None = None, env: Mapping[str, str] | None = None,
              port: int | None = None, command: str | None = None, restart: bool | None = None) -> Process:
        """Start a copy of process group ``group`` (its Procfile command, or ``command``) named ``name``
        (default: the group's name), with ``env`` on top of the launcher's and, for web or the gateway,
        listening on ``port``. ``start(name)`` alone brings a stopped or dead process back as it was
        (same group, command, settings); with any other argument it is replaced. A running one is an
        error. Returns at once; :meth:`wait_ready` waits for it to come up."""
        name = name or group
        previous = self.processes.get(name)
        if previous is not None and env is None and port is None and command is None and restart is None:
            group, command, restart, env = previous.group, previous.command, previous.restart, previous.overrides
        if command is None:
            if group not in self.specs:
                raise UnknownProcess(f"no such process in the Procfile or Procfile.dev: {group} "
                                     f"(known: {', '.join(sorted(self.specs))})")
            command = self.specs[group].command
        overrides = dict(env or {})
        if port is not None:
            if group not in HTTP_READY:
                raise LaunchError(f"{group} listens on no port of its own")
            overrides[HTTP_READY[group][0]] = str(port)
        with self._lock:
            current = self.processes.get(name)
            if current is not None and current.alive():
                raise LaunchError(f"{name} is running already (pid {current.pid})")
            self.processes.pop(name, None)  # a replaced process starts at the end of the listing
            process = Process(name, group, command, {**self.env, **overrides, "PS": name},
                              restart=self.restart_by_default if restart is None else restart,
                              log=self.logs / f"{name}.log" if self.logs is not None else None,
                              delay=self.policy.initial_delay)
            process.overrides = overrides
            self.processes[name] = process
            self._width = max(self._width, len(name))
            self._colours.setdefault(name, COLOURS[len(self._colours) % len(COLOURS)])
            self._spawn(process)
            if process.restart:
                self._ensure_watcher()
        return process

    def start_all(self, names: Iterable[str] | None = None, env: Mapping[str, str] | None = None) -> list[Process]:
        """The Procfile processes named (all when None), in Procfile order."""
        specs = select_processes(list(self.specs.values()), names or [])
        return [self.start(spec.name, env=env) for spec in specs]

    def _spawn(self, process: Process) -> None:
        argv = ["bash", "-c", process.command]
        common = dict(cwd=self.cwd, env=process.env, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                      start_new_session=True)
        if process.log is not None:
            with open(process.log, "ab") as log:
                offset = log.tell()
                popen = subprocess.Popen(argv, stdout=log, **common)  # type: ignore[call-overload]
            process._begin(popen, offset)
            return
        popen = subprocess.Popen(argv, stdout=subprocess.PIPE, **common)  # type: ignore[call-overload]
        process._begin(popen, 0)
        reader = threading.Thread(target=self._pump, args=(process, popen), daemon=True, name=f"out-{process.name}")
        reader.start()
        self._readers.append(reader)

    def _pump(self, process: Process, popen: subprocess.Popen[bytes]) -> None:
        assert popen.stdout is not None
        for raw in iter(popen.stdout.readline, b""):
            if process.popen is popen and CELERY_READY.search(raw):
                process._ready_line = True
            self.emit(process.name, raw.decode("utf-8", errors="replace").rstrip("\r\n"))

    def emit(self, name: str, line: str) -> None:
        """One line of output under ``name``'s prefix (into ``<logs>/launcher.log`` when processes log to files)."""
        if self.out is None:
            if self.logs is not None:
                with self._out_lock, open(self.logs / "launcher.log", "a") as log:
                    log.write(f"{time.strftime('%H:%M:%S')} {name} | {line}\n")
            return
        prefix = f"{name:<{self._width}} |"
        if name in self._colours and getattr(self.out, "isatty", lambda: False)():
            prefix = f"\033[{self._colours[name]}m{prefix}\033[0m"
        with self._out_lock:
            self.out.write(f"{prefix} {line}\n")
            self.out.flush()

    # -- state -----------------------------------------------------------------------------------
    def up(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.up()

    def status(self) -> dict[str, bool]:
        """Whether each process is up now."""
        return {name: process.up() for name, process in list(self.processes.items())}

    def wait_ready(self, names: Iterable[str] | None = None, timeout: float = 90.0) -> None:
        """Until every named process (default: all still wanted) is up. A process that died and won't be
        brought back, or ``timeout``, is a :class:`LaunchError` with the end of its log."""
        pending = list(names) if names is not None else [n for n, p in self.processes.items() if p.wanted]
        deadline = time.monotonic() + timeout
        missing = [name for name in pending if name not in self.processes]
        if missing:
            raise LaunchError(f"never started: {', '.join(missing)}")
        while pending:
            pending = [name for name in pending if not self.up(name)]
            for name in pending:
                process = self.processes[name]
                if not process.alive() and (not process.restart or process.gave_up or not process.wanted):
                    code = process.popen.returncode if process.popen is not None else None
                    raise LaunchError(f"{name} exited with code {code}:\n{process.tail()}")
            if pending and time.monotonic() > deadline:
                raise LaunchError(f"not up after {timeout:.0f} s: {', '.join(pending)}\n" + "\n".join(
                    f"--- {name}:\n{self.processes[name].tail()}" for name in pending))
            if pending:
                time.sleep(0.1)

    # -- stopping --------------------------------------------------------------------------------
    def stop(self, *names: str) -> None:
        """Stop these processes on purpose, as systemd's ``KillMode=mixed`` does (docs/deploy.md): SIGTERM
        to each main process only, SIGTERM to what is left in its group once it has ended, SIGKILL to
        what is left after the grace period (at once on a further stop request); they stay down until
        started again.

        The main process alone first, because a group's SIGTERM reaches a Celery prefork node's pool
        children too, and they die of it at once (Celery resets SIGTERM in them): the task in hand was cut
        short with its stamping lease held, instead of finishing in the node's warm shutdown."""
        with self._lock:
            processes = [self.processes[name] for name in names if name in self.processes]
            for process in processes:
                process.wanted, process.restart_at = False, None
                if process.alive():
                    _kill_main(process, signal.SIGTERM)
        requests_before = self.stop_requests
        deadline = time.monotonic() + self.grace
        termed: set[str] = set()
        while True:
            for process in processes:
                if not process.alive() and process.name not in termed:
                    termed.add(process.name)
                    _killpg(process, signal.SIGTERM)  # a wrapper's children, a leftover of the main process
            if not any(_group_alive(p) for p in processes):  # the main process is in its group
                break
            if time.monotonic() > deadline or self.stop_requests > requests_before:
                stubborn = [p.name for p in processes if _group_alive(p)]
                self.emit("dev", f"killing {', '.join(stubborn)} (still running)")
                break
            time.sleep(0.05)
        self._reap(processes)

    def kill(self, *names: str) -> None:
        """SIGKILL these processes' groups, as a crash or a lost machine would: a process that restarts on
        death is brought back after its back-off."""
        processes = [self.processes[name] for name in names if name in self.processes]
        for process in processes:
            _killpg(process, signal.SIGKILL)
        for process in processes:
            if process.popen is not None:
                process.popen.wait()

    def stop_all(self) -> None:
        """Stop every process, then the watcher; the launcher is done after this."""
        running = [name for name, p in self.processes.items() if p.alive()]
        if running:
            self.emit("dev", f"stopping {', '.join(running)}")
        self.stop(*self.processes)
        self._closed = True
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        for reader in self._readers:
            reader.join(timeout=2)

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop everything (safe from a signal handler)."""
        self.stop_requests += 1

    @staticmethod
    def _reap(processes: list[Process]) -> None:
        for process in processes:
            _killpg(process, signal.SIGKILL)  # also whatever it left behind in its group
            if process.popen is not None:
                process.popen.wait()

    # -- running in the foreground, restarting -------------------------------------------------------
    def run(self, names: Iterable[str] | None = None, on_started: Callable[[], None] | None = None,
            env_for: Mapping[str, Mapping[str, str]] | None = None) -> int:
        """``./dev up``: start the named processes (all when None), each with ``env_for[name]`` on top of
        the common environment, keep them up until :meth:`request_stop` (then 0) or until one can't stay
        up (then its exit code), and stop them all either way."""
        try:
            for spec in select_processes(list(self.specs.values()), names or []):
                if self.stop_requests:
                    break
                self.start(spec.name, env=(env_for or {}).get(spec.name))
            if on_started is not None and not self.stop_requests:
                on_started()
            while not self.stop_requests and self.gave_up is None:
                time.sleep(0.1)
            if self.gave_up is not None:
                self.emit("dev", "stopping everything")
        finally:
            self.stop_all()
        if self.gave_up is None:
            return 0
        popen = self.processes[self.gave_up].popen
        return (popen.returncode if popen is not None else None) or 1

    def _ensure_watcher(self) -> None:
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch, daemon=True, name="launcher-watch")
            self._watcher.start()

    def _watch(self) -> None:
        while not self._closed:
            with self._lock:
                now = time.monotonic()
                for process in list(self.processes.values()):
                    if not (process.restart and process.wanted) or process.gave_up:
                        continue
                    if process.restart_at is not None:
                        if now >= process.restart_at:
                            process.restarts += 1
                            self._spawn(process)
                        continue
                    if process.popen is not None and process.popen.poll() is not None:
                        self._schedule_restart(process, now)
            time.sleep(0.1)

    def _schedule_restart(self, process: Process, now: float) -> None:
        """Note a death and pick the restart time, or give up on a process that died too often too soon."""
        assert process.popen is not None
        code, policy = process.popen.returncode, self.policy
        _killpg(process, signal.SIGKILL)  # whatever it left behind in its group goes with it
        if now - process.started_at >= policy.stable_after:
            process.quick_deaths, process.delay = 0, policy.initial_delay
        else:
            process.quick_deaths += 1
        if process.quick_deaths >= policy.max_quick_deaths:
            self.emit("dev", f"{process.name} exited with code {code}, {process.quick_deaths} times in a row "
                             f"within {policy.stable_after:g} s of starting; giving up")
            process.gave_up = True
            self.gave_up = self.gave_up or process.name
            return
        delay = process.delay
        process.delay = min(policy.max_delay, process.delay * 2)
        process.restart_at = now + delay
        self.emit("dev", f"{process.name} exited with code {code}; restarting in {delay:g} s")
