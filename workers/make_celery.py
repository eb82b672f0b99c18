"""What ``celery -A workers.make_celery`` points at: the Flask app's Celery instance."""
import threading

from celery.signals import celeryd_after_setup, worker_ready

from shared import jobs
from shared.services import mail
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


@worker_ready.connect
def _mail_nodes_probe_their_server(sender=None, **_: object) -> None:
    """A worker that sends e-mail asks its SMTP server (connect, EHLO, STARTTLS, AUTH, NOOP) as it starts
    and says at ERROR when it can't be reached, rather than failing every buyer's e-mail unseen. It still
    starts (the server may come back; the outbox keeps every e-mail): in a thread, so the worker consumes
    at once."""
    app = sender.app if sender is not None else celery_app
    if jobs.QUEUES[jobs.SEND_MAIL] not in app.amqp.queues.consume_from:
        return
    settings = flask_app.extensions["meterai.settings"]
    threading.Thread(target=mail.check_server, args=(settings,), name="smtp-probe", daemon=True).start()
