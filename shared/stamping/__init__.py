"""The stamping kernel: check a PDF before payment, then put the e-Meterai stamp on it and sign it.

Pure functions over bytes, no services: :func:`quick_check` (inline on upload, :mod:`.header`),
:func:`preflight` (in a sandbox child of a worker, before payment), :func:`stamp_document` (after payment;
:mod:`.signing` stamps and signs in one pass). Failures are :class:`DocumentRejected` /
:class:`DocumentUnreadable` (:mod:`.verdicts`), both permanent, so they are never retried.

Importing this package loads no PDF, drawing, QR or signing library: the web process imports the light
modules (:mod:`.header`, :mod:`.verdicts`, :mod:`.key_material`, :mod:`.fields`), and the heavy names
below are loaded on first use (PEP 562), by the workers and the sandbox's children.
"""
from __future__ import annotations

import importlib
from typing import Any

from .header import quick_check
from .verdicts import STAMP_SIZE, DocumentRejected, DocumentUnreadable, PreflightResult

_HEAVY = {
    "preflight": ".preflight_checks",
    "stamp_document": ".kernel",
    "qr_code": ".art",
    "qr_matrix": ".art",
}

__all__ = [
    "STAMP_SIZE",
    "DocumentRejected",
    "DocumentUnreadable",
    "PreflightResult",
    "preflight",
    "qr_code",
    "qr_matrix",
    "quick_check",
    "stamp_document",
]


def __getattr__(name: str) -> Any:
    module = _HEAVY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
