"""The beat scheduler: the periodic jobs of ``workers/celery_app.py`` on a clock that keeps nothing on disk.

Why not Celery's default ``PersistentScheduler``: it keeps each job's last-run time in a shelve file
(``celerybeat-schedule``) on the node that runs beat, so beat is tied to that node's disk, and moving
it (or a container restarting on a fresh filesystem) leaves a file behind or starts without one. Every
periodic job here is a sweep of what PostgreSQL says is due, idempotent and safe to run early, late or
twice:

* ``sweep-refunds`` takes paid/stamping orders past their deadline with no live lease, ``FOR UPDATE
  SKIP LOCKED``, and moves each to ``refund_pending`` by the state machine's compare-and-set: an order is
  refunded once, whoever runs the sweep and however often.
* ``redrive`` re-publishes work that looks lost (older than ``REDRIVE_GRACE_SECONDS``); every task it
  publishes checks the database first, so a duplicate message is a no-op.
* ``reconcile-payments`` and ``expire-unpaid`` claim rows that are due (``SKIP LOCKED``) and move their
  next check forward in the same transaction, so a second run right after finds nothing to claim.

So forgetting the last-run times costs nothing: after a (re)start each job first runs one interval
later (Celery's in-memory entries start at "now"), a delay of at most a minute for a sweep that works
in hours.

**One beat at a time is the rule; two stay harmless.** A deployment runs one ``beat`` process (on any
node; it keeps no state there). If two run at once (a deploy overlapping, a node thought dead coming
back), each job simply runs twice as often and the overlapping runs split the work as above: nothing
is done twice. ``tests/test_node_state.py`` runs two beats against one system and counts one refund.
The same jobs are ``meterai`` commands for cron (``shared/cli.py``), under the same rule.
"""
from __future__ import annotations

from celery.beat import Scheduler


class MemoryScheduler(Scheduler):
    """Celery's base scheduler, which keeps the schedule in memory only (``sync`` writes nothing), under a
    name of our own: the Procfile's ``beat -S workers.beat:MemoryScheduler``."""

    def setup_schedule(self) -> None:
        super().setup_schedule()
        self.logger.info("beat: schedule in memory only (nothing on disk): %s", ", ".join(sorted(self.data)))
