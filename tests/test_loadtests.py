"""The surge drill's own parts, without running a drill: the load shapes and the SLO gate.

A Locust run is minutes long, so it lives in ``python -m loadtests.drill`` (and ``make drill-short``),
not here. These check that the shapes reach the peak and stop by themselves, and that the gate fails
on a 5xx, a connection error or an unbalanced ledger and passes a clean run.
"""
from __future__ import annotations

import os

import pytest

# Importing Locust monkey-patches the whole process for gevent; the test process must stay as it is.
os.environ["LOCUST_SKIP_MONKEY_PATCH"] = "1"
pytest.importorskip("locust", reason="Locust is not installed: pip install -e '.[load]'")

from loadtests import locustfile, shapes, slo  # noqa: E402
from loadtests.slo import EndpointStats, InvariantReport, LoadSummary, OrderLedger, Thresholds  # noqa: E402


def ticks(shape, until: float, step: float = 1.0) -> list:
    """The shape's tick() at 0, step, 2·step, … until it returns None (or ``until`` seconds)."""
    seen, t = [], 0.0
    while t <= until:
        shape.get_run_time = lambda t=t: t
        value = shape.tick()
        seen.append(value)
        if value is None:
            break
        t += step
    return seen


def test_spike_goes_quiet_then_ramps_to_the_hold_users_then_drains_and_stops():
    params = shapes.SpikeParams(quiet_users=3, quiet_seconds=10, peak_users=100, ramp_seconds=30,
                                hold_seconds=40, drain_seconds=10)
    seen = ticks(locustfile.SpikeShape(params), until=200)
    users = [tick[0] for tick in seen if tick is not None]

    assert seen[-1] is None, "the spike must stop by itself"
    assert len(seen) - 1 == params.total_seconds
    assert users[:10] == [3] * 10
    ramp = users[10:40]
    assert ramp == sorted(ramp) and ramp[-1] == 100
    assert users[40:80] == [100] * 40
    drain = users[80:]
    assert drain == sorted(drain, reverse=True) and drain[-1] == 0
    assert all(rate >= 1 for _, rate in filter(None, seen))


def test_steady_shape_holds_its_users_and_stops():
    params = shapes.SteadyParams(users=12, ramp_seconds=5, hold_seconds=20, drain_seconds=5)
    seen = ticks(locustfile.SteadyShape(params), until=100)
    users = [tick[0] for tick in seen if tick is not None]

    assert seen[-1] is None
    assert users[5:25] == [12] * 20
    assert users[-1] == 0


def test_drill_shape_follows_the_environment():
    kind, params = shapes.selected({"DRILL_SHAPE": "steady", "DRILL_SHAPE_PARAMS": '{"users": 7}'})
    assert kind == "steady" and params.users == 7
    with pytest.raises(ValueError):
        shapes.selected({"DRILL_SHAPE": "spike", "DRILL_SHAPE_PARAMS": '{"peak": 7}'})
    assert locustfile.DrillShape.abstract is False
    assert locustfile.SpikeShape.abstract and locustfile.SteadyShape.abstract  # only DrillShape runs


def clean_load() -> LoadSummary:
    return LoadSummary(
        endpoints={
            slo.CREATE: EndpointStats(slo.CREATE, requests=300, status_counts={"202": 100, "429": 200},
                                      p95_ms=150),
            slo.STATUS: EndpointStats(slo.STATUS, requests=500, status_counts={"200": 500}, p95_ms=80),
            slo.QUEUE: EndpointStats(slo.QUEUE, requests=900, status_counts={"200": 900}, p95_ms=60),
        },
        flows_started=120, flows_completed=2,
    )


def clean_invariants() -> InvariantReport:
    return InvariantReport(
        orders_by_status={"stamped": 1, "refunded": 1, "awaiting_payment": 1},
        ledger=[
            OrderLedger("a", "stamped", captured=12_500, revenue=12_500),
            OrderLedger("b", "refunded", captured=12_500, refunded=12_500),
            OrderLedger("c", "awaiting_payment"),
        ],
    )


def test_gate_passes_a_clean_drill():
    result = slo.evaluate(clean_load(), clean_invariants(), Thresholds())
    assert result.passed, result.render()


def test_gate_fails_on_a_single_5xx():
    load = clean_load()
    load.endpoints[slo.STATUS].status_counts["503"] = 1
    result = slo.evaluate(load, clean_invariants(), Thresholds())
    assert not result.passed
    assert [c.name for c in result.failures] == ["no 5xx"]


def test_gate_fails_on_a_connection_error():
    load = clean_load()
    load.endpoints[slo.QUEUE].status_counts["0"] = 1
    result = slo.evaluate(load, clean_invariants(), Thresholds())
    assert [c.name for c in result.failures] == ["no connection errors or timeouts"]


def test_gate_fails_when_p95_is_over_the_threshold():
    result = slo.evaluate(clean_load(), clean_invariants(), Thresholds(p95_create_ms=100))
    assert [c.name for c in result.failures] == [f"p95 {slo.CREATE}"]


@pytest.mark.parametrize("row", [
    OrderLedger("x", "stamped", captured=12_500, revenue=10_000),                      # revenue short
    OrderLedger("x", "stamped", captured=12_500, revenue=12_500, refunded=12_500),     # both outcomes
    OrderLedger("x", "refunded", captured=12_500, refunded=9_375),                     # a 75% refund
    OrderLedger("x", "expired", captured=12_500),                                      # kept money, no order
    OrderLedger("x", "stamped", revenue=12_500),                                       # revenue never captured
])
def test_gate_fails_on_an_unbalanced_ledger(row):
    invariants = clean_invariants()
    invariants.ledger.append(row)
    result = slo.evaluate(clean_load(), invariants, Thresholds())
    assert "ledger balances per order and in total" in [c.name for c in result.failures]


def test_gate_fails_when_paid_work_is_left_after_the_drain():
    invariants = clean_invariants()
    invariants.orders_by_status["stamping"] = 2
    invariants.ledger += [OrderLedger("d", "stamping", captured=12_500), OrderLedger("e", "stamping", captured=12_500)]
    result = slo.evaluate(clean_load(), invariants, Thresholds())
    assert [c.name for c in result.failures] == ["paid ⇒ stamped or refunded after the drain"]


def test_gate_fails_when_nobody_got_a_stamped_document():
    load = clean_load()
    load.flows_completed = 0
    result = slo.evaluate(load, clean_invariants(), Thresholds())
    assert [c.name for c in result.failures] == ["stamped documents delivered"]


def test_summary_round_trips_through_json(tmp_path):
    path = tmp_path / "summary.json"
    import json

    path.write_text(json.dumps(slo.load_summary_as_dict(clean_load())))
    assert slo.load_summary_from_json(path) == clean_load()


def test_every_function_the_web_benchmark_profiles_still_exists():
    """The front-end benchmark times named functions of the product; a rename must not break it at the
    end of a twenty-minute run."""
    import importlib

    from loadtests.bench import web as bench_web

    for target, _ in (bench_web.CREATE_SPANS + bench_web.BARE_SPANS + bench_web.STATUS_SPANS
                      + bench_web.QUEUE_SPANS + bench_web.PAGE_SPANS):
        module, _, path = target.partition(":")
        owner = importlib.import_module(module)
        for name in path.split("."):
            owner = getattr(owner, name)


def test_the_web_benchmark_with_no_wrk_rounds_reports_its_breakdown_alone(tmp_path, capsys):
    """``--rounds 0 --profile-requests N`` (the in-process breakdown, as docs/benchmarks.md runs it) has
    no rounds to take medians of: it writes the breakdown beside the run and leaves web.json alone."""
    import argparse
    import json

    from loadtests.bench import web as bench_web

    kept = bench_web.REPORTS / "bench" / "web.json"
    before = kept.read_bytes() if kept.exists() else None
    profiles = {"no-op endpoint": {"total": 0.1}}
    assert bench_web.report([], argparse.Namespace(rounds=0), tmp_path, profiles) == 0
    assert json.loads((tmp_path / "result.json").read_text())["cpu_breakdown"] == profiles
    assert (kept.read_bytes() if kept.exists() else None) == before
    assert "in-process breakdown only" in capsys.readouterr().out


# A web node's and a stamping node's scrape, as GET /metrics answers them (made up, in the real names).
WEB_SCRAPE = """\
# HELP meterai_http_requests_total HTTP requests answered, by route template, method and status.
# TYPE meterai_http_requests_total counter
meterai_http_requests_total{method="POST",route="/api/v1/orders",status="202"} 40.0
meterai_http_requests_total{method="POST",route="/api/v1/orders",status="429"} 7.0
meterai_http_requests_total{method="GET",route="/api/v1/orders/<order_id>",status="200"} 300.0
# TYPE meterai_http_refusals_total counter
meterai_http_refusals_total{reason="queued",status="429"} 5.0
meterai_http_refusals_total{reason="rate_limited",status="429"} 2.0
# TYPE meterai_queue_messages gauge
meterai_queue_messages{queue="stamping"} %(depth)s
meterai_queue_messages{queue="checkout"} 0.0
# TYPE meterai_queue_oldest_message_age_seconds gauge
meterai_queue_oldest_message_age_seconds{queue="stamping"} %(age)s
# TYPE meterai_admission_line_length gauge
meterai_admission_line_length %(line)s
# TYPE meterai_admission_line_head gauge
meterai_admission_line_head %(head)s
# TYPE meterai_refunds_open gauge
meterai_refunds_open{status="pending"} 1.0
"""
STAMPING_SCRAPE = """\
# TYPE meterai_stamping_attempts_total counter
meterai_stamping_attempts_total{outcome="stamped"} 30.0
meterai_stamping_attempts_total{outcome="retry"} 2.0
"""


def test_the_drills_metrics_summary_keeps_the_peaks_and_the_last_totals():
    from loadtests import scrapes

    lines = []
    for t, (depth, age, line, head) in enumerate([(3, 1.5, 10, 0), (12, 8.25, 40, 15), (2, 0.5, 5, 60)]):
        web = scrapes.key_series(scrapes.parse_samples(WEB_SCRAPE % dict(depth=depth, age=age, line=line, head=head)))
        stamping = scrapes.key_series(scrapes.parse_samples(STAMPING_SCRAPE))
        # Two web nodes see the same queues and line; their request counters add up, as do the workers'.
        lines.append({"t": 1000.0 + 10 * t, "answered": 3, "series": scrapes.merge([web, web, stamping]),
                      "errors": {}})
    lines.append({"t": 1040.0, "answered": 0, "series": {}, "errors": {"web": "URLError: refused"}})

    summary = scrapes.summarise(lines)

    assert summary["scrapes"] == 4 and summary["scrapes_with_errors"] == 1
    assert summary["first_errors"] == ["web: URLError: refused"]
    assert summary["peak_queue_depth"] == {"checkout": 0, "stamping": 12}
    assert summary["max_oldest_message_age_seconds"]["stamping"] == 8.2  # rounded to 0.1 s
    assert summary["peak_line_length"] == 40
    assert summary["peak_admitted_per_minute"] == 270.0  # 45 admitted in the 10 s between scrapes 2 and 3
    end = summary["at_end"]
    assert end["create_orders"] == {"202": 80, "429": 14}  # the status poll's route is not create-order
    assert end["refusals"] == {"429:queued": 10, "429:rate_limited": 4}
    assert end["stamping_attempts"] == {"retry": 2, "stamped": 30}
    assert end["refunds_open"] == {"pending": 1} and end["queue_messages"]["stamping"] == 2
    assert "peak line 40" in scrapes.render(summary)
    # The reader that stands in for prometheus-client's parser reads the same samples.
    text = WEB_SCRAPE % dict(depth=1, age=2.5, line=3, head=4)
    assert scrapes._parse_plainly(text) == scrapes.parse_samples(text)


def test_the_bare_parts_of_the_end_to_end_benchmark_do_what_they_say(sys_, postgres_admin, tmp_path, monkeypatch):
    """loadtests/bench/e2e.py divides by these handlers' CPU: each must do its whole job (a durable
    upload and its row, the stored file sent back, a payment opened at the real stand-in and a signed
    notification recorded, a forged one refused), or the benchmark's ratio flatters us."""
    import hashlib
    import json
    import uuid

    import psycopg

    from loadtests.bench.web import BASELINE_TABLES, baseline_app
    from loadtests.documents import make_pdf
    from tests.conftest import SERVER_KEY

    name = f"meterai_bare_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(postgres_admin, dbname=name)
    app = None
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            for statement in BASELINE_TABLES:
                conn.execute(statement)
        monkeypatch.setenv("BENCH_DATABASE_URL", url)
        monkeypatch.setenv("BENCH_UPLOAD_DIR", str(tmp_path))
        monkeypatch.setenv("BENCH_GATEWAY_URL", sys_.gateway_url)
        monkeypatch.setenv("BENCH_SERVER_KEY", SERVER_KEY)
        app = baseline_app()
        client = app.test_client()
        document = make_pdf(20_000)
        uploaded = client.post("/upload", data={"document": (__import__("io").BytesIO(document), "surat.pdf")})
        assert uploaded.status_code == 202
        upload_id = uploaded.get_json()["id"]
        assert (tmp_path / f"{upload_id}.pdf").read_bytes() == document
        assert client.get(f"/download/{upload_id}").data == document
        assert client.get("/download/nope").status_code == 404
        gateway_id = f"{upload_id[:20]}-1"
        opened = client.post(f"/pay/open/{gateway_id}")
        assert opened.status_code == 201 and opened.get_json()["redirect_url"]
        assert sys_.gateway_record(gateway_id)["gross_amount"] == 10000
        note = {"order_id": upload_id, "status_code": "200", "gross_amount": "10000.00"}
        note["signature_key"] = hashlib.sha512((upload_id + "200" + "10000.00" + SERVER_KEY).encode()).hexdigest()
        assert client.post("/pay/notify", data=json.dumps(note), content_type="application/json").status_code == 200
        forged = {**note, "signature_key": "0" * 128}
        assert client.post("/pay/notify", data=json.dumps(forged), content_type="application/json").status_code == 401
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM bench_payments").fetchone()[0] == 1
            assert conn.execute("SELECT paid_at IS NOT NULL FROM bench_uploads WHERE id = %s",
                                (upload_id,)).fetchone()[0]
    finally:
        for pool in (app.extensions["bench.pools"].values() if app is not None else ()):
            pool.close()
        with psycopg.connect(postgres_admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_gateway_client_benchmark_measures_the_adapter_against_the_floor(tmp_path, capsys):
    """`python -m loadtests.bench.gateway_client`: the adapter's status call parses the local server's
    answer as the workers' calls do (a GatewayStatus, not an error), and every case is measured."""
    import json

    from loadtests.bench import gateway_client

    out = tmp_path / "gateway_client.json"
    assert gateway_client.main(["--rounds", "1", "--calls", "30", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["median_ms"]) == {"adapter (requests, as shipped)", "adapter, environment read per call",
                                        "floor (http.client, json.loads)"}
    assert all(value > 0 for value in report["median_ms"].values())
    assert "× the floor" in capsys.readouterr().out
