"""Benchmark: the web front end against bare handlers on the same gunicorn setup.

    .venv/bin/python -m loadtests.bench.web            # about 3 minutes; needs wrk (apt-get install wrk)

Targets (docs/benchmarks.md):

* create-order (a 200 KB PDF upload) ≥ 0.8× a bare handler that only parses the upload, stores it
  durably (temporary file, fsync, rename, fsync of the folder) and inserts one row;
* status polls and queue polls ≥ 0.5× a no-op endpoint;
* and, with no target, what a queue poll costs on the poll server (web/pollserver.py) against gunicorn's
  fast path, on the same waiting room (the CPU per request the capacity model's queue polls use).

The bare handler and the no-op endpoint are a tiny Flask app in this file (:func:`baseline_app`), served
by gunicorn with exactly the Procfile's web flags (gthread, same workers and threads). Our own web runs
as the Procfile says, with its real settings except what the benchmark must fix: the waiting room wide
open for the create-order run (what is measured is an admitted create; the waiting room's own cost
is still paid on every request) and, in a second instance, a trickle outflow so a queue ticket stays
in line for the queue-poll run. No Celery workers run: the front end is what is measured (checkout tasks
pile up in Redis meanwhile). PostgreSQL and Redis are the ones a drill uses.

Every figure is a ratio measured in the same run: rounds alternate product and baseline (A B A B …),
each wrk run lasts a few seconds, and the ratio reported is the median of the per-round ratios, so a
neighbour's load on this shared machine hits both sides alike. Alongside, CPU milliseconds per request
(gunicorn processes, PostgreSQL backends, Redis), the per-core rates the capacity model starts from.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import psycopg

from shared.devtools.services import free_port
from loadtests.documents import make_pdf
from loadtests.bench.loadgen import (multipart, run_wrk, wrk_available, wrk_script_get, wrk_script_post_empty,
                                     wrk_script_upload)
from loadtests.stack import REPORTS, CpuMeter, Stack, gunicorn_flags, postgres_backend_pids, say, workdir_for

TARGET_CREATE = 0.8
TARGET_POLL = 0.5
UPLOAD_BYTES = 200_000
FIELDS = {"page": "1", "x": "400", "y": "80", "email": "pelamar@example.id"}


# --- the baseline app (served by gunicorn as "loadtests.bench.web:baseline_app()") -----------------

def baseline_app():
    """Bare handlers: ``POST /upload`` parses the multipart upload, writes it durably and inserts one row;
    ``GET /noop`` answers a constant JSON body; ``GET /download/<id>`` looks the row up and sends its file;
    ``POST /pay/open/<id>`` opens a payment at the gateway (one outbound call), ``POST /pay/notify``
    verifies a notification's signature and records it (one INSERT, one UPDATE). Reads
    BENCH_DATABASE_URL, BENCH_UPLOAD_DIR and, for the payment pair, BENCH_GATEWAY_URL and BENCH_SERVER_KEY
    (tables: :data:`BASELINE_TABLES`)."""
    import hashlib
    import hmac

    import requests
    from flask import Flask, jsonify, request, send_file
    from psycopg_pool import ConnectionPool

    app = Flask("baseline")
    app.config["MAX_CONTENT_LENGTH"] = 4 * 1024 * 1024
    root = Path(os.environ["BENCH_UPLOAD_DIR"])
    root.mkdir(parents=True, exist_ok=True)
    pools: dict[int, ConnectionPool] = {}

    def pool() -> ConnectionPool:  # one per worker process, made after gunicorn forks
        if os.getpid() not in pools:
            pools[os.getpid()] = ConnectionPool(os.environ["BENCH_DATABASE_URL"], min_size=1, max_size=10,
                                                kwargs={"autocommit": False}, open=True)
        return pools[os.getpid()]

    app.extensions["bench.pools"] = pools  # for whoever must close them (a test dropping the database)
    sessions: dict[int, object] = {}

    def gateway():  # a keep-alive session per thread, as the payments worker keeps one per process
        import threading

        key = threading.get_ident()
        if key not in sessions:
            session = requests.Session()
            session.auth = (os.environ.get("BENCH_SERVER_KEY", ""), "")
            sessions[key] = session
        return sessions[key]

    @app.post("/upload")
    def upload():
        data = request.files["document"].read()
        name = uuid.uuid4().hex
        path, tmp = root / f"{name}.pdf", root / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        with pool().connection() as conn:
            conn.execute("INSERT INTO bench_uploads (id, document_key, document_bytes) VALUES (%s, %s, %s)",
                         (name, path.name, len(data)))
        return jsonify({"id": name}), 202

    @app.get("/noop")
    def noop():
        return jsonify({"ok": True})

    # The rest of an order's bare parts (loadtests/bench/e2e.py): the download of the stamped file, and
    # a payment round trip (one outbound call opening the payment, one signed notification recorded).
    @app.get("/download/<name>")
    def download(name: str):
        with pool().connection() as conn:
            row = conn.execute("SELECT document_key FROM bench_uploads WHERE id = %s", (name,)).fetchone()
        if row is None:
            return jsonify({"error": "not found"}), 404
        return send_file(root / row[0], mimetype="application/pdf")  # wsgi.file_wrapper: sendfile

    @app.post("/pay/open/<name>")
    def pay_open(name: str):
        answer = gateway().post(os.environ["BENCH_GATEWAY_URL"].rstrip("/") + "/snap/v1/transactions", timeout=10,
                                json={"transaction_details": {"order_id": name, "gross_amount": 10000},
                                      "customer_details": {"email": "pelamar@example.id"}})
        if answer.status_code != 201:
            return jsonify({"error": answer.text[:200]}), 502
        return jsonify({"redirect_url": answer.json()["redirect_url"]}), 201

    @app.post("/pay/notify")
    def pay_notify():
        body = request.get_json(force=True)
        expected = hashlib.sha512((body["order_id"] + body["status_code"] + body["gross_amount"]
                                   + os.environ["BENCH_SERVER_KEY"]).encode()).hexdigest()
        if not hmac.compare_digest(expected, str(body.get("signature_key", ""))):
            return jsonify({"error": "bad signature"}), 401
        with pool().connection() as conn:
            conn.execute("INSERT INTO bench_payments (order_id, body) VALUES (%s, %s)",
                         (body["order_id"], json.dumps(body)))
            conn.execute("UPDATE bench_uploads SET paid_at = now() WHERE id = %s", (body["order_id"],))
        return jsonify({"ok": True})

    return app


BASELINE_TABLES = (
    "CREATE TABLE bench_uploads (id text PRIMARY KEY, document_key text NOT NULL, document_bytes integer NOT NULL,"
    " created_at timestamptz NOT NULL DEFAULT now(), paid_at timestamptz)",
    "CREATE TABLE bench_payments (id bigserial PRIMARY KEY, order_id text NOT NULL, body jsonb NOT NULL,"
    " received_at timestamptz NOT NULL DEFAULT now())",
)


# --- the benchmark -----------------------------------------------------------------------------------

def _cpu_groups(stack: Stack, process: str) -> dict:
    return {
        "gunicorn": lambda: stack.process_pids(process),
        "postgres": lambda: postgres_backend_pids(stack.database_url),
        "redis": lambda: stack.redis_pids,
    }


def _measure(stack: Stack, process: str, label: str, url: str, script: str, workdir: Path, seconds: float,
             connections: int) -> dict:
    meter = CpuMeter(_cpu_groups(stack, process))
    meter.start()
    result = run_wrk(label, url, script, workdir, seconds=seconds, connections=connections)
    used = meter.stop()
    say(result.line())
    return {**asdict(result), "cpu_ms_per_request": {k: 1000 * v / max(1, result.requests) for k, v in used.items()}}


def _clear(folder: Path) -> None:
    """Delete the uploads a run left (the folders stay: servers write into them)."""
    time.sleep(0.5)  # let requests still in flight when wrk stopped finish
    for path in folder.rglob("*.pdf"):
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench.web", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--profile-requests", type=int, default=300,
                        help="requests per endpoint for the in-process CPU breakdown (0: skip)")
    args = parser.parse_args(argv)
    if not wrk_available():
        print("wrk is not installed; on Debian: apt-get install wrk", file=sys.stderr)
        return 2
    workdir = workdir_for("bench-web")
    document = make_pdf(UPLOAD_BYTES)
    body, content_type = multipart(FIELDS, {"document": ("surat.pdf", document, "application/pdf")})
    body_path = workdir / "upload.body"
    body_path.write_bytes(body)
    flags = " ".join(gunicorn_flags())
    with Stack(workdir, label="bench_web") as stack:
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            for statement in BASELINE_TABLES:
                conn.execute(statement)
        wide_open = {"ADMISSION_PER_MINUTE": "100000000", "ADMISSION_BURST": "100000000",
                     "ADMISSION_ACTIVE_CHECKOUTS": "100000000", "PROXY_HOPS": "1"}
        stack.start_procfile(["web"], overrides=wide_open)
        queue_port = free_port()
        queue_env = stack.env({"ADMISSION_PER_MINUTE": "1", "ADMISSION_BURST": "1", "PROXY_HOPS": "1",
                               "PORT": str(queue_port), "REDIS_KEY_PREFIX": "meterai-queued:"})
        stack.start("web-queue", f"gunicorn --bind 127.0.0.1:{queue_port} {flags} 'web:create_app()'", queue_env)
        # The same waiting room's polls answered by the Procfile's poll server (web/pollserver.py).
        polls_port = free_port()
        stack.start("polls-queue", f"python -m web.pollserver --bind 127.0.0.1:{polls_port}",
                    {**queue_env, "POLLS_PORT": str(polls_port)})
        quiet_port = free_port()  # the same without its access lines (the proxy logs every request too)
        stack.start("polls-quiet", f"python -m web.pollserver --bind 127.0.0.1:{quiet_port} --no-access-log",
                    {**queue_env, "POLLS_PORT": str(quiet_port)})
        base_port = free_port()
        base_env = stack.env({"BENCH_DATABASE_URL": stack.database_url,
                              "BENCH_UPLOAD_DIR": str(workdir / "baseline-uploads")})
        stack.start("baseline", f"gunicorn --bind 127.0.0.1:{base_port} {flags} 'loadtests.bench.web:baseline_app()'",
                    base_env)
        stack.wait_ready()
        _wait_http(f"http://127.0.0.1:{queue_port}/healthz")
        _wait_http(f"http://127.0.0.1:{polls_port}/healthz")
        _wait_http(f"http://127.0.0.1:{quiet_port}/healthz")
        _wait_http(f"http://127.0.0.1:{base_port}/noop")
        product, queued, baseline = stack.web_url, f"http://127.0.0.1:{queue_port}", f"http://127.0.0.1:{base_port}"

        # An order to poll, and a ticket that stays in line (outflow 1/minute, position ~50).
        import requests

        created = requests.post(f"{product}/api/v1/orders", headers={"Idempotency-Key": "poll-me",
                                "Content-Type": content_type}, data=body, timeout=10)
        created.raise_for_status()
        order = created.json()
        ticket = None
        for n in range(60):
            answer = requests.post(f"{queued}/api/v1/orders", data=body, timeout=10, headers={
                "Idempotency-Key": f"queue-{n}", "Content-Type": content_type, "X-Forwarded-For": f"198.19.0.{n + 1}"})
            if answer.status_code == 429 and answer.json().get("queue"):
                ticket = answer.json()["queue"]["ticket"]
        assert ticket, "the trickle-outflow web never queued anyone"
        position = requests.get(f"{queued}/api/v1/queue/{ticket}", timeout=10).json()["position"]
        say(f"polling order {order['order_id']} and a ticket at position {position}")

        upload_product = wrk_script_upload(body_path, content_type, f"b{uuid.uuid4().hex[:6]}")
        upload_baseline = wrk_script_upload(body_path, content_type, "x")
        status_script = wrk_script_get({"Authorization": f"Bearer {order['access_token']}"})
        noop_script = wrk_script_get({})
        ticket_script = wrk_script_post_empty({"Client-Id": "bench-tab-0001"})
        rounds: list[dict] = []
        for number in range(1, args.rounds + 1):
            say(f"round {number} of {args.rounds}")
            r = {}
            common = dict(workdir=workdir, seconds=args.seconds, connections=args.connections)
            r["create"] = _measure(stack, "web", "create-order (ours)", f"{product}/api/v1/orders", upload_product, **common)
            _clear(workdir / "data" / "documents")
            r["upload"] = _measure(stack, "baseline", "bare upload handler", f"{baseline}/upload", upload_baseline, **common)
            _clear(workdir / "baseline-uploads")
            r["status"] = _measure(stack, "web", "order status poll (ours)", f"{product}/api/v1/orders/{order['order_id']}",
                                   status_script, **common)
            r["queue"] = _measure(stack, "web-queue", "queue poll (ours)", f"{queued}/api/v1/queue/{ticket}",
                                  noop_script, **common)
            r["pollserver"] = _measure(stack, "polls-queue", "queue poll (poll server)",
                                       f"http://127.0.0.1:{polls_port}/api/v1/queue/{ticket}", noop_script, **common)
            r["pollquiet"] = _measure(stack, "polls-quiet", "queue poll (poll server, no access lines)",
                                      f"http://127.0.0.1:{quiet_port}/api/v1/queue/{ticket}", noop_script, **common)
            # A new buyer taking a place before any upload (POST /api/v1/queue), each from an address of
            # its own while the line only grows (the trickle outflow): what an arrival above the outflow
            # costs once the checkout asks for its ticket first.
            r["ticket"] = _measure(stack, "web-queue", "ticket request (ours)", f"{queued}/api/v1/queue",
                                   ticket_script, **common)
            r["noop"] = _measure(stack, "baseline", "no-op endpoint", f"{baseline}/noop", noop_script, **common)
            rounds.append(r)
        profiles = profile_in_process(stack.env(wide_open), stack.env({"ADMISSION_PER_MINUTE": "1",
                                      "ADMISSION_BURST": "1", "PROXY_HOPS": "1", "REDIS_KEY_PREFIX": "meterai-queued:"}),
                                      body, content_type, order, ticket, args.profile_requests)
    return report(rounds, args, workdir, profiles)


CREATE_SPANS = [
    ("flask.app:Flask.__call__", "Flask/werkzeug request handling, endpoint glue"),
    ("flask.wrappers:Request._load_form_data", "multipart parse (werkzeug)"),
    ("shared.ratelimit:RateLimiter.hit", "rate limit (Redis INCR+EXPIRE)"),
    ("web.api:find_by_idempotency_key", "idempotency-key lookup (SQL)"),
    ("shared.orders:find_by_idempotency_key", "idempotency-key lookup (SQL)"),
    ("shared.admission:AdmissionController.admit_or_queue", "waiting room decision (Redis)"),
    ("web.api:quick_check", "PDF header check"),
    ("shared.orders:insert_order", "INSERT order + first event (one statement)"),
    ("shared.orders:NewOrder.fingerprint", "request fingerprint (SHA-256 of the PDF)"),
    ("shared.store:FilesystemStore.put", "durable store (write, fsync, rename, fsync dir)"),
    ("web.api:create_order", "INSERT order + event, commit (psycopg)"),
    ("web.api:_new_order_from_request", "read upload, validate fields"),
    ("os:fsync", "fsync (file and folder)"),
    ("shared.jobs:publish", "Celery publish after commit (kombu → Redis)"),
    ("shared.orders:new_access_token", "access token (random)"),
    ("web.api:_links", "response links (url_for)"),
]
BARE_SPANS = [
    ("flask.app:Flask.__call__", "Flask/werkzeug request handling, handler"),
    ("flask.wrappers:Request._load_form_data", "multipart parse (werkzeug)"),
    ("os:fsync", "fsync (file and folder)"),
    ("psycopg:Connection.execute", "INSERT one row, commit (psycopg)"),
    ("psycopg:Connection.__exit__", "INSERT one row, commit (psycopg)"),
]
STATUS_SPANS = [
    ("flask.app:Flask.__call__", "Flask/werkzeug request handling, endpoint glue"),
    ("web.statuspoll:StatusPolls.__call__", "fast path before Flask (web/statuspoll.py)"),
    ("shared.statuscache:get", "status cache (Redis GET)"),
    ("web.statuspoll:token_hash_matches", "token check (fast path)"),
    ("web.api:get_order_with_view", "SELECT order with payment, refund, events (one statement)"),
    ("web.api:token_hash_matches", "token check (cached answer)"),
    ("web.api:token_matches", "token check"),
    ("web.api:order_view", "JSON view"),
]
PAGE_SPANS = [
    ("flask.app:Flask.__call__", "Flask/werkzeug request handling, endpoint glue"),
    ("web.pages:_page", "the page: kept copy, nonce and order id replaced (web/pages.py)"),
    ("web.pages:render_template", "Jinja render (the first answer, or debug)"),
]
QUEUE_SPANS = [
    ("flask.app:Flask.__call__", "Flask/werkzeug request handling, endpoint glue"),
    ("shared.admission:Signer.verify", "ticket signature check (HMAC)"),
    ("shared.admission:Signer.sign", "token signing (HMAC)"),
    ("shared.admission:AdmissionController.outflow_per_minute", "outflow (settings or Redis MGET)"),
    ("shared.admission:AdmissionController._advance", "advance the line, with its epoch (Redis Lua)"),
    ("shared.admission:AdmissionController.mode", "mode (Redis GET)"),
]


def profile_in_process(product_env: dict, queue_env: dict, body: bytes, content_type: str, order: dict,
                       ticket: str, requests_each: int) -> dict:
    """CPU per request by step, for each endpoint named, through the real app in this process."""
    from shared.config import load_settings
    from loadtests.bench.profiling import Spans
    from web import create_app

    results: dict = {}
    if requests_each <= 0:
        return results
    product = create_app(load_settings(product_env)).test_client()
    afresh_app = create_app(load_settings(product_env))
    afresh_app.jinja_env.auto_reload = True  # as in debug: each page rendered by Jinja, not kept (web/pages.py)
    afresh = afresh_app.test_client()
    queued = create_app(load_settings(queue_env)).test_client()
    os.environ.update(BENCH_DATABASE_URL=product_env["DATABASE_URL"],
                      BENCH_UPLOAD_DIR=str(Path(product_env["DATA_DIR"]) / "profile-uploads"))
    bare = baseline_app().test_client()
    runs = {
        "create-order": (product, CREATE_SPANS, lambda c, i: c.post("/api/v1/orders", data=body, headers={
            "Content-Type": content_type, "Idempotency-Key": f"prof-{uuid.uuid4().hex}",
            "X-Forwarded-For": f"198.18.9.{i % 250 + 1}"})),
        "order-status": (product, STATUS_SPANS, lambda c, i: c.get(
            f"/api/v1/orders/{order['order_id']}", headers={"Authorization": f"Bearer {order['access_token']}"})),
        "queue-status": (queued, QUEUE_SPANS, lambda c, i: c.get(f"/api/v1/queue/{ticket}")),
        "checkout page": (product, PAGE_SPANS, lambda c, i: c.get("/")),
        "order page": (product, PAGE_SPANS, lambda c, i: c.get(f"/pesanan/{order['order_id']}")),
        "checkout page, rendered afresh": (afresh, PAGE_SPANS, lambda c, i: c.get("/")),
        "order page, rendered afresh": (afresh, PAGE_SPANS, lambda c, i: c.get(f"/pesanan/{order['order_id']}")),
        "bare upload handler": (bare, BARE_SPANS, lambda c, i: c.post("/upload", data=body, headers={
            "Content-Type": content_type})),
        "no-op endpoint": (bare, BARE_SPANS[:1], lambda c, i: c.get("/noop")),
    }
    for name, (client, targets, call) in runs.items():
        for i in range(20):  # warm pools and caches outside the measurement
            call(client, i)
        spans = Spans()
        for target, label in targets:
            spans.wrap(target, label)
        try:
            for i in range(requests_each):
                answer = call(client, i)
                assert answer.status_code < 300, (name, answer.status_code, answer.data[:200])
        finally:
            spans.restore()
        print(spans.table(requests_each, name))
        results[name] = spans.as_dict(requests_each)
    return results


def _wait_http(url: str, timeout: float = 30.0) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def report(rounds: list[dict], args: argparse.Namespace, workdir: Path, profiles: dict) -> int:
    def ratios(ours: str, base: str) -> list[float]:
        return [r[ours]["rps"] / r[base]["rps"] for r in rounds]

    def median(key: str, field: str = "rps") -> float:
        return statistics.median(r[key][field] for r in rounds)

    comparisons = [
        ("create-order vs bare upload handler", "create", "upload", TARGET_CREATE),
        ("order status poll vs no-op", "status", "noop", TARGET_POLL),
        ("queue poll vs no-op", "queue", "noop", TARGET_POLL),
    ]
    run = {"benchmark": "web", "command": "python -m loadtests.bench.web " + " ".join(sys.argv[1:]),
           "when": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": vars(args)}
    if not rounds:  # --rounds 0: the in-process breakdown alone, kept beside its run (web.json keeps the last ratios)
        (workdir / "result.json").write_text(json.dumps({**run, "cpu_breakdown": profiles}, indent=2))
        print(f"no wrk rounds: the in-process breakdown only; details: {workdir / 'result.json'}")
        return 0
    errors = sum(r[k]["non_2xx"] + r[k]["socket_errors"] for r in rounds for k in r)
    print()
    print(f"{'endpoint':<26} {'req/s (median)':>15} {'p99 ms':>8}   CPU ms per request (gunicorn / postgres / redis)")
    for key, label in (("create", "create-order (ours)"), ("upload", "bare upload handler"),
                       ("status", "order status (ours)"), ("queue", "queue poll (ours)"),
                       ("pollserver", "queue poll (poll server)"), ("pollquiet", "  ... no access lines"),
                       ("ticket", "ticket request (ours)"), ("noop", "no-op endpoint")):
        cpu = {k: statistics.median(r[key]["cpu_ms_per_request"][k] for r in rounds) for k in ("gunicorn", "postgres", "redis")}
        print(f"{label:<26} {median(key):>15.1f} {median(key, 'p99_ms'):>8.1f}   "
              f"{cpu['gunicorn']:.2f} / {cpu['postgres']:.2f} / {cpu['redis']:.2f}")
    print()
    results = []
    for label, ours, base, target in comparisons:
        values = ratios(ours, base)
        ratio = statistics.median(values)
        met = ratio >= target
        results.append({"comparison": label, "ratio": ratio, "per_round": values, "target": target, "met": met})
        print(f"{label:<38} ratio {ratio:.2f} (rounds: {', '.join(f'{v:.2f}' for v in values)})"
              f"   target ≥ {target}   {'MET' if met else 'MISSED'}")
    if all("pollserver" in r for r in rounds):
        per_round = [r["queue"]["cpu_ms_per_request"]["gunicorn"] / r["pollserver"]["cpu_ms_per_request"]["gunicorn"]
                     for r in rounds]
        cheaper = statistics.median(per_round)
        results.append({"comparison": "queue poll: gunicorn CPU / poll server CPU", "ratio": cheaper,
                        "per_round": per_round, "target": None, "met": True})
        print(f"{'queue poll, gunicorn / poll server CPU':<38} ratio {cheaper:.2f} "
              f"(rounds: {', '.join(f'{v:.2f}' for v in per_round)})   (the poll server's saving; no target)")
    print(f"non-2xx answers and socket errors over all runs: {errors}")
    out = {**run, "results": results, "rounds": rounds, "errors": errors, "cpu_breakdown": profiles}
    (workdir / "result.json").write_text(json.dumps(out, indent=2))
    (REPORTS / "bench").mkdir(parents=True, exist_ok=True)
    (REPORTS / "bench" / "web.json").write_text(json.dumps(out, indent=2))
    print(f"details: {workdir / 'result.json'}")
    return 0 if all(r["met"] for r in results) and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
