"""The development CA: a root and an issuer certificate made on a development machine, never in production.

Why in the tooling: production only loads key material (``shared/stamping/key_material.py``); a signer
that made itself a CA whenever files were missing would, on a misconfigured server, sign real stamps
with a CA nobody trusts. So ``./dev up``, the test fixtures, the drills and the kernel benchmark call
:func:`ensure_dev_pki` (or run ``python -m shared.devtools.pki``) before any process that signs or
verifies starts. The files land where production reads them (:func:`~shared.stamping.key_material.pki_paths`:
``SIGNING_*_PATH``, else ``<DATA_DIR>/pki/``; key material given as ``SIGNING_*_PEM`` is never made);
every certificate names the organisation
:data:`~shared.config.DEV_PKI_ORGANIZATION`, by which production refuses a copied development root.

Several processes may start together, so generation happens under an exclusive file lock and every file
lands by atomic rename. The root's private key is thrown away once it has issued the issuer
certificate: a copied data folder can't mint new issuers.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import os
import sys
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.config import DEV_PKI_ORGANIZATION, Settings, load_settings
from shared.stamping.key_material import PkiPaths, SigningUnavailable, pki_paths

DEV_CA_NAME = "meterai Development Root CA"
DEV_ISSUER_NAME = "meterai Development e-Meterai Issuer"
_DEV_CA_YEARS = 20
_DEV_ISSUER_YEARS = 10


def ensure_dev_pki(settings: Settings) -> bool:
    """The development CA at the paths ``settings`` sign with, made unless all three files exist;
    True if this call made it. Nothing is made with ``SIGNING_DEV_PKI=0`` (real key material is
    configured). Raises :class:`SigningUnavailable` for partial key material or an unwritable folder.
    """
    if not settings.signing_dev_pki:
        return False
    return ensure_pki(pki_paths(settings), passphrase=settings.signing_key_passphrase)


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


def ensure_pki(paths: PkiPaths, *, passphrase: str = "") -> bool:
    """Make sure the key, certificate and root certificate exist; True if this call created them.

    Creates a development PKI only when *none* of the three files exists (so a typo in one configured
    path never overwrites real key material). Safe when several processes call it at once: the first
    takes the lock and writes, the others wait and then find the files.
    """
    if all(p.exists() for p in paths.all()):
        return False
    if len(paths.files()) < 3:  # some come from the environment (SIGNING_*_PEM): configured, never made
        raise SigningUnavailable(
            "Signing key material is incomplete; refusing to generate beside key material given in the "
            "environment: missing " + ", ".join(str(p) for p in paths.all() if not p.exists()) + ".")
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


def main() -> int:
    """``python -m shared.devtools.pki``: :func:`ensure_dev_pki` for the environment, as the processes
    started with it will read it (for tooling that must not import the core itself, such as the drills)."""
    settings = load_settings()
    try:
        made = ensure_dev_pki(settings)
    except SigningUnavailable as exc:
        print(f"development CA: {exc.message}", file=sys.stderr)
        return 1
    paths = pki_paths(settings)
    if made:
        print(f"development CA made in {paths.ca_cert.parent}")
    elif not settings.signing_dev_pki:
        print("development CA: SIGNING_DEV_PKI=0, nothing made")
    else:
        print(f"development CA: key material already in place ({paths.ca_cert})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
