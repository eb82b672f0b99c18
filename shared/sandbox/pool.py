"""The parent's side: this process's children, reused across documents, and how one document's run ends.

**Pre-forked children.** A fork per document costs far more CPU than a check (page tables, copy-on-write
faults and the exit of a copy of a worker-sized process; ``loadtests/bench/preflight.py``, figures in
``docs/benchmarks.md``). So each process keeps a small pool of children per job, forked lazily on first
use, each serving documents one after another over a pair of pipes. A child goes back to the pool only
after a clean answer and only while it is healthy; it is retired (``SIGKILL`` + reap, replaced on the
next use) after

* anything but a clean answer: a timeout, a crash, a malformed or oversized reply, an out-of-memory, and
  any answer its job calls unclean (for the preflight: every rejection; such documents are rare among
  real buyers and are exactly those that may have driven the parser down odd paths);
* ``max_documents`` documents, and as soon as its resident set (the anonymous part) or its mapped size
  has grown more than ``max_growth_bytes`` beyond the child's own when it was ready, read from
  ``/proc/<pid>/statm`` after each document. A slow leak in a parser, or a document that leaves a large
  heap behind, thus can't change later verdicts. Without ``/proc`` (not Linux) a child can't be measured
  and is retired after each document.

Why reuse is acceptable: a job keeps no per-document state at module level (the parsing limits are a
context variable set per check) and the child collects a document's garbage before it answers; what
outlives a document are caches of constant inputs (the stamp art), the same for every document.

**Threads.** Parents are multi-threaded (a Celery pool process with the connection pool's threads, a
gunicorn ``gthread`` worker). The death signal follows the *thread* that forked, so a child is only
reused by the thread that made it: a thread that ends takes its child with it, never in the middle of
another thread's document, and the next check retires what such threads left idle. Signals that raise
in the parent (Celery's soft time limit is ``SIGUSR1``) are held while a child is forked and registered,
so none can land between the fork and the bookkeeping and leave a child nobody knows of; a wait
interrupted that way still retires the child in use. A process forked from this one (Celery's pool, say)
starts with an empty pool (``os.register_at_fork``): children belong to the process that made them.

Why ``os.fork`` and not a fresh interpreter: the fork inherits what the parent already imported (the
preflight's pypdf and reportlab, and the stamp art drawn once); ``subprocess`` of ``python -m …`` pays
an interpreter start and all imports per child. ``multiprocessing`` is not an option: billiard's pool
children are daemonic and refuse to have children.
"""
from __future__ import annotations

import atexit
import fcntl
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from shared.logs import log_event

from . import child as child_side
from . import jobs, protocol
from .limits import Limits, statm

log = logging.getLogger(__name__)

# Why a run gave no answer.
TIMEOUT = "timeout"  # past the wall-clock deadline: killed by us
CPU = "cpu"  # RLIMIT_CPU ended it (SIGXCPU)
MEMORY = "memory"  # the job ran out of address space, or the kernel's OOM killer took the child
CRASHED = "crashed"  # any other death, or a reply that is not one

_REAP_GRACE_SECONDS = 1.0
_PIPE_BYTES = 1024 * 1024
_MAX_IDLE_CHILDREN = 4  # more than one only when threads of one process check documents at once
_HELD_DURING_SPAWN = {signal.SIGUSR1, signal.SIGALRM, signal.SIGINT, signal.SIGTERM}


class SandboxUnavailable(Exception):
    """No child process could be started (out of processes or descriptors): come back later."""


@dataclass(frozen=True)
class Outcome:
    """How one document's run ended: the job's answer, or why there is none."""

    answer: dict[str, Any] | None
    failure: str | None = None  # TIMEOUT, CPU, MEMORY or CRASHED when there is no answer
    cause: str = "answered"  # for logs: timeout, signal_SIGKILL, exit_70, reported_memory, malformed, lost
    reused: bool = False  # the child had served documents before this one


class _Child:
    """One forked child with its two pipe ends; killed and reaped exactly once, whatever happens."""

    def __init__(self, pid: int, job: str, requests: int, replies: int, limits: Limits, thread: int) -> None:
        self.pid = pid
        self.job = job
        self.requests = requests  # we write documents here (non-blocking)
        self.replies = replies  # and read answers here
        self.limits = limits
        self.thread = thread
        self.baseline: tuple[int, int] | None = None  # (mapped, anonymous) when it was ready
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
        sizes = statm(self.pid)
        if sizes is None or self.baseline is None:
            return "gone" if sizes is None else "unmeasured"
        mapped, anonymous = sizes
        if anonymous - self.baseline[1] > self.limits.max_growth_bytes:
            return "resident_growth"
        if mapped - self.baseline[0] > self.limits.max_growth_bytes:
            return "mapped_growth"
        return None


class Pool:
    """This process's sandbox children. A child serves one document at a time; the lock guards only the
    pool's lists (a run happens outside it, so threads don't queue behind each other's documents)."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self._lock = threading.Lock()
        self._idle: list[_Child] = []
        self._all: dict[int, _Child] = {}
        self._in_use: dict[int, _Child] = {}  # by thread: the child serving its current document

    def run(self, job: str, request: bytes, limits: Limits, deadline: float) -> Outcome:
        """Send one request to a child (reused or fresh) and wait for its answer until ``deadline``."""
        thread = threading.get_ident()
        reusable_pid = None
        try:
            child = self._take(job, limits)
            try:
                outcome, reusable = _exchange(child, request, deadline)
            except _GoneBeforeRequest:
                # Not the document's doing, so the document gets a fresh child, within its own deadline.
                self._retire(child)
                child = self._spawn(job, limits)
                outcome, reusable = _exchange(child, request, deadline)
            if outcome.answer is not None:
                child.documents += 1
            if reusable:
                reusable_pid = child.pid
            return outcome
        finally:
            # Also when the caller's wait was interrupted (e.g. Celery's soft time limit), wherever that
            # landed: the child in use is the one _take/_spawn registered for this thread, not whatever
            # a local variable held at that moment.
            with self._lock:
                in_use = self._in_use.pop(thread, None)
            if in_use is not None and in_use.pid == reusable_pid:
                self._give_back(in_use)
            elif in_use is not None:
                self._retire(in_use)

    def children(self, job: str | None = None) -> dict[int, int]:
        with self._lock:
            return {pid: child.documents for pid, child in self._all.items()
                    if not child.done and job in (None, child.job)}

    def shutdown(self) -> None:
        """Retire every child this pool knows of, idle or not: at process exit nothing is in use, and one
        that an interrupt left unregistered as idle is still in ``_all``."""
        with self._lock:
            self._idle = []
            known = [child for child in self._all.values() if not child.done]
        for child in known:
            self._retire(child)

    def _take(self, job: str, limits: Limits) -> _Child:
        """An idle child this thread made for this job with these limits, alive; else a new one. Idle
        children made with other limits, or by threads that have ended (whose death signal has killed
        them), are retired on the way, so none is left unreaped."""
        thread = threading.get_ident()
        threads = {alive.ident for alive in threading.enumerate()}
        found = None
        with self._lock:
            for child in reversed(self._idle):
                if child.job == job and child.limits == limits and child.thread == thread:
                    found = child
                    self._in_use[thread] = child  # before it leaves the idle list: never in neither
                    break
            stale = [child for child in self._idle if child is not found and (
                child.thread not in threads or (child.job == job and child.limits != limits))]
            self._idle = [child for child in self._idle if child is not found and child not in stale]
        for child in stale:
            self._retire(child)
        if found is not None and not found.exited():
            return found
        if found is not None:
            self._retire(found)
        return self._spawn(job, limits)

    def _give_back(self, child: _Child) -> None:
        why = child.outgrown()
        if why is None:
            with self._lock:
                if len(self._idle) < _MAX_IDLE_CHILDREN:
                    self._idle.append(child)
                    return
            why = "pool_full"
        log_event(log, "sandbox_child_retired", logging.DEBUG if why == "documents" else logging.INFO,
                  job=child.job, pid=child.pid, reason=why, documents=child.documents)
        self._retire(child)

    def _retire(self, child: _Child) -> None:
        child.kill()
        child.close_pipes()
        with self._lock:
            self._all.pop(child.pid, None)
            if self._in_use.get(child.thread) is child:
                del self._in_use[child.thread]

    def _spawn(self, job: str, limits: Limits) -> _Child:
        """Fork a child that serves documents until it is retired or its parent dies."""
        parent_pid = os.getpid()
        descriptors: list[int] = []
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
                raise SandboxUnavailable(f"can't start a sandbox child: {exc}") from exc
            if pid == 0:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                child_side.serve(job, requests_read, replies_write, parent_pid, limits)
            child = _Child(pid, job, requests_write, replies_read, limits, threading.get_ident())
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
_current_pool: Pool | None = None


def current() -> Pool:
    """This process's pool (a new, empty one in a process forked from the pool's owner)."""
    global _current_pool
    with _pool_lock:
        if _current_pool is None or _current_pool.owner != os.getpid():
            _current_pool = Pool()
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


def _exchange(child: _Child, request: bytes, deadline: float) -> tuple[Outcome, bool]:
    """One document through ``child``, and whether the child may take another; raises
    :class:`_GoneBeforeRequest` (reused children only)."""
    reused = child.documents > 0
    try:
        sent = protocol.write_until(child.requests, request, deadline)
    except BrokenPipeError:
        if reused:
            raise _GoneBeforeRequest() from None
        sent = True  # a fresh child that died at once: judged below by how it died, as always
    if not sent:
        return Outcome(None, TIMEOUT, "timeout", reused), False
    message, timed_out, exact = protocol.read_reply(child.replies, deadline)
    if timed_out:
        return Outcome(None, TIMEOUT, "timeout", reused), False
    if message is None:
        status = child.reap(deadline + _REAP_GRACE_SECONDS)
        failure, cause = _judge_death(status)
        return Outcome(None, failure, cause, reused), False
    reply = protocol.decode_reply(message)
    if reply.failure == protocol.MEMORY_FAILURE:
        return Outcome(None, MEMORY, "reported_memory", reused), False
    if reply.answer is None:
        return Outcome(None, CRASHED, "malformed", reused), False
    if reply.baseline is not None and child.baseline is None:
        child.baseline = reply.baseline
    # Bytes beyond one reply can only come from a child in a state we don't understand: answer from the
    # reply, but never use that child again.
    return Outcome(reply.answer, reused=reused), reply.clean and exact


def _judge_death(status: int | None) -> tuple[str, str]:
    if status is None:
        return CRASHED, "lost"
    if os.WIFSIGNALED(status):
        killed_by = os.WTERMSIG(status)
        cause = f"signal_{signal.Signals(killed_by).name}"
        if killed_by == signal.SIGKILL:  # not by us (we would have said timeout): the kernel's OOM killer
            return MEMORY, cause
        if killed_by == signal.SIGXCPU:  # RLIMIT_CPU
            return CPU, cause
        return CRASHED, cause
    return CRASHED, f"exit_{os.WEXITSTATUS(status)}"


def _widen(fd: int) -> None:
    """Room for a whole ordinary document in the pipe (1 MiB, the unprivileged maximum, instead of
    64 KiB), so sending it is one write rather than a ping-pong of wake-ups; best effort."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except (OSError, AttributeError):
        pass


def run(job: str, data: bytes, arguments: dict[str, Any], limits: Limits, *, preload: bool = False) -> Outcome:
    """Run ``job`` on ``data`` in a sandbox child of this process, bounded by ``limits``.

    ``preload``: import the job (and warm its caches) in this process first, so every child inherits it
    instead of importing it itself; for callers that load the job's libraries anyway (workers), never
    for the web process. Raises :class:`SandboxUnavailable` if no child can be started.
    """
    jobs.check(job)
    if preload:
        jobs.load(job)
    started = time.monotonic()
    return current().run(job, protocol.encode_request(arguments, data), limits, started + limits.timeout_seconds)


def children(job: str | None = None) -> dict[int, int]:
    """This process's live sandbox children (of ``job``, or all), idle or busy: process id → documents
    answered so far (for tests and diagnostics)."""
    return current().children(job)


def shutdown_children() -> None:
    """Retire every child of this process now (they would also die with it)."""
    current().shutdown()
