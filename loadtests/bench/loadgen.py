"""Load generators for the benchmarks: ``wrk`` to saturate a server, and a small open-loop Python client.

* :func:`run_wrk` drives one URL as hard as ``wrk`` can (closed loop, keep-alive) for a fixed time and
  returns requests/second and latency percentiles. wrk is C and costs the server far less CPU than a
  Python client would, which matters on a 2-core machine where the generator shares the cores with the
  server: a faster server would otherwise be slowed more by its own load generator. Debian package:
  ``wrk`` (``apt-get install wrk``). Lua scripts give every request its own ``Idempotency-Key`` and
  ``X-Forwarded-For`` (a buyer address from 198.18.0.0/15, only ever a header).
* :class:`HttpClient` is one keep-alive connection (``http.client``) that reconnects after a server
  reset and drops connections idle past ``idle_seconds``, used by the open-loop overload benchmark and
  by the end-to-end buyers.
"""
from __future__ import annotations

import http.client
import json
import re
import select
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"timeout":%d,"status":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""

WRK_COUNTER = r"""
local counter = 0
local threads_made = 0
function setup(thread)
  threads_made = threads_made + 1
  thread:set("tid", threads_made)
end
local function address()
  local n = counter + (tid or 0) * 100000
  return string.format("198.18.%d.%d", math.floor(n / 250) % 256, n % 250 + 1)
end
"""


def _wrk_script_no_body(method: str, headers: Mapping[str, str]) -> str:
    header_lines = "\n".join(f'  wrk.headers[{json.dumps(k)}] = {json.dumps(v)}' for k, v in headers.items())
    return WRK_COUNTER + f"""
function init(args)
{header_lines}
end
request = function()
  counter = counter + 1
  wrk.headers["X-Forwarded-For"] = address()
  return wrk.format("{method}")
end
""" + WRK_DONE


def wrk_script_get(headers: Mapping[str, str]) -> str:
    """A GET of the URL's path with fixed ``headers`` (plus a per-request client address)."""
    return _wrk_script_no_body("GET", headers)


def wrk_script_post_empty(headers: Mapping[str, str]) -> str:
    """A POST without a body to the URL's path with fixed ``headers`` (plus a per-request client address:
    each request is another buyer)."""
    return _wrk_script_no_body("POST", headers)


def wrk_script_upload(body_path: Path, content_type: str, key_prefix: str) -> str:
    """A POST of the multipart body in ``body_path`` with a fresh Idempotency-Key per request."""
    return WRK_COUNTER + f"""
local f = assert(io.open({json.dumps(str(body_path))}, "rb"))
local body = f:read("*a")
f:close()
request = function()
  counter = counter + 1
  local headers = {{}}
  headers["Content-Type"] = {json.dumps(content_type)}
  headers["Idempotency-Key"] = string.format("%s-%d-%d", {json.dumps(key_prefix)}, tid or 0, counter)
  headers["X-Forwarded-For"] = address()
  return wrk.format("POST", nil, headers, body)
end
""" + WRK_DONE


@dataclass
class WrkResult:
    label: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int

    def line(self) -> str:
        return (f"{self.label:<34} {self.rps:8.1f} req/s  p50 {self.p50_ms:6.1f} ms  p99 {self.p99_ms:7.1f} ms"
                f"  non-2xx {self.non_2xx}  socket errors {self.socket_errors}")


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(label: str, url: str, script: str, workdir: Path, *, seconds: float = 8.0, connections: int = 32,
            threads: int = 1, timeout_seconds: float = 10.0) -> WrkResult:
    if not wrk_available():
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    script_path = workdir / f"wrk-{uuid.uuid4().hex[:8]}.lua"
    script_path.write_text(script)
    command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s",
               "--timeout", f"{timeout_seconds:g}s", "-s", str(script_path), url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    script_path.unlink(missing_ok=True)
    match = re.search(r"^WRK_JSON (\{.*\})$", done.stdout, re.M)
    if done.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    data = json.loads(match.group(1))
    seconds_run = data["duration_us"] / 1e6
    return WrkResult(
        label=label, requests=data["requests"], seconds=seconds_run, rps=data["requests"] / seconds_run,
        p50_ms=data["p50_us"] / 1000, p90_ms=data["p90_us"] / 1000, p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000, non_2xx=data["status"],
        socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
    )


def multipart(fields: Mapping[str, str], files: Mapping[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request."""
    boundary = f"----meterai{uuid.uuid4().hex}"
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, kind) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@dataclass
class Answer:
    status: int          # 0: no HTTP answer (connection refused/reset, timeout)
    headers: dict[str, str]
    body: bytes
    seconds: float
    error: str = ""

    def json(self) -> dict:
        try:
            value = json.loads(self.body)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


class HttpClient:
    """One keep-alive HTTP/1.1 connection to one server (not thread-safe: one per thread)."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, idle_seconds: float = 1.5) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self.idle_seconds = idle_seconds
        self._conn: http.client.HTTPConnection | None = None
        self._last_used = 0.0
        self.dropped_by_server = 0
        self.resent = 0

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> Answer:
        """One request. Like browsers (and unlike plain http.client), a request that gets no answer at all
        on a *reused* keep-alive connection is sent once more on a fresh one: the server may have closed
        the connection after its previous answer. Those resends are counted in ``resent``."""
        now = time.monotonic()
        if self._conn is not None and now - self._last_used > self.idle_seconds:
            self.close()  # below the server's keep-alive: never reuse a connection it may be reaping
        if self._conn is not None and _dropped(self._conn):
            self.dropped_by_server += 1  # closed by the server since its last answer (urllib3 checks too)
            self.close()
        reused = self._conn is not None
        answer = self._once(method, path, body, headers)
        if answer.status == 0 and reused and answer.error.startswith(_RESENDABLE):
            self.resent += 1
            answer = self._once(method, path, body, headers)
        self._last_used = time.monotonic()
        return answer

    def _once(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None) -> Answer:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        started = time.perf_counter()
        try:
            self._conn.request(method, path, body=body, headers=dict(headers or {}))
            response = self._conn.getresponse()
            data = response.read()
            answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data,
                            time.perf_counter() - started)
            if response.getheader("connection", "").lower() == "close":
                self.close()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            answer = Answer(0, {}, b"", time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
        return answer


# What a reused connection closed by the server looks like (no answer at all).
_RESENDABLE = ("RemoteDisconnected", "ConnectionResetError", "BrokenPipeError", "ConnectionAbortedError")


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """An idle HTTP/1.1 connection that is readable has been closed (EOF or reset) by the server."""
    if conn.sock is None:
        return True
    try:
        readable, _, _ = select.select([conn.sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank) of ``values``; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[rank]
