"""What parent and child say to each other over their two pipes.

A request is two lengths, the job's arguments as JSON and the document's bytes; a reply is one
length-prefixed JSON object: the job's answer (``{"answer": {...}, "clean": bool}``, the first one from a
child also carrying its ``baseline`` size), or ``{"failure": "memory"}`` when the job ran out of memory.
Nothing else crosses: no pickles (a child that misbehaves could make the parent unpickle anything), no
exceptions, no HTTP statuses. Each side turns the plain data back into its own types.

The parent never blocks on a pipe past a deadline (non-blocking writes, ``poll`` for reading: a busy
worker may hold descriptors above ``FD_SETSIZE``, which ``select`` can't watch); the child blocks, since
its parent ending it is the only way out it needs.
"""
from __future__ import annotations

import json
import math
import os
import select
import struct
import time
from dataclasses import dataclass
from typing import Any

_LENGTH = struct.Struct("!I")
_REQUEST = struct.Struct("!II")  # length of the JSON arguments, length of the document
MAX_REPLY = 64 * 1024  # an answer is a few hundred bytes; anything longer is not from our child


@dataclass(frozen=True)
class Answer:
    """What a job returns: a JSON-able ``body`` for the caller, and whether the child that made it may
    take another document (``clean``: nothing went the odd way a hostile file could lead a parser)."""

    body: dict[str, Any]
    clean: bool


# --- the child's side (blocking) ---------------------------------------------------------------------

def read_request(fd: int) -> tuple[dict[str, Any], bytes] | None:
    """The next request (arguments, document), or ``None`` once the parent closed the pipe."""
    head = _read_exactly(fd, _REQUEST.size)
    if head is None:
        return None
    arguments_length, data_length = _REQUEST.unpack(head)
    arguments = _read_exactly(fd, arguments_length)
    data = _read_exactly(fd, data_length)
    if arguments is None or data is None:
        raise EOFError("request cut short")
    return json.loads(arguments), data


def _read_exactly(fd: int, length: int) -> bytes | None:
    buffer = bytearray(length)
    view = memoryview(buffer)
    filled = 0
    while filled < length:
        count = os.readv(fd, [view[filled:]])
        if count == 0:
            return None
        filled += count
    view.release()
    return bytes(buffer)


def frame(payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    return _LENGTH.pack(len(body)) + body


def answer_frame(answer: Answer, baseline: tuple[int, int] | None) -> bytes:
    payload: dict[str, Any] = {"answer": answer.body, "clean": answer.clean}
    if baseline is not None:
        payload["baseline"] = list(baseline)
    return frame(payload)


MEMORY_FAILURE = "memory"


def failure_frame(failure: str) -> bytes:
    return frame({"failure": failure})


def write_all(fd: int, message: bytes) -> None:
    view = memoryview(message)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# --- the parent's side (never past a deadline) ------------------------------------------------------

def encode_request(arguments: dict[str, Any], data: bytes) -> bytes:
    header = json.dumps(arguments).encode("utf-8")
    return _REQUEST.pack(len(header), len(data)) + header + data


def write_until(fd: int, data: bytes, deadline: float) -> bool:
    """Write all of ``data`` to a non-blocking ``fd``; ``False`` if the deadline passed first."""
    view = memoryview(data)
    poller = select.poll()
    poller.register(fd, select.POLLOUT | select.POLLERR)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(max(1, math.ceil(remaining * 1000)))
            continue
        view = view[written:]
    return True


def read_reply(fd: int, deadline: float) -> tuple[bytes | None, bool, bool]:
    """The child's length-prefixed reply or ``None``; whether the deadline passed first; and whether
    exactly one reply came (nothing after it)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    received = bytearray()
    while not _complete(received):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, True, False
        if not poller.poll(max(1, math.ceil(remaining * 1000))):
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break  # EOF: the child exited or died
        received += chunk
    if len(received) < _LENGTH.size:
        return None, False, False
    length = _LENGTH.unpack_from(received)[0]
    if length > MAX_REPLY or len(received) < _LENGTH.size + length:
        return None, False, False
    return bytes(received[_LENGTH.size:_LENGTH.size + length]), False, len(received) == _LENGTH.size + length


def _complete(received: bytearray) -> bool:
    """Enough read: a whole reply, or a length no reply of ours has (stop reading, judge it)."""
    if len(received) < _LENGTH.size:
        return False
    length = _LENGTH.unpack_from(received)[0]
    return length > MAX_REPLY or len(received) >= _LENGTH.size + length


@dataclass(frozen=True)
class Reply:
    """A reply as the parent understands it: an answer, a failure the child reported, or neither
    (``malformed``: not a reply our child makes)."""

    answer: dict[str, Any] | None = None
    clean: bool = False
    baseline: tuple[int, int] | None = None
    failure: str | None = None

    @property
    def malformed(self) -> bool:
        return self.answer is None and self.failure is None


def decode_reply(message: bytes) -> Reply:
    try:
        payload = json.loads(message)
        if not isinstance(payload, dict):
            return Reply()
        if payload.get("failure") == MEMORY_FAILURE:
            return Reply(failure=MEMORY_FAILURE)
        answer, clean = payload["answer"], payload["clean"]
        if not isinstance(answer, dict) or not isinstance(clean, bool):
            return Reply()
        raw = payload.get("baseline")
        baseline = (int(raw[0]), int(raw[1])) if isinstance(raw, list) and len(raw) == 2 else None
        return Reply(answer=answer, clean=clean, baseline=baseline)
    except (ValueError, KeyError, TypeError, IndexError):
        return Reply()
