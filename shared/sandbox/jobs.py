"""The jobs a sandbox child can run, by name, and how a name becomes a function.

Why names and not functions: a caller hands the sandbox a string, and the function is imported in the
child by :mod:`importlib`. So the web process, which verifies uploads through the sandbox, never imports
pyHanko itself; only its children do. The static imports of a caller (what the import-linter contracts
see) thus stay as light as the caller is.

A job module exposes ``function(data: bytes, arguments: dict) -> Answer`` and, optionally, a ``warm()``
that makes the per-process caches every document uses (the stamp art, say): run once in the parent when
the caller preloads the job (so every fork inherits it), else once in each child before its first
document.
"""
from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .protocol import Answer

JobFunction = Callable[[bytes, dict[str, Any]], Answer]


@dataclass(frozen=True)
class Job:
    module: str
    function: str
    warm: str | None = None


JOBS: dict[str, Job] = {
    # The checks before payment (shared/stamping/preflight_checks.py); the checkout worker preloads it.
    "preflight": Job("shared.stamping.preflight_checks", "sandbox_job", warm="sandbox_warm"),
    # Verification by upload (shared/stamping/inspection.py); the web process does not preload it.
    "inspect_signature": Job("shared.stamping.inspection", "sandbox_job"),
}

_loaded: dict[str, JobFunction] = {}
_lock = threading.Lock()


def check(name: str) -> None:
    """A name the sandbox knows, or ``KeyError`` (a caller's bug, raised before any fork)."""
    if name not in JOBS:
        raise KeyError(f"no sandbox job named {name!r}; known: {', '.join(sorted(JOBS))}")


def load(name: str) -> JobFunction:
    """Import the job's module (once per process), warm it, and return its function."""
    found = _loaded.get(name)
    if found is not None:
        return found
    with _lock:
        if name not in _loaded:
            job = JOBS[name]
            module = importlib.import_module(job.module)
            if job.warm is not None:
                getattr(module, job.warm)()
            _loaded[name] = getattr(module, job.function)
        return _loaded[name]


def _reset_after_fork() -> None:
    """In a forked process: another thread may have held the lock at the moment of the fork."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)
