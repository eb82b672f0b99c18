"""Benchmark: the web's CPU for each request a buyer's browser makes, one kind at a time.

    .venv/bin/python -m loadtests.bench.buyer_requests          # about a minute

Not a target: the breakdown behind the web's share of ``loadtests.bench.e2e`` (which counts a whole
order). Our web under gunicorn as the Procfile runs it (waiting room wide open, ``PROXY_HOPS=1``, no
Celery workers: creates queue up in Redis), one keep-alive client asking ``--requests`` times in a row
for each kind, as one browser would: the checkout page, each static file it names (gzip accepted), a
ticket, a ticket plus the create that spends it, the order page, a status poll, a queue poll of a ticket
kept in line by a second web whose outflow is one a minute. CPU per request of the gunicorn processes,
their PostgreSQL backends and Redis.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

from loadtests.bench.e2e import FIELDS, STATIC_REF
from loadtests.bench.loadgen import HttpClient, multipart
from loadtests.documents import make_pdf
from loadtests.stack import REPORTS, CpuMeter, Stack, gunicorn_flags, postgres_backend_pids, say, workdir_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench.buyer_requests",
                                     description=__doc__.split("\n\n")[0])
    # CPU is read in 10 ms ticks: 1,000 requests of 0.5 ms are 50 ticks, ±2 % from the reading alone.
    parser.add_argument("--requests", type=int, default=1000, help="requests of each kind")
    args = parser.parse_args(argv)
    from shared.devtools.services import free_port

    document = make_pdf(200_000)
    body, content_type = multipart(FIELDS, {"document": ("surat.pdf", document, "application/pdf")})
    workdir = workdir_for("bench-buyer-requests")
    wide_open = {"ADMISSION_PER_MINUTE": "100000000", "ADMISSION_BURST": "100000000",
                 "ADMISSION_ACTIVE_CHECKOUTS": "100000000", "PROXY_HOPS": "1"}
    results: dict[str, dict[str, float]] = {}
    with Stack(workdir, label="bench_buyer_requests") as stack:
        stack.start_procfile(["web"], overrides=wide_open)
        queue_port = free_port()
        stack.start("web-queue", f"gunicorn --bind 127.0.0.1:{queue_port} {' '.join(gunicorn_flags())} 'web:create_app()'",
                    stack.env({"ADMISSION_PER_MINUTE": "1", "ADMISSION_BURST": "1", "PROXY_HOPS": "1",
                               "PORT": str(queue_port), "REDIS_KEY_PREFIX": "meterai-queued:"}))
        stack.wait_ready()
        web, queued = HttpClient(stack.web_url, idle_seconds=30), HttpClient(f"http://127.0.0.1:{queue_port}")
        deadline = time.monotonic() + 30
        while queued.request("GET", "/healthz").status != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the second web did not start")
            time.sleep(0.2)
        counter = iter(range(10**9))

        def address() -> dict[str, str]:
            n = next(counter)
            return {"X-Forwarded-For": f"198.18.{n // 250 % 256}.{n % 250 + 1}"}

        def ticket(client: HttpClient) -> dict:
            answer = client.request("POST", "/api/v1/queue", None, {"Client-Id": uuid.uuid4().hex, **address()})
            if answer.status != 200:
                raise RuntimeError(f"ticket answered {answer.status}")
            return answer.json()

        created: list[dict] = []

        def create() -> None:
            token = ticket(web)["admission_token"]
            answer = web.request("POST", "/api/v1/orders", body, {
                "Content-Type": content_type, "Idempotency-Key": uuid.uuid4().hex, "Admission-Token": token,
                **address()})
            if answer.status != 202:
                raise RuntimeError(f"create answered {answer.status} {answer.body[:200]!r}")
            created.append(answer.json())

        create()
        waiting = None
        for _ in range(5):  # the first places go at once; a later one stays in line
            waiting = ticket(queued)
        assert waiting is not None and not waiting["admitted"], waiting
        page = web.request("GET", "/").body.decode()
        order = created[0]
        kinds = {
            "checkout page": lambda: web.request("GET", "/"),
            "ticket (admitted at once)": lambda: ticket(web),
            "ticket + create (200 KB)": create,
            "order page": lambda: web.request("GET", f"/pesanan/{order['order_id']}"),
            "status poll": lambda: web.request("GET", f"/api/v1/orders/{order['order_id']}", None,
                                               {"Authorization": "Bearer " + order["access_token"]}),
            "queue poll (in line)": lambda: queued.request("GET", f"/api/v1/queue/{waiting['ticket']}"),
        }
        for ref in sorted(set(STATIC_REF.findall(page))):
            kinds["static " + ref.split("/")[-1].split("?")[0]] = (
                lambda ref=ref: web.request("GET", ref, None, {"Accept-Encoding": "gzip, deflate, br"}))
        for name, ask in kinds.items():
            process = "web-queue" if name.startswith("queue") else "web"
            for _ in range(10):
                ask()
            meter = CpuMeter({"gunicorn": lambda p=process: stack.process_pids(p),
                              "postgres": lambda: postgres_backend_pids(stack.database_url),
                              "redis": lambda: stack.redis_pids})
            meter.start()
            for _ in range(args.requests):
                ask()
            used = meter.stop()
            results[name] = {k: 1000 * v / args.requests for k, v in used.items()}
            say(f"{name:<34} " + "  ".join(f"{k} {v:.2f}" for k, v in results[name].items()) + " ms")
    out = {"benchmark": "buyer_requests", "command": "python -m loadtests.bench.buyer_requests " + " ".join(sys.argv[1:]),
           "when": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_ms_per_request": results}
    (REPORTS / "bench").mkdir(parents=True, exist_ok=True)
    (REPORTS / "bench" / "buyer_requests.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
