"""The stamping kernel: check a PDF before payment, then put the e-Meterai stamp on it.

Pure functions over bytes, no services: :func:`quick_check` (inline on upload), :func:`preflight` (in a
worker, before payment) and :func:`stamp_document` (after payment). Failures are
:class:`DocumentRejected` / :class:`DocumentUnreadable`, both permanent, so they are never retried.
"""
from .art import qr_code, qr_matrix
from .kernel import STAMP_SIZE, DocumentRejected, DocumentUnreadable, stamp_document
from .preflight import PreflightResult, preflight, quick_check

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
