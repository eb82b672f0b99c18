"""The S3 document store: any S3-compatible server (AWS S3, SeaweedFS, MinIO, Ceph RGW), for many machines.

Objects live at ``s3://<bucket>/<prefix><key>``. What each promise of :mod:`shared.store` costs here:

- durable: an S3 PUT answers 200 only once the object is stored; we send ``Content-MD5`` so the server
  refuses a body damaged on the way (every S3-compatible server checks it, unlike botocore's newer
  CRC checksums, which ``S3_CHECKSUMS=when_required``, the default, leaves off because some servers
  reject them; ``when_supported`` turns them on where the server copes).
- never overwrite a stamped file: an exclusive put sends ``If-None-Match: *``; the server answers 412
  when the key exists. A server that can't (501 NotImplemented) is a configuration error unless
  ``S3_CONDITIONAL_WRITES=0``, which falls back to HEAD-then-PUT (racy between two writers of the same
  key; our attempt keys make that race need two workers on one attempt, which the lease forbids). Some
  servers ignore the header silently, so before its first exclusive put each process puts a probe key
  exclusively twice and refuses the store (:class:`StoreMisconfigured`) if the second is not refused.
- integrity: ``get`` compares the bytes with the SHA-256 the caller passes (PostgreSQL's record); the
  digest also goes into the object's metadata (``x-amz-meta-sha256``) at put, checked when the caller
  passes none (damage only: a rewrite can carry its own metadata); a mismatch is :class:`DocumentCorrupt`.
- down or slow: connect/read timeouts (``S3_CONNECT_TIMEOUT``, ``S3_READ_TIMEOUT``) and botocore's own
  retries (``S3_MAX_ATTEMPTS`` attempts in all) bound every call; then :class:`StoreUnavailable`. The
  web's store (``web=True``) makes one attempt within at most :data:`WEB_CONNECT_TIMEOUT` +
  :data:`WEB_READ_TIMEOUT`, far inside the proxy's 30 s read timeout (a proxy that timed out would
  resend the upload to another node while this one still writes).
- ready: ``writable()`` puts and deletes a small probe object (short timeouts, one attempt), so
  read-only credentials are not reported ready.

boto3 is imported when the first client is made (the first call in each process), never at import, so
a web process on the filesystem store doesn't load it. One client per process (clients are thread-safe,
not fork-safe).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import uuid
from typing import Any

from shared.logs import log_event
from shared.store import (DocumentCorrupt, DocumentExists, DocumentMissing, StoreMisconfigured,
                          StoreUnavailable, check_digest, check_key)

log = logging.getLogger(__name__)

_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_MISCONFIGURED = frozenset({
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
    "AllAccessDisabled", "AuthorizationHeaderMalformed", "InvalidBucketName", "PermanentRedirect",
    "301", "400", "InvalidRequest", "InvalidArgument", "XAmzContentSHA256Mismatch", "NotImplemented", "501",
})
_BUSY = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500",
                   "ConditionalRequestConflict", "OperationAborted", "RequestTimeTooSkewed"})
SHA256_METADATA = "sha256"
# The web's budget per store call: one attempt, at most this long to connect and between bytes.
WEB_CONNECT_TIMEOUT = 2.0
WEB_READ_TIMEOUT = 3.0
# Readiness and the conditional-write probe: short, one attempt.
PROBE_CONNECT_TIMEOUT = 1.0
PROBE_READ_TIMEOUT = 2.0
PROBE_FOLDER = "probes/"


class S3Store:
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str = "", region: str = "us-east-1",
                 access_key_id: str = "", secret_access_key: str = "", checksums: str = "when_required",
                 connect_timeout: float = 2.0, read_timeout: float = 10.0, max_attempts: int = 2,
                 conditional_writes: bool = True, addressing_style: str = "") -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url or None
        self.region = region
        self._credentials = (access_key_id or None, secret_access_key or None)
        self.checksums = checksums
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_attempts = max_attempts
        self.conditional_writes = conditional_writes
        # A custom endpoint is usually an address, not a domain buckets can be sub-domains of.
        self.addressing_style = addressing_style or ("path" if endpoint_url else "auto")
        self._clients: dict[str, tuple[int, Any]] = {}
        self._lock = threading.Lock()
        self._conditional_writes_checked_pid: int | None = None

    @classmethod
    def from_settings(cls, settings, *, web: bool = False) -> "S3Store":
        """The store the settings name; ``web=True``: the web's budget (one attempt, short timeouts)."""
        location = settings.document_store
        connect, read, attempts = settings.s3_connect_timeout, settings.s3_read_timeout, settings.s3_max_attempts
        if web:
            connect, read, attempts = min(connect, WEB_CONNECT_TIMEOUT), min(read, WEB_READ_TIMEOUT), 1
        return cls(location.bucket, location.prefix, endpoint_url=settings.s3_endpoint_url,
                   region=settings.s3_region, access_key_id=settings.s3_access_key_id,
                   secret_access_key=settings.s3_secret_access_key, checksums=settings.s3_checksums,
                   connect_timeout=connect, read_timeout=read, max_attempts=attempts,
                   conditional_writes=bool(settings.s3_conditional_writes),
                   addressing_style=settings.s3_addressing_style)

    def __repr__(self) -> str:
        return f"S3Store(s3://{self.bucket}/{self.prefix}, endpoint={self.endpoint_url or 'AWS'})"

    # -- the client -----------------------------------------------------------------------------------
    def _client(self, purpose: str = "documents") -> Any:
        """This process's client for ``purpose``: "documents" (the configured bounds) or "probe" (short,
        one attempt)."""
        pid = os.getpid()
        made = self._clients.get(purpose)
        if made is None or made[0] != pid:
            with self._lock:
                made = self._clients.get(purpose)
                if made is None or made[0] != pid:
                    made = (pid, self._make_client(probe=purpose == "probe"))
                    self._clients[purpose] = made
        return made[1]

    def _make_client(self, *, probe: bool = False) -> Any:
        import boto3
        from botocore.config import Config

        access_key, secret_key = self._credentials
        connect, read, attempts = self.connect_timeout, self.read_timeout, self.max_attempts
        if probe:
            connect, read, attempts = min(connect, PROBE_CONNECT_TIMEOUT), min(read, PROBE_READ_TIMEOUT), 1
        config = Config(
            region_name=self.region, connect_timeout=connect, read_timeout=read,
            # total_max_attempts counts the first attempt; botocore reads "max_attempts" here as retries.
            retries={"total_max_attempts": attempts, "mode": "standard"},
            request_checksum_calculation=self.checksums, response_checksum_validation=self.checksums,
            s3={"addressing_style": self.addressing_style}, max_pool_connections=32,
        )
        # Empty keys: boto3's own chain (environment, shared files, instance or container role).
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=access_key,
            aws_secret_access_key=secret_key, config=config)

    def _object(self, key: str) -> str:
        return self.prefix + check_key(key)

    # -- the protocol ---------------------------------------------------------------------------------
    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        name = self._object(key)
        digest = hashlib.sha256(data).hexdigest()
        request: dict[str, Any] = {
            "Bucket": self.bucket, "Key": name, "Body": data, "ContentType": "application/pdf",
            "ContentMD5": base64.b64encode(hashlib.md5(data).digest()).decode(),
            "Metadata": {SHA256_METADATA: digest},
        }
        if exclusive:
            if self.conditional_writes:
                self._check_conditional_writes()
                request["IfNoneMatch"] = "*"
            elif self._stored_digest(key, name) is not None:
                self._refuse_overwrite(key, name, digest)
                return
        try:
            self._client().put_object(**request)
        except Exception as exc:  # noqa: BLE001 - sorted out below
            code, status = _error_code(exc)
            if exclusive and (code == "PreconditionFailed" or status == 412):
                self._refuse_overwrite(key, name, digest)
                return
            if exclusive and (code == "NotImplemented" or status == 501):
                raise StoreMisconfigured(_NO_CONDITIONAL_WRITES) from exc
            raise _translated(exc, key, "write") from exc

    def _check_conditional_writes(self) -> None:
        """Once per process, before the first exclusive put: put a probe key exclusively twice; the
        second must be refused (412). A server that ignores ``If-None-Match`` would let a late attempt
        overwrite a delivered stamp, so it is refused as misconfigured (unless S3_CONDITIONAL_WRITES=0)."""
        pid = os.getpid()
        if self._conditional_writes_checked_pid == pid:
            return
        name = f"{self.prefix}{PROBE_FOLDER}{uuid.uuid4()}"
        client = self._client("probe")
        request = {"Bucket": self.bucket, "Key": name, "Body": b"probe", "IfNoneMatch": "*"}
        try:
            try:
                client.put_object(**request)
            except Exception as exc:  # noqa: BLE001
                code, status = _error_code(exc)
                if code == "NotImplemented" or status == 501:
                    raise StoreMisconfigured(_NO_CONDITIONAL_WRITES) from exc
                raise _translated(exc, None, "conditional-write check") from exc
            try:
                client.put_object(**request)
            except Exception as exc:  # noqa: BLE001
                code, status = _error_code(exc)
                if not (code == "PreconditionFailed" or status == 412):
                    raise _translated(exc, None, "conditional-write check") from exc
            else:
                log_event(log, "store_ignores_conditional_writes", logging.ERROR, store=repr(self))
                raise StoreMisconfigured(
                    "the S3 server accepted a second exclusive put (If-None-Match: *) of the same key: it "
                    "ignores conditional writes, so a stamped file could be overwritten; use a server that "
                    "honours them, or set S3_CONDITIONAL_WRITES=0 to check with HEAD before each PUT")
        finally:
            try:
                client.delete_object(Bucket=self.bucket, Key=name)
            except Exception as exc:  # noqa: BLE001 - a leftover probe costs a few bytes
                log_event(log, "store_probe_not_deleted", logging.WARNING, error=type(exc).__name__)
        self._conditional_writes_checked_pid = pid

    def _refuse_overwrite(self, key: str, name: str, digest: str) -> None:
        """The key exists: done if it holds these very bytes (our own earlier put, whose answer was lost),
        else DocumentExists."""
        if self._stored_digest(key, name) != digest:
            raise DocumentExists(f"document {key} already exists; not overwritten")

    def _stored_digest(self, key: str, name: str) -> str | None:
        try:
            head = self._client().head_object(Bucket=self.bucket, Key=name)
        except Exception as exc:  # noqa: BLE001
            error = _translated(exc, key, "read")
            if isinstance(error, DocumentMissing):
                return None
            raise error from exc
        return head.get("Metadata", {}).get(SHA256_METADATA, "")

    def get(self, key: str, *, sha256: str | None = None) -> bytes:
        name = self._object(key)
        try:
            answer = self._client().get_object(Bucket=self.bucket, Key=name)
            data = answer["Body"].read()
        except Exception as exc:  # noqa: BLE001
            error = _translated(exc, key, "read")
            if isinstance(error, DocumentMissing):
                error = DocumentMissing(f"document {key} is missing from the store {self!r}")
            raise error from exc
        if sha256 is not None:
            return check_digest(self, key, data, sha256)
        recorded = answer.get("Metadata", {}).get(SHA256_METADATA)
        if recorded != hashlib.sha256(data).hexdigest():
            log_event(log, "document_corrupt", logging.ERROR, key=key, store=repr(self), recorded=recorded,
                      bytes=len(data))
            raise DocumentCorrupt(f"document {key} in the store is not the document that was stored "
                                  "(its SHA-256 differs from the one in its metadata)")
        return data

    def delete(self, key: str) -> None:
        name = self._object(key)
        try:
            self._client().delete_object(Bucket=self.bucket, Key=name)
        except Exception as exc:  # noqa: BLE001 - a leftover object costs storage only
            log_event(log, "document_not_deleted", logging.WARNING, key=key, error=type(exc).__name__)

    def problem(self) -> str | None:
        """Why the store can't be used right now (None when it can): a small probe object put and deleted
        (short timeouts, one attempt), so credentials that can read but not write are not "ready"."""
        client = self._client("probe")
        name = f"{self.prefix}{PROBE_FOLDER}{uuid.uuid4()}"
        try:
            client.put_object(Bucket=self.bucket, Key=name, Body=b"probe")
        except Exception as exc:  # noqa: BLE001
            return _translated(exc, None, "check").message
        try:
            client.delete_object(Bucket=self.bucket, Key=name)
        except Exception as exc:  # noqa: BLE001 - writing is what readiness needs; a probe left costs bytes
            log_event(log, "store_probe_not_deleted", logging.WARNING, error=type(exc).__name__)
        return None

    def writable(self) -> bool:
        problem = self.problem()
        if problem is not None:
            log_event(log, "document_store_not_ready", logging.WARNING, store=repr(self), problem=problem)
        return problem is None


_NO_CONDITIONAL_WRITES = (
    "the S3 server does not support conditional writes (If-None-Match: *), which keep a stamped file from "
    "ever being overwritten; use a server that does, or set S3_CONDITIONAL_WRITES=0 to check with HEAD "
    "before each PUT instead")


def _error_code(exc: BaseException) -> tuple[str, int | None]:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", None
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status


def _translated(exc: BaseException, key: str | None, doing: str) -> Exception:
    """The store's error for a botocore failure: missing, misconfigured, or (by default) unavailable."""
    from botocore import exceptions as boto

    what = f"document {key}" if key else "the bucket"
    if isinstance(exc, boto.NoCredentialsError | boto.PartialCredentialsError):
        return StoreMisconfigured(f"no S3 credentials: set S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY, or "
                                  f"give the process a role ({exc})")
    if isinstance(exc, boto.ClientError):
        code, status = _error_code(exc)
        if key is not None and code != "NoSuchBucket" and (code in _MISSING or status == 404):
            return DocumentMissing(f"{what} is missing from the store")
        if code in _BUSY or (status is not None and status >= 500 and code not in _MISCONFIGURED):
            return StoreUnavailable(f"document store {doing} failed: the S3 server answered {code or status}")
        if code in _MISCONFIGURED or status in (301, 400, 403, 404, 501):
            hint = {"NoSuchBucket": "the bucket does not exist", "404": "the bucket does not exist"}.get(
                code, "check the bucket, the credentials and the S3 settings")
            return StoreMisconfigured(f"document store {doing} of {what} refused: the S3 server answered "
                                      f"{code or status} ({hint})")
        return StoreUnavailable(f"document store {doing} failed: the S3 server answered {code or status}")
    # Connection refused, timeouts, a connection closed mid-body, a proxy in the way: try again later.
    return StoreUnavailable(f"document store {doing} failed: {type(exc).__name__}: {exc}")
