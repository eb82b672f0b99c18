"""Celery tasks, one module per domain. Each is a thin, idempotent wrapper around ``shared.services``."""
