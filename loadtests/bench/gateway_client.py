"""Benchmark: our side's CPU for one payment gateway call, the adapter (requests) against the floor.

py-spy put the gateway calls at about 14 % of the checkout worker's samples (docs/benchmarks.md,
2026-12-02): an order makes two (the checkout opens the payment, the payments worker confirms the
notification with a status query). This asks what one call costs the caller, and how much of it the
HTTP client is: a status query answered by a local server (its own process, so its CPU isn't counted),
keep-alive, measured as this process's CPU per call for

* the adapter as the workers run it (``MidtransGateway.get_status``: requests, the circuit breaker, the
  answer's parsing into a ``GatewayStatus``; since 2026-12-04 the environment's proxy and CA settings
  read once when it is made, ``trust_env`` off afterwards);
* the same with ``trust_env`` on again, as before: requests reads those settings on every call;
* the floor: one ``http.client`` request on a kept connection and ``json.loads`` of the answer.

Rounds interleave the cases; the medians go to ``reports/bench/gateway_client.json``.

    python -m loadtests.bench.gateway_client [--rounds 5] [--calls 1500]
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from loadtests.stack import REPORTS, say
from shared.devtools.services import free_port, port_accepts

ANSWER = {"status_code": "200", "transaction_status": "pending", "order_id": "MTR-bench-1",
          "gross_amount": "12500.00", "payment_type": "qris", "transaction_id": "tx-bench-1"}

_SERVER = """
import http.server, json, socketserver, sys
BODY = json.dumps(%r).encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the head and the body are two writes: no 40 ms wait on delayed ACKs
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""" % (ANSWER,)


def _adapter(base_url: str, *, trust_env: bool):
    from shared.payments.breaker import CircuitBreaker
    from shared.payments.gateway import MidtransGateway

    gateway = MidtransGateway(base_url, "SB-Mid-server-bench", timeout=5,
                              breaker=CircuitBreaker())
    gateway._session.trust_env = trust_env
    return lambda: gateway.get_status("MTR-bench-1")


def _floor(port: int):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"Accept": "application/json",
               "Authorization": "Basic " + base64.b64encode(b"SB-Mid-server-bench:").decode()}

    def call():
        conn.request("GET", "/v2/MTR-bench-1/status", headers=headers)
        return json.loads(conn.getresponse().read())
    return call


def _cpu_per_call(call, calls: int) -> float:
    for _ in range(min(100, calls)):  # connections made, caches warm
        call()
    started = time.process_time()
    for _ in range(calls):
        call()
    return (time.process_time() - started) / calls * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=REPORTS / "bench" / "gateway_client.json")
    args = parser.parse_args(argv)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)])
    try:
        deadline = time.monotonic() + 10
        while not port_accepts(port):
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the local gateway answer server did not start")
            time.sleep(0.05)
        base_url = f"http://127.0.0.1:{port}"
        cases = {"adapter (requests, as shipped)": _adapter(base_url, trust_env=False),
                 "adapter, environment read per call": _adapter(base_url, trust_env=True),
                 "floor (http.client, json.loads)": _floor(port)}
        runs: dict[str, list[float]] = {name: [] for name in cases}
        for number in range(1, args.rounds + 1):
            for name, call in cases.items():
                runs[name].append(_cpu_per_call(call, args.calls))
            say(f"round {number}: " + ", ".join(f"{name} {values[-1]:.3f} ms" for name, values in runs.items()))
    finally:
        server.terminate()
        server.wait(timeout=10)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    floor = medians["floor (http.client, json.loads)"]
    print("CPU ms per gateway status call (median of rounds):")
    for name, value in medians.items():
        print(f"  {name:34s} {value:.3f}  ({value / floor:.2f}× the floor)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": args.rounds, "calls": args.calls, "runs": runs,
                                    "median_ms": medians, "at": time.strftime("%Y-%m-%d %H:%M:%S")},
                                   indent=2) + "\n", encoding="utf-8")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
