"""How our signature names what it vouches for: the field ``eMeterai-<serial>`` and its ``/Reason``.

Why a module of its own: the signer writes these names and verification reads them back, in a sandbox
child that should load pyHanko's validator and nothing of the signer. So a verifier can tell which serial
a signature vouches for without a database, and without importing the code that makes signatures.
"""
from __future__ import annotations

import re

FIELD_PREFIX = "eMeterai-"
FIELD_NAME = re.compile(r"^eMeterai-([0-9A-Z]{22})$")
SERIAL = re.compile(r"^[0-9A-Z]{22}$")
REASON_PREFIX = "e-Meterai "
LOCATION = "Indonesia"


def field_name(serial: str) -> str:
    return FIELD_PREFIX + serial


def serial_from_field_name(name: str | None) -> str | None:
    match = FIELD_NAME.match(name or "")
    return match.group(1) if match else None
