"""The preflight as a checkout worker runs it: in a sandbox child, bounded in time and memory.

Why: the preflight parses a stranger's PDF, and a parser that loops or allocates without bound must not
take the worker (and, through redelivery, the order) with it. :mod:`shared.sandbox` runs the job
"preflight" (:func:`shared.stamping.preflight_checks.sandbox_job`) in a reused child; this module turns every
way a run can end into an answer for the buyer: the preflight's own verdict, or
:class:`DocumentRejected` "too_complex" (out of time or memory) or "unreadable" (the child crashed, or
said something that is not an answer).

Light on purpose: it imports no PDF library itself. The worker preloads the job (the fork then inherits
pypdf, reportlab and the stamp art instead of every child importing them).
"""
from __future__ import annotations

import logging
import time
from typing import Any

from shared import sandbox
from shared.errors import TransientError
from shared.logs import log_event

from .header import quick_check
from .verdicts import STAMP_SIZE, TOO_BIG_MESSAGE, DocumentRejected, PreflightResult, too_complex, unreadable

log = logging.getLogger(__name__)

DEFAULT_CHILD_MAX_DOCUMENTS = sandbox.DEFAULT_CHILD_MAX_DOCUMENTS
DEFAULT_CHILD_MAX_GROWTH_BYTES = sandbox.DEFAULT_CHILD_MAX_GROWTH_BYTES


def preflight_isolated(
    data: bytes,
    *,
    page: int,
    x: float,
    y: float,
    max_bytes: int,
    max_pages: int,
    size: float = STAMP_SIZE,
    timeout_seconds: float,
    memory_bytes: int,
    child_max_documents: int = DEFAULT_CHILD_MAX_DOCUMENTS,
    child_max_growth_bytes: int = DEFAULT_CHILD_MAX_GROWTH_BYTES,
) -> PreflightResult:
    """:func:`~shared.stamping.preflight_checks.preflight` in a sandbox child (:class:`shared.sandbox.Limits`
    says what the bounds mean).

    Returns the :class:`PreflightResult` or raises :class:`DocumentRejected`: the preflight's own codes,
    plus "too_complex" when the child runs out of time or memory and "unreadable" when it dies any other
    way. Raises :class:`TransientError` if no child process can be started (retry later).
    """
    quick_check(data, max_bytes=max_bytes)  # cheap verdicts need no process
    limits = sandbox.Limits(timeout_seconds, memory_bytes, child_max_documents, child_max_growth_bytes)
    arguments = dict(page=page, x=x, y=y, max_bytes=max_bytes, max_pages=max_pages, size=size)
    started = time.monotonic()
    try:
        outcome = sandbox.run("preflight", data, arguments, limits, preload=True)
    except sandbox.SandboxUnavailable as exc:
        raise TransientError("Pemeriksaan dokumen belum dapat dijalankan; akan dicoba lagi.",
                             code="preflight_unavailable") from exc
    if outcome.answer is not None:
        return _verdict(outcome.answer)
    log_event(log, "preflight_child_failed", logging.WARNING, cause=outcome.cause,
              elapsed_ms=round((time.monotonic() - started) * 1000), document_bytes=len(data),
              reused=outcome.reused)
    if outcome.failure in (sandbox.TIMEOUT, sandbox.CPU):
        raise too_complex()
    if outcome.failure == sandbox.MEMORY:
        raise too_complex(TOO_BIG_MESSAGE)
    raise unreadable()


def _verdict(answer: dict[str, Any]) -> PreflightResult:
    try:
        if answer["ok"] is True:
            return PreflightResult(page_count=int(answer["page_count"]),
                                   page_width=float(answer["page_width"]),
                                   page_height=float(answer["page_height"]))
        code, text = str(answer["code"]), str(answer["message"])
    except (KeyError, TypeError, ValueError) as exc:
        raise unreadable() from exc
    raise DocumentRejected(code, text)


def preflight_children() -> dict[int, int]:
    """This process's live preflight children, idle or busy: process id → documents answered so far
    (for tests and diagnostics)."""
    return sandbox.children("preflight")
