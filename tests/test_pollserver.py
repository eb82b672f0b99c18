"""The poll server (web/pollserver.py): the Procfile's ``polls`` process, started by the launcher against the
shared system's Redis, answering places in line as the web does; its HTTP, its metrics and access lines;
and behind the production proxy (deploy/nginx/meterai.conf), which sends it the place-in-line reads and
falls back to the web nodes while it is down.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
import requests

from shared.admission import AdmissionController, Mode, Signer
from shared.config import Settings
from shared.devtools.launcher import Process
from shared.devtools.proxy import start_nginx
from shared.devtools.services import free_port
from shared.redisconn import redis_client
from tests.conftest import System, wait_until

QUEUE = "/api/v1/queue"
# Headers that name the request or the moment, not the answer.
PER_REQUEST = {"x-request-id", "date", "server", "connection", "keep-alive"}


class Line:
    """A waiting room of its own (key prefix), its web node and poll server on the same settings."""

    def __init__(self, sys_: System, web: Process, polls: Process, env: dict[str, str]) -> None:
        self.sys, self.web, self.polls, self.env = sys_, web, polls, env
        self.web_url, self.polls_url = f"http://127.0.0.1:{web.port}", f"http://127.0.0.1:{polls.port}"
        self.prefix = env["REDIS_KEY_PREFIX"]
        self.clients: list = []

    def ticket(self, n: int) -> dict:
        answer = requests.post(f"{self.web_url}{QUEUE}", headers={"Client-Id": f"buyer-{uuid.uuid4().hex[:12]}",
                                                                 "X-Forwarded-For": f"10.9.{n >> 8 & 255}.{n & 255}"},
                               timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def waiting_ticket(self) -> str:
        """A ticket that waits (the first of an empty line is admitted at once)."""
        for n in range(100, 110):
            answer = self.ticket(n)
            if not answer["admitted"]:
                return answer["ticket"]
        raise AssertionError("every ticket was admitted at once")

    def room(self) -> AdmissionController:
        from shared.config import load_settings

        settings = load_settings({**self.sys.env, **self.env})
        client = redis_client(settings.redis_url, timeout=1)
        self.clients.append(client)  # closed with the fixture
        return AdmissionController(settings, client)

    def polls_log(self) -> list[dict]:
        lines = []
        for line in self.polls.output().decode("utf-8", "replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                lines.append(record)
        return lines


@pytest.fixture
def line(sys_: System):
    """``line(ADMISSION_PER_MINUTE="1", ...)``: a web node and a poll server on a waiting room of their own."""
    started: list[str] = []
    prefixes: list[str] = []
    lines: list[Line] = []

    def start(**env: str) -> Line:
        tag = uuid.uuid4().hex[:6]
        prefix = f"meterai-polls-{tag}:"
        prefixes.append(prefix)
        env = {"REDIS_KEY_PREFIX": prefix, "ADMISSION_PER_MINUTE": "1", "ADMISSION_BURST": "1",
               "PROXY_HOPS": "1", **env}
        web = sys_.launcher.start("web", name=f"web-{tag}", port=free_port(), env=env)
        polls = sys_.launcher.start("polls", name=f"polls-{tag}", port=free_port(), env=env)
        started.extend([web.name, polls.name])
        sys_.launcher.wait_ready([web.name, polls.name], timeout=90)
        lines.append(Line(sys_, web, polls, env))
        return lines[-1]

    yield start
    sys_.launcher.stop(*started)
    for line_ in lines:
        for client in line_.clients:
            client.close()
    for prefix in prefixes:
        _forget(sys_, prefix)


def _same_answer(a: requests.Response, b: requests.Response) -> None:
    assert a.status_code == b.status_code, (a.text, b.text)
    names = lambda r: {k.lower() for k in r.headers} - PER_REQUEST  # noqa: E731
    assert names(a) == names(b), (dict(a.headers), dict(b.headers))
    for name in names(a) - {"content-length", "retry-after"}:
        assert a.headers[name] == b.headers[name], name
    assert a.headers["X-Request-Id"] and b.headers["X-Request-Id"]


def test_a_place_in_line_from_the_poll_server_is_the_one_the_web_gives(line):
    room = line(ADMISSION_PER_MINUTE="1", ADMISSION_BURST="1")
    first = room.ticket(1)  # admitted at once: the line was empty
    waiting = [room.ticket(n) for n in range(2, 5)]
    assert first["admitted"] is True and all(not w["admitted"] for w in waiting)
    for n, ticket in enumerate(w["ticket"] for w in waiting):
        web = requests.get(f"{room.web_url}{QUEUE}/{ticket}", timeout=10)
        polls = requests.get(f"{room.polls_url}{QUEUE}/{ticket}", timeout=10)
        _same_answer(web, polls)
        assert web.json() == polls.json()  # one outflow a minute: the head can't have moved between
        assert polls.json()["position"] == n + 1 and polls.json()["admitted"] is False
        assert polls.headers["Retry-After"] == web.headers["Retry-After"]
        assert polls.headers["Cache-Control"] == "no-store"
    # Refusals in the web's error shape, status and headers: not a ticket, forged, expired, another epoch.
    settings = room.room().settings
    signer = Signer(settings.secret_key)
    epoch = redis.Redis.from_url(settings.redis_url).get(f"{room.prefix}adm:epoch").decode()
    refusals = {
        "garbage": 404,
        waiting[0]["ticket"][:-2] + "xx": 404,
        signer.sign("ticket", {"n": 3, "e": epoch, "t": 0}): 410,
        signer.sign("ticket", {"n": 3, "e": "another", "t": int(time.time())}): 410,
    }
    for ticket, status in refusals.items():
        web = requests.get(f"{room.web_url}{QUEUE}/{ticket}", timeout=10)
        polls = requests.get(f"{room.polls_url}{QUEUE}/{ticket}", timeout=10)
        _same_answer(web, polls)
        assert polls.status_code == status and polls.json() == web.json()
    # Paths and methods that are not a place in line.
    for method, path in (("POST", f"{QUEUE}/{waiting[0]['ticket']}"), ("GET", f"{QUEUE}/a/b"), ("GET", "/nothing")):
        polls = requests.request(method, f"{room.polls_url}{path}", timeout=10)
        web = requests.request(method, f"{room.web_url}{path}", timeout=10)
        assert polls.status_code == web.status_code and polls.json()["error"]["code"] == web.json()["error"]["code"]


def test_sales_paused_and_the_turn_come_from_the_poll_server_as_from_the_web(line):
    room = line(ADMISSION_PER_MINUTE="60", ADMISSION_BURST="1")
    room.ticket(1)
    ticket = room.ticket(2)["ticket"]
    controller = room.room()
    controller.set_mode(Mode.PAUSED)
    try:
        def paused(url: str) -> list[requests.Response]:
            answer = requests.get(f"{url}{QUEUE}/{ticket}", timeout=10)
            # (A list: a 503 Response is falsy.) Each process's look at the line is 200 ms old at most.
            return [answer] if answer.status_code == 503 else []

        [web], [polls] = wait_until(lambda: paused(room.web_url)), wait_until(lambda: paused(room.polls_url))
        _same_answer(web, polls)
        assert polls.json() == web.json() and polls.json()["error"]["code"] == "sales_paused"
        assert polls.headers["Retry-After"] == "5"
    finally:
        controller.set_mode(Mode.AUTO)
    # Its turn, collected at the poll server: a token the web takes for a create (checked, not spent).
    admitted = wait_until(lambda: (a := requests.get(f"{room.polls_url}{QUEUE}/{ticket}", timeout=10).json())
                          .get("admitted") and a, timeout=30, message="the ticket's turn")
    assert admitted["position"] == 0 and admitted["admission_token"]
    assert controller.check_token(admitted["admission_token"])["n"] == 2
    again = requests.get(f"{room.polls_url}{QUEUE}/{ticket}", timeout=10)
    assert again.status_code == 200 and "Retry-After" not in again.headers


class _NoRedis:
    """A Redis client any use of which fails the test: the answer had to come from memory."""

    def __getattr__(self, name: str):
        raise AssertionError(f"Redis was asked ({name})")


class _SilentRedis:
    """A "Redis" that accepts connections and never answers."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(256)
        self.socket.settimeout(0.2)
        self.held: list[socket.socket] = []
        self.open = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.socket.getsockname()[1]}/0"

    def _accept(self) -> None:
        while self.open:
            try:
                self.held.append(self.socket.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self.open = False
        self.thread.join(timeout=5)
        self.socket.close()
        for connection in self.held:
            connection.close()


@pytest.fixture
def silent_redis():
    silent = _SilentRedis()
    yield silent
    silent.close()


def _line_of_two(sys_: System, prefix: str) -> tuple[Settings, str]:
    """A waiting room of its own (one a minute): the first ticket admitted at once, the second's returned."""
    from shared.config import load_settings

    settings = load_settings({**sys_.env, "REDIS_KEY_PREFIX": prefix, "ADMISSION_PER_MINUTE": "1",
                              "ADMISSION_BURST": "1"})
    client = redis_client(settings.redis_url, timeout=1)
    try:
        room = AdmissionController(settings, client)
        room.take_ticket("10.8.0.1", "buyer-first-one")
        return settings, room.take_ticket("10.8.0.2", "buyer-second-one").ticket
    finally:
        client.close()


def _forget(sys_: System, prefix: str) -> None:
    client = redis.Redis.from_url(sys_.settings.redis_url)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


def test_a_poll_behind_a_fresh_look_at_the_line_is_answered_from_memory(sys_):
    prefix = f"meterai-polls-{uuid.uuid4().hex[:6]}:"
    settings, ticket = _line_of_two(sys_, prefix)
    client = redis_client(settings.redis_url, timeout=1)
    try:
        fresh = AdmissionController(settings, client)
        assert fresh.status_if_known(ticket) is None  # nothing seen yet: ask Redis
        asked = fresh.status(ticket)
        fresh.LINE_MAX_AGE_SECONDS = fresh.OUTFLOW_MAX_AGE_SECONDS = 3600.0  # no clock in this test
        fresh.redis = fresh._script = fresh._collect = _NoRedis()  # type: ignore[assignment]
        known = fresh.status_if_known(ticket)
        assert known == asked and known.position == 1 and not known.admitted
        with pytest.raises(Exception) as refused:
            fresh.status_if_known("garbage")
        assert getattr(refused.value, "code", None) == "invalid_ticket"
        # At the head (its admission is collected in Redis), another epoch, a stale look: not from memory.
        signer = Signer(settings.secret_key)
        claims = signer.verify("ticket", ticket)
        at_head = signer.sign("ticket", {**claims, "n": 1})
        elsewhere = signer.sign("ticket", {**claims, "e": "another-epoch"})
        assert fresh.status_if_known(at_head) is None and fresh.status_if_known(elsewhere) is None
        fresh.LINE_MAX_AGE_SECONDS = 0.0
        assert fresh.status_if_known(ticket) is None
        assert fresh.status_if_known(ticket, slack=3600.0) == asked  # unless an older look is accepted
    finally:
        client.close()
        _forget(sys_, prefix)


def test_a_poll_waiting_on_redis_holds_up_neither_the_others_nor_more_than_a_few_threads(sys_, silent_redis):
    """A Redis that doesn't answer delays the polls that need it (each then answered 503, as the web would),
    never /healthz; beyond --max-thread-polls a poll is answered 503 at once instead of queueing, even
    when many arrive in the same turn of the event loop."""
    import selectors

    prefix = f"meterai-polls-{uuid.uuid4().hex[:6]}:"
    _, ticket = _line_of_two(sys_, prefix)
    name, port = f"polls-silent-{uuid.uuid4().hex[:6]}", free_port()
    polls = sys_.launcher.start("polls", name=name, port=port, env={"REDIS_URL": silent_redis.url,
                                                                   "REDIS_KEY_PREFIX": prefix},
                                command="python -m web.pollserver --bind 127.0.0.1:${POLLS_PORT} --threads 1 "
                                        "--max-thread-polls 1 --redis-timeout 30")
    try:
        sys_.launcher.wait_ready([name], timeout=60)
        # Five polls sent at once on five connections: one waits on Redis, four are refused at once.
        connections = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(5)]
        request = f"GET {QUEUE}/{ticket} HTTP/1.1\r\nConnection: close\r\n\r\n".encode()
        for connection in connections:
            connection.sendall(request)
        wait_until(lambda: len(silent_redis.held) >= 1, message="a poll's thread reaching Redis")
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert health.status_code == 200  # the event loop is free meanwhile
        selector = selectors.DefaultSelector()
        for connection in connections:
            selector.register(connection, selectors.EVENT_READ)

        def read_answers(count: int) -> list[bytes]:
            answers = []
            while len(answers) < count:
                ready = selector.select(timeout=20)
                assert ready, f"only {len(answers)} of {count} answers came"
                for key, _ in ready:
                    data = b""
                    while chunk := key.fileobj.recv(65536):
                        data += chunk
                    selector.unregister(key.fileobj)
                    answers.append(data)
            return answers

        refused = read_answers(4)
        assert all(a.startswith(b"HTTP/1.1 503") and b"admission_unavailable" in a for a in refused)
        assert selector.select(timeout=0) == []  # the fifth still waits on the silent Redis (30 s timeout)
        assert len(silent_redis.held) == 1  # one poll went to Redis, not five
        silent_redis.close()  # Redis goes away: the waiting poll is answered as the web would
        [last] = read_answers(1)
        assert last.startswith(b"HTTP/1.1 503") and b"admission_unavailable" in last
        for connection in connections:
            connection.close()
    finally:
        sys_.launcher.stop(name)
        _forget(sys_, prefix)
    assert polls.popen is not None and polls.popen.returncode == 0  # SIGTERM: a clean stop


def _exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        return received


def test_the_poll_server_speaks_http_carefully(line):
    room = line()
    ticket = room.waiting_ticket()
    port = room.polls.port
    assert port
    # Pipelined requests answered in order, the last one closing the connection.
    poll = f"GET {QUEUE}/{ticket} HTTP/1.1\r\nHost: x\r\nX-Request-Id: pipelined-{{}}\r\n\r\n"
    raw = _exchange(port, ("".join(poll.format(i) for i in range(5))
                           + "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode())
    answers = raw.split(b"HTTP/1.1 ")[1:]
    assert [a.split(b" ", 1)[0] for a in answers] == [b"200"] * 6
    assert [a.split(b"X-Request-Id: ")[1].split(b"\r\n")[0] for a in answers[:5]] == [
        f"pipelined-{i}".encode() for i in range(5)]
    assert b"Connection: close" in answers[-1]
    # HTTP/1.0 closes unless asked; HEAD has the headers and no body.
    raw = _exchange(port, f"HEAD {QUEUE}/{ticket} HTTP/1.0\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and body == b"" and b"Content-Length: " in head
    # A body too big to skip, a broken request line, an oversized head: refused in JSON, then closed.
    for request, status in ((f"GET {QUEUE}/{ticket} HTTP/1.1\r\nContent-Length: 9999999\r\n\r\nhello", b"400"),
                            ("BROKEN\r\n\r\n", b"400"),
                            ("GET / HTTP/2.0\r\n\r\n", b"400"),
                            (f"GET {QUEUE}/{ticket} HTTP/1.1\r\nX-Big: {'a' * 50000}\r\n\r\n", b"431")):
        raw = _exchange(port, request.encode())
        assert raw.startswith(b"HTTP/1.1 " + status), raw[:200]
        assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"] in ("bad_request",
                                                                               "request_header_fields_too_large")
        assert raw.count(b"\r\nContent-Type: ") == 1  # one answer, then closed
    # Refused as ambiguous (nginx never sends these; a client reaching the port directly might).
    for request in (f"GET {QUEUE}/{ticket} HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\nhello",
                    f"GET {QUEUE}/{ticket} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                    f"GET {QUEUE}/{ticket} HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
                    f"get {QUEUE}/{ticket} HTTP/1.1\r\n\r\n",
                    f"GET {QUEUE}/{ticket} HTTP/1.1\r\nBad\tName: x\r\n\r\n",
                    f"GET {QUEUE}/{ticket} HTTP/1.1\r\nContent-Length: {'9' * 5000}\r\n\r\n"):
        raw = _exchange(port, request.encode())
        assert raw.startswith(b"HTTP/1.1 400"), (request, raw[:200])
        assert raw.count(b"\r\nContent-Type: ") == 1
    # Big headers (a browser's cookies, as nginx passes them: up to 4 × 8 KiB) are a normal request.
    raw = _exchange(port, f"GET {QUEUE}/{ticket} HTTP/1.1\r\nCookie: {'c' * 8000}\r\nX-More: {'m' * 20000}\r\n"
                          f"Connection: close\r\n\r\n".encode())
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    # A GET's body is read and ignored: the request after it is answered, the body never taken for one.
    body = b"GET /nothing HTTP/1.1\r\n\r\n"
    raw = _exchange(port, f"GET {QUEUE}/{ticket} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
                    + b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert [a.split(b" ", 1)[0] for a in raw.split(b"HTTP/1.1 ")[1:]] == [b"200", b"200"], raw
    # Many more pipelined requests than are parsed ahead (MAX_PIPELINED): all answered, in order.
    from web.pollserver import MAX_PIPELINED

    count = 3 * MAX_PIPELINED
    raw = _exchange(port, ("".join(f"GET {QUEUE}/{ticket} HTTP/1.1\r\nX-Request-Id: many-{i:04d}\r\n\r\n"
                                   for i in range(count)) + "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n").encode())
    ids = [a.split(b"X-Request-Id: ")[1].split(b"\r\n")[0].decode() for a in raw.split(b"HTTP/1.1 200 ")[1:]]
    assert ids[:count] == [f"many-{i:04d}" for i in range(count)] and len(ids) == count + 1
    # A client that half-closes after its requests still gets their answers.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(f"GET {QUEUE}/{ticket} HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n".encode())
        connection.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200 ") == 2
    # HEAD as the web answers it.
    web, polls = (requests.head(f"{url}{QUEUE}/{ticket}", timeout=10) for url in (room.web_url, room.polls_url))
    _same_answer(web, polls)
    assert polls.content == b"" and polls.headers["Content-Length"] == web.headers["Content-Length"]
    # Every request counted in an access line: route template (never the ticket), status, request id.
    lines = [r for r in room.polls_log() if r.get("event") == "http_request"]
    ids = {r.get("request_id") for r in lines}
    assert {f"pipelined-{i}" for i in range(5)} <= ids
    assert all(ticket not in json.dumps(r) for r in lines)
    assert {r["route"] for r in lines} >= {"/api/v1/queue/<ticket>", "/healthz"}


def test_idle_connections_and_heads_that_never_end_are_let_go(sys_):
    name, port = f"polls-idle-{uuid.uuid4().hex[:6]}", free_port()
    sys_.launcher.start("polls", name=name, port=port,
                        command="python -m web.pollserver --bind 127.0.0.1:${POLLS_PORT} --keep-alive 2 "
                                "--head-seconds 0.5")
    try:
        sys_.launcher.wait_ready([name], timeout=60)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            for _ in range(2):  # kept open between requests...
                connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert connection.recv(65536).startswith(b"HTTP/1.1 200")
            assert connection.recv(65536) == b""  # ...and closed by the server once idle, not by us
        # A head trickled a byte at a time, or stray CRLFs, faster than the head's deadline: more bytes
        # don't extend it (if they did, the connection would live as long as the trickle, 20 s here).
        for trickle in (b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 200, b"\r\n" * 100):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
                connection.settimeout(0.2)
                closed = False
                for n in range(len(trickle)):
                    try:
                        connection.sendall(trickle[n:n + 1])
                        closed = connection.recv(65536) == b""
                    except TimeoutError:
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        closed = True
                    if closed:
                        break
                assert closed, trickle[:20]
    finally:
        sys_.launcher.stop(name)


def test_an_answer_that_fails_is_a_500_and_the_connection_closes_never_a_hang(sys_):
    """Whatever raises while an answer is made (in the loop or on a thread: a broken metrics file, a full
    disk) gives that request a 500 and closes the connection; the server goes on."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from shared.config import load_settings
    from web.pollserver import Connection, PollServer

    settings = load_settings(sys_.env)

    class Failing(PollServer):
        def answer(self, request, gone=None):
            if request.path == "/fails-here":
                raise OSError("no space left on device")
            if request.path == "/fails-on-a-thread":
                async def later() -> bytes:
                    raise OSError("no space left on device")
                return later()
            return super().answer(request, gone)

    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(1)
    server = Failing(settings, AdmissionController(settings, redis_client(settings.redis_url, timeout=1)), executor)
    connections: set = set()
    listener = loop.run_until_complete(loop.create_server(lambda: Connection(server, 30.0, connections),
                                                          "127.0.0.1", 0))
    port = listener.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        for path in ("/fails-here", "/fails-on-a-thread"):
            raw = _exchange(port, f"GET {path} HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n".encode())
            assert raw.startswith(b"HTTP/1.1 500") and b"Connection: close" in raw, raw[:300]
            assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"] == "internal_error"
            assert raw.count(b"HTTP/1.1 ") == 1  # closed after it: the pipelined request is not answered
        assert _exchange(port, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")
    finally:
        loop.call_soon_threadsafe(listener.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        executor.shutdown()


def test_the_poll_server_counts_its_requests_for_prometheus_behind_the_ops_token(line):
    room = line(OPS_TOKEN="ops-token-for-the-polls-test-0123456789")
    ticket = room.waiting_ticket()
    for _ in range(3):
        assert requests.get(f"{room.polls_url}{QUEUE}/{ticket}", timeout=10).status_code == 200
    requests.get(f"{room.polls_url}{QUEUE}/garbage", timeout=10)
    assert requests.get(f"{room.polls_url}/metrics", timeout=10).status_code == 401
    assert requests.get(f"{room.polls_url}/metrics", headers={"Authorization": "Bearer wrong"},
                        timeout=10).status_code == 401
    scrape = requests.get(f"{room.polls_url}/metrics", timeout=10,
                          headers={"Authorization": "Bearer ops-token-for-the-polls-test-0123456789"})
    assert scrape.status_code == 200 and scrape.headers["Content-Type"].startswith("text/plain")
    text = scrape.text
    assert 'meterai_http_requests_total{method="GET",route="/api/v1/queue/<ticket>",status="200"} 3.0' in text
    assert 'meterai_http_requests_total{method="GET",route="/api/v1/queue/<ticket>",status="404"} 1.0' in text
    assert "meterai_http_request_duration_seconds_bucket" in text
    # Which server answered the line's polls (the LinePollsAnsweredByTheWeb alert): the poll server's 4
    # here, the web's own when a poll reaches it (what the proxy does only while no poll server answers).
    assert 'meterai_queue_polls_total{server="polls"} 4.0' in text
    assert requests.get(f"{room.web_url}{QUEUE}/{ticket}", timeout=10).status_code == 200
    web = requests.get(f"{room.web_url}/metrics", timeout=10,
                       headers={"Authorization": "Bearer ops-token-for-the-polls-test-0123456789"}).text
    assert 'meterai_queue_polls_total{server="web"} 1.0' in web and 'server="polls"' not in web


def test_without_an_ops_token_the_poll_servers_metrics_are_not_there(line):
    room = line(OPS_TOKEN="")
    assert requests.get(f"{room.polls_url}/metrics", timeout=10).status_code == 404


def test_the_proxy_sends_place_in_line_reads_to_the_poll_server_and_to_the_web_while_it_is_down(line, tmp_path):
    room = line(ADMISSION_PER_MINUTE="1", ADMISSION_BURST="1")
    nginx = start_nginx(tmp_path / "nginx", [f"127.0.0.1:{room.web.port}"], polls=[f"127.0.0.1:{room.polls.port}"])
    try:
        def upstreams(method: str, path_prefix: str) -> list[str]:
            lines = [json.loads(x) for x in nginx.access_log.read_text().splitlines() if x.strip()]
            return [x["upstream"] for x in lines if x["method"] == method and x["path"].startswith(path_prefix)]

        headers = {"Client-Id": "buyer-through-the-proxy"}
        taken = requests.post(f"{nginx.url}{QUEUE}", headers=headers, timeout=10)
        assert taken.status_code == 200
        second = requests.post(f"{nginx.url}{QUEUE}", headers={"Client-Id": "buyer-through-the-proxy-2"}, timeout=10)
        ticket = second.json()["ticket"]
        for _ in range(3):
            answer = requests.get(f"{nginx.url}{QUEUE}/{ticket}", timeout=10)
            assert answer.status_code == 200 and answer.json()["position"] == 1
        assert requests.head(f"{nginx.url}{QUEUE}/{ticket}", timeout=10).status_code == 200
        wait_until(lambda: len(upstreams("HEAD", f"{QUEUE}/")) == 1, message="nginx logging")
        polls_address, web_address = f"127.0.0.1:{room.polls.port}", f"127.0.0.1:{room.web.port}"
        assert set(upstreams("GET", f"{QUEUE}/")) | set(upstreams("HEAD", f"{QUEUE}/")) == {polls_address}
        assert set(upstreams("POST", QUEUE)) == {web_address}
        # A POST under the prefix is the web's (its 405, as before).
        assert requests.post(f"{nginx.url}{QUEUE}/{ticket}", timeout=10).status_code == 405
        # nginx writes its access line after the answer: wait for it rather than race it.
        wait_until(lambda: len(upstreams("POST", f"{QUEUE}/")) == 1, message="nginx logging the POST")
        assert upstreams("POST", f"{QUEUE}/") == [web_address]
        # The poll server down: nobody in line sees an error, the web answers.
        room.sys.launcher.kill(room.polls.name)
        before = len(upstreams("GET", f"{QUEUE}/"))
        for _ in range(5):
            answer = requests.get(f"{nginx.url}{QUEUE}/{ticket}", timeout=10)
            assert answer.status_code == 200 and answer.json()["position"] == 1
        wait_until(lambda: len(upstreams("GET", f"{QUEUE}/")) == before + 5, message="nginx logging the GETs")
        assert upstreams("GET", f"{QUEUE}/")[-1] == web_address
        # Back up: polls go to it again (once nginx tries it after its fail_timeout).
        room.sys.launcher.start(room.polls.name)
        room.sys.launcher.wait_ready([room.polls.name], timeout=60)
        wait_until(lambda: requests.get(f"{nginx.url}{QUEUE}/{ticket}", timeout=10) and
                   upstreams("GET", f"{QUEUE}/")[-1] == polls_address, timeout=30, interval=0.5,
                   message="polls back on the poll server")
    finally:
        nginx.stop()
    # Every poll server down (more of them than the server block's 3 tries): still the web's answer.
    dead = [f"127.0.0.1:{free_port()}" for _ in range(4)]
    nginx = start_nginx(tmp_path / "nginx-dead", [f"127.0.0.1:{room.web.port}"], polls=dead)
    try:
        for _ in range(3):
            answer = requests.get(f"{nginx.url}{QUEUE}/{ticket}", timeout=30)
            assert answer.status_code == 200 and answer.json()["position"] == 1
    finally:
        nginx.stop()


def test_the_site_file_lists_poll_servers_with_the_web_nodes_as_their_backups():
    from shared.devtools.proxy import render_site

    site = render_site(["127.0.0.1:8000"], 8080, polls=["127.0.0.1:8001"])
    polls = site.split("upstream meterai_polls {", 1)[1].split("}", 1)[0]
    assert "server 127.0.0.1:8001 max_fails=3 fail_timeout=10s;" in polls
    assert "server 127.0.0.1:8000 max_fails=3 fail_timeout=10s backup;" in polls
    without = render_site(["127.0.0.1:8000"], 8080).split("upstream meterai_polls {", 1)[1].split("}", 1)[0]
    assert "server 127.0.0.1:8000 max_fails=3 fail_timeout=10s;" in without and "backup" not in without


class _Transport:
    """The transport side of one connection, as asyncio hands it to the protocol (no socket)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.reading, self.closed, self.aborted = True, False, False

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return sum(len(data) for data in self.written) if self.unsent else 0

    unsent = False  # True: nothing written is taken by the client (asyncio keeps it in its buffer)


def test_a_client_that_stops_reading_its_answers_is_not_read_from_and_is_let_go(sys_):
    """When the socket's send buffer is full asyncio pauses writing: the connection then reads no more
    requests, parses no more than MAX_PIPELINED ahead, and is dropped after the keep-alive if the client
    never takes its answers."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from shared.config import load_settings
    from web.pollserver import MAX_PIPELINED, Connection, PollServer

    settings = load_settings(sys_.env)
    client = redis_client(settings.redis_url, timeout=1)

    async def scenario() -> tuple[_Transport, int, int]:
        server = PollServer(settings, AdmissionController(settings, client), ThreadPoolExecutor(1),
                            access_lines=False)
        connection, transport = Connection(server, 0.3, set()), _Transport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        connection.pause_writing()  # the client's receive window is full
        connection.data_received(b"GET /healthz HTTP/1.1\r\n\r\n" * (3 * MAX_PIPELINED))
        parsed, reading = len(connection.pending), transport.reading
        await asyncio.sleep(1.0)  # past the keep-alive, the client still not reading
        return transport, parsed, reading

    try:
        transport, parsed, reading = asyncio.run(scenario())
    finally:
        client.close()
    assert parsed == MAX_PIPELINED and not reading and transport.written == []
    assert transport.aborted


def test_a_connection_closed_with_answers_the_client_never_took_is_dropped_after_the_keep_alive(sys_):
    """asyncio's close() waits for the write buffer to empty; below its high-water mark writing never
    pauses, so a client that doesn't read would hold the connection for ever without a deadline."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from shared.config import load_settings
    from web.pollserver import Connection, PollServer

    settings = load_settings(sys_.env)
    client = redis_client(settings.redis_url, timeout=1)

    async def scenario() -> _Transport:
        server = PollServer(settings, AdmissionController(settings, client), ThreadPoolExecutor(1),
                            access_lines=False)
        connection, transport = Connection(server, 0.3, set()), _Transport()
        transport.unsent = True
        connection.connection_made(transport)  # type: ignore[arg-type]
        connection.data_received(b"GET /healthz HTTP/1.1\r\n\r\n" * 3 + b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert len(transport.written) == 4 and transport.closed and not transport.aborted
        await asyncio.sleep(1.0)
        return transport

    try:
        transport = asyncio.run(scenario())
    finally:
        client.close()
    assert transport.aborted


def test_the_cap_on_polls_waiting_for_redis_holds_within_one_turn_of_the_event_loop(sys_):
    """Many connections readable at once: each poll that needs Redis is counted as it is sent to a thread,
    so the 257th in the same turn is refused, not queued."""
    from concurrent.futures import ThreadPoolExecutor

    from shared.config import load_settings
    from web.pollserver import MAX_THREAD_POLLS, PollServer, parse_head

    class Unknown:
        """A waiting room that has not seen the line yet: every poll needs Redis."""

        def status_if_known(self, ticket, slack=0.0):
            return None

    settings = load_settings(sys_.env)
    server = PollServer(settings, Unknown(), ThreadPoolExecutor(1), access_lines=False)  # type: ignore[arg-type]
    head = f"GET {QUEUE}/some-ticket HTTP/1.1".encode()
    answers = [server.answer(parse_head(head)) for _ in range(MAX_THREAD_POLLS + 10)]
    waiting = [a for a in answers if not isinstance(a, bytes)]
    refused = [a for a in answers if isinstance(a, bytes)]
    for coroutine in waiting:
        coroutine.close()  # never run: nothing to wait for here
    assert len(waiting) == MAX_THREAD_POLLS and server.thread_polls == MAX_THREAD_POLLS
    assert len(refused) == 10 and all(a.startswith(b"HTTP/1.1 503") and b"admission_unavailable" in a
                                      for a in refused)


def test_the_poll_server_refuses_port_0(capsys):
    """Port 0 would listen where neither the proxy nor a readiness check looks: refused at the command
    line, before anything starts."""
    from web.pollserver import main

    for bad in ("127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:", "8002"):
        with pytest.raises(SystemExit) as exited:
            main(["--bind", bad])
        assert exited.value.code == 2, bad
    assert "port must be 1-65535" in capsys.readouterr().err
