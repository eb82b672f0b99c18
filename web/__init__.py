"""The thin Flask front end: validate, store the upload, insert, enqueue, answer 202.

No PDF rendering and no call to a slow third party happens in a request; anything heavier is a Celery
task. ``create_app`` is the app factory gunicorn and ``workers.make_celery`` both call.
"""
from __future__ import annotations

import logging
from pathlib import Path

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from shared.admission import AdmissionController
from shared.config import Settings, get_settings, refuse_unsafe
from shared.logs import configure_logging, log_event
from shared.ratelimit import RateLimiter
from shared.redisconn import eviction_policy_problem, redis_client
from shared.stamping.key_material import ROOT_ONLY, require_key_material
from shared.store import store_from_settings
from workers.celery_app import celery_init_app


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    configure_logging()
    refuse_unsafe(settings, "web")  # workers start through this factory too (workers/make_celery.py)
    if not settings.development:
        # Every process built here (web, and each worker through workers/make_celery.py) checks stamps
        # against the root; a stamping worker also needs the key (checked where it starts, there).
        require_key_material(settings, "node", needs=ROOT_ONLY)
    app = Flask(__name__)
    # Let a slightly oversized upload reach our own check (which names the limit) instead of a bare 413.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_document_bytes + 256 * 1024
    # werkzeug holds at most this much of any text field in memory (it can't be lower than its 64 KiB
    # read chunk); web.api refuses fields over 1 KiB before anything looks inside them.
    app.config["MAX_FORM_MEMORY_SIZE"] = 64 * 1024
    # Static files (pdf.js is 1.7 MB): a buyer's phone keeps them for an hour instead of asking per page.
    app.config["SEND_FILE_MAX_AGE_DEFAULT"] = 3600
    app.extensions["meterai.settings"] = settings
    app.extensions["meterai.store"] = store_from_settings(settings, web=True)  # a buyer waits on it: one short try
    celery_init_app(app, settings)  # also configures the status cache (shared/statuscache.py)
    # Short timeouts: a slow Redis must turn into a quick "come back", never a hung request. One retry: a
    # connection the server dropped, or a primary Sentinel just replaced, costs no buyer an error.
    client = redis_client(settings.redis_url, timeout=0.5, retries=1,
                          sentinel_password=settings.redis_sentinel_password)
    problem = eviction_policy_problem(client)
    if problem:
        log_event(logging.getLogger(__name__), "redis_may_evict", logging.WARNING, problem=problem)
    app.extensions["meterai.admission"] = AdmissionController(settings, client)
    app.extensions["meterai.ratelimiter"] = RateLimiter(client, settings.redis_key_prefix)
    from web.queuepoll import QueuePolls
    from web.security import NON_PAGE_HEADERS
    from web.staticfiles import StaticFiles
    from web.statuspoll import StatusPolls

    # The most frequent requests answered before Flask: a new buyer's scripts (web/staticfiles.py), the
    # polls of the people in line (web/queuepoll.py) and the order page's polls the status cache answers
    # (web/statuspoll.py).
    app.wsgi_app = StaticFiles(app.wsgi_app, app.static_folder or "", prefix=(app.static_url_path or "/static") + "/",
                               max_age=app.config["SEND_FILE_MAX_AGE_DEFAULT"], headers=NON_PAGE_HEADERS)
    app.wsgi_app = StatusPolls(app.wsgi_app, NON_PAGE_HEADERS)
    app.wsgi_app = QueuePolls(app.wsgi_app, app, NON_PAGE_HEADERS)
    if settings.proxy_hops > 0:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxy_hops)
    if not (Path(app.static_folder or "") / "vendor" / "pdfjs" / "pdf.min.mjs").is_file():
        # The checkout still sells (typed coordinates), but buyers can't see where the stamp goes: said at
        # ERROR so a build that skipped `python -m shared.devtools.vendor` is noticed (docs/deploy.md).
        log_event(logging.getLogger(__name__), "checkout_preview_missing", logging.ERROR,
                  missing=str(Path(app.static_folder or "") / "vendor" / "pdfjs"))

    from web import (api, errors, health, limits, metrics, notifications, openapi, ops, pages, queue, requestid,
                     security, verify)

    requestid.register(app)  # first: every answer, even one refused early, has an id
    metrics.register(app)  # next: its after-request hook runs late, timing and counting the whole answer
    errors.register(app)
    security.register(app)
    app.after_request(limits.add_rate_limit_headers)
    app.register_blueprint(api.bp)
    app.register_blueprint(notifications.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(verify.bp)
    app.register_blueprint(queue.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(pages.bp)
    return app
