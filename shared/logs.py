"""One JSON object per line per event, carrying the request id that caused it.

``log_event(log, "stamped", order_id=…, serial=…)`` writes
``{"timestamp": "…Z", "level": "info", "logger": "shared.services.stamping", "event": "stamped",
"request_id": "…", "order_id": "…", "serial": "…"}``. JSON parses into any log pipeline, and escaping is
by construction: a value from outside can't break a line in two or forge a field (``ensure_ascii``
escapes every line break, U+2028 included).

The request id is made at the web edge (or taken from the proxy's ``X-Request-Id``, ``web/requestid.py``),
kept in :data:`REQUEST_ID` for the request, and carried in the headers of every Celery task published
while it is set (``workers/context.py``), so one ``grep`` follows the work across processes.

structlog renders, the standard library's handlers write: every process (gunicorn's own loggers through
:func:`gunicorn_logconfig`, Celery's through its ``setup_logging`` signal, our ``logging.getLogger``
loggers) goes through :class:`JsonFormatter`. A handler we didn't configure (pytest's ``caplog``) still
reads ``event=… key=value`` from an event's message. Never log secrets, tokens or documents.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

import structlog

# The id of the request (or, in a worker, of the task chain) being handled; None outside any.
REQUEST_ID: ContextVar[str | None] = ContextVar("meterai_request_id", default=None)

# What we accept from a proxy: an id, not a payload (nginx's $request_id is 32 hex, others use UUIDs or
# dotted/colon forms). Anything else is replaced by one of ours.
_SANE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=/-]{7,127}")
# Keys every line has; an event field of the same name is written as "<name>_" instead.
_RESERVED = frozenset({"timestamp", "level", "logger", "event", "exception", "stack"})
_FIRST = ("timestamp", "level", "logger", "event", "request_id")
# Where the web leaves the matched route's template for gunicorn's access line (a WSGI environ key).
ROUTE_ENVIRON = "meterai.route"


def sane_request_id(value: str | None) -> str | None:
    """``value`` when it is a bounded token fit to log and echo, else None."""
    return value if value and _SANE_ID.fullmatch(value) else None


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    return REQUEST_ID.get()


def adopt_request_id(value: str | None) -> str | None:
    """Go on under ``value``, the id of the create that made the order this work turned out to be about
    (a gateway notification arrives as the gateway's own request; a sweep starts as beat's), so every
    later line, and every task published from here on, carries the order's id. Returns the id it
    replaced, for the one line that links the two (None when nothing changed)."""
    previous = REQUEST_ID.get()
    if not value or value == previous:
        return None
    REQUEST_ID.set(value)
    return previous


class _Event(dict):
    """A log record's message for :func:`log_event`: the event's fields, which :class:`JsonFormatter`
    writes as JSON; a plain formatter gets the ``event=… key=value`` text from ``str()``."""

    def __str__(self) -> str:
        return " ".join(f"{k}={_kv(v)}" for k, v in self.items())


def _kv(value: Any) -> str:
    text = str(value).replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    if not text or any(c in text for c in ' "='):
        return '"' + text.replace('"', "'") + '"'
    return text


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """One line for ``event`` with ``fields`` (None values left out)."""
    if not logger.isEnabledFor(level):
        return
    message = _Event(event=event)
    for key, value in fields.items():
        if value is not None:
            message[f"{key}_" if key in _RESERVED else key] = value
    # _logger/_name: structlog's marks for "the message is an event dict" (ProcessorFormatter reads them).
    logger.log(level, message, extra={"_logger": logger, "_name": logging.getLevelName(level).lower()})


# -- rendering ------------------------------------------------------------------------------------

def _record_context(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Level, logger, the request id, and an exception's traceback, from the stdlib record."""
    record: logging.LogRecord | None = event_dict.get("_record")
    if record is not None:
        event_dict["level"] = record.levelname.lower()
        event_dict["logger"] = record.name
        if record.exc_info and "exc_info" not in event_dict:
            event_dict["exc_info"] = record.exc_info
    request_id = REQUEST_ID.get()
    if request_id and "request_id" not in event_dict:
        event_dict["request_id"] = request_id
    return event_dict


def _in_order(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    ordered = {k: event_dict.pop(k) for k in _FIRST if k in event_dict}
    ordered.update(event_dict)
    return ordered


def _value(value: Any) -> str:
    return str(value)


class JsonFormatter(structlog.stdlib.ProcessorFormatter):
    """The one formatter of every handler we configure: a record, ours or a library's, as a JSON line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(
            processors=[
                _record_context,
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
                structlog.processors.format_exc_info,
                structlog.processors.StackInfoRenderer(),
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _in_order,
                structlog.processors.JSONRenderer(default=_value),
            ],
            use_get_message=True,
        )

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, RENDERED, False):  # rendered already (access_line): the line as it is
            return record.getMessage()
        if record.name == "gunicorn.access" and isinstance(record.args, Mapping):
            record = _access_record(record)
        return super().format(record)


def _int(value: Any) -> Any:
    return int(value) if isinstance(value, int) or (isinstance(value, str) and value.isdigit()) else None


def _access_record(record: logging.LogRecord) -> logging.LogRecord:
    """gunicorn's access line as fields: the route template the app matched (``/api/v1/queue/<ticket>``:
    never the path or query, where a ticket or token may sit; nor referrer or user agent), the status,
    size and time, and the request id the app answered with (both left in the WSGI environ and the
    response by ``web/requestid.py``)."""
    atoms = record.args
    assert isinstance(atoms, Mapping)
    route = atoms["{%s}e" % ROUTE_ENVIRON]
    message = _Event(event="http_request", method=atoms["m"], route=route if route != "-" else None,
                     status=_int(atoms["s"]), bytes=_int(atoms["B"]), ms=_int(atoms["M"]))
    request_id = sane_request_id(str(atoms["{x-request-id}o"]))
    if request_id:
        message["request_id"] = request_id
    copy = logging.makeLogRecord(record.__dict__)
    copy.msg, copy.args = message, ()
    copy._logger, copy._name = logging.getLogger(record.name), "info"  # type: ignore[attr-defined]
    return copy


# A record whose message is a finished JSON line (``extra={RENDERED: True}``).
RENDERED = "meterai_rendered"


def access_line(status: Any, headers: Any, environ: Mapping[str, Any], sent: Any, request_time: Any,
                logger: str = "gunicorn.access") -> str:
    """gunicorn's access line with the fields of :func:`_access_record`, rendered straight to JSON.

    Every request writes one, and gunicorn's own path (a dict of every header and environ key, then
    structlog's processor chain) cost about an eighth of the web's CPU per order (loadtests/bench/e2e.py
    with --py-spy); this builds only the fields we keep. ``status``: gunicorn's ``resp.status`` ("200 OK" or
    200), ``headers``: the response's (name, value) pairs, ``request_time``: a timedelta."""
    code = status.split(None, 1)[0] if isinstance(status, str) else status
    request_id = None
    for name, value in headers or ():
        if name.lower() == "x-request-id":
            request_id = sane_request_id(str(value))
            break
    route = environ.get(ROUTE_ENVIRON)
    line: dict[str, Any] = {
        "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "level": "info",
        "logger": logger, "event": "http_request"}
    if request_id:
        line["request_id"] = request_id
    line.update(method=environ.get("REQUEST_METHOD"), route=route if route and route != "-" else None,
                status=_int(code), bytes=_int(sent),
                ms=request_time.seconds * 1000 + request_time.microseconds // 1000)
    return json.dumps(line, default=_value)


def _ours(handler: logging.Handler) -> bool:
    return isinstance(handler.formatter, JsonFormatter)


class StreamHandler(logging.StreamHandler):
    """logging's StreamHandler, its lock taken with ``with``. Python 3.11's ``Handler.handle`` and
    ``StreamHandler.flush`` take it with ``acquire()`` and only then enter their ``try``: an asynchronous
    exception landing between the two (on Celery's threads pool a soft time limit is one,
    workers/watchdog.py) would leave the lock taken, and every other thread of the process, the worker's
    event loop included, would wait on its next log line for ever. A ``with`` block can't be left that
    way."""

    def handle(self, record: logging.LogRecord) -> Any:
        accepted = self.filter(record)
        if isinstance(accepted, logging.LogRecord):  # Python 3.12+: a filter may hand back a record
            record = accepted
        if accepted:
            with self.lock:  # type: ignore[union-attr] - createLock() made it
                self.emit(record)
        return accepted

    def handleError(self, record: logging.LogRecord) -> None:
        """A soft time limit that lands while a line is written is the task's, not the line's: let it
        through (``emit`` catches every Exception and would have swallowed it, leaving the task to run
        on to its hard limit)."""
        exceptions = sys.modules.get("celery.exceptions")  # not loaded: no such exception can exist
        if exceptions is not None and isinstance(sys.exc_info()[1], exceptions.SoftTimeLimitExceeded):
            raise  # noqa: PLE0704 - re-raises the exception being handled
        super().handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self.stream and hasattr(self.stream, "flush"):
                self.stream.flush()


def configure_logging(level: int | str = logging.INFO) -> None:
    """Every record of this process as a JSON line on stderr. Idempotent: called by ``create_app``, by
    Celery's logging setup in each worker process and beat, by the CLI. Like ``basicConfig``, it leaves a
    root logger someone else gave handlers alone (pytest's, an embedding program's); gunicorn's root,
    configured by :func:`gunicorn_logconfig`, already writes through :class:`JsonFormatter`."""
    root = logging.getLogger()
    if root.handlers and not any(_ours(h) for h in root.handlers):
        return
    if not root.handlers:
        handler = StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.setLevel(logging.getLevelName(level.upper()) if isinstance(level, str) else level)
    logging.captureWarnings(True)  # a library's warning is a log line too, not loose text on stderr


def gunicorn_logconfig(level: str = "INFO") -> dict[str, Any]:
    """gunicorn's ``logconfig_dict``: its error and access logs, and the root logger the app writes to,
    as JSON lines on stderr (one handler each, nothing propagated twice)."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"console": dict(handler), "error_console": dict(handler)},
        "root": {"level": level, "handlers": ["error_console"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["error_console"], "propagate": False,
                               "qualname": "gunicorn.error"},
            "gunicorn.access": {"level": level, "handlers": ["console"], "propagate": False,
                                "qualname": "gunicorn.access"},
        },
    }
