"""gunicorn's settings for the web process (the Procfile's ``web:`` line reads them with ``-c``).

The bind address, worker class and counts stay on the Procfile line, where the launcher and operators
see them; this file holds what needs Python: the metrics' multiprocess directory and its upkeep.
"""
# Imported in the master, before any worker imports prometheus-client: the master leads the metrics group
# (it wipes the group's directory at start, and those of web or worker nodes that are gone), and every
# worker it forks counts into that directory (shared/metrics.py).
from shared import metrics


def child_exit(server, worker):
    """A worker that exited (or was killed): its live gauges go, its counts are folded into the archive."""
    metrics.fold_dead_processes(worker.pid)


# --- logging (helper O2): logconfig_dict goes here -------------------------------------------------------
# gunicorn's own error and access lines, and the app's, as JSON lines (shared/logs.py).
import shared.logs  # noqa: E402

logconfig_dict = shared.logs.gunicorn_logconfig()

from gunicorn.glogging import Logger as _Logger  # noqa: E402


class AccessLogger(_Logger):
    """gunicorn's logger, with the access line built from the few fields we keep (shared.logs.access_line)
    instead of gunicorn's dict of every header and environ key formatted through structlog."""

    def access(self, resp, req, environ, request_time):
        if not self.access_log_enabled:
            return
        try:
            line = shared.logs.access_line(resp.status, resp.headers, environ, getattr(resp, "sent", None),
                                           request_time)
            self.access_log.info(line, extra={shared.logs.RENDERED: True})
        except Exception:  # noqa: BLE001 - as gunicorn's own: a broken log line never fails a request
            self.error("access log line failed", exc_info=True)


logger_class = AccessLogger
# --- end logging ------------------------------------------------------------------------------------------
