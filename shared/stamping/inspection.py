"""What the signature in an uploaded PDF says: found, intact, trusted, covering the whole file.

Runs only in a sandbox child (the job "inspect_signature", :mod:`shared.sandbox.jobs`): pyHanko is pure
Python and its parsing time on a crafted file is not bounded, and the web process that asks must not
load it at all. The answer is plain data (:func:`sandbox_job`); the verdict and its messages are made
on the web's side (:mod:`shared.services.verification`), with the serial checked against the database.

pyHanko's validator is the reference for what a PDF reader will say about our signature, and the only
trust root it is given is ours; nothing is fetched from the network.
"""
from __future__ import annotations

import base64
import io
from functools import lru_cache
from typing import Any

from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation import validate_pdf_signature
from pyhanko.sign.validation.status import SignatureCoverageLevel
from pyhanko_certvalidator import ValidationContext

from shared.sandbox import Answer

from .fields import serial_from_field_name


@lru_cache(maxsize=4)
def _trust_root(der: bytes) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(der)


def inspect_signature(data: bytes, trust_root_der: bytes) -> dict[str, Any]:
    """Find our last signature in ``data`` and validate it against ``trust_root_der`` only.

    Returns the findings: ``outcome`` (ok, not_signed, unreadable, signature_invalid, untrusted_signer
    or modified_after_stamping), and ``serial`` and ``signer`` when known.
    """
    try:
        reader = PdfFileReader(io.BytesIO(data), strict=False)
        ours = [(sig, serial_from_field_name(sig.field_name)) for sig in reader.embedded_regular_signatures]
    except Exception:  # pyHanko raises far more than PdfReadError on hostile input
        return {"outcome": "unreadable"}
    ours = [(sig, serial) for sig, serial in ours if serial is not None]
    if not ours:
        return {"outcome": "not_signed"}
    embedded, serial = ours[-1]  # signatures come in file order: the last covers the most
    signer = None
    try:
        subject = embedded.signer_cert.subject
        signer = subject.native.get("common_name") or subject.human_friendly
        context = ValidationContext(trust_roots=[_trust_root(trust_root_der)], allow_fetching=False)
        # Diff analysis only matters for a signature that doesn't cover the whole file, which we
        # refuse anyway; skipping it keeps the work small and its hostile-input surface smaller.
        status = validate_pdf_signature(embedded, context, skip_diff=True)
    except Exception:
        return {"outcome": "signature_invalid", "serial": serial}
    findings = {"serial": serial, "signer": signer}
    if not (status.intact and status.valid):
        return {"outcome": "signature_invalid", **findings}
    if not status.trusted:
        return {"outcome": "untrusted_signer", **findings}
    if status.coverage != SignatureCoverageLevel.ENTIRE_FILE:
        return {"outcome": "modified_after_stamping", **findings}
    return {"outcome": "ok", **findings}


def sandbox_job(data: bytes, arguments: dict[str, Any]) -> Answer:
    """:func:`inspect_signature` as a sandbox job. Every verdict leaves the child clean, unlike the
    preflight's rejections: the web process doesn't preload pyHanko (it must stay light), so a fresh
    child pays pyHanko's import (``docs/benchmarks.md``, "Verification by upload"), and retiring one per
    forged or broken upload would let anyone make the web process pay that per request. A child that
    ran out of time, memory or CPU, or crashed, is still retired, and the growth and document bounds
    still apply."""
    return Answer(inspect_signature(data, base64.b64decode(arguments["trust_root"])), clean=True)
