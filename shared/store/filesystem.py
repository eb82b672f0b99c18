"""The filesystem document store: one machine's folder (or a shared mount), durable before ``put`` returns.

``put`` writes a temporary file, fsyncs it, moves it into place and fsyncs the folder, so a crash right
after ``put`` returns can't lose or tear a document. A plain put renames (``os.replace``: an upload put
again by a retry replaces itself); an exclusive put links (``os.link`` fails when the name exists), so a
stamped file is never replaced by another. ``get`` checks what it read against the SHA-256 the caller
passes (the database's record), so a file changed behind our back is never stamped or served. Workers on several hosts need a shared store: the S3 store
(:mod:`shared.store.s3`), or a shared mount here.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from shared.store import DocumentExists, DocumentMissing, StoreUnavailable, check_digest, check_key


class FilesystemStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"FilesystemStore({self.root})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
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
            if exclusive:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    if not self._holds(path, data):
                        raise DocumentExists(f"document {key} already exists; not overwritten") from None
                finally:
                    tmp.unlink(missing_ok=True)
            else:
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

    @staticmethod
    def _holds(path: Path, data: bytes) -> bool:
        """Whether the file at ``path`` is ``data`` already (an exclusive put repeated with the same bytes)."""
        return hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()

    def get(self, key: str, *, sha256: str | None = None) -> bytes:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise DocumentMissing(f"document {key} is missing from the store {self!r}") from exc
        except OSError as exc:
            raise StoreUnavailable(f"document store read failed: {exc.strerror or exc}") from exc
        return data if sha256 is None else check_digest(self, key, data, sha256)

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
