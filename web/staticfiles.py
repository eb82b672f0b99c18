"""The pages' static files, answered before Flask from memory, gzipped once per process.

Every new applicant fetches the checkout's scripts once (pdf.js is 1.7 MB), so at a deadline they are
as many requests as creates. Through Flask's static route each cost 1.2-2.2 ms of CPU (routing, the
file's stat and ETag, the after-request hooks; loadtests/bench/e2e.py: 6.8 ms of a new buyer's 28 ms in
the web); from here, a dictionary lookup and one write. A compressible file is also kept gzipped (made
at its first request, level 9, deterministic), sent to browsers that accept it with ``Vary:
Accept-Encoding``, so a phone on mobile data downloads pdf.js as ≈ 0.5 MB and no proxy compresses it
per request.

What the answer carries is what Flask's gave: the security headers (``web/security.py``'s policy for
files), a request id, the access line's route and the request count (shared.metrics), ``Cache-Control`` for an hour (the pages' URLs carry the content hash, ``?v=``),
an ETag answered with 304. Only regular files inside the folder are kept (a path that resolves
elsewhere, a folder, a dotfile or anything missing falls through to Flask's own static route, which
answers as it always did: 404 for anything outside the folder or missing). Files change only with a
deploy, which restarts the process: what is cached is never stale.
"""
from __future__ import annotations

import gzip
import hashlib
import mimetypes
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from shared import metrics
from shared.logs import ROUTE_ENVIRON, new_request_id, sane_request_id

ROUTE = "/static/<path:filename>"
# Text worth compressing; fonts and cmaps of pdf.js are already compact binaries.
_COMPRESSIBLE = {"text/javascript", "text/css", "application/json", "image/svg+xml", "text/plain", "text/html"}
_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".map": "application/json",
          ".bcmap": "application/octet-stream", ".pfb": "application/octet-stream"}
_MAX_CACHED_BYTES = 8 * 1024 * 1024  # a single file above this goes through Flask (none does today)


@dataclass(frozen=True)
class _Variant:
    body: bytes
    etag: str


@dataclass(frozen=True)
class _Entry:
    content_type: str
    plain: _Variant
    gzipped: _Variant | None


def _accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (RFC 9110 12.5.3: by name, else by ``*``; q=0 refuses)."""
    weights: dict[str, float] = {}
    for part in header.split(","):
        coding, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if coding.strip():
            weights[coding.strip().lower()] = q
    return weights.get("gzip", weights.get("x-gzip", weights.get("*", 0.0))) > 0


class StaticFiles:
    """WSGI middleware: ``GET``/``HEAD`` of ``prefix`` + a file in ``folder``, before ``app``."""

    def __init__(self, app: Callable, folder: str | Path, *, prefix: str = "/static/", max_age: int = 3600,
                 headers: dict[str, str] | None = None) -> None:
        self.app = app
        if not str(folder):
            raise ValueError("a static folder is required")  # "" would resolve to the working directory
        self.folder = Path(folder).resolve()
        self.prefix = prefix
        self.max_age = max_age
        self.headers = list((headers or {}).items())
        self._entries: dict[str, _Entry] = {}
        self._loading: dict[str, threading.Lock] = {}  # one per file that exists
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "")
        if not path.startswith(self.prefix) or method not in ("GET", "HEAD"):
            return self.app(environ, start_response)
        entry = self._entry(path[len(self.prefix):])
        if entry is None:
            return self.app(environ, start_response)
        environ[ROUTE_ENVIRON] = ROUTE
        started = time.perf_counter()
        variant = entry.plain
        gzipped = entry.gzipped is not None and _accepts_gzip(environ.get("HTTP_ACCEPT_ENCODING", ""))
        if gzipped:
            variant = entry.gzipped  # type: ignore[assignment]
        request_id = sane_request_id(environ.get("HTTP_X_REQUEST_ID")) or new_request_id()
        headers = [("Cache-Control", f"public, max-age={self.max_age}"), ("ETag", variant.etag),
                   ("X-Request-Id", request_id), *self.headers]
        if entry.gzipped is not None:
            headers.append(("Vary", "Accept-Encoding"))
        wanted = _etags(environ.get("HTTP_IF_NONE_MATCH", ""))
        if variant.etag in wanted or "*" in wanted:
            start_response("304 Not Modified", headers)
            metrics.record_http(ROUTE, method, 304, time.perf_counter() - started)
            return []
        headers += [("Content-Type", entry.content_type), ("Content-Length", str(len(variant.body)))]
        if gzipped:
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        metrics.record_http(ROUTE, method, 200, time.perf_counter() - started)
        return [] if method == "HEAD" else [variant.body]

    def _entry(self, name: str) -> _Entry | None:
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        path = self._path(name)
        if path is None:  # a miss is Flask's 404, and takes no lock (nor a place in any dict)
            return None
        with self._lock:
            lock = self._loading.setdefault(name, threading.Lock())
        with lock:  # one read (and one gzip of pdf.js) per file, however many ask for it at first
            entry = self._entries.get(name)
            if entry is None:
                entry = self._load(path)
                if entry is not None:
                    self._entries[name] = entry
        return entry

    def _path(self, name: str) -> Path | None:
        """The regular file ``name`` names inside the folder, or None."""
        if not name or any(part.startswith(".") or part == "" for part in name.split("/")):
            return None
        try:
            path = (self.folder / name).resolve()
            if not path.is_relative_to(self.folder) or not path.is_file():
                return None
        except (OSError, ValueError):
            return None
        return path

    @staticmethod
    def _load(path: Path) -> _Entry | None:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if len(data) > _MAX_CACHED_BYTES:
            return None
        content_type = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        compressible = content_type in _COMPRESSIBLE
        if content_type.startswith("text/") or content_type in ("application/json", "image/svg+xml"):
            content_type += "; charset=utf-8"
        digest = hashlib.sha256(data).hexdigest()[:20]
        gzipped = None
        if compressible and len(data) >= 1024:
            packed = gzip.compress(data, compresslevel=9, mtime=0)
            if len(packed) < 0.9 * len(data):
                gzipped = _Variant(packed, f'"{digest}-gz"')
        return _Entry(content_type, _Variant(data, f'"{digest}"'), gzipped)


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}
