"""pyHanko's signer, as the reference our own signing route is compared against, and as the buyers'
signing tool in tests (documents already signed by somebody else before we stamp them).

Production signs with one route only (``shared/stamping/signing.py``: our incremental update and our
CMS). pyHanko is the maintained library made for the job, so its signatures are what ours must look like
to a validator, and what the delivery check must accept from any standard signer.
"""
from __future__ import annotations

from io import BytesIO

from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.sign import fields, signers

from shared.stamping.fields import LOCATION, REASON_PREFIX, field_name
from shared.stamping.key_material import PkiPaths


def pyhanko_signer(paths: PkiPaths, passphrase: str = "") -> signers.SimpleSigner:
    """pyHanko's signer for the key and certificates at ``paths``."""
    signer = signers.SimpleSigner.load(str(paths.key), str(paths.cert), ca_chain_files=(str(paths.ca_cert),),
                                       key_passphrase=passphrase.encode() or None)
    assert signer is not None, f"pyHanko could not load {paths}"
    return signer


def sign_with_pyhanko(data: bytes, signer: signers.Signer, *, serial: str) -> bytes:
    """``data`` signed by pyHanko the way our signer signs: same field name, reason, location, PAdES."""
    metadata = signers.PdfSignatureMetadata(
        field_name=field_name(serial),
        md_algorithm="sha256",
        subfilter=fields.SigSeedSubFilter.PADES,
        reason=REASON_PREFIX + serial,
        location=LOCATION,
    )
    writer = IncrementalPdfFileWriter(BytesIO(data), strict=False)
    return signers.PdfSigner(metadata, signer=signer).sign_pdf(writer).getvalue()
