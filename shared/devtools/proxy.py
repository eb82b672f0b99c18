"""A private nginx in front of N web nodes, rendered from the production file ``deploy/nginx/meterai.conf``.

The tests, the benchmarks and the multi-node drill put the proxy production runs in front of their
gunicorn nodes, so what they prove is about that file, not a look-alike: :func:`render_site` keeps every
line of it except the web nodes' list and the listen section (plain http on a loopback port instead of
TLS on 443), and the plain-http redirect server. Everything nginx writes (pid, logs, request-body and
proxy temp files) goes under the caller's data folder; nginx runs in the foreground (``daemon off``) as
our child, in a process group of its own, so :meth:`NginxHandle.stop` takes its workers along.

Only the standard library and the other client-side devtools: drills use this module and must stay
clients of the system.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.devtools.launcher import descendants
from shared.devtools.procfile import ROOT
from shared.devtools.services import ServiceError, free_port, port_accepts

TEMPLATE = ROOT / "deploy" / "nginx" / "meterai.conf"
UPSTREAM_OPTIONS = "max_fails=3 fail_timeout=10s"
_NODES = re.compile(r"^([ \t]*)# web nodes: begin.*?\n.*?^[ \t]*# web nodes: end[^\n]*\n", re.M | re.S)
_LISTEN = re.compile(r"^([ \t]*)# listen: begin[^\n]*\n.*?^[ \t]*# listen: end[^\n]*\n", re.M | re.S)
_POLLS = re.compile(r"^([ \t]*)# poll servers: begin.*?\n.*?^[ \t]*# poll servers: end[^\n]*\n", re.M | re.S)
_REDIRECT = re.compile(r"^# redirect: begin[^\n]*\n.*?^# redirect: end[^\n]*\n", re.M | re.S)
_UPSTREAM = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d+$")
_DIRECTIVE_NAME = re.compile(r"^[a-z_0-9]+$")


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if not path:
        raise ServiceError("nginx was not found (Debian: apt-get install nginx)")
    return path


def _check_upstreams(upstreams: list[str]) -> list[str]:
    if not upstreams:
        raise ValueError("the proxy needs at least one web node (host:port)")
    for upstream in upstreams:
        if not _UPSTREAM.match(upstream):
            raise ValueError(f"not a web node address (host:port): {upstream!r}")
    return list(upstreams)


def render_site(upstreams: list[str], port: int, *, template: Path = TEMPLATE,
                access_log: Path | None = None, error_log: Path | None = None,
                trust_forwarded_from: str | None = None, polls: list[str] | None = None,
                **limits: str | int) -> str:
    """The production site file with ``upstreams`` as its web nodes, listening on 127.0.0.1:``port``.

    ``polls``: the poll servers (web/pollserver.py) the place-in-line reads go to, with the web nodes as
    their backups, as in production; none (the default), and the web nodes answer them as before.

    ``limits`` replaces the value of every occurrence of a directive the file already has (for example
    ``proxy_read_timeout="2s"``, ``client_max_body_size="1m"``); a directive the file doesn't have is an
    error, so a caller can't believe it tuned something that isn't there. ``trust_forwarded_from`` makes
    nginx take the client's address from the X-Forwarded-For of a front proxy at that address (what
    production does behind a load balancer of its own; the benchmarks use it to give each simulated buyer
    an address of its own).
    """
    text = template.read_text()
    nodes = "".join(f"    server {u} {UPSTREAM_OPTIONS};\n" for u in _check_upstreams(upstreams))
    text, found_nodes = _NODES.subn(lambda m: nodes, text, count=1)
    if polls:
        poll_lines = "".join(f"    server {u} {UPSTREAM_OPTIONS};\n" for u in _check_upstreams(polls)) + "".join(
            f"    server {u} {UPSTREAM_OPTIONS} backup;\n" for u in upstreams)
    else:
        poll_lines = nodes
    text, found_polls = _POLLS.subn(lambda m: poll_lines, text, count=1)
    listen = f"    listen 127.0.0.1:{port};\n"
    if trust_forwarded_from:
        listen += (f"    set_real_ip_from {trust_forwarded_from};\n    real_ip_header X-Forwarded-For;\n")
    text, found_listen = _LISTEN.subn(lambda m: listen, text, count=1)
    text, found_redirect = _REDIRECT.subn("", text, count=1)
    if not (found_nodes and found_polls and found_listen and found_redirect):
        raise ValueError(f"{template} lost its 'web nodes', 'poll servers', 'listen' or 'redirect' markers")
    overrides: dict[str, str] = {name: str(value) for name, value in limits.items()}
    if access_log is not None:
        overrides["access_log"] = f"{access_log} meterai_json"
    if error_log is not None:
        overrides["error_log"] = f"{error_log} warn"
    for name, value in overrides.items():
        if not _DIRECTIVE_NAME.match(name) or ";" in value or "\n" in value:
            raise ValueError(f"not a directive and value nginx could take: {name} {value!r}")
        text, count = re.subn(rf"^([ \t]*){name}[ \t]+[^;\n]*;", lambda m: f"{m.group(1)}{name} {value};",
                              text, flags=re.M)
        if not count:
            raise ValueError(f"{template.name} has no {name} directive to set")
    return text


def render_main(data_dir: Path, site: str, *, workers: int = 1) -> str:
    """A whole nginx.conf around ``site``, every path under ``data_dir``. As root, nginx's workers run as
    root too: the default user (nobody) couldn't write the temp folders under a private data folder."""
    temp = data_dir / "temp"
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes {workers};\n"
        f"pid {data_dir / 'nginx.pid'};\n"
        f"error_log {data_dir / 'logs' / 'error.log'} warn;\n"
        "events {\n    worker_connections 4096;\n}\n"
        "http {\n"
        "    default_type application/octet-stream;\n"
        f"    client_body_temp_path {temp / 'body'};\n"
        f"    proxy_temp_path {temp / 'proxy'};\n"
        f"    fastcgi_temp_path {temp / 'fastcgi'};\n"
        f"    uwsgi_temp_path {temp / 'uwsgi'};\n"
        f"    scgi_temp_path {temp / 'scgi'};\n"
        + "".join(f"    {line}\n" if line else "\n" for line in site.splitlines())
        + "}\n"
    )


@dataclass
class NginxHandle:
    """A running private nginx: its address, its files, and how to change its web nodes or stop it."""

    data_dir: Path
    port: int
    upstreams: list[str]
    limits: dict[str, str | int] = field(default_factory=dict)
    trust_forwarded_from: str | None = None
    workers: int = 1
    polls: list[str] = field(default_factory=list)  # poll servers (web/pollserver.py), the web nodes their backups
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def conf(self) -> Path:
        return self.data_dir / "nginx.conf"

    @property
    def access_log(self) -> Path:
        return self.data_dir / "logs" / "access.log"

    @property
    def error_log(self) -> Path:
        return self.data_dir / "logs" / "error.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def pids(self) -> list[int]:
        """The master and its children: the workers, and the static cache's manager and loader."""
        if self.process is None or self.process.poll() is not None:
            return []
        return descendants(self.process.pid, include_self=True)

    def worker_pids(self) -> list[int]:
        """The worker processes only (what serves requests; the cache's helpers come and go on their own)."""
        found = []
        for pid in self.pids():
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"worker process" in title:
                found.append(pid)
        return found

    def _write_conf(self, upstreams: list[str]) -> None:
        cache = self.data_dir / "cache" / "static"
        limits = {"proxy_cache_path": f"{cache} levels=1:2 keys_zone=meterai_static:1m max_size=64m inactive=2h"
                                      " use_temp_path=off", **self.limits}
        site = render_site(upstreams, self.port, access_log=self.access_log, error_log=self.error_log,
                           trust_forwarded_from=self.trust_forwarded_from, polls=self.polls, **limits)
        for sub in ("logs", "temp", "cache/static"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        candidate = self.conf.with_suffix(".conf.new")
        candidate.write_text(render_main(self.data_dir, site, workers=self.workers))
        checked = subprocess.run(self._argv(candidate, "-t", "-q"), capture_output=True, text=True)
        if checked.returncode != 0:
            raise ServiceError(f"nginx refused its configuration {candidate}:\n{checked.stderr.strip()}")
        candidate.replace(self.conf)
        self.upstreams = list(upstreams)

    def _argv(self, conf: Path, *extra: str) -> list[str]:
        return [nginx_binary(), "-p", str(self.data_dir), "-c", str(conf), "-e", str(self.error_log), *extra]

    def start(self, timeout: float = 10.0) -> None:
        self._write_conf(self.upstreams)
        with open(self.data_dir / "logs" / "nginx.out", "ab") as out:
            self.process = subprocess.Popen(self._argv(self.conf, "-g", "daemon off;"), stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not (port_accepts(self.port) and len(self.worker_pids()) >= self.workers):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"nginx on port {self.port} did not start:\n{_tail(self.error_log)}")
            time.sleep(0.05)

    def reload(self, upstreams: list[str], timeout: float = 30.0) -> None:
        """New web nodes, without dropping a request: the checked configuration goes in, nginx starts new
        workers on it and lets the old ones finish what they are serving. Returns once only new workers are
        left (so every request from now on sees ``upstreams``)."""
        if self.process is None or self.process.poll() is not None:
            raise ServiceError("nginx is not running")
        old = set(self.worker_pids())
        self._write_conf(upstreams)
        os.kill(self.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            workers = set(self.worker_pids())
            if workers and not workers & old and len(workers) >= self.workers:
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise ServiceError(f"nginx did not take its new configuration:\n{_tail(self.error_log)}")
            time.sleep(0.05)

    def stop(self, grace: float = 10.0) -> None:
        """Graceful stop (SIGQUIT: finish what is in flight), then SIGKILL to the whole group: nothing of it
        is left afterwards."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                os.kill(process.pid, signal.SIGQUIT)
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # workers outliving their master, if any
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()
        deadline = time.monotonic() + 5
        while group_members(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def start_nginx(data_dir: Path, upstreams: list[str], *, port: int | None = None,
                trust_forwarded_from: str | None = None, workers: int = 1, polls: list[str] | None = None,
                **limits: str | int) -> NginxHandle:
    """Start a private nginx on 127.0.0.1:``port`` (a free one when None) in front of ``upstreams``
    (``host:port`` of each gunicorn node), with its files under ``data_dir``. ``polls``: poll servers
    (web/pollserver.py) for the place-in-line reads, the web nodes their backups. ``limits`` overrides
    directives of the production file (see :func:`render_site`)."""
    data_dir = Path(data_dir).absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    attempts = 1 if port else 3  # a free port can be taken by someone else before nginx binds it
    for attempt in range(1, attempts + 1):
        handle = NginxHandle(data_dir, port or free_port(), _check_upstreams(upstreams), dict(limits),
                             trust_forwarded_from, workers, list(polls or []))
        try:
            handle.start()
        except ServiceError:
            if attempt == attempts:
                raise
            continue
        return handle
    raise ServiceError("nginx did not start")
