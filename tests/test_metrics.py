"""Prometheus metrics: a real order moves the counters on a web node's /metrics and on a worker node's
metrics port; the scrape-time state is there; /metrics is not public; a dead process's counts survive
being folded; every metric the alert rules and the dashboard name exists (and the rules parse)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import redis
import requests
import yaml

from shared import jobs, metrics  # noqa: F401 - before prometheus_client: multiprocess mode
from shared.broker import PUBLISHED_AT_HEADER
from shared.devtools.services import free_port
from tests.conftest import ROOT, wait_until

TOKEN = "metrics-test-ops-token-0123456789abcdef"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "meterai.json"


def scrape(url: str, token: str | None = TOKEN) -> dict[tuple[str, tuple], float]:
    # Imported here: shared.metrics must be imported first in any process (multiprocess mode).
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = requests.get(url, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def metered(system):
    """A web copy with an ops token and the stamping node replaced by one serving METRICS_PORT."""
    port = free_port()
    web = system.launcher.start("web", name="web-metered", env={"OPS_TOKEN": TOKEN}, port=free_port())
    system.stop("stamping")
    system.launcher.start("stamping", name="stamping-metered", env={"METRICS_PORT": str(port)})
    try:
        system.launcher.wait_ready(["web-metered", "stamping-metered"], timeout=90)
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).ok, timeout=30)
        yield web.url, f"http://127.0.0.1:{port}/metrics"
    finally:
        system.stop("web-metered", "stamping-metered")
        system.start("stamping")


def test_a_real_order_moves_the_web_and_worker_counters(system, metered):
    web_url, worker_url = metered
    route = ("meterai_http_requests_total", dict(route="/api/v1/orders", method="POST", status="202"))
    stamped = ("meterai_stamping_attempts_total", dict(outcome="stamped"))
    task = ("meterai_tasks_total", dict(task=jobs.STAMP_ORDER, outcome="succeeded"))
    web_before, worker_before = scrape(f"{web_url}/metrics"), scrape(worker_url, token=None)

    created = requests.post(f"{web_url}/api/v1/orders", headers={"Idempotency-Key": os.urandom(8).hex()},
                            data={"page": "1", "x": "400", "y": "80", "email": "pelamar@example.id"},
                            files={"document": ("surat.pdf", _pdf(), "application/pdf")}, timeout=10)
    assert created.status_code == 202, created.text
    order = created.json()
    view = system.wait_status(order["order_id"], order["access_token"], "awaiting_payment")
    system.pay(view["payment"]["gateway_order_id"])
    system.wait_status(order["order_id"], order["access_token"], "stamped")

    web_after = scrape(f"{web_url}/metrics")
    assert value(web_after, route[0], **route[1]) == value(web_before, route[0], **route[1]) + 1
    assert value(web_after, "meterai_http_request_duration_seconds_count", route="/api/v1/orders",
                 method="POST") >= 1
    # The route is the template, never the order's id.
    assert not any(order["order_id"] in str(labels) for _, labels in web_after)
    # The scrape-time state was read, every part of it.
    assert all(value(web_after, "meterai_observe_up", source=s) == 1 for s in (
        "queues", "line", "breaker", "database")), {k: v for k, v in web_after.items() if "observe" in k[0]}
    assert {labels for name, labels in web_after if name == "meterai_queue_messages"} == {
        (("queue", q),) for q in jobs.ALL_QUEUES}
    assert ("meterai_orders", (("status", "paid"),)) in web_after
    assert ("meterai_mail_outbox", (("status", "failed"),)) in web_after  # e-mails not sent, by status

    worker_after = wait_until(lambda: (lambda s: s if value(s, *stamped[:1], **stamped[1]) > value(
        worker_before, stamped[0], **stamped[1]) else None)(scrape(worker_url, token=None)), timeout=10)
    assert value(worker_after, stamped[0], **stamped[1]) == value(worker_before, stamped[0], **stamped[1]) + 1
    assert value(worker_after, task[0], **task[1]) >= value(worker_before, task[0], **task[1]) + 1
    assert value(worker_after, "meterai_task_duration_seconds_count", task=jobs.STAMP_ORDER) >= 1
    assert value(worker_after, "meterai_db_pool_connections", state="idle") + value(
        worker_after, "meterai_db_pool_connections", state="in_use") >= 1


def test_metrics_are_not_public(system, metered):
    web_url, _ = metered
    assert requests.get(f"{web_url}/metrics", timeout=10).status_code == 401
    assert requests.get(f"{web_url}/metrics", headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
    # Without OPS_TOKEN (the shared system's web) there is nothing there.
    assert requests.get(f"{system.web_url}/metrics", timeout=10).status_code == 404


def test_a_dead_processes_counts_survive_folding(tmp_path):
    """A child that counted and died: its files are folded into the archive, the total is unchanged."""
    script = f"""
import os, sys
from shared import metrics
pid = os.fork()
if pid == 0:
    metrics.TASKS.labels("t", "succeeded").inc(3)
    metrics.DB_POOL_WAITING.set(7)
    os._exit(0)
os.waitpid(pid, 0)
metrics.TASKS.labels("t", "succeeded").inc(2)
before = metrics.exposition().decode()
assert metrics.fold_dead_processes() == 1
assert not list(metrics.DIRECTORY.glob(f"*_{{pid}}.db")), list(metrics.DIRECTORY.iterdir())
after = metrics.exposition().decode()
assert 'meterai_tasks_total{{outcome="succeeded",task="t"}} 5.0' in before, before
assert 'meterai_tasks_total{{outcome="succeeded",task="t"}} 5.0' in after, after
assert "meterai_db_pool_waiting_requests 7.0" in before and "meterai_db_pool_waiting_requests 7.0" not in after
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# -- the alert rules and the dashboard ----------------------------------------------------------------
_SUFFIXES = ("_bucket", "_count", "_sum")


def _defined_metrics() -> set[str]:
    """Every series name /metrics can serve: shared/metrics.py's and the scrape-time collector's."""
    from shared import metrics
    from web.metrics import SnapshotCollector

    names = set()
    for item in vars(metrics).values():
        describe = getattr(item, "describe", None)
        if callable(describe) and getattr(item, "_name", "").startswith("meterai_"):
            for family in describe():
                names.add(family.name + ("_total" if family.type == "counter" else ""))
    full = {"at": 0, "errors": {}, "queues": {"stamping": {"messages": 1, "oldest_age_seconds": 1}},
            "line": {"mode": "auto", "length": 1, "waiting": 1, "oldest_waiter_seconds": 1, "head": 1, "tail": 2,
                     "active_checkouts": 1,
                     "outflow_target_per_minute": 1, "stamped_last_minute": 1},
            "breaker": {"state": "closed", "processes": {}}, "orders": {"paid": 1},
            "stamping": {"oldest_paid_age_seconds": 1, "nearest_deadline_seconds": 1},
            "refunds": {"pending": {"count": 1, "oldest_age_seconds": 1}},
            "mail": {"pending": 1, "sending": 0, "failed": 1, "failed_last_hour": 1, "oldest_unsent_age_seconds": 1}}
    names.update(family.name for family in SnapshotCollector(full).collect())
    return names


def _named(text: str) -> set[str]:
    found = set()
    for name in re.findall(r"\bmeterai_[a-z0-9_]+", text):
        for suffix in _SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix).endswith("_seconds"):
                name = name.removesuffix(suffix)
        found.add(name)
    return found


def test_alert_rules_and_dashboard_name_only_metrics_that_exist():
    defined = _defined_metrics()
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {r["alert"] for r in alerts} >= {"StampingJobTooOld", "RefundsNearDeadline", "GatewayBreakerOpen",
                                             "QueueNotConsumed", "LineGrowingFasterThanOutflow"}
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["expr"] and rule["annotations"]["summary"], rule
    in_rules = set().union(*(_named(r["expr"]) for r in alerts))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    in_dashboard = set().union(*(_named(e) for e in exprs))
    assert in_rules - defined == set(), "alert rules name metrics that don't exist"
    assert in_dashboard - defined == set(), "the dashboard names metrics that don't exist"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) not installed")
def test_alert_rules_parse_with_promtool():
    done = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _pdf() -> bytes:
    from tests.conftest import make_pdf

    return make_pdf()


def test_a_task_that_returns_a_dict_is_counted_as_succeeded():
    """The redrive returns counts (a dict): its outcome is "succeeded", not a handler error that loses
    the count (a dict can't be looked up in a set of outcome words)."""
    from shared import metrics
    from workers import metrics as worker_metrics

    class Redrive:
        name = "meterai.housekeeping.redrive"

    counter = metrics.TASKS.labels(Redrive.name, "succeeded")
    before = counter._value.get()  # noqa: SLF001 - this process's own value
    worker_metrics._task_ended(task_id="t-1", task=Redrive(), retval={"published": 2}, state="SUCCESS")
    assert counter._value.get() == before + 1


def test_a_publisher_without_the_workers_or_the_metrics_stamps_the_publish_time(system):
    """The CLI publishes through shared.broker alone (no workers' app, no shared.metrics): its messages
    carry the publish time too, so the oldest message's age is known whoever queued it."""
    prefix = f"meterai-publish-time-{os.getpid()}:"
    code = (
        "import sys, time\n"
        "from shared import cli, jobs\n"
        "from shared.config import load_settings\n"
        "settings = load_settings()\n"
        "cli._publisher(settings)\n"
        "jobs.publish(jobs.OPS_SAMPLE)\n"
        "assert 'shared.metrics' not in sys.modules and 'workers' not in sys.modules, sorted(sys.modules)\n"
    )
    env = {**os.environ, "REDIS_KEY_PREFIX": prefix, "DATABASE_URL": system.settings.database_url,
           "REDIS_URL": system.settings.redis_url, "BROKER_URL": system.settings.broker_url or system.settings.redis_url}
    before = time.time()
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, timeout=60)
    client = redis.Redis.from_url(system.settings.redis_url)
    try:
        message = json.loads(client.lindex(f"{prefix}housekeeping", -1))
        assert before <= message["headers"][PUBLISHED_AT_HEADER] <= time.time()
    finally:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


def test_a_worker_metrics_port_in_use_is_said_at_error_and_the_worker_carries_on(caplog):
    import logging
    import socket
    import types

    from workers import metrics as worker_metrics

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    settings = types.SimpleNamespace(metrics_port=port, metrics_bind_host="127.0.0.1")
    sender = types.SimpleNamespace(app=types.SimpleNamespace(conf=types.SimpleNamespace(meterai_settings=settings)))
    try:
        with caplog.at_level(logging.INFO, logger="workers.metrics"):
            worker_metrics._serve(sender=sender)  # returns: the node goes on without its metrics
    finally:
        taken.close()
    events = [r for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == "metrics_port_unavailable"]
    assert events and events[0].levelno == logging.ERROR and events[0].msg["port"] == port
