"""``GET /metrics`` for Prometheus, and the web's request metrics.

Access: ``Authorization: Bearer $OPS_TOKEN``, like every ops endpoint (404 while OPS_TOKEN is unset; wrong
tokens count against the same per-client limit as ``/ops``). A token rather than "only from an internal
bind" because a web node behind a proxy on another machine already listens on its private address
(BIND_HOST): an address can't tell Prometheus from the proxy forwarding a buyer. Prometheus sends it with
``authorization: {credentials_file: ...}`` (deploy/prometheus/).

What a scrape returns: this node's counters (every gunicorn worker's, added up: shared/metrics.py) and
the system's state read at scrape time (shared/services/observe.py), kept for a few seconds per process
so several Prometheus servers, or a fast scrape interval, cost the database and Redis no more.

Requests are counted by route template (``/api/v1/orders/<order_id>``, never the id), method and status;
latency by route and method; every 429 and 503 also by its reason (the error code of the answer).
"""
from __future__ import annotations

import logging
import threading
import time

from flask import Blueprint, Flask, Response, g, request

from shared import metrics
from shared.db import get_pool
from shared.errors import DomainError
from shared.logs import log_event
from shared.services import observe
from web.context import admission, settings
from web.limits import client_id, enforce_limit
from web.security import OPS_TOKEN_ATTEMPTS, bearer_token_matches

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

# The scrape-time snapshot is reused for this long (seconds) within a process.
SNAPSHOT_MAX_AGE_SECONDS = 5.0
# This process's pool is copied into the pool gauges at most this often (seconds).
POOL_RECORD_SECONDS = 1.0


def register(app: Flask) -> None:
    """Time and count every request (registered first, so its after-request hook runs last)."""
    app.before_request(_started)
    app.after_request(_count)
    app.register_blueprint(bp)


def _started() -> None:
    g.metrics_started = time.perf_counter()


def _count(response: Response) -> Response:
    started = g.pop("metrics_started", None)
    rule = request.url_rule
    route = rule.rule if rule is not None else "unmatched"
    method = request.method if request.method in metrics.HTTP_METHODS else "other"
    status = response.status_code
    metrics.record_http(route, method, status, time.perf_counter() - started if started is not None else None)
    if status in (429, 503):
        metrics.HTTP_REFUSALS.labels(str(status), _reason(response)).inc()
    _record_pool()
    return response


def _reason(response: Response) -> str:
    body = response.get_json(silent=True) if response.is_json else None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    # Our error codes are a fixed set of short words; anything else is not a label value.
    return code if isinstance(code, str) and len(code) <= 40 and code.replace("_", "").isalnum() else "other"


_pool_recorded_at = 0.0


def _record_pool() -> None:
    global _pool_recorded_at
    now = time.monotonic()
    if now - _pool_recorded_at < POOL_RECORD_SECONDS:
        return
    _pool_recorded_at = now
    try:
        metrics.record_pool(get_pool(settings().database_url).get_stats())
    except Exception:  # noqa: BLE001 - a pool that can't be made now is the database's problem, not ours
        pass


@bp.get("/metrics")
def scrape():
    expected = settings().ops_token
    if not expected:
        raise DomainError("Not found.", code="not_found")
    if not bearer_token_matches(request.headers.get("Authorization", ""), expected):
        enforce_limit("ops_auth", OPS_TOKEN_ATTEMPTS)
        log_event(log, "ops_token_refused", logging.WARNING, client=client_id(), path=request.path)
        raise DomainError("Send the ops token as 'Authorization: Bearer <token>'.", code="unauthorized")
    return Response(metrics.exposition(SnapshotCollector(_snapshot())), mimetype=metrics.CONTENT_TYPE)


_snapshot_lock = threading.Lock()
_snapshot_cache: tuple[float, dict] | None = None


def _snapshot() -> dict:
    global _snapshot_cache
    with _snapshot_lock:
        cached = _snapshot_cache
        if cached is None or time.monotonic() - cached[0] > SNAPSHOT_MAX_AGE_SECONDS:
            controller = admission()
            cached = _snapshot_cache = (time.monotonic(), observe.snapshot(settings(), controller.redis, controller))
        return cached[1]


class SnapshotCollector:
    """The scrape-time snapshot as gauges (``meterai_observe_up{source}`` says which parts were read)."""

    def __init__(self, snapshot: dict) -> None:
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot
        up = metrics.GaugeMetricFamily("meterai_observe_up", "1 when the scrape-time source could be read.",
                               labels=["source"])
        for source in ("queues", "line", "breaker", "database"):
            up.add_metric([source], 0.0 if source in s["errors"] else 1.0)
        yield up
        if "queues" in s:
            depth = metrics.GaugeMetricFamily("meterai_queue_messages", "Messages waiting in each broker queue.",
                                      labels=["queue"])
            age = metrics.GaugeMetricFamily("meterai_queue_oldest_message_age_seconds", "Age of the oldest message "
                                    "waiting in each queue (0 when empty).", labels=["queue"])
            for queue, values in s["queues"].items():
                depth.add_metric([queue], values["messages"])
                age.add_metric([queue], values["oldest_age_seconds"])
            yield depth
            yield age
        if "line" in s:
            line = s["line"]
            yield _gauge("meterai_admission_line_length", "People waiting in line: tickets past the head "
                         "whose holder polled within the abandon window.", line["waiting"])
            yield _gauge("meterai_admission_line_tickets", "Tickets issued past the head, abandoned ones "
                         "included (the head moves over those without admitting).", line["length"])
            if line["oldest_waiter_seconds"] is not None:  # None: unknown (see observe.OLDEST_WAITER_SCAN)
                yield _gauge("meterai_admission_oldest_waiter_seconds", "Seconds since the oldest ticket still "
                             "held in line was issued (0 when nobody waits).", line["oldest_waiter_seconds"])
            yield _gauge("meterai_admission_line_head", "The highest ticket number admitted (its rate is "
                         "the line's admissions).", line["head"])
            yield _gauge("meterai_admission_line_tail", "The highest ticket number issued (its rate is the "
                         "line's arrivals).", line["tail"])
            yield _gauge("meterai_admission_active_checkouts", "Checkouts admitted within the session "
                         "window.", line["active_checkouts"])
            yield _gauge("meterai_admission_outflow_target_per_minute", "Admissions per minute the waiting "
                         "room aims at (configured, or the measured stamping rate, at least the floor).",
                         line["outflow_target_per_minute"])
            yield _gauge("meterai_admission_stamped_last_minute", "Stamps in the last full minute (the "
                         "measured outflow).", line["stamped_last_minute"])
            mode = metrics.GaugeMetricFamily("meterai_admission_mode", "The waiting room's mode (1 for the current "
                                     "one).", labels=["mode"])
            for name in ("auto", "queue_all", "paused"):
                mode.add_metric([name], 1.0 if line["mode"] == name else 0.0)
            yield mode
        if "breaker" in s:
            yield _gauge("meterai_gateway_breaker_worst_state", "The gateway breaker's worst state any live "
                         "worker reported: 0 closed, 1 half-open, 2 open.",
                         observe.BREAKER_STATES[s["breaker"]["state"]])
        if "orders" in s:
            orders = metrics.GaugeMetricFamily("meterai_orders", "Open orders by status (settled ones are counted "
                                       "by the workers' counters).", labels=["status"])
            for status, count in s["orders"].items():
                orders.add_metric([status], count)
            yield orders
            yield _gauge("meterai_stamping_oldest_paid_age_seconds", "Age of the oldest paid order not yet "
                         "stamped (0 when none).", s["stamping"]["oldest_paid_age_seconds"])
            nearest = s["stamping"]["nearest_deadline_seconds"]
            if nearest is not None:
                yield _gauge("meterai_stamping_nearest_deadline_seconds", "Seconds until the nearest paid "
                             "order's stamping deadline, when it is refunded (negative: overdue).", nearest)
            pending = metrics.GaugeMetricFamily("meterai_refunds_open", "Refunds not yet paid out, by status "
                                        "(pending: the gateway's; manual: finance's).", labels=["status"])
            oldest = metrics.GaugeMetricFamily("meterai_refunds_oldest_age_seconds", "Age of the oldest open refund "
                                       "by status (0 when none).", labels=["status"])
            for status, values in s["refunds"].items():
                pending.add_metric([status], values["count"])
                oldest.add_metric([status], values["oldest_age_seconds"])
            yield pending
            yield oldest
        if "mail" in s:
            outbox = metrics.GaugeMetricFamily("meterai_mail_outbox", "E-mails to buyers not sent, by status "
                                               "(pending and sending: still to send; failed: given up, until "
                                               "`meterai mail-retry`).", labels=["status"])
            for status in ("pending", "sending", "failed"):
                outbox.add_metric([status], s["mail"].get(status, 0))
            yield outbox
            yield _gauge("meterai_mail_outbox_failed_last_hour", "E-mails to buyers that failed for good within "
                         "the last hour.", s["mail"].get("failed_last_hour", 0))
            yield _gauge("meterai_mail_outbox_oldest_unsent_age_seconds", "Age of the oldest e-mail still to "
                         "send (0 when none).", s["mail"].get("oldest_unsent_age_seconds", 0))


def _gauge(name: str, documentation: str, value: float) -> metrics.GaugeMetricFamily:
    return metrics.GaugeMetricFamily(name, documentation, value=float(value))
