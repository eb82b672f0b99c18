"""What ``celery -A workers.make_celery`` points at: the Flask app's Celery instance."""
from celery.signals import celeryd_after_setup

from shared.stamping.key_material import require_key_material
from web import create_app
from workers import metrics  # noqa: F401 - its Celery signals count tasks and serve METRICS_PORT

flask_app = create_app()
celery_app = flask_app.extensions["celery"]


@celeryd_after_setup.connect
def _stamping_nodes_hold_their_key(sender: str, instance, **_: object) -> None:
    """A worker that takes stamping work checks for the issuer's key as it starts, outside development:
    without it, it would start and retry every stamp until the deadline refunds them. SystemExit, not an
    exception: Celery's signal dispatch logs exceptions and carries on."""
    settings = flask_app.extensions["meterai.settings"]
    if settings.development or "stamping" not in instance.app.amqp.queues.consume_from:
        return
    try:
        require_key_material(settings, "stamping worker")
    except Exception as exc:  # noqa: BLE001 - SigningUnavailable, said once and fatal
        import sys

        print(exc, file=sys.stderr, flush=True)
        raise SystemExit(1) from exc
