"""Document storage: uploads and stamped results, durable before anyone is told "accepted".

Two stores keep the same promises behind one protocol, chosen by ``DOCUMENT_STORE_URL``:

- empty or ``file:///abs/path``: :class:`FilesystemStore` (one machine; ``DOCUMENT_DIR`` still names the
  folder when the URL is empty). Write to a temporary file, fsync, rename or link into place, fsync the
  folder.
- ``s3://bucket/optional/prefix``: :class:`S3Store` (many machines), any S3-compatible server. boto3 is
  imported only when such a store is configured, so the web process stays light otherwise.

The promises:

- ``put`` returns only once the document is durable (fsync; an S3 PUT is durable when it answers 200).
- ``put(key, data, exclusive=True)`` never replaces an existing document: a stamped file is written under
  a key per attempt, and a second write of that key with other bytes raises :class:`DocumentExists`
  (transient for the stamping worker: its retry is a new attempt, hence a new key). The same bytes again
  (a retried request whose first answer was lost) are taken as done. Uploads (``uploads/<order>.pdf``)
  are plain puts: an idempotent retry with the same bytes may put them again.
- ``get`` returns exactly what was put: the S3 store records the SHA-256 of the bytes in the object's
  metadata (``x-amz-meta-sha256``) and checks it on every read; a mismatch is :class:`DocumentCorrupt`,
  treated like a missing document (the checkout rejects the order, stamping refunds it), never retried.
- A store that is down or slow is :class:`StoreUnavailable` (transient: create answers 503 with
  Retry-After, workers retry); a store that refuses us (access denied, no such bucket, credentials) is
  :class:`StoreMisconfigured`, also transient (an operator fixes it; no order is refunded for it before
  its deadline), and ``writable()`` (``/readyz``) reports it.

Keys are only our own shapes (``_KEY``): an order's upload and its stamped attempts.

Lifecycle: uploads are needed until their order is final (stamped, refunded, rejected or expired);
nothing reads them after that. An S3 lifecycle rule may expire ``<prefix>uploads/`` after N days (N well
beyond ``STAMP_DEADLINE_SECONDS`` plus ``PAYMENT_WATCH_SECONDS``, e.g. 30), and nothing depends on it
running: a kept upload costs storage only. Stamped files (``<prefix>stamped/``) are what buyers download:
no rule may expire them.
"""
from __future__ import annotations

import re
import uuid
from typing import Protocol

from shared.errors import PermanentError, TransientError

# "$" would also accept a trailing newline: callers use fullmatch.
_KEY = re.compile(r"[a-z]+/[0-9a-f-]{36}(-[0-9]+)?\.pdf")


class StoreUnavailable(TransientError):
    """The store did not answer in time, or answered that it is overloaded or failing (5xx, SlowDown)."""

    code = "store_unavailable"


class StoreMisconfigured(StoreUnavailable):
    """The store refuses us: access denied, no such bucket, bad credentials, a feature it lacks. Retried
    like an outage (an operator must fix it), and shown in ``/readyz``."""

    code = "store_misconfigured"


class DocumentMissing(PermanentError):
    code = "document_missing"


class DocumentCorrupt(DocumentMissing):
    """The stored bytes are not the bytes that were put (their SHA-256 differs from the recorded one):
    as good as missing, and never worth a retry."""

    code = "document_corrupt"


class DocumentExists(TransientError):
    """An exclusive put found another document under the key; nothing was overwritten."""

    code = "document_exists"


class DocumentStore(Protocol):
    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None: ...
    def get(self, key: str) -> bytes: ...
    def delete(self, key: str) -> None: ...
    def writable(self) -> bool: ...


def check_key(key: str) -> str:
    """``key`` if it is one of our own key shapes, else ValueError."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"bad document key {key!r}")
    return key


def upload_key(order_id: uuid.UUID | str) -> str:
    return f"uploads/{order_id}.pdf"


def stamped_key(order_id: uuid.UUID | str, attempt: int) -> str:
    """One file per stamping attempt: a worker that lost its lease can't overwrite the file another
    attempt committed (the committed key is recorded on the order, and stamped files are put
    exclusively)."""
    return f"stamped/{order_id}-{attempt}.pdf"


from shared.store.filesystem import FilesystemStore  # noqa: E402  (they use the names above)
from shared.store.s3 import S3Store  # noqa: E402


def store_from_settings(settings) -> DocumentStore:
    """The store ``DOCUMENT_STORE_URL`` names (validated by the settings)."""
    location = settings.document_store
    if location.kind == "s3":
        return S3Store.from_settings(settings)
    return FilesystemStore(location.path)


__all__ = [
    "DocumentCorrupt", "DocumentExists", "DocumentMissing", "DocumentStore", "FilesystemStore", "S3Store",
    "StoreMisconfigured", "StoreUnavailable", "check_key", "stamped_key", "store_from_settings", "upload_key",
]
