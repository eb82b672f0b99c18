"""The Celery side: the app factory, one task module per domain, and the beat schedule."""
