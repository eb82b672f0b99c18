"""Run the preflight in a child process with hard limits on time and memory, reused across documents.

Why: the preflight parses a stranger's PDF. pypdf is hardened, but a parser bug that loops or allocates
without bound inside a Celery prefork child would run into the task's hard time limit; the pool kills
the child and, because of ``acks_late`` + ``task_reject_on_worker_lost``, the message is redelivered,
again and again, and the order never gets an answer. Here the damage stays in a process of its own:

* the parent enforces a wall-clock deadline per document (``SIGKILL``, then reaps the child: no
  zombies);
* the child runs under ``RLIMIT_AS`` (address space) and ``RLIMIT_CPU`` (a backstop should the parent
  be stopped), and dies with its parent (``PR_SET_PDEATHSIG``) if the worker itself is killed or
  recycled (Celery's ``max-tasks-per-child``);
* every way a document's check can end becomes an answer for the buyer: the preflight's own verdict, or
  :class:`DocumentRejected` "too_complex" (out of time or memory) or "unreadable" (crashed, or an answer
  that is not one).

**Pre-forked children.** Forking per document cost about 18 ms of CPU (page tables, copy-on-write faults
and the exit of a copy of a ~125 MB worker) around a 3 ms check: the biggest single CPU item of an order.
So each worker process keeps a small pool of children (:class:`PreflightPool`), forked lazily on first
use (the first document a worker process checks pays for the fork, as every document did), each
serving documents one after another over a pair of pipes. ``loadtests/bench_preflight.py`` measures
the three ways side by side (figures in ``docs/benchmarks.md``). A child goes back to the pool only
after an accepted document and only while it is healthy; it is retired (``SIGKILL`` + reap, replaced on
the next use) after

* anything but a clean "accepted" answer: a timeout, a crash, a malformed or oversized reply, an out-of-
  memory, *and any rejection*. Rejections are rare among real buyers and are exactly the documents that
  may have driven the parser down odd paths; such a document costs one fork, as every document did
  before;
* ``max_documents`` documents (``PREFLIGHT_CHILD_MAX_DOCUMENTS``), and as soon as its resident set
  (the anonymous part: memory the child allocated and touched, not the libraries' file pages it faults
  in) or its mapped size has grown more than ``max_growth_bytes`` (``PREFLIGHT_CHILD_MAX_GROWTH_BYTES``)
  beyond the worker's own at the fork, read by the parent from ``/proc/<pid>/statm`` after each
  document. A slow leak in a parser, or a document that leaves a large heap behind, thus can't change
  later verdicts. (Measured: a letter leaves 16-44 KiB behind, a 400-page document up to 1 MiB.)
  Without ``/proc`` (not Linux) a child can't be measured and is retired after each document.

Why reuse is acceptable: everything a check creates hangs off its own ``PdfReader`` and ``PdfWriter``
(pypdf keeps no per-document module state; the parsing limits are a context variable set per check),
and the child collects that garbage before it answers. What outlives a document are caches of our own
constant inputs (the stamp art, the trial serial's QR code), the same for every document. The child
never touches the database, the broker or the network: it only reads a request pipe (and leaves when
that closes) and writes a reply pipe. The memory headroom of each document is what it was with a fresh
fork: the soft ``RLIMIT_AS`` is set before each document to the child's current mapped size plus
``memory_bytes``, and the recycling bound keeps the hard limit (the fork's mapped size +
``memory_bytes`` + twice the growth bound) out of the way.

**CPU backstop.** ``RLIMIT_CPU`` counts a process's whole life, so the child sets it per document: the
soft limit (``SIGXCPU``, ending the child) to its CPU time so far plus the per-document budget
(``ceil(timeout) + 1`` seconds), the hard limit (``SIGKILL``; can only be lowered, so set once at the
fork) to that budget × (``max_documents`` + 1). A runaway document is thus stopped within one budget
even if the parent were stopped, and no child can burn more than its lifetime's worth. Core dumps are
off: a crashing or ``SIGXCPU``-ed child would otherwise write hundreds of megabytes.

Why ``os.fork`` and not a fresh interpreter: the fork inherits the already imported pypdf and
reportlab (and the stamp art, drawn once in the parent); ``subprocess`` of ``python -m …`` costs
250-360 ms of interpreter start and imports alone. ``multiprocessing`` is not an option: billiard's
pool children are daemonic and refuse to have children.

What makes the fork safe here: right after the fork the child closes every file descriptor it
inherited except standard input, output and error and its two pipes, so it holds no database, broker or
client socket at all (closing a duplicate descriptor sends nothing: the worker's connections stay
open), and it ends with ``os._exit`` so it never runs atexit handlers or flushes inherited buffers. The
collector is frozen, so it never finalises an inherited object. Threads the worker may have (the
connection pool's) do not exist in the child; the interpreter re-initialises its own locks after
``fork``, and a lock that another thread held at the moment of the fork could at worst stall the child
until the deadline, which ends as "too_complex" for that document (and a fresh child for the next),
never as a hung worker. The death signal follows the *thread* that forked, so a child is only reused
by the thread that made it: a thread that ends takes its child with it, never in the middle of another
thread's document. A process forked from the worker (Celery's pool, say) starts with an empty pool
(``os.register_at_fork``): children belong to the process that made them.
"""
from __future__ import annotations

import atexit
import ctypes
import fcntl
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
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

from shared.errors import TransientError
from shared.logs import log_event

from . import art
from .kernel import STAMP_SIZE, DocumentRejected, unreadable
from .preflight import PreflightResult, preflight, quick_check

log = logging.getLogger(__name__)

DEFAULT_CHILD_MAX_DOCUMENTS = 200
DEFAULT_CHILD_MAX_GROWTH_BYTES = 64 * 1024 * 1024

_LENGTH = struct.Struct("!I")
_REQUEST = struct.Struct("!II")  # length of the JSON arguments, length of the document
_MAX_MESSAGE = 64 * 1024  # a verdict is a few hundred bytes; anything longer is not from our child
_EXIT_FAILED = 70  # the child could not even report (EX_SOFTWARE)
_PR_SET_PDEATHSIG = 1
_REAP_GRACE_SECONDS = 1.0
_PIPE_BYTES = 1024 * 1024
_MAX_IDLE_CHILDREN = 4  # more than one only when threads of one process check documents at once
_HELD_DURING_SPAWN = {signal.SIGUSR1, signal.SIGALRM, signal.SIGINT, signal.SIGTERM}
_RESET_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD",
                  "SIGXCPU")

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
    """What a child is made with; a call with other limits gets a child made with those."""

    timeout_seconds: float
    memory_bytes: int
    max_documents: int
    max_growth_bytes: int

    @property
    def cpu_seconds_per_document(self) -> int:
        return max(1, math.ceil(self.timeout_seconds) + 1)


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
    child_max_documents: int = DEFAULT_CHILD_MAX_DOCUMENTS,
    child_max_growth_bytes: int = DEFAULT_CHILD_MAX_GROWTH_BYTES,
) -> PreflightResult:
    """:func:`~shared.stamping.preflight` in a pre-forked child, bounded in time and memory.

    ``timeout_seconds`` is wall-clock time for the whole check, a fork included when one is needed.
    ``memory_bytes`` is how much address space the check may add on top of what the child maps when the
    document arrives (the child starts as a copy of the worker, so an absolute limit would depend on the
    worker's own footprint). ``child_max_documents`` and ``child_max_growth_bytes``: when a child is
    retired (see the module docstring).

    Returns the :class:`PreflightResult` or raises :class:`DocumentRejected`: the preflight's own codes,
    plus "too_complex" when the child runs out of time or memory and "unreadable" when it dies any other
    way. Raises :class:`TransientError` if no child process can be started (retry later).
    """
    quick_check(data, max_bytes=max_bytes)  # cheap verdicts need no process
    art.static_art()  # drawn once per worker, not once per child: every fork inherits the cached art
    limits = _Limits(timeout_seconds, memory_bytes, max(1, child_max_documents),
                     max(1, child_max_growth_bytes))
    request = _encode_request(data, dict(page=page, x=x, y=y, max_bytes=max_bytes, max_pages=max_pages,
                                         size=size))
    started = time.monotonic()
    outcome = _pool().check(request, limits, started + timeout_seconds)
    if outcome.message is not None:
        return _verdict(outcome.message)
    log_event(log, "preflight_child_failed", logging.WARNING, cause=outcome.cause,
              elapsed_ms=round((time.monotonic() - started) * 1000), document_bytes=len(data),
              reused=outcome.reused)
    if outcome.timed_out:
        raise too_complex()
    status = outcome.status
    killed_by = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
    if killed_by == signal.SIGKILL:  # not by us: the kernel's OOM killer
        raise too_complex(_TOO_BIG)
    if killed_by == signal.SIGXCPU:  # RLIMIT_CPU
        raise too_complex()
    raise unreadable()


def preflight_children() -> dict[int, int]:
    """This process's live preflight children, idle or busy: process id → documents answered so far
    (for tests and diagnostics)."""
    return _pool().children()


def shutdown_preflight_children() -> None:
    """Retire every idle child of this process now (they would also die with it)."""
    _pool().shutdown()


# --- the pool (parent side) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Outcome:
    """How one document's check ended: a message from the child, or why there is none."""

    message: bytes | None
    timed_out: bool = False
    status: int | None = None  # the child's wait status when it died on its own
    reused: bool = False  # the child had served documents before this one
    clean: bool = True  # exactly one reply came, nothing after it

    @property
    def cause(self) -> str:
        return "timeout" if self.timed_out else _describe(self.status)


class _Child:
    """One forked child with its two pipe ends; killed and reaped exactly once, whatever happens."""

    def __init__(self, pid: int, requests: int, replies: int, limits: _Limits, thread: int,
                 mapped_at_fork: int, anonymous_at_fork: int) -> None:
        self.pid = pid
        self.requests = requests  # we write documents here (non-blocking)
        self.replies = replies  # and read verdicts here
        self.limits = limits
        self.thread = thread
        self.mapped_at_fork = mapped_at_fork
        self.anonymous_at_fork = anonymous_at_fork
        self.documents = 0
        self.done = False

    def exited(self) -> bool:
        """Whether the child is gone (reaping it if so), without waiting."""
        if self.done:
            return True
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid = self.pid
        if pid:
            self.done = True
        return self.done

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

    def close_pipes(self) -> None:
        # Forget the numbers *before* closing them: os.close lets other threads run, and a number
        # closed but still listed here could be handed out again by os.pipe() in another thread and
        # then closed by mistake (in a process forked meanwhile, by forget_after_fork).
        fds, self.requests, self.replies = (self.requests, self.replies), -1, -1
        for fd in fds:
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass

    def outgrown(self) -> str | None:
        """Why this child should not take another document, if it shouldn't."""
        if self.documents >= self.limits.max_documents:
            return "documents"
        sizes = _statm(self.pid)
        if sizes is None:
            return "gone"
        mapped, anonymous = sizes
        if anonymous - self.anonymous_at_fork > self.limits.max_growth_bytes:
            return "resident_growth"
        if mapped - self.mapped_at_fork > self.limits.max_growth_bytes:
            return "mapped_growth"
        return None


class PreflightPool:
    """This process's preflight children. A child serves one document at a time; the lock guards only
    the pool's lists (a check runs outside it, so threads don't queue behind each other's documents)."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self._lock = threading.Lock()
        self._idle: list[_Child] = []
        self._all: dict[int, _Child] = {}
        self._in_use: dict[int, _Child] = {}  # by thread: the child serving its current document

    def check(self, request: bytes, limits: _Limits, deadline: float) -> _Outcome:
        """Send one request to a child (reused or fresh) and wait for its answer until ``deadline``."""
        thread = threading.get_ident()
        reusable_pid = None
        try:
            child = self._take(limits)
            try:
                outcome = _exchange(child, request, deadline)
            except _GoneBeforeRequest:
                # Not the document's doing, so the document gets a fresh child, within its own deadline.
                self._retire(child)
                child = self._spawn(limits)
                outcome = _exchange(child, request, deadline)
            if outcome.message is not None:
                child.documents += 1
                if outcome.clean and _accepted(outcome.message):
                    reusable_pid = child.pid
            return outcome
        finally:
            # Also when the caller's wait was interrupted (e.g. Celery's soft time limit), wherever
            # that landed: the child in use is the one _take/_spawn registered for this thread, not
            # whatever a local variable held at that moment.
            with self._lock:
                in_use = self._in_use.pop(thread, None)
            if in_use is not None and in_use.pid == reusable_pid:
                self._give_back(in_use)
            elif in_use is not None:
                self._retire(in_use)

    def children(self) -> dict[int, int]:
        with self._lock:
            return {pid: child.documents for pid, child in self._all.items() if not child.done}

    def shutdown(self) -> None:
        """Retire every child this pool knows of, idle or not: at process exit nothing is in use, and
        one that an interrupt left unregistered as idle is still in ``_all``."""
        with self._lock:
            self._idle = []
            known = [child for child in self._all.values() if not child.done]
        for child in known:
            self._retire(child)

    def _take(self, limits: _Limits) -> _Child:
        """An idle child this thread made with these limits, alive; else a new one. Idle children made
        with other limits, or by threads that have ended (whose death signal has killed them), are
        retired on the way, so none is left unreaped."""
        thread = threading.get_ident()
        threads = {alive.ident for alive in threading.enumerate()}
        found = None
        with self._lock:
            for child in reversed(self._idle):
                if child.limits == limits and child.thread == thread:
                    found = child
                    self._in_use[thread] = child  # before it leaves the idle list: never in neither
                    break
            stale = [child for child in self._idle
                     if child is not found and (child.limits != limits or child.thread not in threads)]
            self._idle = [child for child in self._idle if child is not found and child not in stale]
        for child in stale:
            self._retire(child)
        if found is not None and not found.exited():
            return found
        if found is not None:
            self._retire(found)
        return self._spawn(limits)

    def _give_back(self, child: _Child) -> None:
        why = child.outgrown()
        if why is None:
            with self._lock:
                if len(self._idle) < _MAX_IDLE_CHILDREN:
                    self._idle.append(child)
                    return
            why = "pool_full"
        log_event(log, "preflight_child_retired", logging.DEBUG if why == "documents" else logging.INFO,
                  pid=child.pid, reason=why, documents=child.documents)
        self._retire(child)

    def _retire(self, child: _Child) -> None:
        child.kill()
        child.close_pipes()
        with self._lock:
            self._all.pop(child.pid, None)
            if self._in_use.get(child.thread) is child:
                del self._in_use[child.thread]

    def _spawn(self, limits: _Limits) -> _Child:
        """Fork a child that serves documents until it is retired or its parent dies."""
        mapped, anonymous = _statm("self") or (0, 0)
        parent_pid = os.getpid()
        descriptors: list[int] = []
        # Celery's soft time limit is an exception raised from a signal handler (SIGUSR1). Landing
        # between the fork and the registration below it would leave a child nobody knows of, so the
        # signals that raise are held until the child is registered (and the child resets them).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_DURING_SPAWN)
        try:
            try:
                requests_read, requests_write = os.pipe()
                descriptors += [requests_read, requests_write]
                replies_read, replies_write = os.pipe()
                descriptors += [replies_read, replies_write]
                pid = os.fork()
            except OSError as exc:
                for fd in descriptors:
                    os.close(fd)
                raise TransientError("Pemeriksaan dokumen belum dapat dijalankan; akan dicoba lagi.",
                                     code="preflight_unavailable") from exc
            if pid == 0:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                _serve(requests_read, replies_write, parent_pid, limits, mapped)
            child = _Child(pid, requests_write, replies_read, limits, threading.get_ident(), mapped, anonymous)
            with self._lock:
                self._all[pid] = child
                self._in_use[child.thread] = child
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        try:
            os.close(requests_read)
            os.close(replies_write)
            os.set_blocking(requests_write, False)  # a child that stops reading can't hold us past a deadline
            _widen(requests_write)
        except BaseException:
            self._retire(child)
            raise
        return child

    def forget_after_fork(self) -> None:
        """In a process forked from this one: these children are not ours; let go of their pipes."""
        for child in list(self._all.values()):
            child.close_pipes()
            child.done = True  # never signal or wait for another process's child


_pool_lock = threading.Lock()
_current_pool: PreflightPool | None = None


def _pool() -> PreflightPool:
    global _current_pool
    with _pool_lock:
        if _current_pool is None or _current_pool.owner != os.getpid():
            _current_pool = PreflightPool()
        return _current_pool


def _after_fork_in_child() -> None:
    global _current_pool, _pool_lock
    _pool_lock = threading.Lock()  # another thread may have held it at the moment of the fork
    if _current_pool is not None:
        _current_pool.forget_after_fork()
    _current_pool = None


def _shutdown_at_exit() -> None:
    if _current_pool is not None and _current_pool.owner == os.getpid():
        _current_pool.shutdown()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_shutdown_at_exit)


class _GoneBeforeRequest(Exception):
    """A reused child had died before it received the document: nothing is known about the document."""


def _exchange(child: _Child, request: bytes, deadline: float) -> _Outcome:
    """One document through ``child``; raises :class:`_GoneBeforeRequest` (reused children only)."""
    reused = child.documents > 0
    try:
        sent = _write_until(child.requests, request, deadline)
    except BrokenPipeError:
        if reused:
            raise _GoneBeforeRequest() from None
        sent = True  # a fresh child that died at once: judged below by how it died, as always
    if not sent:
        return _Outcome(None, timed_out=True, reused=reused)
    message, timed_out, exact = _read_message(child.replies, deadline)
    if timed_out:
        return _Outcome(None, timed_out=True, reused=reused)
    if message is None:
        return _Outcome(None, status=child.reap(deadline + _REAP_GRACE_SECONDS), reused=reused)
    # Bytes beyond one reply can only come from a child in a state we don't understand: answer from the
    # reply, but never use that child again.
    return _Outcome(message, reused=reused, clean=exact)


def _widen(fd: int) -> None:
    """Room for a whole ordinary document in the pipe (1 MiB, the unprivileged maximum, instead of
    64 KiB), so sending it is one write rather than a ping-pong of wake-ups; best effort."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except (OSError, AttributeError):
        pass


def _write_until(fd: int, data: bytes, deadline: float) -> bool:
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


def _read_message(fd: int, deadline: float) -> tuple[bytes | None, bool, bool]:
    """The child's length-prefixed message or ``None``; whether the deadline passed first; and whether
    exactly one message came (nothing after it).

    ``poll`` rather than ``select``: a busy worker may hold file descriptors above ``FD_SETSIZE``.
    """
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
    if length > _MAX_MESSAGE or len(received) < _LENGTH.size + length:
        return None, False, False
    return bytes(received[_LENGTH.size:_LENGTH.size + length]), False, len(received) == _LENGTH.size + length


def _complete(received: bytearray) -> bool:
    """Enough read: a whole message, or a length no message of ours has (stop reading, judge it)."""
    if len(received) < _LENGTH.size:
        return False
    length = _LENGTH.unpack_from(received)[0]
    return length > _MAX_MESSAGE or len(received) >= _LENGTH.size + length


def _accepted(message: bytes) -> bool:
    try:
        return json.loads(message).get("ok") is True
    except (ValueError, AttributeError):
        return False


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


def _statm(pid: int | str) -> tuple[int, int] | None:
    """Mapped bytes and anonymous resident bytes (resident minus file-backed: what the process itself
    allocated and touched) of a process, from Linux ``/proc``; ``None`` where unknown."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            fields = statm.read().split()
        page = resource.getpagesize()
        return int(fields[0]) * page, (int(fields[1]) - int(fields[2])) * page
    except (OSError, ValueError, IndexError):
        return None


def _encode_request(data: bytes, arguments: dict[str, Any]) -> bytes:
    header = json.dumps(arguments).encode("utf-8")
    return _REQUEST.pack(len(header), len(data)) + header + data


# --- the child ------------------------------------------------------------------------------------

def _serve(requests: int, replies: int, parent_pid: int, limits: _Limits, mapped_at_fork: int) -> NoReturn:
    """Check documents one by one until the request pipe closes, the parent dies or something goes wrong;
    leave without running any of the worker's cleanup."""
    code = _EXIT_FAILED
    try:
        # Encoded before the limits apply, so running out of memory can still be reported.
        out_of_memory = _encode_rejection(too_complex(_TOO_BIG))
        _detach_from_worker(parent_pid, keep=(requests, replies))
        cpu_hard, address_space_hard = _apply_lifetime_limits(limits, mapped_at_fork)
        while True:
            request = _read_request(requests)
            if request is None:
                code = 0  # the parent closed the pipe
                break
            arguments, data = request
            _apply_document_limits(limits, cpu_hard, address_space_hard)
            message = _check(data, arguments, out_of_memory)
            del request, data
            gc.collect()  # this document's garbage goes before the next one (and before we're measured)
            _write_all(replies, message)
    except BaseException:  # noqa: BLE001 - the parent turns a silent exit into "unreadable"
        pass
    finally:
        os._exit(code)


def _check(data: bytes, arguments: dict[str, Any], out_of_memory: bytes) -> bytes:
    try:
        return _encode_result(preflight(data, **arguments))
    except MemoryError:
        return out_of_memory
    except DocumentRejected as exc:
        return out_of_memory if _ran_out_of_memory(exc) else _encode_rejection(exc)
    except RecursionError:
        return _encode_rejection(unreadable())


def _detach_from_worker(parent_pid: int, keep: tuple[int, ...]) -> None:
    """Default signal dispositions (the worker's handlers are not ours), no descriptor of the worker's,
    die with the parent, and leave the worker's objects alone: frozen, the collector never finalises
    (say, closes) anything inherited, nor touches those pages, which would copy them.

    The death signal follows the thread that forked, which is the only one that uses this child.
    """
    gc.freeze()
    for name in _RESET_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    _close_inherited_descriptors(keep)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # best effort; RLIMIT_CPU still ends a runaway child nobody waits for
    if os.getppid() != parent_pid:
        os._exit(_EXIT_FAILED)  # the parent died before the death signal was armed
    # pypdf warns once per broken object; a hostile file can write tens of thousands of lines.
    logging.getLogger("pypdf").setLevel(logging.ERROR)


def _close_inherited_descriptors(keep: tuple[int, ...]) -> None:
    """Close everything above standard error except ``keep``: database and broker sockets, listening
    sockets, log files, other children's pipes. (Closing a descriptor the worker also holds sends
    nothing to the other end.)"""
    low = 3
    for fd in sorted(keep):
        if fd < low:
            continue
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(low, os.sysconf("SC_OPEN_MAX")))


def _apply_lifetime_limits(limits: _Limits, mapped_at_fork: int) -> tuple[int, int]:
    """The hard limits, for the child's whole life; returns them (CPU seconds, address-space bytes)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu_hard = limits.cpu_seconds_per_document * (limits.max_documents + 1)
    _, previous = resource.getrlimit(resource.RLIMIT_CPU)
    if previous != resource.RLIM_INFINITY:
        cpu_hard = min(cpu_hard, previous)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_hard, cpu_hard))
    base = mapped_at_fork or _mapped_bytes()
    address_space_hard = base + limits.memory_bytes + 2 * limits.max_growth_bytes
    _, previous = resource.getrlimit(resource.RLIMIT_AS)
    if previous != resource.RLIM_INFINITY:
        address_space_hard = min(address_space_hard, previous)
    resource.setrlimit(resource.RLIMIT_AS, (address_space_hard, address_space_hard))
    return cpu_hard, address_space_hard


def _apply_document_limits(limits: _Limits, cpu_hard: int, address_space_hard: int) -> None:
    """The soft limits for the next document: one CPU budget from now, ``memory_bytes`` more than now."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = min(cpu_hard, math.ceil(usage.ru_utime + usage.ru_stime) + limits.cpu_seconds_per_document)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu_hard))
    address_space = min(address_space_hard, _mapped_bytes() + limits.memory_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space_hard))


def _mapped_bytes() -> int:
    """This process's current virtual size (Linux); 0 elsewhere, making ``memory_bytes`` absolute."""
    sizes = _statm("self")
    return sizes[0] if sizes else 0


def _read_request(fd: int) -> tuple[dict[str, Any], bytes] | None:
    """The next request (arguments, document), or ``None`` once the parent closed the pipe."""
    head = _read_exactly(fd, _REQUEST.size)
    if head is None:
        return None
    header_length, data_length = _REQUEST.unpack(head)
    header = _read_exactly(fd, header_length)
    data = _read_exactly(fd, data_length)
    if header is None or data is None:
        raise EOFError("request cut short")
    return json.loads(header), data


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
