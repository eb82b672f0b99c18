"""Celery settings that paid work depends on, and the retry policy's shape."""
from __future__ import annotations

import ssl

from shared import jobs
from shared.config import load_settings
from workers.celery_app import celery_config
from workers.tasks.base import backoff_seconds


def test_messages_are_acked_late_one_at_a_time_and_outlive_the_longest_task_and_retry():
    settings = load_settings({})
    config = celery_config(settings)
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["task_time_limit"] == settings.task_time_limit_seconds
    assert config["task_soft_time_limit"] < config["task_time_limit"]
    visibility = config["broker_transport_options"]["visibility_timeout"]
    assert visibility > settings.task_time_limit_seconds + settings.retry_max_seconds


def test_lease_outlives_the_task_time_limit():
    """A live task always holds a live lease, so the sweep can't refund an order mid-stamp."""
    settings = load_settings({})
    assert settings.lease_seconds > settings.task_time_limit_seconds


def test_every_task_has_a_queue_and_paid_work_has_its_own():
    assert jobs.QUEUES[jobs.STAMP_ORDER] == "stamping"
    assert jobs.QUEUES[jobs.REFUND_ORDER] == "refunds"
    assert jobs.QUEUES[jobs.PREPARE_ORDER] not in ("stamping", "refunds")


def test_backoff_grows_exponentially_with_full_jitter_under_a_cap():
    samples = {attempt: [backoff_seconds(attempt, 2.0, 60.0) for _ in range(400)] for attempt in range(10)}
    for attempt, values in samples.items():
        ceiling = min(60.0, 2.0 * 2 ** attempt)
        assert all(0.1 <= v <= max(ceiling, 0.1) for v in values)
    assert max(samples[9]) <= 60.0
    assert len({round(v, 3) for v in samples[5]}) > 100  # jittered, not a fixed delay
    assert sum(samples[4]) / 400 > 2 * sum(samples[1]) / 400  # grows with the attempt


def test_settings_that_would_break_an_invariant_are_refused_at_start():
    import pytest

    with pytest.raises(ValueError, match="LEASE_SECONDS"):
        load_settings({"LEASE_SECONDS": "60", "TASK_TIME_LIMIT_SECONDS": "120"})
    with pytest.raises(ValueError, match="PREFLIGHT_TIMEOUT_SECONDS"):
        load_settings({"PREFLIGHT_TIMEOUT_SECONDS": "115"})
    assert load_settings({"LEASE_SECONDS": "200", "TASK_TIME_LIMIT_SECONDS": "150"}).lease_seconds == 200


def test_publishing_cannot_hang_a_request_on_a_stuck_redis():
    config = celery_config(load_settings({}))
    options = config["broker_transport_options"]
    assert 0 < options["socket_timeout"] <= 5 and 0 < options["socket_connect_timeout"] <= 5
    assert config["task_publish_retry_policy"]["max_retries"] <= 3


def test_workers_ride_out_broker_outages_of_any_length_and_let_running_tasks_finish():
    config = celery_config(load_settings({}))
    assert config["broker_connection_retry"] is True
    assert config["broker_connection_max_retries"] is None  # retry forever, never exit
    assert config["worker_cancel_long_running_tasks_on_connection_loss"] is False


def test_redis_brokers_use_the_repaired_transport_tls_too_with_certificates_verified():
    from shared.broker import redis_transport

    for url, expected in [("redis://127.0.0.1:6379/0", "shared.broker.redis_transport:Transport"),
                          ("redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/0",
                           "shared.broker.redis_transport:SentinelTransport"),
                          ("rediss://cache.example:6380/0", "shared.broker.redis_transport:Transport")]:
        config = celery_config(load_settings({"REDIS_URL": url}))
        assert config["broker_transport"] == expected
        assert redis_transport.transport_for(config["broker_url"]) == expected
        tls = url.startswith("rediss")
        assert config["broker_use_ssl"] == ({"ssl_cert_reqs": ssl.CERT_REQUIRED} if tls else None)


def test_the_retry_policy_is_written_once():
    """Every task retries through the base class; task modules only say what their task does."""
    from pathlib import Path

    workers = Path(__file__).resolve().parents[1] / "workers"
    calls = {str(p.relative_to(workers)): p.read_text().count("self.retry(") for p in workers.rglob("*.py")}
    assert {name: n for name, n in calls.items() if n} == {"tasks/base.py": 1}


def test_every_task_names_its_retry_bound_and_runs_on_the_base_class(sys_):
    from workers.celery_app import make_celery_app
    from workers.tasks.base import MeteraiTask

    app = make_celery_app(sys_.settings)
    app.loader.import_default_modules()
    ours = {name: task for name, task in app.tasks.items() if name in jobs.QUEUES}
    assert set(ours) == set(jobs.QUEUES)
    for name, task in ours.items():
        assert isinstance(task, MeteraiTask), name
        if task.retries_setting:
            assert isinstance(getattr(sys_.settings, task.retries_setting), int), name
    retried = {name for name, task in ours.items() if task.retries_setting}
    assert retried == {jobs.PREPARE_ORDER, jobs.PROCESS_NOTIFICATION, jobs.POLL_PAYMENT, jobs.EXPIRE_ORDER,
                       jobs.STAMP_ORDER, jobs.REFUND_ORDER, jobs.SEND_MAIL}


def test_a_sentinel_broker_url_survives_the_celery_commands_own_reading_of_it(monkeypatch):
    """The `celery` command reads a BROKER_URL variable as its --broker and sets CELERY_BROKER_URL to it
    as given: a redis+sentinel:// URL kombu can't parse. The app's connections must still be ours."""
    from workers.celery_app import make_celery_app

    ours = "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/meterai-broker/0"
    monkeypatch.setenv("CELERY_BROKER_URL", ours)
    app = make_celery_app(load_settings({"BROKER_URL": ours}))
    for connection in (app.connection_for_write(), app.connection_for_read()):
        assert connection.transport_cls == "shared.broker.redis_transport:SentinelTransport"
        assert not connection.as_uri().startswith("redis+sentinel")
        assert connection.transport_options["master_name"] == "meterai-broker"
