"""The buffering proxy production runs (deploy/nginx/meterai.conf), rendered by shared/devtools/proxy.py and
put in front of real gunicorn web nodes: copies of the Procfile's ``web`` started by the one launcher, with
PROXY_HOPS=1 as production sets it and gunicorn's access log on, so a test counts what each node saw.
"""
from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import pytest
import requests

from shared.devtools.launcher import Process
from shared.devtools.proxy import NginxHandle, group_members, render_site, start_nginx
from shared.devtools.services import free_port
from tests.conftest import System, make_pdf, wait_until

FIELDS = {"page": "1", "x": "400", "y": "80", "email": "pelamar@example.id"}
DOCUMENT = make_pdf(1)  # one document: a repeated create must send the same one


def node_requests(node: Process, method: str, route: str) -> int:
    """How many ``method route`` requests this node's gunicorn logged (its JSON access lines, event
    ``http_request``, go to its output)."""
    count = 0
    for line in node.output().decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "http_request" \
                and record.get("method") == method and record.get("route") == route:
            count += 1
    return count


def access_lines(proxy: NginxHandle) -> list[dict]:
    return [json.loads(line) for line in proxy.access_log.read_text().splitlines() if line.strip()]


def create(url: str, key: str, document: bytes | None = None, **headers: str) -> requests.Response:
    return requests.post(f"{url}/api/v1/orders", headers={"Idempotency-Key": key, **headers}, data=FIELDS,
                         files={"document": ("surat.pdf", document or DOCUMENT, "application/pdf")},
                         timeout=60)


@pytest.fixture
def web_nodes(sys_: System):
    """Start web nodes on ports of their own: ``web_nodes(2, RATE_LIMIT_VERIFY="2/60")``."""
    started: list[str] = []

    def start(count: int, **env: str) -> list[Process]:
        nodes = []
        for _ in range(count):
            name = f"web-node-{uuid.uuid4().hex[:6]}"
            started.append(name)
            nodes.append(sys_.launcher.start("web", name=name, port=free_port(), env={
                "PROXY_HOPS": "1", "GUNICORN_CMD_ARGS": "--access-logfile -", **env}))
        sys_.launcher.wait_ready([n.name for n in nodes], timeout=90)
        return nodes

    yield start
    for name in started:
        process = sys_.launcher.processes[name]
        if process.alive():
            os.killpg(process.pid, signal.SIGCONT)  # a test may have frozen it
    sys_.launcher.stop(*started)


@pytest.fixture
def proxy(tmp_path: Path):
    """Start the private nginx: ``proxy(nodes, proxy_read_timeout="2s")``."""
    handles: list[NginxHandle] = []

    def start(nodes: list[Process], **limits: str) -> NginxHandle:
        handle = start_nginx(tmp_path / f"nginx-{len(handles)}", [f"127.0.0.1:{n.port}" for n in nodes], **limits)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


def test_an_upload_over_the_limit_is_refused_by_the_proxy_in_json_before_a_node_sees_it(web_nodes, proxy):
    [node] = web_nodes(1)
    nginx = proxy([node])
    too_big = b"%PDF-1.4\n" + b"0" * (2304 * 1024)  # MAX_DOCUMENT_BYTES + the multipart allowance, and more

    refused = create(nginx.url, uuid.uuid4().hex, too_big)
    accepted = create(nginx.url, uuid.uuid4().hex)

    assert refused.status_code == 413
    assert refused.headers["Content-Type"] == "application/json"
    assert refused.json()["error"]["code"] == "too_large"
    assert accepted.status_code == 202, accepted.text
    assert wait_until(lambda: node_requests(node, "POST", "/api/v1/orders") == 1, message="the one create logged")
    assert [line["upstream"] for line in access_lines(nginx) if line["status"] == 413] == [""]


def test_verification_by_upload_takes_bigger_files_than_a_create(web_nodes, proxy):
    [node] = web_nodes(1)
    nginx = proxy([node])
    three_megabytes = b"not a pdf" * (3 * 1024 * 1024 // 9)

    answer = requests.post(f"{nginx.url}/api/v1/verify",
                           files={"document": ("x.pdf", three_megabytes, "application/pdf")}, timeout=60)

    assert answer.status_code == 415, answer.text  # the node's verdict on the content, not nginx's 413
    wait_until(lambda: node_requests(node, "POST", "/api/v1/verify") == 1, message="the node logging it")


def test_a_client_cannot_choose_its_address_through_the_proxy(web_nodes, proxy):
    # A fresh key prefix: this node's rate-limit counters are its own.
    [node] = web_nodes(1, RATE_LIMIT_VERIFY="2/60", REDIS_KEY_PREFIX=f"meterai-proxy-{uuid.uuid4().hex[:8]}:")
    nginx = proxy([node])

    def verify(url: str, claimed: str) -> int:
        return requests.post(f"{url}/api/v1/verify", headers={"X-Forwarded-For": claimed},
                             files={"document": ("x.pdf", b"not a pdf", "application/pdf")}, timeout=10).status_code

    # Straight to the node, which trusts one hop, every claimed address is a client of its own...
    direct = [verify(node.url, f"203.0.113.{n}") for n in range(1, 4)]
    # ...through the proxy, the claim is replaced by the address nginx saw: one client, limited at two.
    proxied = [verify(nginx.url, f"198.51.100.{n}") for n in range(1, 4)]

    assert 429 not in direct
    assert 429 not in proxied[:2] and proxied[2] == 429


def test_both_nodes_serve_and_a_killed_node_costs_no_request(sys_: System, web_nodes, proxy):
    first, second = web_nodes(2)
    nginx = proxy([first, second])
    for _ in range(10):
        assert requests.get(f"{nginx.url}/healthz", timeout=10).status_code == 200
    wait_until(lambda: node_requests(first, "GET", "/healthz") + node_requests(second, "GET", "/healthz") == 10,
               message="both nodes logging what they served")
    assert node_requests(first, "GET", "/healthz") > 0 and node_requests(second, "GET", "/healthz") > 0
    key = uuid.uuid4().hex
    before = create(nginx.url, key)
    assert before.status_code == 202, before.text

    sys_.launcher.kill(first.name)
    answers = [create(nginx.url, uuid.uuid4().hex) for _ in range(12)]
    repeated = create(nginx.url, key)

    assert [a.status_code for a in answers] == [202] * 12, [a.text for a in answers if a.status_code != 202]
    assert repeated.status_code == 200 and repeated.json()["order_id"] == before.json()["order_id"]
    assert sys_.query("SELECT count(*) AS n FROM orders")[0]["n"] == 13


def test_a_create_the_proxy_retries_on_another_node_makes_one_order(sys_: System, web_nodes, proxy):
    """non_idempotent retries are safe: the frozen node took the request, the proxy gave up on it and sent
    it to the other node, and when the frozen one wakes up and serves it too, the Idempotency-Key finds the
    order the other node made."""
    frozen, healthy = web_nodes(2)
    nginx = proxy([frozen, healthy], proxy_read_timeout="2s", proxy_send_timeout="2s")
    os.killpg(frozen.pid, signal.SIGSTOP)
    keys = [uuid.uuid4().hex for _ in range(3)]

    answers = [create(nginx.url, key) for key in keys]  # least_conn takes turns: one at least meets the frozen node
    retried = [line for line in access_lines(nginx) if line["method"] == "POST" and "," in line["upstream"]]
    os.killpg(frozen.pid, signal.SIGCONT)

    assert [a.status_code for a in answers] == [202] * 3, [a.text for a in answers]
    assert retried and all(line["upstream"].startswith(f"127.0.0.1:{frozen.port}") for line in retried)
    assert all(line["upstream_status"] == "504, 202" for line in retried)
    wait_until(lambda: node_requests(frozen, "POST", "/api/v1/orders") >= len(retried), timeout=30,
               message="the frozen node serving what it was sent")
    rows = sys_.query("SELECT idempotency_key, count(*) AS n FROM orders GROUP BY idempotency_key")
    assert {r["idempotency_key"]: r["n"] for r in rows} == {key: 1 for key in keys}


def test_reload_moves_requests_to_the_new_web_nodes(web_nodes, proxy):
    old, new = web_nodes(2)
    nginx = proxy([old])
    assert requests.get(f"{nginx.url}/healthz", timeout=10).status_code == 200

    nginx.reload([f"127.0.0.1:{new.port}"])
    answers = [requests.get(f"{nginx.url}/healthz", timeout=10).status_code for _ in range(5)]

    assert answers == [200] * 5
    wait_until(lambda: node_requests(new, "GET", "/healthz") == 5, message="the new node logging all five")
    assert node_requests(old, "GET", "/healthz") == 1


def test_stopping_the_proxy_leaves_no_process(tmp_path: Path):
    nginx = start_nginx(tmp_path / "nginx", ["127.0.0.1:9"], workers=2)
    pids = nginx.pids()
    assert len(nginx.worker_pids()) == 2 and len(pids) >= 3  # the master, two workers, the cache's helpers

    nginx.stop()

    assert group_members(pids[0]) == []
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_the_rendered_file_is_the_production_file_with_only_nodes_and_listen_changed():
    site = render_site(["127.0.0.1:8001", "127.0.0.1:8002"], 8080)

    assert "server 127.0.0.1:8001 max_fails=3 fail_timeout=10s;" in site
    assert "10.0.0.11" not in site and "listen 443" not in site and "return 301" not in site
    assert "listen 127.0.0.1:8080;" in site
    assert "proxy_request_buffering on;" in site and "proxy_set_header X-Forwarded-For $remote_addr;" in site
    with pytest.raises(ValueError, match="no sendfile_max_chunk directive"):
        render_site(["127.0.0.1:8001"], 8080, sendfile_max_chunk="1m")
    with pytest.raises(ValueError, match="host:port"):
        render_site(["127.0.0.1"], 8080)


def test_no_node_answering_is_a_json_come_back_with_hsts(tmp_path: Path):
    """Every web node down: the proxy's own 503 in the API's error shape, with Retry-After, and the HSTS
    header its location would otherwise have dropped (nginx inherits no add_header into a location that
    has one)."""
    nginx = start_nginx(tmp_path / "nginx", [f"127.0.0.1:{free_port()}"])  # nothing listens there
    try:
        answer = requests.post(f"{nginx.url}/api/v1/orders", headers={"Idempotency-Key": uuid.uuid4().hex},
                               files={"document": ("surat.pdf", make_pdf(), "application/pdf")}, timeout=30)
    finally:
        nginx.stop()
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "service_unavailable"
    assert int(answer.headers["Retry-After"]) > 0
    assert "max-age" in answer.headers["Strict-Transport-Security"]


def test_the_proxy_names_each_request_and_a_client_cannot(web_nodes, proxy):
    """nginx's $request_id reaches the node as X-Request-Id (echoed back by the app) and is in nginx's
    access log; a client's own X-Request-Id is replaced, so ids in our logs are ours."""
    [node] = web_nodes(1)
    nginx = proxy([node])
    answer = requests.get(f"{nginx.url}/healthz", headers={"X-Request-Id": "client-chosen-id-1234"}, timeout=10)
    request_id = answer.headers["X-Request-Id"]
    assert request_id != "client-chosen-id-1234" and len(request_id) == 32
    wait_until(lambda: request_id in nginx.access_log.read_text(), message="nginx's access line")
    logged = [json.loads(line) for line in nginx.access_log.read_text().splitlines()]
    assert [line["path"] for line in logged if line["request_id"] == request_id] == ["/healthz"]


def test_the_proxy_keeps_the_pages_static_files_and_nothing_else(web_nodes, proxy):
    """A new buyer's scripts come from the proxy's cache after the first: the node serves each file (per
    Accept-Encoding) once, while pages and API answers always reach it."""
    import gzip
    import re

    [node] = web_nodes(1)
    nginx = proxy([node])
    page = requests.get(f"{nginx.url}/", timeout=10)
    refs = sorted(set(re.findall(r"/static/[A-Za-z0-9_./-]+\?v=[0-9a-f]+", page.text)))
    worker = next(r for r in refs if "pdf.worker" in r)
    bodies = []
    for _ in range(5):
        answer = requests.get(nginx.url + worker, headers={"Accept-Encoding": "gzip"}, timeout=10, stream=True)
        assert answer.status_code == 200 and answer.headers["Content-Encoding"] == "gzip"
        bodies.append(answer.raw.read())
    plain = requests.get(nginx.url + worker, headers={"Accept-Encoding": "identity"}, timeout=10)
    assert "Content-Encoding" not in plain.headers and gzip.decompress(bodies[0]) == plain.content
    assert len(set(bodies)) == 1
    wait_until(lambda: node_requests(node, "GET", "/static/<path:filename>") >= 2)
    assert node_requests(node, "GET", "/static/<path:filename>") == 2  # one per encoding, not one per buyer
    for _ in range(3):
        requests.get(f"{nginx.url}/", timeout=10)
    wait_until(lambda: node_requests(node, "GET", "/") >= 4, message="every page reaches the node")
