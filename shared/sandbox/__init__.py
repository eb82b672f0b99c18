"""One sandbox for every parse of a stranger's PDF: the preflight before payment and verification by upload.

Why: parsers are hardened, but a parser bug that loops or allocates without bound would take down the
process it runs in. In a Celery worker the task would run into its hard time limit, the pool would kill
the process and, because of ``acks_late`` + ``task_reject_on_worker_lost``, the message would be
redelivered again and again, and the order would never get an answer; in the web process it would hold
a request thread and the process's memory. Here the damage stays in a child process of its own:

* the parent enforces a wall-clock deadline per document (``SIGKILL``, then reaps the child: no zombies);
* the child runs under ``RLIMIT_AS`` (address space) and ``RLIMIT_CPU`` (a backstop should the parent be
  stopped), holds none of the parent's descriptors, and dies with its parent (``PR_SET_PDEATHSIG``);
* every way a run can end is an :class:`Outcome` the caller turns into an answer for a person: the job's
  own answer, or a failure (``TIMEOUT``, ``CPU``, ``MEMORY``, ``CRASHED``);
* children are reused for many documents and recycled by clear rules (:mod:`.pool`).

A job is named by a string (:mod:`.jobs`) and imported in the child, so a caller need not load the job's
libraries at all: the web process verifies uploads through here without importing pyHanko.

Modules: :mod:`.pool` (the parent's side: children, reuse, recycling, threads), :mod:`.child` (the
child's side: detaching, limits, the serve loop), :mod:`.protocol` (what crosses the pipes),
:mod:`.limits`, :mod:`.jobs`. Callers: :func:`shared.stamping.isolation.preflight_isolated`,
:func:`shared.services.verification.verify_document`.
"""
from __future__ import annotations

from .limits import DEFAULT_CHILD_MAX_DOCUMENTS, DEFAULT_CHILD_MAX_GROWTH_BYTES, Limits
from .pool import CPU, CRASHED, MEMORY, TIMEOUT, Outcome, SandboxUnavailable, children, run, shutdown_children
from .protocol import Answer

__all__ = [
    "CPU",
    "CRASHED",
    "DEFAULT_CHILD_MAX_DOCUMENTS",
    "DEFAULT_CHILD_MAX_GROWTH_BYTES",
    "MEMORY",
    "TIMEOUT",
    "Answer",
    "Limits",
    "Outcome",
    "SandboxUnavailable",
    "children",
    "run",
    "shutdown_children",
]
