"""Run the preflight in a throwaway child process with hard limits on time and memory.

Why: the preflight parses a stranger's PDF. pypdf is hardened, but a parser bug that loops or allocates
without bound inside a Celery prefork child would run into the task's hard time limit; the pool kills
the child and, because of ``acks_late`` + ``task_reject_on_worker_lost``, the message is redelivered,
again and again, and the order never gets an answer. Here the damage stays in a process of its own:

* the parent enforces a wall-clock deadline (``SIGKILL``, then reaps the child: no zombies);
* the child runs under ``RLIMIT_AS`` (address space) and ``RLIMIT_CPU`` (a backstop should the parent
  be stopped), and dies with its parent (``PR_SET_PDEATHSIG``) if the worker itself is killed;
* every way the child can end becomes an answer for the buyer: the preflight's own verdict, or
  :class:`DocumentRejected` "too_complex" (out of time or memory) or "unreadable" (crashed).

Why ``os.fork`` and not a fresh interpreter: the fork inherits the already imported pypdf and
reportlab (and the stamp art, drawn once in the parent), so isolation costs one fork, the child's
copy-on-write faults and one exit. Measured on the 2-vCPU test machine, median of 30 runs: 15-30 ms per
document in a process with the worker's imports and a database pool (~125 MB resident, ~430 MB mapped; a
two-page letter: 14 ms in process, 37 ms isolated), about 14 ms in a small one, where ``subprocess`` of
``python -m …`` costs 250-360 ms of interpreter start and imports alone, before any work: over ten times
the preflight itself, at a million documents a day. ``multiprocessing`` is not an option: billiard's
pool children are daemonic and refuse to have children.

What makes the fork safe here: the child touches nothing but the document bytes and the pipe, and ends
with ``os._exit`` so it never runs atexit handlers, flushes inherited buffers or closes the worker's
database and broker connections. Threads the worker may have (the connection pool's) do not exist in the
child; the interpreter re-initialises its own locks after ``fork`` (import lock, logging handlers), and a
lock that another thread held at the moment of the fork could at worst stall the child until the
deadline, which ends as "too_complex", never as a hung worker. (Python 3.12+ warns about ``fork`` in a
threaded process for this reason; revisit if the worker ever runs preflight from a thread it shares.)
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import os
import resource
import select
import signal
import struct
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

from shared.errors import TransientError
from shared.logs import log_event

from . import art
from .kernel import STAMP_SIZE, DocumentRejected, unreadable
from .preflight import PreflightResult, preflight, quick_check

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")
_MAX_MESSAGE = 64 * 1024  # a verdict is a few hundred bytes; anything longer is not from our child
_EXIT_FAILED = 70  # the child could not even report (EX_SOFTWARE)
_PR_SET_PDEATHSIG = 1
_REAP_GRACE_SECONDS = 1.0
_RESET_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD")

_TOO_SLOW = (
    "Dokumen PDF terlalu rumit untuk diperiksa dalam batas waktu. Simpan ulang atau cetak ulang "
    "dokumen ke PDF, lalu unggah kembali."
)
_TOO_BIG = (
    "Dokumen PDF membutuhkan memori terlalu besar untuk diperiksa. Simpan ulang atau cetak ulang "
    "dokumen ke PDF, lalu unggah kembali."
)


def too_complex(message: str = _TOO_SLOW) -> DocumentRejected:
    return DocumentRejected("too_complex", message)


@dataclass(frozen=True)
class _Limits:
    timeout_seconds: float
    memory_bytes: int


def preflight_isolated(
    data: bytes,
    *,
    page: int,
    x: float,
    y: float,
    max_bytes: int,
    max_pages: int,
    size: float = STAMP_SIZE,
    timeout_seconds: float,
    memory_bytes: int,
) -> PreflightResult:
    """:func:`~shared.stamping.preflight` in a forked child, bounded in time and memory.

    ``timeout_seconds`` is wall-clock time for the whole check, fork included. ``memory_bytes`` is how
    much address space the check may add on top of what the calling process already maps (the child
    starts as a copy of the worker, so an absolute limit would depend on the worker's own footprint).

    Returns the :class:`PreflightResult` or raises :class:`DocumentRejected`: the preflight's own codes,
    plus "too_complex" when the child runs out of time or memory and "unreadable" when it dies any other
    way. Raises :class:`TransientError` if no child process can be started (retry later).
    """
    quick_check(data, max_bytes=max_bytes)  # cheap verdicts need no process
    art.static_art()  # drawn once per worker, not once per child: every fork inherits the cached art
    limits = _Limits(timeout_seconds, memory_bytes)
    started = time.monotonic()
    deadline = started + timeout_seconds
    parent_pid = os.getpid()
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_fd)
        os.close(write_fd)
        raise TransientError("Pemeriksaan dokumen belum dapat dijalankan; akan dicoba lagi.",
                             code="preflight_unavailable") from exc
    if pid == 0:
        os.close(read_fd)
        _run_child(write_fd, parent_pid, data, limits,
                   dict(page=page, x=x, y=y, max_bytes=max_bytes, max_pages=max_pages, size=size))
    os.close(write_fd)
    child = _Child(pid)
    try:
        message, timed_out = _read_message(read_fd, deadline)
        status = None if timed_out else child.reap(deadline + _REAP_GRACE_SECONDS)
    finally:
        os.close(read_fd)
        child.kill()  # also when the caller's wait was interrupted (e.g. Celery's soft time limit)
    elapsed_ms = round((time.monotonic() - started) * 1000)
    if message is not None:
        return _verdict(message)
    cause = "timeout" if timed_out else _describe(status)
    log_event(log, "preflight_child_failed", logging.WARNING, cause=cause, elapsed_ms=elapsed_ms,
              document_bytes=len(data))
    if timed_out:
        raise too_complex()
    killed_by = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
    if killed_by == signal.SIGKILL:  # not by us: the kernel's OOM killer
        raise too_complex(_TOO_BIG)
    if killed_by == signal.SIGXCPU:  # RLIMIT_CPU
        raise too_complex()
    raise unreadable()


class _Child:
    """A forked child that is reaped exactly once, whatever happens to the parent meanwhile."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.done = False

    def reap(self, deadline: float) -> int | None:
        """Wait for the child to exit by ``deadline``; its wait status, or ``None`` if it had to be killed
        or was reaped elsewhere (SIGCHLD ignored)."""
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.done = True
                return None
            if pid:
                self.done = True
                return status
            if time.monotonic() >= deadline:
                self.kill()
                return None
            time.sleep(0.002)

    def kill(self) -> None:
        if self.done:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)  # SIGKILL can't be caught: this returns at once
        except ChildProcessError:
            pass
        self.done = True


def _read_message(fd: int, deadline: float) -> tuple[bytes | None, bool]:
    """The child's length-prefixed message, or ``None``; and whether the deadline passed first.

    ``poll`` rather than ``select``: a busy worker may hold file descriptors above ``FD_SETSIZE``.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    received = bytearray()
    while not _complete(received):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, True
        if not poller.poll(max(1, math.ceil(remaining * 1000))):
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break  # EOF: the child exited or died
        received += chunk
    if len(received) < _LENGTH.size:
        return None, False
    length = _LENGTH.unpack_from(received)[0]
    if length > _MAX_MESSAGE or len(received) < _LENGTH.size + length:
        return None, False
    return bytes(received[_LENGTH.size:_LENGTH.size + length]), False


def _complete(received: bytearray) -> bool:
    """Enough read: a whole message, or a length no message of ours has (stop reading, judge it)."""
    if len(received) < _LENGTH.size:
        return False
    length = _LENGTH.unpack_from(received)[0]
    return length > _MAX_MESSAGE or len(received) >= _LENGTH.size + length


def _verdict(message: bytes) -> PreflightResult:
    try:
        verdict = json.loads(message)
        if verdict["ok"]:
            return PreflightResult(page_count=int(verdict["page_count"]),
                                   page_width=float(verdict["page_width"]),
                                   page_height=float(verdict["page_height"]))
        code, text, status = str(verdict["code"]), str(verdict["message"]), int(verdict["status"])
    except (ValueError, KeyError, TypeError) as exc:
        raise unreadable() from exc
    raise DocumentRejected(code, text, status=status)


def _describe(status: int | None) -> str:
    if status is None:
        return "lost"
    if os.WIFSIGNALED(status):
        return f"signal_{signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit_{os.WEXITSTATUS(status)}"


# --- the child ------------------------------------------------------------------------------------

def _run_child(
    write_fd: int, parent_pid: int, data: bytes, limits: _Limits, arguments: dict[str, Any]
) -> NoReturn:
    """Check the document, write one message, and leave without running any of the worker's cleanup."""
    code = _EXIT_FAILED
    try:
        # Encoded before the limits apply, so running out of memory can still be reported.
        out_of_memory = _encode_rejection(too_complex(_TOO_BIG))
        _detach_from_worker(parent_pid)
        _apply_limits(limits)
        try:
            message = _encode_result(preflight(data, **arguments))
        except MemoryError:
            message = out_of_memory
        except DocumentRejected as exc:
            message = out_of_memory if _ran_out_of_memory(exc) else _encode_rejection(exc)
        except RecursionError:
            message = _encode_rejection(unreadable())
        _write_all(write_fd, message)
        code = 0
    except BaseException:  # noqa: BLE001 - the parent turns a silent exit into "unreadable"
        pass
    finally:
        os._exit(code)


def _detach_from_worker(parent_pid: int) -> None:
    """Default signal dispositions (the worker's handlers are not ours), die with the parent, and leave
    the worker's objects alone: frozen, the collector never finalises (say, closes) anything inherited,
    nor touches those pages, which would copy them.

    The death signal follows the thread that forked, which is the one waiting for this child anyway.
    """
    gc.freeze()
    for name in _RESET_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # best effort; RLIMIT_CPU still ends a child nobody waits for
    if os.getppid() != parent_pid:
        os._exit(_EXIT_FAILED)  # the parent died before the death signal was armed
    # pypdf warns once per broken object; a hostile file can write tens of thousands of lines.
    logging.getLogger("pypdf").setLevel(logging.ERROR)


def _apply_limits(limits: _Limits) -> None:
    cpu = max(1, math.ceil(limits.timeout_seconds) + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    address_space = _mapped_bytes() + limits.memory_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        address_space = min(address_space, hard)
    resource.setrlimit(resource.RLIMIT_AS, (address_space, hard))


def _mapped_bytes() -> int:
    """This process's current virtual size (Linux); 0 elsewhere, making ``memory_bytes`` absolute."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def _ran_out_of_memory(exc: BaseException) -> bool:
    """pypdf turns some MemoryErrors into read errors, which the preflight reports as "unreadable"."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, MemoryError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _encode_result(result: PreflightResult) -> bytes:
    return _frame({"ok": True, **asdict(result)})


def _encode_rejection(exc: DocumentRejected) -> bytes:
    return _frame({"ok": False, "code": exc.code, "message": exc.message, "status": exc.status})


def _frame(payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    return _LENGTH.pack(len(body)) + body


def _write_all(fd: int, message: bytes) -> None:
    view = memoryview(message)
    while view:
        written = os.write(fd, view)
        view = view[written:]
