"""Sign stamped documents: an X.509 signature (PAdES B-B, SHA-256) over the whole final file.

Why it is built this way:

* The signature is an incremental update appended after the stamp, so its byte range covers every byte
  of the stamped document except its own ``/Contents``. Anything appended later (another incremental
  update, a pasted page) leaves the signature covering only a revision, which verification refuses.
* The signature field is named ``eMeterai-<serial>`` and the serial is repeated in ``/Reason``
  (:mod:`.fields`), so a verifier can tell which serial a signature vouches for without a database.
* One signing route: the signature field, its widget and the signature dictionary join the stamp's
  incremental update (one update, one pass, :func:`stamp_and_sign`), with a fixed-size ``/Contents``
  placeholder; the two byte ranges around it are hashed and the CMS blob is assembled from per-process
  parts (:mod:`.cms`) and written into the placeholder in place. pyHanko's signer is what the tests
  compare this against (``tests/reference_signer.py``); pyHanko's validator is what verification uses.
* Key and certificates are read once per process and cached (:func:`signer_from_settings`): a worker
  signs many documents, and re-reading and parsing a PEM key per document would be wasted work. A key
  our CMS can't sign with (anything but RSA PKCS#1 v1.5 and ECDSA) is refused when it is loaded, not at
  the first document.
* Production only loads key material (:mod:`.key_material`): missing, unreadable or unusable files are
  :class:`SigningUnavailable`, a :class:`TransientError`, so the order is retried, not refunded. The
  development CA is made by the tooling before processes start (``shared/devtools/pki.py``). A document
  that can't be stamped or signed is the document's fault: :class:`DocumentUnreadable` (permanent).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import threading
from dataclasses import dataclass

from asn1crypto import algos
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from pypdf import PdfReader
from pypdf.generic import ArrayObject, DictionaryObject, IndirectObject, NameObject, NumberObject

from shared.config import Settings

from . import art
from .cms import CmsTemplate
from .fields import LOCATION, REASON_PREFIX, SERIAL, field_name
from .incremental import IncrementalUpdate, serialize
from .kernel import UNREADABLE_NOW, open_update, prepare_any
from .key_material import PkiPaths, SigningUnavailable, certificate_der, pki_paths
from .reading import bounded_parsing, can_update_incrementally, read_document
from .verdicts import STAMP_SIZE, DocumentRejected, DocumentUnreadable

__all__ = ["PkiPaths", "Signer", "SigningUnavailable", "load_signer", "pki_paths", "sign_pdf",
           "signer_from_settings", "stamp_and_sign"]

_CANT_SIGN = "Dokumen PDF tidak dapat ditandatangani."


@dataclass(frozen=True)
class Signer:
    """Key material for signing, loaded once: the issuer's CMS template (its key inside), its certificate
    and the root above it."""

    template: CmsTemplate
    certificate: asn1_x509.Certificate
    ca_certificate: asn1_x509.Certificate
    # Room for the CMS blob in /Contents, in hex digits (two per byte). Fixed per signer: the
    # certificates, the raw signature and the signed attributes, with generous slack (unused room is
    # zero padding after the DER value).
    bytes_reserved: int = 16384

    @property
    def subject(self) -> str:
        return self.certificate.subject.human_friendly


# --- loading, once per process -------------------------------------------------------------------

def _load_private_key(data: bytes, passphrase: str) -> PrivateKeyTypes:
    password = passphrase.encode() or None
    if b"-----BEGIN" in data:
        return serialization.load_pem_private_key(data, password=password)
    return serialization.load_der_private_key(data, password=password)


def _certificate(data: bytes) -> asn1_x509.Certificate:
    """A certificate from PEM or DER, its names and key parsed now: a broken file is an error at load
    time, not at the first signature."""
    certificate = asn1_x509.Certificate.load(certificate_der(data))
    _ = certificate.subject, certificate.issuer, certificate.serial_number, certificate.public_key
    return certificate


def _mechanism(private_key: PrivateKeyTypes) -> algos.SignedDigestAlgorithm:
    """The signature algorithm our CMS makes with this key (the same pyHanko would choose)."""
    if isinstance(private_key, rsa.RSAPrivateKey):
        return algos.SignedDigestAlgorithm({"algorithm": "sha256_rsa"})
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return algos.SignedDigestAlgorithm({"algorithm": "sha256_ecdsa"})
    raise SigningUnavailable(
        f"The signing key is {type(private_key).__name__.lstrip('_')}; e-Meterai stamps are signed with an "
        "RSA (PKCS#1 v1.5) or ECDSA key only. Configure such a key for SIGNING_KEY_PATH.")


def load_signer(paths: PkiPaths, passphrase: str = "") -> Signer:
    """Read the key and certificates from disk (no caching; see :func:`signer_from_settings`).

    Raises :class:`SigningUnavailable` for missing or unreadable files, a wrong passphrase, or a key type
    the signer can't use.
    """
    try:
        private_key = _load_private_key(paths.key.read_bytes(), passphrase)
        cert = _certificate(paths.cert.read_bytes())
        ca_cert = _certificate(paths.ca_cert.read_bytes())
        template = CmsTemplate.build(private_key, _mechanism(private_key), cert, (ca_cert,))
    except (OSError, ValueError, TypeError) as exc:
        raise SigningUnavailable(f"Can't load the signing key or certificate: {type(exc).__name__}: "
                                 f"{exc}") from exc
    if template is None:
        raise SigningUnavailable("The signing key does not fit the signature mechanism it was given.")
    certificates = len(cert.dump()) + len(ca_cert.dump())
    raw_signature = (getattr(private_key, "key_size", 4096) + 7) // 8 * 2  # ECDSA DER < 2x key size
    return Signer(template=template, certificate=cert, ca_certificate=ca_cert,
                  bytes_reserved=2 * (certificates + raw_signature + 4096))


_cache: dict[tuple[str, str, str, str], Signer] = {}
_cache_lock = threading.Lock()


def signer_from_settings(settings: Settings) -> Signer:
    """The process-wide signer for these settings, loaded on first use."""
    paths = pki_paths(settings)
    cache_key = (str(paths.key), str(paths.cert), str(paths.ca_cert), settings.signing_key_passphrase)
    cached = _cache.get(cache_key)
    if cached is not None:
        return cached
    with _cache_lock:
        cached = _cache.get(cache_key)
        if cached is None:
            missing = [str(path) for path in paths.all() if not path.exists()]
            if missing:
                raise SigningUnavailable(f"Signing key material is missing: {', '.join(missing)}.")
            cached = _cache[cache_key] = load_signer(paths, settings.signing_key_passphrase)
    return cached


# --- signing -------------------------------------------------------------------------------------

def _pdf_date(moment: dt.datetime) -> bytes:
    return moment.strftime("D:%Y%m%d%H%M%S+00'00'").encode("ascii")


_BYTE_RANGE_WIDTH = 48  # "[0 a b c]" padded with spaces; four ten-digit numbers fit
_WIDGET_FLAGS = 132  # print + locked: an invisible widget nobody can move or delete by accident


def _add_signature_field(update: IncrementalUpdate, reader: PdfReader, page_ref: IndirectObject,
                         page: DictionaryObject, serial: str, hex_digits: int) -> None:
    """Field + widget on ``page``, listed in the AcroForm, and the signature dictionary with placeholders.

    ``page`` is the new dictionary of the page; the caller writes it. The form dictionary is copied and
    written anew (in place of the old object, or in a new catalog when the form was a direct entry).
    """
    signature_ref = update.reserve()
    widget_ref = update.add(
        b"<< /Type /Annot /Subtype /Widget /FT /Sig /T (" + field_name(serial).encode("ascii")
        + b") /F %d /Rect [0 0 0 0] /P " % _WIDGET_FLAGS + serialize(page_ref)
        + b" /V " + serialize(signature_ref) + b" >>")
    annotations = page.get("/Annots")
    annotations = annotations.get_object() if annotations is not None else None
    existing = list(annotations) if isinstance(annotations, ArrayObject) else []
    page[NameObject("/Annots")] = ArrayObject([*existing, widget_ref])

    root_ref = reader.trailer.raw_get("/Root")
    if not isinstance(root_ref, IndirectObject):
        raise ValueError("document catalog is not an indirect object")
    root = root_ref.get_object()
    form_raw = root.raw_get("/AcroForm") if "/AcroForm" in root else None
    form_value = form_raw.get_object() if form_raw is not None else None
    form = DictionaryObject(form_value) if isinstance(form_value, DictionaryObject) else DictionaryObject()
    fields = form.get("/Fields")
    fields = fields.get_object() if fields is not None else None
    form[NameObject("/Fields")] = ArrayObject([*(fields if isinstance(fields, ArrayObject) else []), widget_ref])
    form[NameObject("/SigFlags")] = NumberObject(3)  # signatures exist; append only
    if isinstance(form_raw, IndirectObject) and isinstance(form_value, DictionaryObject):
        update.put(form_raw, serialize(form))
    else:
        catalog = DictionaryObject(root)
        catalog[NameObject("/AcroForm")] = update.add(serialize(form))
        update.put(root_ref, serialize(catalog))

    update.put(signature_ref, b"".join((
        b"<< /Type /Sig /Filter /Adobe.PPKLite /SubFilter /ETSI.CAdES.detached /M (",
        _pdf_date(dt.datetime.now(dt.timezone.utc)),
        b") /Location (", LOCATION.encode("ascii"), b") /Reason (", (REASON_PREFIX + serial).encode("ascii"),
        b") /ByteRange ", b"[0 0 0 0]".ljust(_BYTE_RANGE_WIDTH),
        b" /Contents <", b"0" * hex_digits, b"> >>",
    )))


def _seal(output: bytearray, signer: Signer) -> bytes:
    """Fill in the byte ranges, hash them and write the CMS signature into the placeholder, in place."""
    range_at = output.rindex(b"/ByteRange [0 0 0 0]") + len(b"/ByteRange ")
    contents_at = output.index(b"/Contents <", range_at) + len(b"/Contents ")
    contents_end = output.index(b">", contents_at) + 1
    byte_range = b"[0 %d %d %d]" % (contents_at, contents_end, len(output) - contents_end)
    output[range_at:range_at + _BYTE_RANGE_WIDTH] = byte_range.ljust(_BYTE_RANGE_WIDTH)
    view = memoryview(output)
    digest = hashlib.sha256(view[:contents_at])
    digest.update(view[contents_end:])
    view.release()
    blob = signer.template.signed_data(digest.digest()).hex().encode("ascii")
    if len(blob) > contents_end - contents_at - 2:
        raise ValueError("signature larger than the room reserved for it")
    output[contents_at + 1:contents_at + 1 + len(blob)] = blob
    return bytes(output)


def stamp_and_sign(
    data: bytes,
    signer: Signer,
    *,
    page: int,
    x: float,
    y: float,
    serial: str,
    verify_url: str,
    size: float = STAMP_SIZE,
) -> bytes:
    """``data`` stamped for ``serial`` and signed, in one incremental update whose signature covers it all.

    Errors as :func:`~shared.stamping.kernel.stamp_document`'s: :class:`DocumentUnreadable` /
    :class:`DocumentRejected` (permanent), ``ValueError`` for a malformed serial or URL.
    """
    if not SERIAL.match(serial):
        raise ValueError(f"malformed serial {serial!r}")
    art.qr_matrix(verify_url)  # a caller's bad URL is a ValueError, not the document's fault
    with bounded_parsing():
        try:
            prepared = prepare_any(read_document(data), page=page, x=x, y=y, serial=serial,
                                   verify_url=verify_url, size=size)
            _add_signature_field(prepared.update, prepared.update.reader, prepared.page_ref, prepared.page,
                                 serial, signer.bytes_reserved)
            return _seal(prepared.render(), signer)
        except DocumentRejected as exc:
            if exc.code in UNREADABLE_NOW:
                raise DocumentUnreadable() from exc
            raise
        except Exception as exc:
            raise DocumentUnreadable() from exc


def sign_pdf(data: bytes, signer: Signer, *, serial: str) -> bytes:
    """``data`` (already stamped) with our signature appended as an incremental update covering the
    whole file, by the same route as :func:`stamp_and_sign`.

    Raises :class:`DocumentUnreadable` (permanent) if the document can't be parsed or take the update,
    ``ValueError`` for a malformed serial.
    """
    if not SERIAL.match(serial):
        raise ValueError(f"malformed serial {serial!r}")
    with bounded_parsing():
        try:
            reader = read_document(data)
            if not can_update_incrementally(reader):
                raise DocumentUnreadable(_CANT_SIGN)
            update, page_ref, first_page = open_update(reader, 1)
            _add_signature_field(update, reader, page_ref, first_page, serial, signer.bytes_reserved)
            update.put(page_ref, serialize(first_page))
            return _seal(update.render(), signer)
        except DocumentUnreadable:
            raise
        except Exception as exc:
            raise DocumentUnreadable(_CANT_SIGN) from exc
