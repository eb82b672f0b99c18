"""Where the signing key and certificates come from, and the root certificate verification trusts.

Why apart from the signer: verification runs in the web process, which must not load the signer's
libraries, yet needs the root certificate (its bytes go to the sandbox child that validates). And the
development tooling (:mod:`shared.devtools.pki`) writes its CA exactly where production reads key
material, so both ask :func:`pki_paths`.

Each of the three items (the issuer's private key, its certificate, the root certificate) comes from
a file (``SIGNING_KEY_PATH``, ``SIGNING_CERT_PATH``, ``SIGNING_CA_CERT_PATH``; empty: ``<DATA_DIR>/pki/``)
or, for a container platform that injects secrets as environment variables, from PEM text
(``SIGNING_KEY_PEM``, ``SIGNING_CERT_PEM``, ``SIGNING_CA_CERT_PEM``). Both are read the same way
(:class:`InlinePem` answers ``read_bytes()`` and ``exists()`` like a :class:`~pathlib.Path`), so the
signer and the verification never ask which. A path *and* a PEM for the same item is refused when the
settings are built (:class:`~shared.config.Settings`). Every node of a deployment is given the same
items: nothing here is made, cached on disk or kept per node.

Production only *loads* key material. Missing or unreadable files are :class:`SigningUnavailable`, a
:class:`TransientError` (the signer's fault, not the buyer's: the order is retried, not refunded), never a
new CA made on the spot; :func:`key_material_problems` says at start-up what can't be loaded.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from shared.config import Settings
from shared.errors import TransientError

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.DOTALL)
_PEM_ANY = re.compile(rb"-----BEGIN [A-Z0-9 ]+-----")


class SigningUnavailable(TransientError):
    """The signing key or certificate can't be used right now (missing, unreadable, wrong passphrase,
    a key type we can't sign with)."""

    code = "signing_unavailable"


@dataclass(frozen=True)
class InlinePem:
    """One item of key material given as PEM text in the environment (``variable``), read like a file.

    ``str()`` names the variable and a fingerprint of its text, never the text (it lands in logs and
    error messages, and the key is a secret)."""

    variable: str
    text: str

    def read_bytes(self) -> bytes:
        # Platforms that can't hold newlines in a variable often pass them as the two characters "\n".
        data = self.text.replace("\\n", "\n").strip().encode()
        return data + b"\n"

    def exists(self) -> bool:
        return bool(self.text.strip())

    def __str__(self) -> str:
        return f"${self.variable} (sha256 {hashlib.sha256(self.text.encode()).hexdigest()[:12]})"


KeySource = Union[Path, InlinePem]


@dataclass(frozen=True)
class PkiPaths:
    """Where each item is read from: a file, or PEM text from the environment (:class:`InlinePem`)."""

    key: KeySource
    cert: KeySource
    ca_cert: KeySource

    def all(self) -> tuple[KeySource, KeySource, KeySource]:
        return (self.key, self.cert, self.ca_cert)

    def files(self) -> list[Path]:
        """The items that are files (what the development tooling may write)."""
        return [item for item in self.all() if isinstance(item, Path)]


def pki_paths(settings: Settings) -> PkiPaths:
    """The configured items: PEM text from the environment where given, else the configured file, else
    ``<data_dir>/pki/``."""
    folder = Path(settings.data_dir) / "pki"

    def source(pem: str, variable: str, path: str, default: str) -> KeySource:
        if pem.strip():
            return InlinePem(variable, pem)
        return Path(path or folder / default)

    return PkiPaths(
        key=source(settings.signing_key_pem, "SIGNING_KEY_PEM", settings.signing_key_path, "issuer-key.pem"),
        cert=source(settings.signing_cert_pem, "SIGNING_CERT_PEM", settings.signing_cert_path,
                    "issuer-cert.pem"),
        ca_cert=source(settings.signing_ca_cert_pem, "SIGNING_CA_CERT_PEM", settings.signing_ca_cert_path,
                       "ca-cert.pem"),
    )


# What each kind of process needs: a web node checks signatures against the root (the public verify
# page), a stamping worker signs. The issuer's private key belongs on stamping nodes only, never on the
# internet-facing web nodes.
SIGNING_ITEMS = ("signing key", "issuer certificate", "root certificate")
ROOT_ONLY = ("root certificate",)
_SETTING_NAMES = {"signing key": "SIGNING_KEY_PATH (or SIGNING_KEY_PEM)",
                  "issuer certificate": "SIGNING_CERT_PATH (or SIGNING_CERT_PEM)",
                  "root certificate": "SIGNING_CA_CERT_PATH (or SIGNING_CA_CERT_PEM)"}


def key_material_problems(settings: Settings, needs: tuple[str, ...] = SIGNING_ITEMS) -> list[str]:
    """What keeps this node from loading the key material it ``needs``, one line per item; empty when
    each is there and looks like PEM (or DER for a certificate). A start-up check (run it where a process
    starts, outside development): it reads the files but parses nothing, so it stays light for the web
    process; the signer's own load still reports a wrong passphrase or key type."""
    paths, problems = pki_paths(settings), []
    for what, item in (("signing key", paths.key), ("issuer certificate", paths.cert),
                       ("root certificate", paths.ca_cert)):
        if what not in needs:
            continue
        try:
            data = item.read_bytes()
        except OSError as exc:
            problems.append(f"the {what} can't be read from {item}: {exc.strerror or exc}")
            continue
        if what == "signing key":
            if not _PEM_ANY.search(data):
                problems.append(f"the {what} in {item} is not PEM")
        elif not (_PEM_CERTIFICATE.search(data) or data.startswith(b"\x30")):
            problems.append(f"the {what} in {item} is neither a PEM nor a DER certificate")
    return problems


def require_key_material(settings: Settings, role: str, needs: tuple[str, ...] = SIGNING_ITEMS) -> None:
    """:class:`SigningUnavailable` naming every problem of :func:`key_material_problems`: for the place a
    process starts, so a node without its key material fails at once instead of retrying every stamp."""
    problems = key_material_problems(settings, needs)
    if problems:
        raise SigningUnavailable(
            f"meterai {role} can't start without its signing key material:\n  - " + "\n  - ".join(problems)
            + "\nSet " + ", ".join(_SETTING_NAMES[item] for item in needs)
            + ", the same on every node of this kind.")


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
    source = pki_paths(settings).ca_cert
    path = str(source)
    cached = _trust_roots.get(path)
    if cached is not None:
        return cached
    with _trust_lock:
        if path not in _trust_roots:
            try:
                der = certificate_der(source.read_bytes())
            except (OSError, ValueError) as exc:
                raise SigningUnavailable(f"Can't load the root certificate {path}: {exc}") from exc
            if not der.startswith(b"\x30"):
                raise SigningUnavailable(f"The root certificate {path} is neither PEM nor DER.")
            _trust_roots[path] = der
        return _trust_roots[path]
