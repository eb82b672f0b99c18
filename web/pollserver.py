"""The people in line's polls, ``GET /api/v1/queue/<ticket>``, answered on an event loop.

Why a server of its own: at the design peak the line makes ≈ 8,150 polls a second (docs/capacity.md), more
than every other request together, and a poll's own work is small (the ticket's HMAC, this process's
200 ms look at the line). Under gunicorn's threads the serving model is most of a poll
(``loadtests.bench.http_floor``: ≈ 0.25 ms of each 0.48 ms; a bare ``asyncio.Protocol`` answers the same
request for 0.008 ms). The proxy sends these polls here (``deploy/nginx/meterai.conf``, ``location
/api/v1/queue/``) and falls back to the web nodes, which answer the same request the same way
(web/queuepoll.py), when no poll server answers.

The answers are the web's, byte for byte apart from the request id: a place in line (body,
``Cache-Control: no-store``, ``Retry-After`` from the ETA), a refusal with the web's error shape and status
(web/errors.py), the security headers of every non-page answer, ``X-Request-Id`` (the proxy's, or one
made here); each request counted in the same metrics and written as the same access line. What it
serves besides: ``GET /healthz`` (the process answers) and ``GET /metrics`` (its own counters; bearer
``OPS_TOKEN`` as on the web, 404 while unset). Anything else is a JSON 404 or 405: the proxy never
sends it other requests.

The event loop never waits on Redis: a poll it can answer from the look at the line
(:meth:`~shared.admission.AdmissionController.status_if_known`) is answered in the loop; one that needs
Redis (the look is stale, the ticket has reached the head and collects its admission) runs the web's own
:meth:`~shared.admission.AdmissionController.status` on one of ``--threads`` threads, so a slow Redis
delays only those polls, each by at most the client's 0.5 s timeout. Requests on one connection are
answered in order (HTTP/1.1 pipelining); a connection sends no more than :data:`MAX_PIPELINED` requests
ahead of its answers before the server stops reading it.

HTTP it speaks: HTTP/1.0 and 1.1, keep-alive (closed after ``--keep-alive`` idle seconds, longer than the
proxy's 30 s upstream keepalive, as gunicorn's ``--keep-alive 35``), request heads up to
:data:`MAX_HEAD_BYTES`; a request with a body, a malformed head or an oversized one is answered 400 or
431 and the connection closed (nothing of a body is ever read as the next request).

    python -m web.pollserver [--bind HOST:PORT] [--threads 8] [--keep-alive 35]

Several processes may listen on one port (``SO_REUSEPORT``): one per core, as gunicorn runs one worker
per core.
"""
from __future__ import annotations

from shared import metrics  # first: this process leads its metrics group (shared/metrics.py)

import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote

from shared.admission import AdmissionController, AdmissionUnavailable, InvalidAdmission, QueueStatus, SalesPaused
from shared.config import Settings, get_settings, refuse_unsafe
from shared.errors import DomainError
from shared.logs import RENDERED, ROUTE_ENVIRON, access_line, configure_logging, log_event, new_request_id, sane_request_id
from shared.redisconn import redis_client
from web.errors import status_for
from web.queuepoll import PREFIX, ROUTE, line_body, line_headers
from web.security import NON_PAGE_HEADERS

log = logging.getLogger(__name__)
access_log = logging.getLogger("meterai.polls.access")

MAX_HEAD_BYTES = 16 * 1024
MAX_PIPELINED = 32
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            410: "Gone", 403: "Forbidden", 409: "Conflict", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}
# Statuses whose answer tells the client when to come back (web/errors.py's, with its 5 s).
_COME_BACK = frozenset({429, 503})
_SECURITY = [(name, value) for name, value in NON_PAGE_HEADERS.items()]
_NOT_FOUND = ("not_found", "The requested URL was not found on the server. If you entered the URL manually "
                           "please check your spelling and try again.")
_METHOD_NOT_ALLOWED = ("method_not_allowed", "The method is not allowed for the requested URL.")


def _json(body: dict) -> bytes:
    """As Flask's ``jsonify`` writes it outside debug mode: compact, keys sorted, ASCII, a newline."""
    return (json.dumps(body, separators=(",", ":"), sort_keys=True) + "\n").encode()


class _Date:
    """The Date header, formatted once a second."""

    def __init__(self) -> None:
        self.second, self.value = 0, ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self.second:
            self.second, self.value = now, formatdate(now, usegmt=True)
        return self.value


class Request:
    __slots__ = ("method", "path", "version", "headers", "keep_alive", "started", "failure")

    def __init__(self, method: str, path: str, version: str, headers: dict[str, str], keep_alive: bool,
                 failure: tuple[int, str] | None = None) -> None:
        self.method, self.path, self.version, self.headers = method, path, version, headers
        self.keep_alive = keep_alive
        self.started = time.perf_counter()
        self.failure = failure  # (status, message): a head that could not be taken, answered and closed


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_head(head: bytes) -> Request:
    """One request head (without its blank line) as a :class:`Request`; :class:`BadRequest` when it isn't
    one this server may answer."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise BadRequest(400, "The request could not be read.") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
        raise BadRequest(400, "The request line could not be read.")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(400, "Only HTTP/1.0 and HTTP/1.1 are spoken here.")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or " " in name:
            raise BadRequest(400, "A header line could not be read.")
        headers[name.lower()] = value.strip()
    if headers.get("transfer-encoding") or headers.get("content-length", "0") != "0":
        # No request here has a body; reading one as the next request would let a client smuggle one.
        raise BadRequest(400, "These requests carry no body.")
    connection = headers.get("connection", "").lower()
    keep_alive = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
    path = unquote(target.partition("?")[0])
    return Request(method.upper(), path, version, headers, keep_alive)


class PollServer:
    """What answers a request: a place in line, a refusal, health or metrics. The protocol (below) feeds it
    requests and writes what it returns; a poll that needs Redis comes back as a coroutine to await."""

    def __init__(self, settings: Settings, admission: AdmissionController, executor: ThreadPoolExecutor,
                 *, access_lines: bool = True) -> None:
        self.settings = settings
        self.admission = admission
        self.executor = executor
        self.max_retry_after = settings.admission_max_retry_after_seconds
        self.access_lines = access_lines
        self.date = _Date()

    # -- answers --------------------------------------------------------------------------------------
    def answer(self, request: Request) -> bytes | Any:
        """The whole answer (bytes), or a coroutine that makes it (a poll that needs Redis, a scrape)."""
        path = request.path
        if path.startswith(PREFIX) and len(path) > len(PREFIX) and "/" not in path[len(PREFIX):]:
            if request.method not in ("GET", "HEAD"):
                return self._error(request, ROUTE, 405, *_METHOD_NOT_ALLOWED, extra=[("Allow", "GET, HEAD")])
            ticket = path[len(PREFIX):]
            try:
                status = self.admission.status_if_known(ticket)
            except (InvalidAdmission, SalesPaused) as refusal:
                return self._refusal(request, refusal)
            except Exception:  # noqa: BLE001 - the thread's full status() answers it, as it would on the web
                status = None
            if status is None:
                return self._poll_on_thread(request, ticket)
            return self._line(request, status)
        if path == "/healthz" and request.method in ("GET", "HEAD"):
            return self._respond(request, "/healthz", 200, _json({"status": "ok"}), [])
        if path == "/metrics" and request.method in ("GET", "HEAD"):
            return self._scrape(request)
        return self._error(request, "unmatched", 404, *_NOT_FOUND)

    async def _poll_on_thread(self, request: Request, ticket: str) -> bytes:
        loop = asyncio.get_running_loop()
        try:
            status = await loop.run_in_executor(self.executor, self.admission.status, ticket)
        except (InvalidAdmission, SalesPaused, AdmissionUnavailable) as refusal:
            return self._refusal(request, refusal)
        except Exception as exc:  # noqa: BLE001 - as web/errors.py's last handler
            log_event(log, "unhandled_error", logging.ERROR, error=type(exc).__name__)
            log.error("unhandled error", exc_info=exc)
            return self._error(request, ROUTE, 500, "internal_error", "Something went wrong on our side; please retry.")
        return self._line(request, status)

    def _line(self, request: Request, status: QueueStatus) -> bytes:
        body = line_body(status)
        return self._respond(request, ROUTE, 200, _json(body), line_headers(body, self.max_retry_after))

    def _refusal(self, request: Request, refusal: DomainError) -> bytes:
        return self._error(request, ROUTE, status_for(refusal), refusal.code, refusal.message,
                           extra=list(getattr(refusal, "headers", {}).items()))

    def _error(self, request: Request, route: str, status: int, code: str, message: str,
               extra: list[tuple[str, str]] | None = None) -> bytes:
        headers = [("Retry-After", "5")] if status in _COME_BACK else []
        answer = self._respond(request, route, status, _json({"error": {"code": code, "message": message}}),
                               [*headers, *(extra or [])])
        if status in _COME_BACK:
            metrics.HTTP_REFUSALS.labels(str(status), code).inc()
        return answer

    async def _scrape(self, request: Request) -> bytes:
        expected = self.settings.ops_token
        if not expected:
            return self._error(request, "/metrics", 404, "not_found", "Not found.")
        header = request.headers.get("authorization", "")
        given = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), expected.encode()):
            log_event(log, "ops_token_refused", logging.WARNING, path=request.path)
            return self._error(request, "/metrics", 401, "unauthorized",
                               "Send the ops token as 'Authorization: Bearer <token>'.")
        body = await asyncio.get_running_loop().run_in_executor(self.executor, metrics.exposition)
        return self._respond(request, "/metrics", 200, body, [], content_type=metrics.CONTENT_TYPE)

    def _respond(self, request: Request, route: str, status: int, body: bytes, headers: list[tuple[str, str]],
                 content_type: str = "application/json") -> bytes:
        request_id = sane_request_id(request.headers.get("x-request-id")) or new_request_id()
        all_headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers,
                       ("X-Request-Id", request_id), *_SECURITY, ("Date", self.date())]
        if not request.keep_alive:
            all_headers.append(("Connection", "close"))
        elif request.version == "HTTP/1.0":
            all_headers.append(("Connection", "keep-alive"))
        head = f"{request.version} {status} {_REASONS.get(status, 'Unknown')}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in all_headers) + "\r\n"
        elapsed = time.perf_counter() - request.started
        method = request.method if request.method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE",
                                                      "OPTIONS") else "other"
        metrics.record_http(route, method, status, elapsed)
        if self.access_lines:
            line = access_line(status, all_headers, {"REQUEST_METHOD": request.method, ROUTE_ENVIRON: route},
                               0 if request.method == "HEAD" else len(body),
                               timedelta(seconds=elapsed), logger="meterai.polls.access")
            access_log.info(line, extra={RENDERED: True})
        return head.encode("latin-1") + (b"" if request.method == "HEAD" else body)

    def bad_request(self, request: Request) -> bytes:
        """The answer to a head that could not be taken (the connection is closed after it)."""
        status, message = request.failure or (400, "The request could not be read.")
        code = "request_header_fields_too_large" if status == 431 else "bad_request"
        return self._error(request, "unmatched", status, code, message)


class Connection(asyncio.Protocol):
    """One client connection: request heads parsed as they arrive, answered in order."""

    def __init__(self, server: PollServer, keep_alive: float, connections: set) -> None:
        self.server = server
        self.keep_alive = keep_alive
        self.connections = connections
        self.buffer = b""
        self.pending: deque[Request] = deque()
        self.busy = False  # an answer is being made off the loop: later requests wait their turn
        self.reading = True  # False after a last request (Connection: close, or one that failed)
        self.closing = False
        self.paused = False
        self.transport: asyncio.Transport | None = None
        self.idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.closing = True
        self.pending.clear()
        if self.idle_timer is not None:
            self.idle_timer.cancel()

    def data_received(self, data: bytes) -> None:
        if not self.reading or self.closing:
            return
        self.buffer += data
        while self.reading:
            # Blank lines before a request line are allowed (RFC 9112 2.2): a client's stray CRLF.
            self.buffer = self.buffer.lstrip(b"\r\n")
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0 and len(self.buffer) <= MAX_HEAD_BYTES:
                break
            if end < 0 or end > MAX_HEAD_BYTES:
                self._last(Request("GET", "", "HTTP/1.1", {}, False, (431, "The request's headers are too large.")))
                break
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            try:
                request = parse_head(head)
            except BadRequest as exc:
                request = Request("GET", "", "HTTP/1.1", {}, False, (exc.status, str(exc)))
            if request.keep_alive and request.failure is None:
                self.pending.append(request)
            else:
                self._last(request)
        if len(self.pending) >= MAX_PIPELINED and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._drain()

    def _last(self, request: Request) -> None:
        """The last request this connection gets answered: nothing after it is read."""
        self.pending.append(request)
        self.reading = False
        self.buffer = b""

    def _drain(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        while self.pending and not self.busy and not self.closing:
            request = self.pending.popleft()
            answer = self.server.bad_request(request) if request.failure else self.server.answer(request)
            if isinstance(answer, bytes):
                self._write(request, answer)
            else:
                self.busy = True
                asyncio.ensure_future(self._finish(request, answer))
                return
        if self.paused and len(self.pending) < MAX_PIPELINED // 2 and not self.closing and self.transport:
            self.paused = False
            self.transport.resume_reading()
        if not self.pending and not self.busy:
            self._arm_idle()

    async def _finish(self, request: Request, answer: Any) -> None:
        try:
            data = await answer
        finally:
            self.busy = False
        if not self.closing:
            self._write(request, data)
            self._drain()

    def _write(self, request: Request, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if not request.keep_alive or request.failure is not None:
            self.closing = True
            self.transport.close()

    def _arm_idle(self) -> None:
        if self.closing or self.transport is None:
            return
        self.idle_timer = asyncio.get_running_loop().call_later(self.keep_alive, self._idle)

    def _idle(self) -> None:
        self.idle_timer = None
        self.close_when_idle()

    def close_when_idle(self) -> bool:
        """Close now if nothing is in flight (True); a busy connection closes after its last answer."""
        if self.pending or self.busy or self.transport is None or self.closing:
            return self.closing
        self.closing = True
        self.transport.close()
        return True


def _bind(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {value!r}")
    return host.strip("[]"), int(port)


async def serve(settings: Settings, host: str, port: int, *, threads: int = 8, keep_alive: float = 35.0,
                grace: float = 10.0, ready: "asyncio.Future | None" = None) -> None:
    """Listen on ``host:port`` until SIGTERM or SIGINT, then stop taking connections, let answers in
    flight finish (at most ``grace`` seconds) and return."""
    client = redis_client(settings.redis_url, timeout=0.5, retries=1,
                          sentinel_password=settings.redis_sentinel_password)
    admission = AdmissionController(settings, client)
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="poll")
    server = PollServer(settings, admission, executor)
    connections: set[Connection] = set()
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: Connection(server, keep_alive, connections), host, port,
                                        reuse_port=True, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log_event(log, "polls_listening", host=host, port=port, threads=threads, pid=os.getpid())
    if ready is not None:
        ready.set_result(listener)
    try:
        await stop.wait()
    finally:
        listener.close()
        deadline = loop.time() + grace
        while connections and loop.time() < deadline:
            for connection in list(connections):
                connection.close_when_idle()
            await asyncio.sleep(0.05)
        for connection in list(connections):
            if connection.transport is not None:
                connection.transport.abort()
        executor.shutdown(wait=False, cancel_futures=True)
        client.close()
        log_event(log, "polls_stopped", pid=os.getpid())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m web.pollserver", description=__doc__.split("\n\n")[0])
    default_bind = f"{os.environ.get('BIND_HOST') or '127.0.0.1'}:{os.environ.get('POLLS_PORT') or 8001}"
    parser.add_argument("--bind", type=_bind, default=_bind(default_bind), help=f"HOST:PORT (default {default_bind})")
    parser.add_argument("--threads", type=int, default=8, help="threads for polls that wait on Redis (default 8)")
    parser.add_argument("--keep-alive", type=float, default=35.0, help="idle seconds before a connection closes")
    args = parser.parse_args(argv)
    configure_logging()
    settings = get_settings()
    refuse_unsafe(settings, "polls")
    host, port = args.bind
    try:
        asyncio.run(serve(settings, host, port, threads=max(1, args.threads), keep_alive=args.keep_alive))
    except OSError as exc:
        log_event(log, "polls_bind_failed", logging.ERROR, host=host, port=port, error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
