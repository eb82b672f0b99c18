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
- ``get(key, sha256=...)`` returns exactly what the buyer sent or the stamper wrote: the caller passes the
  SHA-256 PostgreSQL recorded (``document_sha256``, ``stamped_sha256``) and both stores compare the bytes
  read with it; a mismatch is :class:`DocumentCorrupt` (logged at ERROR). The S3 store also keeps the
  digest in the object's metadata (``x-amz-meta-sha256``), checked when no digest is passed; that one
  only catches damage, not a rewrite, since metadata can be rewritten along with the body.
- A document we recorded after a durable put that the store does not have is :class:`DocumentMissing`:
  **transient**, because the put was durable before anyone was told "accepted", so a miss says this
  node's store is wrong (no ``DOCUMENT_STORE_URL`` on a stamping node reads its own empty folder; a wrong
  bucket or prefix; a lagging server), not that the buyer sent nothing. Workers retry it boundedly and
  the deadline sweep refunds a paid order that never finds its upload, as for any stuck order.
- A store that is down or slow is :class:`StoreUnavailable` (transient: create answers 503 with
  Retry-After, workers retry); a store that refuses us (access denied, no such bucket, credentials) is
  :class:`StoreMisconfigured`, also transient (an operator fixes it; no order is refunded for it before
  its deadline), and ``writable()`` (``/readyz``, a small put and delete) reports it. Buyers see only
  ``store_unavailable``; the detail goes to the logs.
- The web's store calls have a budget of their own (``store_from_settings(settings, web=True)``): one
  attempt with short timeouts, well inside the proxy's read timeout, so a slow store is a quick 503.

Keys are only our own shapes (``_KEY``): an order's upload and its stamped attempts.

Lifecycle: uploads are needed until their order is final (stamped, refunded, rejected or expired);
nothing reads them after that. An S3 lifecycle rule may expire ``<prefix>uploads/`` after N days (N well
beyond ``STAMP_DEADLINE_SECONDS`` plus ``PAYMENT_WATCH_SECONDS``, e.g. 30), and nothing depends on it
running: a kept upload costs storage only. Stamped files (``<prefix>stamped/``) are what buyers download:
no rule may expire them.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
import uuid
from typing import TYPE_CHECKING, Protocol

from shared.errors import PermanentError, TransientError
from shared.logs import log_event

if TYPE_CHECKING:
    from shared.breaker import Breaker

log = logging.getLogger(__name__)

# "$" would also accept a trailing newline: callers use fullmatch.
_KEY = re.compile(r"[a-z]+/[0-9a-f-]{36}(-[0-9]+)?\.pdf")


class StoreUnavailable(TransientError):
    """The store did not answer in time, or answered that it is overloaded or failing (5xx, SlowDown)."""

    code = "store_unavailable"


class StoreMisconfigured(StoreUnavailable):
    """The store refuses us: access denied, no such bucket, bad credentials, a feature it lacks. Retried
    like an outage (an operator must fix it), and shown in ``/readyz``; buyers see ``store_unavailable``."""

    code = "store_misconfigured"


class DocumentMissing(TransientError):
    """The store has nothing under the key. For a key we recorded after a durable put this is the node's
    fault (wrong store, bucket or prefix; a lagging server), never the buyer's: retried, never refunded
    or rejected for it before the order's own deadline."""

    code = "document_missing"


class DocumentCorrupt(PermanentError):
    """The stored bytes are not the ones recorded (their SHA-256 differs from PostgreSQL's record): they
    are not the buyer's document, or not the file we stamped, so nothing may be stamped from them or
    served. Permanent, because reading again returns the same wrong bytes. Not the buyer's fault either:
    before payment the order is rejected with nothing charged and a request to upload again; after
    payment invariant 1 (paid ⇒ stamped or fully refunded) leaves only the refund, which is at once and
    names our error rather than the document; a stamped file that fails the check is a 500 at download
    and the order stays stamped (nothing is guessed)."""

    code = "document_corrupt"


class DocumentExists(TransientError):
    """An exclusive put found another document under the key; nothing was overwritten."""

    code = "document_exists"


class DocumentStore(Protocol):
    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None: ...
    def get(self, key: str, *, sha256: str | None = None) -> bytes: ...
    def delete(self, key: str) -> None: ...
    def writable(self) -> bool: ...


def check_key(key: str) -> str:
    """``key`` if it is one of our own key shapes, else ValueError."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"bad document key {key!r}")
    return key


def check_digest(store: object, key: str, data: bytes, sha256: str) -> bytes:
    """``data`` if its SHA-256 is ``sha256`` (the digest PostgreSQL recorded), else DocumentCorrupt,
    logged at ERROR with the store's identity."""
    actual = hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(actual, sha256):
        log_event(log, "document_corrupt", logging.ERROR, key=key, store=repr(store), recorded=sha256,
                  actual=actual, bytes=len(data))
        raise DocumentCorrupt(f"document {key} in the store is not the document recorded "
                              "(its SHA-256 differs from the database's)")
    return data


def upload_key(order_id: uuid.UUID | str) -> str:
    return f"uploads/{order_id}.pdf"


def stamped_key(order_id: uuid.UUID | str, attempt: int) -> str:
    """One file per stamping attempt: a worker that lost its lease can't overwrite the file another
    attempt committed (the committed key is recorded on the order, and stamped files are put
    exclusively)."""
    return f"stamped/{order_id}-{attempt}.pdf"


from shared.store.filesystem import FilesystemStore  # noqa: E402  (they use the names above)
from shared.store.s3 import S3Store  # noqa: E402


def _store_circuit_open() -> StoreUnavailable:
    return StoreUnavailable("The document store is unavailable (circuit open after repeated failures).")


class GuardedStore:
    """A store behind a circuit breaker (:class:`shared.breaker.Breaker`): after a few consecutive
    :class:`StoreUnavailable` its calls fail at once, for a cool-down, instead of each waiting out the
    store's timeouts; the web answers 503 ``store_unavailable`` at once, workers retry later. A missing,
    corrupt or already-present document is an answer: the store is up. ``writable()`` (``/readyz``)
    always asks the store itself, so readiness shows the store, not the breaker."""

    def __init__(self, inner: DocumentStore, breaker: "Breaker") -> None:
        self.inner = inner
        self.breaker = breaker

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        self.breaker.call(lambda: self.inner.put(key, data, exclusive=exclusive))

    def get(self, key: str, *, sha256: str | None = None) -> bytes:
        return self.breaker.call(lambda: self.inner.get(key, sha256=sha256))

    def delete(self, key: str) -> None:
        self.breaker.call(lambda: self.inner.delete(key))

    def writable(self) -> bool:
        return self.inner.writable()

    def __repr__(self) -> str:
        return repr(self.inner)

    def __getattr__(self, name: str):
        # The store's own attributes (its bucket, root, budget) read through the guard.
        return getattr(self.inner, name)


def store_breaker(threshold: int = 5, cooldown_seconds: float = 10.0) -> "Breaker":
    from shared.breaker import Breaker

    return Breaker("document_store", failures=(StoreUnavailable,), answered=(DocumentMissing, DocumentExists, DocumentCorrupt),
                   opened=_store_circuit_open, threshold=threshold, cooldown_seconds=cooldown_seconds)


def store_from_settings(settings, *, web: bool = False) -> DocumentStore:
    """The store ``DOCUMENT_STORE_URL`` names (validated by the settings), behind a breaker of its own.
    ``web=True``: the web's own budget (one attempt, short timeouts:
    :data:`shared.store.s3.WEB_READ_TIMEOUT`), so a request never outlasts the proxy's read timeout
    waiting for a slow store."""
    location = settings.document_store
    if location.kind == "s3":
        inner: DocumentStore = S3Store.from_settings(settings, web=web)
    else:
        inner = FilesystemStore(location.path)
    return GuardedStore(inner, store_breaker())


__all__ = [
    "DocumentCorrupt", "DocumentExists", "DocumentMissing", "DocumentStore", "FilesystemStore", "GuardedStore", "S3Store",
    "StoreMisconfigured", "StoreUnavailable", "check_digest", "check_key", "stamped_key", "store_from_settings", "upload_key",
]
