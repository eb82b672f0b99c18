"""The delivery check: a stamped file is re-read by a parser other than the one that wrote it.

Why: pypdf reads the buyer's document leniently (it repairs what it can), and our incremental writer
appends to whatever it was given. A document whose cross-reference data is broken in a way pypdf
tolerates without saying so (a subsection numbered past 2^32, entries pointing nowhere, a page tree only
a repair finds) thus came back "stamped" as a file that poppler and qpdf can't open, with no signature
they could see. DESIGN.md: ``done`` means the stamped file was re-read and its signature checked by
another parser; a stamp that fails is a failed attempt, never a delivery.

The other parser is qpdf, through pikepdf (its maintained binding), opened *without recovery*: what
qpdf would have to reconstruct, a strict reader would not see. The check, in order (the first failure
is the reason):

1. **Object layer** (:func:`check_structure`): the file opens, every object in the cross-reference
   data resolves, and qpdf warned about none of them (a wrong offset, a bad ``/Length``, a broken xref
   stream are warnings, not errors, to qpdf when it reads lazily).
2. **Document**: the catalog's ``/Pages`` is a page tree, it has the expected number of pages, and the
   stamped page paints a form XObject that carries our stamp art. qpdf's own repairs of page-level
   details (a page without ``/Resources``) are tolerated: they are what every reader does, and the count
   and the stamp are checked on the result.
3. **Signature** (:func:`check_delivery`): the field ``eMeterai-<serial>`` exists, its value is a
   PAdES signature dictionary whose ``/ByteRange`` covers the whole file but its own ``/Contents``, the
   hex string qpdf parsed is the one in that gap, and the CMS in it is by our issuer certificate, over
   exactly those bytes (message digest recomputed here, signature verified with the certificate's key by
   ``cryptography``; neither pyHanko nor our CMS builder is involved).

The measurements that chose qpdf over pyHanko's validator and poppler are in ``docs/benchmarks.md``
("Delivery check"). Preflight runs steps 1-2 on its trial stamp, so a document that would fail is
rejected before payment (:func:`check_structure`).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from io import BytesIO

import pikepdf
from asn1crypto import cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

from shared.errors import PermanentError

_STAMP_ART = "/MeteraiArt"
_SIGNATURE_SUBFILTER = "/ETSI.CAdES.detached"
_PAINTS_FORM = re.compile(rb"(/[^\s/\[\]()<>{}%]+)\s+Do\s+Q\s*$")
_FIELD_WALK_LIMIT = 10_000  # form fields looked at; the kernel walks no more either
_DIGESTS: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512,
}
_BUYER_MESSAGE = (
    "Meterai tidak dapat dibubuhkan dengan aman karena struktur dokumen PDF rusak. Simpan ulang atau "
    "cetak ulang dokumen ke PDF, lalu unggah kembali."
)


class DeliveryCheckFailed(PermanentError):
    """The stamped file did not pass the independent re-read: never delivered (refund, or rejection in
    preflight). ``problem`` says what was wrong, in English, for logs; ``message`` is for the buyer."""

    code = "stamp_check_failed"

    def __init__(self, problem: str, *, code: str | None = None) -> None:
        super().__init__(_BUYER_MESSAGE, code=code)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.code}: {self.problem}"

    def __reduce__(self) -> tuple[object, ...]:
        # Crosses process boundaries like the kernel's exceptions; the default replays only ``args``.
        return (type(self), (self.problem,), {"code": self.code})


_STREAM_NAME = re.compile(r"(stream )?<_io\.BytesIO object at 0x[0-9a-f]+>:?\s*")


def _plain(exc: BaseException) -> str:
    """qpdf's message without the in-memory stream's address it names the file by."""
    return _STREAM_NAME.sub("", str(exc))[:300]


@contextmanager
def _opened(data: bytes) -> Iterator[pikepdf.Pdf]:
    try:
        pdf = pikepdf.open(BytesIO(data), attempt_recovery=False, suppress_warnings=True)
    except MemoryError:  # this process's trouble, not the document's: the caller retries
        raise
    except Exception as exc:  # qpdf raises PdfError; a hostile file may reach other paths
        raise DeliveryCheckFailed(f"does not open without recovery: {_plain(exc)}") from exc
    try:
        yield pdf
    finally:
        pdf.close()


def _check_objects(pdf: pikepdf.Pdf) -> None:
    """Every object the cross-reference data lists is where it says, and parses without a warning."""
    pdf.get_warnings()  # start from a clean slate: opening may already have warned
    try:
        for obj in pdf.objects:
            if obj is None:  # qpdf could not read the object at the offset given
                raise DeliveryCheckFailed("an object listed in the cross-reference data is unreadable")
    except (DeliveryCheckFailed, MemoryError):
        raise
    except Exception as exc:
        raise DeliveryCheckFailed(f"objects do not resolve: {_plain(exc)}") from exc
    warnings = pdf.get_warnings()
    if warnings:
        raise DeliveryCheckFailed(f"objects need repair: {_STREAM_NAME.sub('', str(warnings[0]))[:300]}")


def _stamp_form_name(page: pikepdf.Dictionary) -> str:
    """The name of the XObject the page's last content stream paints (the kernel's closing stream)."""
    contents = page.get("/Contents")
    last = contents[-1] if isinstance(contents, pikepdf.Array) and len(contents) else contents
    if not isinstance(last, pikepdf.Stream):
        raise DeliveryCheckFailed("the stamped page has no closing content stream")
    match = _PAINTS_FORM.search(last.read_bytes())
    if match is None:
        raise DeliveryCheckFailed("the stamped page does not paint a form at the end")
    return match.group(1).decode("latin-1")


def _check_stamped_page(pdf: pikepdf.Pdf, page: int, page_count: int | None) -> pikepdf.Dictionary:
    try:
        tree = pdf.Root.get("/Pages")
        if not isinstance(tree, pikepdf.Dictionary) or not isinstance(tree.get("/Kids"), pikepdf.Array):
            raise DeliveryCheckFailed("the catalog has no page tree")
        count = len(pdf.pages)
        if page_count is not None and count != page_count:
            raise DeliveryCheckFailed(f"{count} pages where {page_count} were expected")
        if not 1 <= page <= count:
            raise DeliveryCheckFailed(f"page {page} is missing ({count} pages)")
        stamped = pdf.pages[page - 1].obj
        name = _stamp_form_name(stamped)
        resources = stamped.get("/Resources")
        xobjects = resources.get("/XObject") if isinstance(resources, pikepdf.Dictionary) else None
        form = xobjects.get(name) if isinstance(xobjects, pikepdf.Dictionary) else None
        if not isinstance(form, pikepdf.Stream) or form.get("/Subtype") != "/Form":
            raise DeliveryCheckFailed(f"the stamped page's {name} is not a form XObject")
        inner = form.get("/Resources")
        inner_xobjects = inner.get("/XObject") if isinstance(inner, pikepdf.Dictionary) else None
        art = inner_xobjects.get(_STAMP_ART) if isinstance(inner_xobjects, pikepdf.Dictionary) else None
        if not isinstance(art, pikepdf.Stream) or art.get("/Subtype") != "/Form":
            raise DeliveryCheckFailed("the stamp form does not carry the stamp art")
    except (DeliveryCheckFailed, MemoryError):
        raise
    except Exception as exc:
        raise DeliveryCheckFailed(f"the page tree does not read: {_plain(exc)}") from exc
    return stamped


def check_structure(data: bytes, *, page: int, page_count: int | None = None) -> None:
    """Steps 1-2 of the module docstring: ``data`` opens strictly, every object resolves without a
    warning, it has ``page_count`` pages (when given) and page ``page`` carries our stamp.

    Raises :class:`DeliveryCheckFailed`.
    """
    with _opened(data) as pdf:
        _check_objects(pdf)
        _check_stamped_page(pdf, page, page_count)


def _signature_fields(pdf: pikepdf.Pdf) -> Iterator[pikepdf.Dictionary]:
    form = pdf.Root.get("/AcroForm")
    fields = form.get("/Fields") if isinstance(form, pikepdf.Dictionary) else None
    pending = list(fields) if isinstance(fields, pikepdf.Array) else []
    seen: set[tuple[int, int]] = set()
    while pending and len(seen) < _FIELD_WALK_LIMIT:
        field = pending.pop()
        if not isinstance(field, pikepdf.Dictionary):
            continue
        if field.is_indirect:
            if field.objgen in seen:
                continue
            seen.add(field.objgen)
        if field.get("/FT") == "/Sig":
            yield field
        kids = field.get("/Kids")
        if isinstance(kids, pikepdf.Array):
            pending.extend(kids)


def _signed_range(data: bytes, signature: pikepdf.Dictionary) -> tuple[int, int, bytes]:
    """(gap start, gap end, the CMS bytes): the byte range must leave out exactly ``/Contents``."""
    byte_range = signature.get("/ByteRange")
    if not isinstance(byte_range, pikepdf.Array) or len(byte_range) != 4:
        raise DeliveryCheckFailed("the signature has no byte range")
    start, first, second, length = (int(value) for value in byte_range)
    if start != 0 or first <= 0 or second <= first or length < 0 or second + length != len(data):
        raise DeliveryCheckFailed("the signature does not cover the whole file")
    gap = data[first:second]
    if len(gap) < 2 or gap[:1] != b"<" or gap[-1:] != b">":
        raise DeliveryCheckFailed("the byte range's gap is not the signature's hex string")
    try:
        blob = bytes.fromhex(gap[1:-1].decode("ascii"))
    except ValueError as exc:
        raise DeliveryCheckFailed("the signature's hex string is malformed") from exc
    contents = signature.get("/Contents")
    if not isinstance(contents, pikepdf.String) or bytes(contents) != blob:
        raise DeliveryCheckFailed("the parsed /Contents is not the string in the byte range's gap")
    return first, second, blob


@lru_cache(maxsize=8)
def _public_key(certificate_der: bytes) -> object:
    return x509.load_der_x509_certificate(certificate_der).public_key()


def _check_cms(blob: bytes, digest: Callable[[str], bytes], issuer: asn1_x509.Certificate) -> None:
    """One signer, our issuer (named, and its certificate embedded unchanged for readers that validate with
    it), signed attributes carrying the file's digest (``digest(algorithm)``, by the algorithm the
    signature names: SHA-256 or stronger), a signature that verifies with our issuer's key."""
    try:
        content = cms.ContentInfo.load(blob, strict=False)
        if content["content_type"].native != "signed_data":
            raise DeliveryCheckFailed("the signature is not CMS signed data")
        signed = content["content"]
        signer_infos = signed["signer_infos"]
        if len(signer_infos) != 1:
            raise DeliveryCheckFailed("the signature has more than one signer")
        info = signer_infos[0]
        sid = info["sid"].chosen
        # DER equality: the CMS names the issuer exactly as the certificate does (and asn1crypto's
        # semantic comparison of names costs more than the rest of the check).
        if sid["serial_number"].native != issuer.serial_number or sid["issuer"].dump() != issuer.issuer.dump():
            raise DeliveryCheckFailed("the signature is not by our issuer")
        embedded = [certificate.chosen.dump() for certificate in signed["certificates"]
                    if certificate.name == "certificate"
                    and certificate.chosen.serial_number == issuer.serial_number]
        if embedded != [issuer.dump()]:
            raise DeliveryCheckFailed("the signature does not carry our issuer's certificate")
        attributes = info["signed_attrs"]
        digests = [attribute["values"][0].native for attribute in attributes
                   if attribute["type"].native == "message_digest"]
        algorithm = info["digest_algorithm"]["algorithm"].native
        if algorithm not in _DIGESTS:
            raise DeliveryCheckFailed(f"the signature's digest {algorithm} is not SHA-256 or stronger")
        if digests != [digest(algorithm)]:
            raise DeliveryCheckFailed("the signed digest is not that of the file")
        signed_bytes = b"\x31" + attributes.dump()[1:]  # signed as SET OF, stored as [0] IMPLICIT
        signature = info["signature"].native
        signature_algorithm = info["signature_algorithm"]
        mechanism = signature_algorithm.signature_algo
        pss = signature_algorithm["parameters"].native if mechanism == "rsassa_pss" else None
    except (DeliveryCheckFailed, MemoryError):
        raise
    except Exception as exc:  # asn1crypto raises ValueError, TypeError, KeyError on odd DER
        raise DeliveryCheckFailed(f"the signature does not parse: {_plain(exc)}") from exc
    public_key = _public_key(issuer.dump())
    hashing = _DIGESTS[algorithm]()
    try:
        # Our signer makes RSA PKCS#1 v1.5 or ECDSA; the rest is what other standard CMS signers (pyHanko's,
        # the tests' reference) make with other keys, accepted so the check judges the file, not the key.
        if mechanism == "rsassa_pkcs1v15" and isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, signed_bytes, padding.PKCS1v15(), hashing)
        elif mechanism == "ecdsa" and isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, signed_bytes, ec.ECDSA(hashing))
        elif mechanism == "rsassa_pss" and isinstance(public_key, rsa.RSAPublicKey) and pss:
            pss_hash = _DIGESTS[pss["hash_algorithm"]["algorithm"]]()
            public_key.verify(signature, signed_bytes,
                              padding.PSS(mgf=padding.MGF1(pss_hash), salt_length=pss["salt_length"]),
                              pss_hash)
        elif mechanism == "ed25519" and isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, signed_bytes)
        elif mechanism == "ed448" and isinstance(public_key, ed448.Ed448PublicKey):
            public_key.verify(signature, signed_bytes)
        else:
            raise DeliveryCheckFailed(f"unexpected signature mechanism {mechanism}")
    except (InvalidSignature, KeyError, TypeError, ValueError) as exc:
        raise DeliveryCheckFailed("the signature value does not verify") from exc


def _check_signature(pdf: pikepdf.Pdf, data: bytes, serial: str, issuer: asn1_x509.Certificate) -> None:
    wanted = f"eMeterai-{serial}"
    try:
        ours = [field for field in _signature_fields(pdf) if str(field.get("/T", "")) == wanted]
        if len(ours) != 1:
            raise DeliveryCheckFailed(f"{len(ours)} signature fields named {wanted}")
        signature = ours[0].get("/V")
        if not isinstance(signature, pikepdf.Dictionary) or signature.get("/SubFilter") != _SIGNATURE_SUBFILTER:
            raise DeliveryCheckFailed("the field's value is not a PAdES signature")
        first, second, blob = _signed_range(data, signature)
    except (DeliveryCheckFailed, MemoryError):
        raise
    except Exception as exc:
        raise DeliveryCheckFailed(f"the signature field does not read: {_plain(exc)}") from exc
    def digest(algorithm: str) -> bytes:
        hashed = hashlib.new(algorithm, memoryview(data)[:first])
        hashed.update(memoryview(data)[second:])
        return hashed.digest()

    _check_cms(blob, digest, issuer)


def check_delivery(data: bytes, *, page: int, page_count: int | None, serial: str,
                   issuer: asn1_x509.Certificate) -> None:
    """The whole check of the module docstring on a stamped, signed file, before it may be delivered.

    ``issuer`` is the certificate that signs (the signer's, not the root). Raises
    :class:`DeliveryCheckFailed`.
    """
    with _opened(data) as pdf:
        _check_objects(pdf)
        _check_stamped_page(pdf, page, page_count)
        _check_signature(pdf, data, serial, issuer)


def source_is_sound(data: bytes) -> bool:
    """Whether qpdf reads every object of ``data`` where its cross-reference data says, without recovery
    or warning: only then may an incremental update point back at that data (see the kernel)."""
    try:
        with _opened(data) as pdf:
            _check_objects(pdf)
    except DeliveryCheckFailed:
        return False
    return True


def expected_page_count(data: bytes) -> int | None:
    """How many pages qpdf sees in the unstamped ``data`` when allowed to repair it (as a reader shows
    it to the buyer), or ``None`` if it can't open it even so: what the stamped file's count must be."""
    try:
        with pikepdf.open(BytesIO(data), suppress_warnings=True) as pdf:
            return len(pdf.pages)
    except MemoryError:
        raise
    except Exception:
        return None
