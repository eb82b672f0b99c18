"""Benchmark: what answering one HTTP request costs before any of our code runs, gunicorn against asyncio.

A place-in-line poll (``GET /api/v1/queue/<ticket>``) is most of the design peak's web CPU (docs/capacity.md:
8,150 polls/s), and ours is already answered before Flask (web/queuepoll.py) at about the cost of a no-op
request on the Procfile's gunicorn. So the question for the next lever is what the HTTP server itself
costs per keep-alive request: this serves the same small JSON answer, with a poll's headers, from

* a bare WSGI function under the Procfile's gunicorn flags and config (gthread, 2 workers × 8 threads;
  gunicorn.conf.py's access line and metrics directory), as every web request is served today;
* the same without the config (gunicorn itself, no access line), and
* a bare ``asyncio.Protocol`` (one process, one thread, the event loop parsing the request head itself),

drives each with wrk (keep-alive connections, as the proxy holds them to the web nodes) and prints CPU ms
per request of each server's processes. Neither does what a poll must (Redis, the ticket's signature,
metrics, a log line): the difference is the price of the serving model, the part a dedicated poll server
would save.

    python -m loadtests.bench.http_floor [--rounds 3] [--seconds 6] [--connections 32]

Needs wrk (Debian: apt-get install wrk).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from loadtests.bench.loadgen import run_wrk, wrk_available, wrk_script_get
from loadtests.stack import REPORTS, CpuMeter, gunicorn_flags, say, workdir_for

BODY = b'{"status":"waiting","position":123456,"ahead":123455,"eta_seconds":1800,"retry_after_seconds":120}\n'
HEADERS = [("Content-Type", "application/json"), ("Cache-Control", "no-store"), ("Retry-After", "120")]


def app(environ, start_response):
    """The WSGI no-op: a poll-sized answer."""
    start_response("200 OK", [*HEADERS, ("Content-Length", str(len(BODY)))])
    return [BODY]


_RESPONSE = (b"HTTP/1.1 200 OK\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in HEADERS)
             + f"Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY)


class _Answer(asyncio.Protocol):
    """Keep-alive HTTP/1.1 for bodiless requests: each complete request head gets the fixed answer."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            method = head.split(b" ", 1)[0]
            if method not in (b"GET", b"HEAD"):
                self.transport.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                self.transport.close()
                return
            self.transport.write(_RESPONSE if method == b"GET" else _RESPONSE[:-len(BODY)])


def serve(port: int) -> None:
    async def run() -> None:
        server = await asyncio.get_running_loop().create_server(_Answer, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


def _wait_port(port: int, timeout: float = 30.0) -> None:
    from shared.devtools.services import port_accepts

    deadline = time.monotonic() + timeout
    while not port_accepts(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {port}")
        time.sleep(0.1)


def _tree(pid: int) -> list[int]:
    import psutil

    try:
        process = psutil.Process(pid)
        return [pid, *(child.pid for child in process.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench.http_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the asyncio server
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if not wrk_available():
        print("wrk is not installed; on Debian: apt-get install wrk", file=sys.stderr)
        return 2
    from shared.devtools.services import free_port

    workdir = workdir_for("bench-http-floor")
    root = Path(__file__).resolve().parents[2]
    flags = gunicorn_flags()
    bare_flags = [flag for i, flag in enumerate(flags) if flag != "--config" and (i == 0 or flags[i - 1] != "--config")]
    ports: dict[str, int] = {}
    servers: dict[str, subprocess.Popen] = {}
    for name, command in (
            ("gunicorn, the Procfile's flags and config", [sys.executable, "-m", "gunicorn", *flags]),
            ("gunicorn gthread, no config (no access line)", [sys.executable, "-m", "gunicorn", *bare_flags]),
            ("asyncio.Protocol, one thread", None)):
        ports[name] = port = free_port()
        if command is None:
            command = [sys.executable, "-m", "loadtests.bench.http_floor", "--serve", str(port)]
        else:
            command += ["--bind", f"127.0.0.1:{port}", "loadtests.bench.http_floor:app"]
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics")}
        (workdir / "metrics").mkdir(exist_ok=True)
        servers[name] = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL,
                                         stderr=open(workdir / f"server-{len(servers)}.log", "wb"))
    per_request: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for port in ports.values():
            _wait_port(port)
        time.sleep(1.0)  # gunicorn's workers booted
        script = wrk_script_get({})
        for number in range(1, args.rounds + 1):
            say(f"round {number} of {args.rounds}")
            for name, process in servers.items():
                meter = CpuMeter({name: lambda p=process: _tree(p.pid)})
                meter.start()
                result = run_wrk(name, f"http://127.0.0.1:{ports[name]}/api/v1/queue/t", script, workdir,
                                 seconds=args.seconds, connections=args.connections)
                used = meter.stop()[name]
                if result.non_2xx or result.socket_errors or not result.requests:
                    raise RuntimeError(f"{name}: {result.line()}")
                per_request[name].append(1000 * used / result.requests)
                say(f"  {result.line()}  CPU {1000 * used / result.requests:.3f} ms/request")
    finally:
        for process in servers.values():
            process.terminate()
        for process in servers.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    medians = {name: statistics.median(values) for name, values in per_request.items()}
    gunicorn_ms, asyncio_ms = medians[next(iter(medians))], medians["asyncio.Protocol, one thread"]
    print()
    print("CPU ms per keep-alive request of a poll-sized answer, no handler code of ours (median of rounds):")
    for name, value in medians.items():
        print(f"  {name:<46} {value:7.3f}   (rounds: {', '.join(f'{v:.3f}' for v in per_request[name])})")
    print(f"gunicorn as the Procfile runs it / asyncio = {gunicorn_ms / asyncio_ms:.1f}")
    out = {"benchmark": "http_floor", "command": "python -m loadtests.bench.http_floor " + " ".join(argv or sys.argv[1:]),
           "when": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": vars(args),
           "cpu_ms_per_request": medians, "rounds": per_request}
    (REPORTS / "bench").mkdir(parents=True, exist_ok=True)
    (REPORTS / "bench" / "http_floor.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
