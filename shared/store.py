"""Document storage: uploads and stamped results, durable before anyone is told "accepted".

The filesystem store writes to a temporary file, fsyncs it, renames it into place and fsyncs the
folder, so a crash right after ``put`` returns can't lose or tear a document. Workers on several hosts
need a shared store (NFS, or an S3-compatible store behind the same interface); nothing here assumes one
host beyond the root path.
"""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Protocol

from shared.errors import PermanentError, TransientError

_KEY = re.compile(r"[a-z]+/[0-9a-f-]{36}(-[0-9]+)?\.pdf")


class StoreUnavailable(TransientError):
    code = "store_unavailable"


class DocumentMissing(PermanentError):
    code = "document_missing"


class DocumentStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def delete(self, key: str) -> None: ...
    def writable(self) -> bool: ...


def upload_key(order_id: uuid.UUID | str) -> str:
    return f"uploads/{order_id}.pdf"


def stamped_key(order_id: uuid.UUID | str, attempt: int) -> str:
    """One file per stamping attempt: a worker that lost its lease can't overwrite the file another
    attempt committed (the committed key is recorded on the order)."""
    return f"stamped/{order_id}-{attempt}.pdf"


class FilesystemStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):  # "$" would also accept a trailing newline
            raise ValueError(f"bad document key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise StoreUnavailable(f"document store write failed: {exc.strerror or exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise DocumentMissing(f"document {key} is missing from the store") from exc
        except OSError as exc:
            raise StoreUnavailable(f"document store read failed: {exc.strerror or exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError:
            pass

    def writable(self) -> bool:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()
            return True
        except OSError:
            return False


def store_from_settings(settings) -> DocumentStore:
    return FilesystemStore(settings.documents_path)
