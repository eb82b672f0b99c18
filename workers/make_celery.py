"""What ``celery -A workers.make_celery`` points at: the Flask app's Celery instance."""
from web import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
