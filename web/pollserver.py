"""The people in line's polls, ``GET /api/v1/queue/<ticket>``, answered on an event loop.

Why a server of its own: at the design peak the line makes ≈ 8,150 polls a second (docs/capacity.md), more
than every other request together, and a poll's own work is small (the ticket's HMAC, this process's
200 ms look at the line). Under gunicorn's threads the serving model is most of a poll
(``loadtests.bench.http_floor``: ≈ 0.25 ms of each 0.48 ms; a bare ``asyncio.Protocol`` answers the same
request for 0.008 ms). The proxy sends these polls here (``deploy/nginx/meterai.conf``, ``location
/api/v1/queue/``) and falls back to the web nodes, which answer the same request the same way
(web/queuepoll.py), when no poll server answers.

The answers are the web's, byte for byte apart from the request id and the date: a place in line (body,
``Cache-Control: no-store``, ``Retry-After`` from the ETA), a refusal with the web's error shape and
status (web/errors.py), the security headers of every non-page answer, ``X-Request-Id`` (the proxy's, or
one made here); each request counted in the same metrics and written as the same access line. What it
serves besides: ``GET /healthz`` (the process answers) and ``GET /metrics`` (its own counters; bearer
``OPS_TOKEN`` as on the web, 404 while unset, wrong tokens limited per client as there). Anything else
is a JSON 404 or 405: the proxy never sends it other requests.

The event loop never waits on Redis: a poll it can answer from the look at the line
(:meth:`~shared.admission.AdmissionController.status_if_known`) is answered in the loop; one that needs
Redis (the look is stale, the ticket has reached the head and collects its admission) runs the web's own
:meth:`~shared.admission.AdmissionController.status` on one of ``--threads`` threads. At most
:data:`MAX_THREAD_POLLS` such polls wait at once: while Redis is slow or away every poll needs it, and
beyond that bound a poll is answered ``503 admission_unavailable`` at once (what the thread would say
after its timeouts) instead of queueing without end.

HTTP it speaks, strictly (it sits behind nginx, which re-frames every request; anything ambiguous is
refused rather than guessed): HTTP/1.0 and 1.1, keep-alive (closed after ``--keep-alive`` idle seconds,
longer than the proxy's 30 s upstream keepalive, as gunicorn's ``--keep-alive 35``), pipelining (answers
in order; at most :data:`MAX_PIPELINED` requests parsed ahead of their answers, and nothing read while
the client doesn't take its answers), request heads up to :data:`MAX_HEAD_BYTES` arriving within
:data:`HEAD_SECONDS`. A ``Content-Length`` body (a GET may carry one) is read and ignored; a repeated
``Content-Length``, any ``Transfer-Encoding``, a CR or LF inside a line, a header name that isn't a
token, or an oversized head is answered 400 or 431 and the connection closed.

    python -m web.pollserver [--bind HOST:PORT] [--threads 8] [--keep-alive 35] [--no-access-log]
                             [--head-seconds 10] [--redis-timeout 0.5] [--max-thread-polls 256]

One process is one core; at ≈ 0.1 ms a poll one poll server per web node is ample for the design peak
(docs/capacity.md).
"""
from __future__ import annotations

# Before prometheus-client is imported: this process leads its own metrics group (shared/metrics.py).
# (``python -m web.pollserver`` imports the ``web`` package first; nothing there imports prometheus-client.)
from shared import metrics  # noqa: I001

import argparse
import asyncio
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
from shared.logs import ROUTE_ENVIRON, access_line, configure_logging, log_event, new_request_id, sane_request_id
from shared.redisconn import redis_client
from werkzeug.exceptions import MethodNotAllowed, NotFound

from web.errors import COME_BACK, status_for
from web.queuepoll import PREFIX, ROUTE, json_bytes, line_body, line_headers
from web.security import NON_PAGE_HEADERS, OPS_TOKEN_ATTEMPTS, bearer_token_matches

log = logging.getLogger(__name__)

# nginx passes a client's headers of up to 4 × 8 KiB (large_client_header_buffers) and adds its own.
MAX_HEAD_BYTES = 40 * 1024
MAX_BODY_BYTES = 64 * 1024  # a body a GET may carry, read and ignored; beyond it the connection is refused
MAX_PIPELINED = 32
HEAD_SECONDS = 10.0  # a request head must arrive whole within this (a client trickling bytes is let go)
MAX_THREAD_POLLS = 256  # polls waiting on Redis at once (see the module docstring)
# While a poll on a thread is fetching a fresh look at the line, other polls are answered from the last
# look if it is at most this much older than LINE_MAX_AGE_SECONDS (one refresh at a time, not one per poll).
REFRESH_SLACK_SECONDS = 1.0
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 410: "Gone", 429: "Too Many Requests",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}
_SECURITY = list(NON_PAGE_HEADERS.items())
_TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# As web/errors.py's http_error names werkzeug's (the code is the name in snake case).
_NOT_FOUND = ("not_found", NotFound.description)
_METHOD_NOT_ALLOWED = ("method_not_allowed", MethodNotAllowed.description)
_UNAVAILABLE = AdmissionUnavailable("The waiting room is briefly unavailable; please retry shortly.")
_INTERNAL = ("internal_error", "Something went wrong on our side; please retry.")


def _log_unhandled(exc: BaseException) -> None:
    """As web/errors.py's last handler logs it: the event at ERROR, then the traceback."""
    log_event(log, "unhandled_error", logging.ERROR, error=type(exc).__name__)
    log.error("unhandled error", exc_info=exc)


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
    __slots__ = ("method", "path", "version", "headers", "keep_alive", "started", "failure", "client", "body")

    def __init__(self, method: str, path: str, version: str, headers: dict[str, str], keep_alive: bool,
                 failure: tuple[int, str] | None = None, body: int = 0) -> None:
        self.method, self.path, self.version, self.headers = method, path, version, headers
        self.keep_alive = keep_alive
        self.started = time.perf_counter()
        self.failure = failure  # (status, message): a head that could not be taken, answered and closed
        self.client = "-"
        self.body = body  # bytes of body that follow the head (read and ignored)

    @classmethod
    def refused(cls, status: int, message: str) -> "Request":
        return cls("other", "", "HTTP/1.1", {}, False, (status, message))


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _is_token(text: bytes) -> bool:
    return bool(text) and not text.translate(None, _TOKEN)  # nothing left once the token bytes are deleted


def parse_head(head: bytes) -> Request:
    """One request head (without its blank line) as a :class:`Request`; :class:`BadRequest` when it isn't
    one this server may answer (strictly: see the module docstring)."""
    lines = head.split(b"\r\n")
    for line in lines:
        if b"\n" in line or b"\r" in line or b"\0" in line:
            raise BadRequest(400, "Lines must end in CRLF.")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _is_token(parts[0]) or not parts[0].isupper() or len(parts[0]) > 20 \
            or not parts[1].startswith(b"/"):
        raise BadRequest(400, "The request line could not be read.")
    method, target, version = (part.decode("latin-1") for part in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(400, "Only HTTP/1.0 and HTTP/1.1 are spoken here.")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _is_token(name):
            raise BadRequest(400, "A header line could not be read.")
        key = name.decode("latin-1").lower()
        if key in ("content-length", "transfer-encoding") and key in headers:
            raise BadRequest(400, f"A repeated {key} header is refused.")
        headers[key] = value.strip(b" \t").decode("latin-1")
    if "transfer-encoding" in headers:
        raise BadRequest(400, "These requests carry no chunked body.")
    length = headers.get("content-length", "0")
    if not length.isdigit() or not length.isascii() or len(length) > 12:
        raise BadRequest(400, "Content-Length is not a number.")
    if int(length) > MAX_BODY_BYTES:
        raise BadRequest(400, "These requests carry no body.")
    options = {option.strip() for option in headers.get("connection", "").lower().split(",")}
    keep_alive = "keep-alive" in options if version == "HTTP/1.0" else "close" not in options
    path = unquote(target.partition("?")[0])
    return Request(method, path, version, headers, keep_alive, body=int(length))


class PollServer:
    """What answers a request: a place in line, a refusal, health or metrics. The protocol (below) feeds it
    requests and writes what it returns; one that needs a thread (Redis, a scrape) comes back as a
    coroutine to await."""

    def __init__(self, settings: Settings, admission: AdmissionController, executor: ThreadPoolExecutor,
                 *, access_lines: bool = True, stream: Any = None, limiter: Any = None) -> None:
        self.settings = settings
        self.admission = admission
        self.executor = executor
        self.limiter = limiter
        self.max_retry_after = settings.admission_max_retry_after_seconds
        self.access_lines = access_lines
        self.stream = stream if stream is not None else sys.stderr
        self.date = _Date()
        self.thread_polls = 0  # polls on or waiting for a thread now
        self.max_thread_polls = MAX_THREAD_POLLS
        self._lines: list[str] = []
        self.answered_here = metrics.QUEUE_POLLS.labels("polls")

    # -- answers --------------------------------------------------------------------------------------
    def answer(self, request: Request, gone: Any = None) -> bytes | Any:
        """The whole answer (bytes), or a coroutine that makes it (a poll that needs Redis, a scrape).
        ``gone()`` says whether the client left meanwhile (a poll on a thread then isn't asked)."""
        if request.failure is not None:
            status, message = request.failure
            code = "request_header_fields_too_large" if status == 431 else "bad_request"
            return self._error(request, "unmatched", status, code, message)
        path = request.path
        if path.startswith(PREFIX) and len(path) > len(PREFIX) and "/" not in path[len(PREFIX):]:
            if request.method not in ("GET", "HEAD"):
                # As Flask answers it: its 405 is raised before any route, so unmatched.
                return self._error(request, "unmatched", 405, *_METHOD_NOT_ALLOWED)
            ticket = path[len(PREFIX):]
            self.answered_here.inc()
            try:
                status = self.admission.status_if_known(ticket)
                if status is None and self.thread_polls:
                    # Polls are on threads, and the one sent there when the look went stale is fetching
                    # a fresh one (status() does): the last look, up to REFRESH_SLACK_SECONDS older,
                    # answers this poll meanwhile. (The thread polls may also be others: a ticket at the
                    # head, a slow Redis. Either way no answer is from a look over 1.2 s old, and a
                    # ticket at the head or of another epoch still goes to a thread.)
                    status = self.admission.status_if_known(ticket, slack=REFRESH_SLACK_SECONDS)
            except (InvalidAdmission, SalesPaused) as refusal:
                return self._refusal(request, refusal)
            except Exception:  # noqa: BLE001 - the thread's full status() answers it, as it would on the web
                status = None
            if status is None:
                if self.thread_polls >= self.max_thread_polls:
                    return self._refusal(request, _UNAVAILABLE)
                self.thread_polls += 1  # counted now, not when the coroutine first runs a turn later
                return self._poll_on_thread(request, ticket, gone)
            return self._line(request, status)
        if path == "/healthz" and request.method in ("GET", "HEAD"):
            return self._respond(request, "/healthz", 200, json_bytes({"status": "ok"}), [])
        if path == "/metrics" and request.method in ("GET", "HEAD"):
            return self._scrape(request)
        return self._error(request, "unmatched", 404, *_NOT_FOUND)

    def fail(self, request: Request, exc: BaseException) -> bytes:
        """A 500 for a request whose answer raised (the connection is closed after it)."""
        _log_unhandled(exc)
        request.keep_alive = False
        try:
            return self._error(request, "unmatched", 500, *_INTERNAL)
        except Exception:  # noqa: BLE001 - the metrics or the log line failing too: a bare answer
            body = json_bytes({"error": {"code": _INTERNAL[0], "message": _INTERNAL[1]}})
            return (f"{request.version} 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body

    def _status_unless_gone(self, ticket: str, gone: Any) -> QueueStatus | None:
        if gone is not None and gone():
            return None  # the client left while this waited for a thread: nothing to ask Redis for
        return self.admission.status(ticket)

    async def _poll_on_thread(self, request: Request, ticket: str, gone: Any) -> bytes:
        """(``thread_polls`` was counted by :meth:`answer`; given back here.)"""
        loop = asyncio.get_running_loop()
        try:
            status = await loop.run_in_executor(self.executor, self._status_unless_gone, ticket, gone)
        except (InvalidAdmission, SalesPaused, AdmissionUnavailable) as refusal:
            return self._refusal(request, refusal)
        except Exception as exc:  # noqa: BLE001 - as web/errors.py's last handler
            _log_unhandled(exc)
            return self._error(request, ROUTE, 500, *_INTERNAL)
        finally:
            self.thread_polls -= 1
        if status is None:
            return b""  # nobody to answer
        return self._line(request, status)

    def _line(self, request: Request, status: QueueStatus) -> bytes:
        body = line_body(status)
        return self._respond(request, ROUTE, 200, json_bytes(body), line_headers(body, self.max_retry_after))

    def _refusal(self, request: Request, refusal: DomainError) -> bytes:
        return self._error(request, ROUTE, status_for(refusal), refusal.code, refusal.message,
                           extra=list(getattr(refusal, "headers", {}).items()))

    def _error(self, request: Request, route: str, status: int, code: str, message: str,
               extra: list[tuple[str, str]] | None = None) -> bytes:
        headers = [("Retry-After", "5")] if status in COME_BACK and not any(
            name == "Retry-After" for name, _ in extra or []) else []
        answer = self._respond(request, route, status, json_bytes({"error": {"code": code, "message": message}}),
                               [*headers, *(extra or [])])
        if status in COME_BACK:
            metrics.HTTP_REFUSALS.labels(str(status), code).inc()
        return answer

    async def _scrape(self, request: Request) -> bytes:
        expected = self.settings.ops_token
        if not expected:
            return self._error(request, "/metrics", 404, "not_found", "Not found.")
        loop = asyncio.get_running_loop()
        if not bearer_token_matches(request.headers.get("authorization", ""), expected):
            # As the web's: ten wrong tokens per client in ten minutes, then 429 (web/metrics.py).
            if self.limiter is not None:
                from shared.ratelimit import Limit

                decision = await loop.run_in_executor(self.executor, self.limiter.hit, "ops_auth",
                                                      request.client, Limit.parse(OPS_TOKEN_ATTEMPTS))
                if decision is not None and not decision.allowed:
                    return self._error(request, "/metrics", 429, "rate_limited",
                                       "Too many requests from this client; slow down and retry later.",
                                       extra=list(decision.headers().items()))
            log_event(log, "ops_token_refused", logging.WARNING, client=request.client, path=request.path)
            return self._error(request, "/metrics", 401, "unauthorized",
                               "Send the ops token as 'Authorization: Bearer <token>'.")
        body = await loop.run_in_executor(self.executor, metrics.exposition)
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
        method = request.method if request.method in metrics.HTTP_METHODS else "other"
        metrics.record_http(route, method, status, elapsed)
        if self.access_lines:
            self._access_line(access_line(
                status, all_headers, {"REQUEST_METHOD": method, ROUTE_ENVIRON: route},
                0 if request.method == "HEAD" else len(body), timedelta(seconds=elapsed),
                logger="meterai.polls.access"))
        return head.encode("latin-1") + (b"" if request.method == "HEAD" else body)

    def _access_line(self, line: str) -> None:
        """The line goes out with the others of this turn of the event loop, in one write: under load
        dozens of polls are answered per turn, and a write each was a quarter of a poll's cost
        (``loadtests.bench.web``). The lines are JSON already, as gunicorn.conf.py's AccessLogger writes
        them, so no logging handler is involved. Outside a running loop, written at once."""
        self._lines.append(line)
        if len(self._lines) > 1:
            return
        try:
            asyncio.get_running_loop().call_soon(self.flush_lines)
        except RuntimeError:
            self.flush_lines()

    def flush_lines(self) -> None:
        lines, self._lines = self._lines, []
        if not lines:
            return
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr never fails a request
            pass


class Connection(asyncio.Protocol):
    """One client connection: request heads parsed as they arrive, answered in order.

    Reading stops (``pause_reading``) while :data:`MAX_PIPELINED` requests wait for their answers, while
    an answer is being made on a thread behind which more are buffered, or while the client doesn't take
    what was written (``pause_writing``); it resumes when those clear. So neither the parsed requests nor
    the unsent answers of one connection grow without bound."""

    def __init__(self, server: PollServer, keep_alive: float, connections: set,
                 head_seconds: float = HEAD_SECONDS) -> None:
        self.server = server
        self.keep_alive = keep_alive
        self.head_seconds = head_seconds
        self.connections = connections
        self.buffer = bytearray()
        self.scanned = 0  # how far the buffer was searched for a head's end without finding one
        self.skip = 0  # body bytes still to read and ignore
        self.pending: deque[Request] = deque()
        self.busy = False  # an answer is being made off the loop: later requests wait their turn
        self.reading = True  # False after a last request (Connection: close, one refused, the client's EOF)
        self.closing = False
        self.paused_reading = False
        self.write_paused = False
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_kind = ""  # "idle", "head" or "write" (see _arm_timer)
        self.client = "-"
        self.task: asyncio.Task | None = None

    # -- asyncio's callbacks --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, tuple) and peer else "-"
        self.connections.add(self)
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.closing = True
        self.pending.clear()
        self._cancel_timer()

    def eof_received(self) -> bool:
        """The client sent all it will (a half-close): answer what it asked, then close."""
        self.reading = False
        self._drain()
        return True  # keep the transport open for the answers

    def pause_writing(self) -> None:
        self.write_paused = True
        self._flow()
        self._arm_timer()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._drain()

    def data_received(self, data: bytes) -> None:
        if not self.reading or self.closing:
            return
        self.buffer += data
        self._parse()
        self._drain()

    # -- the work ------------------------------------------------------------------------------------
    def _parse(self) -> None:
        """Take the complete requests from the buffer, at most MAX_PIPELINED waiting at a time."""
        buffer = self.buffer
        offset = 0
        while self.reading and len(self.pending) < MAX_PIPELINED:
            if self.skip:
                taken = min(self.skip, len(buffer) - offset)
                offset += taken
                self.skip -= taken
                if self.skip:
                    break
            # Blank lines before a request line are allowed (RFC 9112 2.2): a client's stray CRLF. One
            # with nothing after it stays in the buffer, a head begun: CRLFs can't keep a connection idle
            # for ever.
            while buffer.startswith(b"\r\n", offset) and len(buffer) > offset + 2:
                offset += 2
            # Searched from where the last search stopped (less the 3 bytes a split CRLFCRLF may span):
            # a head arriving in many small reads is scanned once, not once per read.
            end = buffer.find(b"\r\n\r\n", max(offset, self.scanned - 3), offset + MAX_HEAD_BYTES + 4)
            if end < 0:
                self.scanned = len(buffer)
                if len(buffer) - offset > MAX_HEAD_BYTES:
                    self._last(Request.refused(431, "The request's headers are too large."))
                break
            self.scanned = 0
            head = bytes(buffer[offset:end])
            offset = end + 4
            try:
                request = parse_head(head)
            except BadRequest as exc:
                request = Request.refused(exc.status, str(exc))
            request.client = self.client
            self.skip = request.body
            if request.keep_alive and request.failure is None:
                self.pending.append(request)
            else:
                self._last(request)
        if self.reading:
            del buffer[:offset]
            self.scanned = max(0, self.scanned - offset)

    def _last(self, request: Request) -> None:
        """The last request this connection gets answered: nothing after it is read."""
        self.pending.append(request)
        self.reading = False
        self.buffer = bytearray()
        self.scanned = 0
        self.skip = 0

    def _gone(self) -> bool:
        """Whether a poll waiting for a thread still has anyone to answer: not after a reset or our own
        close. A client's FIN is not taken as gone (it may be a half-close awaiting its answers), so a
        poll nginx gave up on still asks Redis once: bounded by the thread-poll cap."""
        return self.closing

    def _drain(self) -> None:
        while self.pending and not self.busy and not self.closing and not self.write_paused:
            request = self.pending.popleft()
            try:
                answer = self.server.answer(request, self._gone)
            except Exception as exc:  # noqa: BLE001 - one request's failure is a 500, not a dead connection
                answer = self.server.fail(request, exc)
            if isinstance(answer, bytes):
                self._write(request, answer)
            else:
                self.busy = True
                self.task = asyncio.ensure_future(self._finish(request, answer))
                break
        if self.reading and not self.busy and not self.write_paused and len(self.pending) < MAX_PIPELINED \
                and self.buffer and not self.closing:
            self._parse()  # requests left in the buffer when the pipeline was full
            if self.pending and not self.busy:
                self._drain()
                return
        self._flow()
        if not self.closing and not self.pending and not self.busy and not self.reading:
            self._close()  # the last request answered (or the client half-closed and all is answered)
            return
        self._arm_timer()

    async def _finish(self, request: Request, answer: Any) -> None:
        try:
            data = await answer
        except Exception as exc:  # noqa: BLE001 - a 500 and the connection closed, never a hang
            data = self.server.fail(request, exc)
        finally:
            self.busy = False
            self.task = None
        if not self.closing:
            if data:
                self._write(request, data)
            self._drain()

    def _write(self, request: Request, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if not request.keep_alive or request.failure is not None:
            self._close()

    def _close(self) -> None:
        self.closing = True
        self.reading = False
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()
            # asyncio closes only once what was written is sent: a client that doesn't read it (below the
            # write buffer's high-water mark, so writing never paused) gets keep_alive seconds more.
            if self.transport.get_write_buffer_size():
                self.timer_kind = "closing"
                self.timer = asyncio.get_running_loop().call_later(self.keep_alive, self.transport.abort)

    def _flow(self) -> None:
        """Read only while this connection can take more: see the class docstring."""
        if self.transport is None or self.closing:
            return
        full = self.write_paused or len(self.pending) >= MAX_PIPELINED or (self.busy and bool(self.buffer))
        if full and not self.paused_reading:
            self.paused_reading = True
            self.transport.pause_reading()
        elif not full and self.paused_reading:
            self.paused_reading = False
            self.transport.resume_reading()

    # -- time limits -----------------------------------------------------------------------------------
    def _arm_timer(self) -> None:
        """One deadline at a time. The client not taking its answers (writes paused): ``keep_alive``
        seconds, then the connection is dropped. Idle between requests: closed after ``keep_alive``
        seconds. A head begun: ``head_seconds`` (at most ``keep_alive``) from its first byte; more bytes
        don't extend it. Answers in flight: no limit of ours (a thread poll has Redis's timeouts)."""
        if self.closing or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        if self.write_paused:
            if self.timer is None or self.timer_kind != "write":
                self._cancel_timer()
                self.timer_kind = "write"
                self.timer = loop.call_later(self.keep_alive, self._stuck)
            return
        if self.pending or self.busy:
            self._cancel_timer()
            return
        if self.buffer or self.skip:
            if self.timer is not None and self.timer_kind == "head":
                return  # the head's deadline stands
            self._cancel_timer()
            self.timer_kind = "head"
            self.timer = loop.call_later(min(self.head_seconds, self.keep_alive), self._expired)
            return
        self._cancel_timer()
        self.timer_kind = "idle"
        self.timer = loop.call_later(self.keep_alive, self._expired)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.timer_kind = ""

    def _expired(self) -> None:
        self.timer, self.timer_kind = None, ""
        if not self.pending and not self.busy:
            self._close()

    def _stuck(self) -> None:
        """A client that stopped reading its answers: let it go, answers unsent."""
        self.timer, self.timer_kind = None, ""
        if self.write_paused and self.transport is not None and not self.closing:
            self.closing, self.reading = True, False
            self.transport.abort()

    def close_when_idle(self) -> bool:
        """At shutdown: close now if nothing is in flight (True); a busy connection closes after its
        answers (nothing more is read)."""
        self.reading = False
        if self.pending or self.busy or self.transport is None or self.closing:
            return self.closing
        self._close()
        return True


def _bind(value: str) -> tuple[str, int]:
    """HOST:PORT with a real port: 0 would listen on whatever port the kernel picks, where neither the
    proxy nor the launcher's readiness check would ever look (how a drill once ran without its poll
    server, unnoticed)."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {value!r}")
    if not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, not {port} (set POLLS_PORT or --bind HOST:PORT)")
    return host.strip("[]"), int(port)


async def serve(settings: Settings, host: str, port: int, *, threads: int = 8, keep_alive: float = 35.0,
                grace: float = 10.0, access_lines: bool = True, max_thread_polls: int = MAX_THREAD_POLLS,
                head_seconds: float = HEAD_SECONDS, redis_timeout: float = 0.5) -> None:
    """Listen on ``host:port`` until SIGTERM or SIGINT, then stop taking connections, let answers in
    flight finish (at most ``grace`` seconds) and return."""
    from shared.ratelimit import RateLimiter

    # As the web's (web/__init__.py): a slow Redis is a quick "come back", never a hung poll.
    client = redis_client(settings.redis_url, timeout=redis_timeout, retries=1,
                          sentinel_password=settings.redis_sentinel_password)
    admission = AdmissionController(settings, client)
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="poll")
    server = PollServer(settings, admission, executor, access_lines=access_lines,
                        limiter=RateLimiter(client, settings.redis_key_prefix))
    server.max_thread_polls = max_thread_polls
    connections: set[Connection] = set()
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: Connection(server, keep_alive, connections, head_seconds),
                                        host, port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bound = sorted({sock.getsockname()[1] for sock in listener.sockets or ()})
    log_event(log, "polls_listening", host=host, port=bound[0] if len(bound) == 1 else bound, threads=threads,
              pid=os.getpid(), access_lines=access_lines)
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
        server.flush_lines()
        client.close()
        log_event(log, "polls_stopped", pid=os.getpid())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m web.pollserver", description=__doc__.split("\n\n")[0])
    default_bind = f"{os.environ.get('BIND_HOST') or '127.0.0.1'}:{os.environ.get('POLLS_PORT') or DEFAULT_PORT}"
    parser.add_argument("--bind", type=_bind, default=default_bind, help=f"HOST:PORT (default {default_bind})")
    parser.add_argument("--threads", type=int, default=8, help="threads for polls that wait on Redis (default 8)")
    parser.add_argument("--keep-alive", type=float, default=35.0, help="idle seconds before a connection closes")
    parser.add_argument("--head-seconds", type=float, default=HEAD_SECONDS,
                        help=f"time for a request head to arrive whole (default {HEAD_SECONDS:g})")
    parser.add_argument("--redis-timeout", type=float, default=0.5,
                        help="seconds a Redis call may take before the poll is answered 503 (default 0.5)")
    parser.add_argument("--max-thread-polls", type=int, default=MAX_THREAD_POLLS,
                        help=f"polls waiting on Redis at once before the next is answered 503 (default {MAX_THREAD_POLLS})")
    parser.add_argument("--no-access-log", action="store_true",
                        help="no access line per request (the proxy's access log has one for each)")
    args = parser.parse_args(argv)
    configure_logging()
    settings = get_settings()
    refuse_unsafe(settings, "polls")
    host, port = args.bind
    try:
        asyncio.run(serve(settings, host, port, threads=max(1, args.threads), keep_alive=args.keep_alive,
                          access_lines=not args.no_access_log, max_thread_polls=max(1, args.max_thread_polls),
                          head_seconds=args.head_seconds, redis_timeout=args.redis_timeout))
    except OSError as exc:
        log_event(log, "polls_bind_failed", logging.ERROR, host=host, port=port, error=str(exc))
        return 1
    return 0


# The Procfile's port for the poll server (POLLS_PORT); 8001 is the stand-in gateway's in development.
DEFAULT_PORT = 8002

if __name__ == "__main__":
    sys.exit(main())
