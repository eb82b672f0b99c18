"""The thin Flask front end: validate, store the upload, insert, enqueue, answer 202.

No PDF rendering and no call to a slow third party happens in a request; anything heavier is a Celery
task. ``create_app`` is the app factory gunicorn and ``workers.make_celery`` both call.
"""
from __future__ import annotations

import logging

from flask import Flask

from shared.config import Settings, get_settings
from shared.store import store_from_settings
from workers.celery_app import celery_init_app


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = Flask(__name__)
    # Let a slightly oversized upload reach our own check (which names the limit) instead of a bare 413.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_document_bytes + 256 * 1024
    app.config["MAX_FORM_MEMORY_SIZE"] = 64 * 1024
    app.extensions["meterai.settings"] = settings
    app.extensions["meterai.store"] = store_from_settings(settings)
    celery_init_app(app, settings)

    from web import api, errors, health, notifications, openapi, verify

    errors.register(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(notifications.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(verify.bp)
    return app
