"""Where the signing key and certificates are, and the root certificate verification trusts.

Why apart from the signer: verification runs in the web process, which must not load the signer's
libraries, yet needs the root certificate (its bytes go to the sandbox child that validates). And the
development tooling (:mod:`shared.devtools.pki`) writes its CA exactly where production reads key
material, so both ask :func:`pki_paths`.

Production only *loads* key material. Missing or unreadable files are :class:`SigningUnavailable`, a
:class:`TransientError` (the signer's fault, not the buyer's: the order is retried, not refunded), never a
new CA made on the spot.
"""
from __future__ import annotations

import base64
import binascii
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from shared.config import Settings
from shared.errors import TransientError

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.DOTALL)


class SigningUnavailable(TransientError):
    """The signing key or certificate can't be used right now (missing, unreadable, wrong passphrase,
    a key type we can't sign with)."""

    code = "signing_unavailable"


@dataclass(frozen=True)
class PkiPaths:
    key: Path
    cert: Path
    ca_cert: Path

    def all(self) -> tuple[Path, Path, Path]:
        return (self.key, self.cert, self.ca_cert)


def pki_paths(settings: Settings) -> PkiPaths:
    """The configured files, each defaulting to ``<data_dir>/pki/``."""
    folder = Path(settings.data_dir) / "pki"
    return PkiPaths(
        key=Path(settings.signing_key_path or folder / "issuer-key.pem"),
        cert=Path(settings.signing_cert_path or folder / "issuer-cert.pem"),
        ca_cert=Path(settings.signing_ca_cert_path or folder / "ca-cert.pem"),
    )


def certificate_der(data: bytes) -> bytes:
    """The first certificate of a PEM file, or the bytes themselves when they are DER already."""
    match = _PEM_CERTIFICATE.search(data)
    if match is None:
        return data
    try:
        return base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("malformed PEM certificate") from exc


_trust_roots: dict[str, bytes] = {}
_trust_lock = threading.Lock()


def trust_root_der(settings: Settings) -> bytes:
    """The root certificate verification trusts, DER-encoded, read once per process. Only the public
    certificate is read, never the key."""
    path = str(pki_paths(settings).ca_cert)
    cached = _trust_roots.get(path)
    if cached is not None:
        return cached
    with _trust_lock:
        if path not in _trust_roots:
            try:
                der = certificate_der(Path(path).read_bytes())
            except (OSError, ValueError) as exc:
                raise SigningUnavailable(f"Can't load the root certificate {path}: {exc}") from exc
            if not der.startswith(b"\x30"):
                raise SigningUnavailable(f"The root certificate {path} is neither PEM nor DER.")
            _trust_roots[path] = der
        return _trust_roots[path]
