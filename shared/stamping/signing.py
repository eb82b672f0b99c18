"""Sign stamped documents: an X.509 signature (PAdES B-B, SHA-256) over the whole final file.

Why it is built this way:

* The signature is an incremental update appended after the stamp, so its byte range covers every byte
  of the stamped document except its own ``/Contents``. Anything appended later (another incremental
  update, a pasted page) leaves the signature covering only a revision, which verification refuses.
* The signature field is named ``eMeterai-<serial>`` and the serial is repeated in ``/Reason``, so a
  verifier can tell which serial a signature vouches for without a database.
* Key and certificate are read once per process and cached (:func:`signer_from_settings`): a worker
  signs many documents, and re-reading and parsing a PEM key per document would be wasted work.
* Without configured key material a development PKI is made on first use: a self-signed root CA and an
  issuer certificate signed by it, under ``<data_dir>/pki/``. Several worker processes start together,
  so generation happens under an exclusive file lock and every file lands by atomic rename. The root's
  private key is thrown away once it has issued the issuer certificate: a copied data folder can't mint
  new issuers. Production sets ``SIGNING_DEV_PKI=0`` and points the ``SIGNING_*`` paths at real files;
  then missing files are an error, never a silently new, untrusted CA.
* Signing is our own fast path (:func:`stamp_and_sign`, :func:`sign_pdf`): the signature field, its
  widget and the signature dictionary join the stamp's incremental update (one update, one pass), with
  a fixed-size ``/Contents`` placeholder; the two byte ranges around it are hashed and the CMS blob is
  assembled from per-process parts (:mod:`.cms`) and written into the placeholder in place. pyHanko's
  signer remains for what the fast path doesn't do (documents rewritten whole by the kernel, keys
  other than RSA PKCS#1 v1.5 or ECDSA); pyHanko's validator is what verification uses, either way.
* A missing or unreadable key is the signer's fault, not the buyer's: :class:`SigningUnavailable` is a
  :class:`TransientError`, so the order is retried, not refunded. A document pyHanko can't parse is the
  document's fault: :class:`DocumentUnreadable` (permanent).
"""
from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import os
import re
import threading
import uuid
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyhanko.keys import load_cert_from_pemder, load_private_key_from_pemder
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.sign import fields, signers
from pyhanko.sign.general import SigningError
from pyhanko_certvalidator.registry import SimpleCertificateStore
from pyhanko_certvalidator.util import get_pyca_cryptography_hash
from pypdf import PdfReader
from pypdf.generic import ArrayObject, DictionaryObject, IndirectObject, NameObject, NumberObject

from shared.config import DEV_PKI_ORGANIZATION, Settings
from shared.errors import TransientError

from . import art
from .cms import CmsTemplate
from .incremental import IncrementalUpdate, serialize
from .kernel import (
    STAMP_SIZE,
    DocumentRejected,
    DocumentUnreadable,
    bounded_parsing,
    can_update_incrementally,
    open_update,
    prepare_stamp,
    read_document,
    stamp_document,
)

FIELD_PREFIX = "eMeterai-"
FIELD_NAME = re.compile(r"^eMeterai-([0-9A-Z]{22})$")
_SERIAL = re.compile(r"^[0-9A-Z]{22}$")
REASON_PREFIX = "e-Meterai "
LOCATION = "Indonesia"

DEV_CA_NAME = "meterai Development Root CA"
DEV_ISSUER_NAME = "meterai Development e-Meterai Issuer"
_DEV_CA_YEARS = 20
_DEV_ISSUER_YEARS = 10


class SigningUnavailable(TransientError):
    """The signing key or certificate can't be used right now (missing, unreadable, wrong passphrase)."""

    code = "signing_unavailable"


@dataclass(frozen=True)
class PkiPaths:
    key: Path
    cert: Path
    ca_cert: Path

    def all(self) -> tuple[Path, Path, Path]:
        return (self.key, self.cert, self.ca_cert)


@dataclass(frozen=True)
class Signer:
    """Key material for signing, loaded once: the issuer key and certificate plus the root above it."""

    cms_signer: signers.SimpleSigner
    certificate: asn1_x509.Certificate
    ca_certificate: asn1_x509.Certificate
    # Room for the CMS blob in /Contents, in hex digits (two per byte), as pyHanko counts it. Fixed per
    # signer, so pyHanko needn't build a throwaway signature per document just to measure it: the
    # certificates, the raw signature and the signed attributes, with generous slack (unused room is
    # zero padding after the DER value).
    bytes_reserved: int = 16384
    # The fixed parts of our CMS signature, for the fast path; None for keys it doesn't handle.
    template: CmsTemplate | None = None

    @property
    def subject(self) -> str:
        return self.certificate.subject.human_friendly


def pki_paths(settings: Settings) -> PkiPaths:
    """The configured files, each defaulting to ``<data_dir>/pki/``."""
    folder = Path(settings.data_dir) / "pki"
    return PkiPaths(
        key=Path(settings.signing_key_path or folder / "issuer-key.pem"),
        cert=Path(settings.signing_cert_path or folder / "issuer-cert.pem"),
        ca_cert=Path(settings.signing_ca_cert_path or folder / "ca-cert.pem"),
    )


# --- the development PKI -------------------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "ID"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEV_PKI_ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _dev_certificates(passphrase: str) -> tuple[bytes, bytes, bytes]:
    """(issuer key PEM, issuer certificate PEM, root certificate PEM), freshly made."""
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ca_name = _name(DEV_CA_NAME)
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=365 * _DEV_CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    issuer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(DEV_ISSUER_NAME)).issuer_name(ca_name)
        .public_key(issuer_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=365 * _DEV_ISSUER_YEARS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=True, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(issuer_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase
        else serialization.NoEncryption()
    )
    key_pem = issuer_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       encryption)
    pem = serialization.Encoding.PEM
    return key_pem, issuer_cert.public_bytes(pem), ca_cert.public_bytes(pem)


def _write_temp(path: Path, data: bytes, mode: int) -> Path:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_pki(paths: PkiPaths, *, dev_pki: bool = True, passphrase: str = "") -> bool:
    """Make sure the key, certificate and root certificate exist; True if this call created them.

    Creates a development PKI only when *none* of the three files exists (so a typo in one configured
    path never overwrites real key material) and ``dev_pki`` allows it. Safe when several processes
    call it at once: the first takes the lock and writes, the others wait and then find the files.
    """
    if all(p.exists() for p in paths.all()):
        return False
    if not dev_pki:
        missing = ", ".join(str(p) for p in paths.all() if not p.exists())
        raise SigningUnavailable(f"Signing key material is missing: {missing}.")
    lock_dir = paths.key.parent
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        for p in paths.all():
            p.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / ".pki.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                present = [p for p in paths.all() if p.exists()]
                if len(present) == 3:
                    return False  # another process made them while we waited
                if present:
                    raise SigningUnavailable(
                        "Signing key material is incomplete; refusing to generate over "
                        + ", ".join(str(p) for p in present) + ".")
                key_pem, cert_pem, ca_pem = _dev_certificates(passphrase)
                # Everything is on disk before the first rename, so only a crash between three
                # renames could leave a partial set, and that is reported, never papered over.
                temps = [(_write_temp(paths.ca_cert, ca_pem, 0o644), paths.ca_cert),
                         (_write_temp(paths.cert, cert_pem, 0o644), paths.cert),
                         (_write_temp(paths.key, key_pem, 0o600), paths.key)]
                for tmp, final in temps:
                    os.replace(tmp, final)
                for folder in {p.parent for p in paths.all()}:
                    _fsync_dir(folder)
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError as exc:
        raise SigningUnavailable(f"Can't create the development PKI: {exc}") from exc


# --- loading, once per process -------------------------------------------------------------------

class _LoadedKeySigner(signers.SimpleSigner):
    """pyHanko's SimpleSigner parses the private key again for every signature it makes (twice per
    document: once to size the signature, once for real), and OpenSSL's consistency checks on an RSA
    key cost ~50 ms each time. This keeps the parsed key for the life of the process."""

    def __init__(self, *, private_key: PrivateKeyTypes, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._private_key = private_key

    def sign_raw(self, data: bytes, digest_algorithm: str) -> bytes:
        mechanism = self.get_signature_mechanism_for_digest(digest_algorithm).signature_algo
        key = self._private_key
        digest = get_pyca_cryptography_hash(digest_algorithm)
        if mechanism == "rsassa_pkcs1v15" and isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, padding.PKCS1v15(), digest)
        if mechanism == "ecdsa" and isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(digest))
        return super().sign_raw(data, digest_algorithm)  # rarer mechanisms: pyHanko's own path


_cache: dict[tuple[str, str, str, str], Signer] = {}
_trust_cache: dict[tuple[str, str, str], asn1_x509.Certificate] = {}
_cache_lock = threading.Lock()


def load_signer(paths: PkiPaths, passphrase: str = "") -> Signer:
    """Read the key and certificates from disk (no caching; see :func:`signer_from_settings`)."""
    try:
        key = load_private_key_from_pemder(str(paths.key), passphrase=passphrase.encode() or None)
        cert = load_cert_from_pemder(str(paths.cert))
        ca_cert = load_cert_from_pemder(str(paths.ca_cert))
    except (OSError, ValueError, TypeError) as exc:
        raise SigningUnavailable(f"Can't load the signing key or certificate: {type(exc).__name__}: "
                                 f"{exc}") from exc
    try:
        private_key = serialization.load_der_private_key(key.dump(), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningUnavailable(f"Unusable signing key: {exc}") from exc
    registry = SimpleCertificateStore.from_certs([ca_cert])
    cms_signer = _LoadedKeySigner(signing_cert=cert, signing_key=key, cert_registry=registry,
                                  private_key=private_key)
    certificates = len(cert.dump()) + len(ca_cert.dump())
    raw_signature = (getattr(private_key, "key_size", 4096) + 7) // 8 * 2  # ECDSA DER < 2x key size
    template = CmsTemplate.build(private_key, cms_signer.get_signature_mechanism_for_digest("sha256"),
                                 cert, (ca_cert,))
    return Signer(cms_signer=cms_signer, certificate=cert, ca_certificate=ca_cert,
                  bytes_reserved=2 * (certificates + raw_signature + 4096), template=template)


def signer_from_settings(settings: Settings) -> Signer:
    """The process-wide signer for these settings, made (and the dev PKI generated) on first use."""
    paths = pki_paths(settings)
    cache_key = (str(paths.key), str(paths.cert), str(paths.ca_cert), settings.signing_key_passphrase)
    cached = _cache.get(cache_key)
    if cached is not None:
        return cached
    with _cache_lock:
        cached = _cache.get(cache_key)
        if cached is None:
            ensure_pki(paths, dev_pki=bool(settings.signing_dev_pki),
                       passphrase=settings.signing_key_passphrase)
            cached = _cache[cache_key] = load_signer(paths, settings.signing_key_passphrase)
    return cached


def trust_root_from_settings(settings: Settings) -> asn1_x509.Certificate:
    """The root certificate verification trusts. Reads only the public certificate, never the key."""
    paths = pki_paths(settings)
    cache_key = (str(paths.key), str(paths.cert), str(paths.ca_cert))
    cached = _trust_cache.get(cache_key)
    if cached is not None:
        return cached
    with _cache_lock:
        cached = _trust_cache.get(cache_key)
        if cached is None:
            ensure_pki(paths, dev_pki=bool(settings.signing_dev_pki),
                       passphrase=settings.signing_key_passphrase)
            try:
                cached = _trust_cache[cache_key] = load_cert_from_pemder(str(paths.ca_cert))
            except (OSError, ValueError) as exc:
                raise SigningUnavailable(f"Can't load the root certificate: {exc}") from exc
    return cached


# --- signing -------------------------------------------------------------------------------------

def field_name(serial: str) -> str:
    return FIELD_PREFIX + serial


def serial_from_field_name(name: str | None) -> str | None:
    match = FIELD_NAME.match(name or "")
    return match.group(1) if match else None


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
    assert signer.template is not None
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
        raise SigningError("signature larger than the room reserved for it")
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

    The same result as :func:`~shared.stamping.stamp_document` followed by :func:`sign_pdf`, and the same
    errors: :class:`DocumentUnreadable` / :class:`DocumentRejected` (permanent), ``ValueError`` for a
    malformed serial or URL.
    """
    if not _SERIAL.match(serial):
        raise ValueError(f"malformed serial {serial!r}")
    art.qr_matrix(verify_url)  # a caller's bad URL is a ValueError, not the document's fault
    if signer.template is not None:
        with bounded_parsing():
            try:
                reader = read_document(data)
                prepared = prepare_stamp(reader, page=page, x=x, y=y, serial=serial, verify_url=verify_url,
                                         size=size)
                if prepared is not None:
                    _add_signature_field(prepared.update, reader, prepared.page_ref, prepared.page, serial,
                                         signer.bytes_reserved)
                    return _seal(prepared.render(), signer)
            except DocumentRejected as exc:
                if exc.code in ("unreadable", "encrypted"):
                    raise DocumentUnreadable() from exc
                raise
            except Exception as exc:
                raise DocumentUnreadable() from exc
    stamped = stamp_document(data, page=page, x=x, y=y, serial=serial, verify_url=verify_url, size=size)
    return sign_pdf(stamped, signer, serial=serial)


def sign_pdf(data: bytes, signer: Signer, *, serial: str) -> bytes:
    """``data`` with our signature appended as an incremental update covering the whole file.

    Raises :class:`DocumentUnreadable` (permanent) if the document can't be parsed or signed,
    ``ValueError`` for a malformed serial.
    """
    if not _SERIAL.match(serial):
        raise ValueError(f"malformed serial {serial!r}")
    if signer.template is not None:
        with bounded_parsing():
            try:
                reader = read_document(data)
                if can_update_incrementally(reader):
                    update, page_ref, first_page = open_update(reader, 1)
                    _add_signature_field(update, reader, page_ref, first_page, serial, signer.bytes_reserved)
                    update.put(page_ref, serialize(first_page))
                    return _seal(update.render(), signer)
            except DocumentRejected as exc:
                raise DocumentUnreadable("Dokumen PDF tidak dapat ditandatangani.") from exc
            except Exception as exc:
                raise DocumentUnreadable("Dokumen PDF tidak dapat ditandatangani.") from exc
    return _sign_with_pyhanko(data, signer, serial=serial)


def _sign_with_pyhanko(data: bytes, signer: Signer, *, serial: str) -> bytes:
    """pyHanko's signer: for documents or keys the fast path leaves alone."""
    metadata = signers.PdfSignatureMetadata(
        field_name=field_name(serial),
        md_algorithm="sha256",
        subfilter=fields.SigSeedSubFilter.PADES,
        reason=REASON_PREFIX + serial,
        location=LOCATION,
    )
    try:
        # The kernel never hands us an encrypted file: a full rewrite drops the encryption of an
        # owner-password document, and a signed, encrypted one is refused before payment.
        writer = IncrementalPdfFileWriter(BytesIO(data), strict=False)
        output = signers.PdfSigner(metadata, signer=signer.cms_signer).sign_pdf(
            writer, bytes_reserved=signer.bytes_reserved)
    except MemoryError:
        raise
    except Exception as exc:  # PdfError, SigningError, and on a crafted file AssertionError and others
        raise DocumentUnreadable("Dokumen PDF tidak dapat ditandatangani.") from exc
    return output.getvalue()
