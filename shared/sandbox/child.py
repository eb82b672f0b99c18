"""The child's side: leave the parent's world behind, take on the limits, answer documents one by one.

What makes the fork safe here: right after the fork the child closes every file descriptor it inherited
except standard input, output and error and its two pipes, so it holds no database, broker, client or
listening socket at all (closing a duplicate descriptor sends nothing: the parent's connections stay
open), and it ends with ``os._exit`` so it never runs atexit handlers or flushes inherited buffers. The
collector is frozen, so it never finalises (say, closes) an inherited object, nor touches those pages,
which would copy them. Every Python signal handler of the parent (Celery's, gunicorn's) is reset to the
default.
Threads of the parent do not exist in the child; the interpreter re-initialises its own locks after
``fork``, and a lock another thread held at that moment could at worst stall the child until the
deadline, which ends that document as a timeout (and a fresh child for the next), never as a hung
parent. The child dies with the thread that forked it (``PR_SET_PDEATHSIG``), and never touches the
database, the broker or the network: it reads a request pipe (and leaves when that closes) and writes a
reply pipe.

**Limits.** ``RLIMIT_AS`` bounds the address space: the soft limit is set before each document to the
child's current mapped size plus ``memory_bytes``, so every document has the headroom a fresh fork
would give it, and the hard limit (the child's size when ready + ``memory_bytes`` + twice the growth
bound) stays out of the recycling bound's way. ``RLIMIT_CPU`` counts a process's whole life, so the soft
limit (``SIGXCPU``, ending the child) is set per document to the CPU time so far plus one budget
(``ceil(timeout) + 1`` seconds), the hard limit (``SIGKILL``; it can only be lowered, so it is set once)
to that budget × (``max_documents`` + 1): a runaway document is stopped within one budget even if the
parent were stopped, and no child burns more than its lifetime's worth. Core dumps are off: a crashing or
``SIGXCPU``-ed child would otherwise write hundreds of megabytes.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import math
import os
import resource
import signal
import sys
from typing import NoReturn

from . import jobs, protocol
from .limits import Limits, statm

EXIT_FAILED = 70  # the child could not even report (EX_SOFTWARE)
_PR_SET_PDEATHSIG = 1
_DEFAULT_SIGNALS = (signal.SIGXCPU, signal.SIGTERM, signal.SIGINT)  # RLIMIT_CPU and a kill must end the child


def serve(job: str, requests: int, replies: int, parent_pid: int, limits: Limits) -> NoReturn:
    """Answer documents one by one until the request pipe closes, the parent dies or something goes
    wrong; leave without running any of the parent's cleanup."""
    code = EXIT_FAILED
    try:
        # Encoded before the limits apply, so running out of memory can still be reported.
        out_of_memory = protocol.failure_frame(protocol.MEMORY_FAILURE)
        _detach(parent_pid, keep=(requests, replies))
        function = jobs.load(job)  # already imported when the parent preloaded it
        # What the job imported joins what the parent had: never collected, so the collection after
        # each document looks only at that document's garbage.
        gc.collect()
        gc.freeze()
        baseline: tuple[int, int] | None = statm("self") or (0, 0)
        cpu_hard, address_space_hard = _apply_lifetime_limits(limits, baseline[0])
        while True:
            request = protocol.read_request(requests)
            if request is None:
                code = 0  # the parent closed the pipe
                break
            arguments, data = request
            _apply_document_limits(limits, cpu_hard, address_space_hard)
            try:
                message = protocol.answer_frame(function(data, arguments), baseline)
            except MemoryError:
                message = out_of_memory
            baseline = None  # the parent learns it from the first answer
            del request, data
            gc.collect()  # this document's garbage goes before the next one (and before we're measured)
            protocol.write_all(replies, message)
    except BaseException:  # noqa: BLE001 - the parent turns a silent exit into a crash
        pass
    finally:
        os._exit(code)


def _detach(parent_pid: int, keep: tuple[int, ...]) -> None:
    """Default signal dispositions, no descriptor of the parent's, die with the parent, leave the
    parent's objects alone, and say nothing: a hostile file can make a parser warn tens of thousands of
    times, into the parent's log.

    The death signal follows the thread that forked, which is the only one that uses this child.
    """
    gc.freeze()
    for number in signal.valid_signals():
        if number in _DEFAULT_SIGNALS or (number < signal.SIGRTMIN and callable(signal.getsignal(number))):
            signal.signal(number, signal.SIG_DFL)
    _close_inherited_descriptors(keep)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # best effort; RLIMIT_CPU still ends a runaway child nobody waits for
    if os.getppid() != parent_pid:
        os._exit(EXIT_FAILED)  # the parent died before the death signal was armed
    logging.disable(logging.WARNING)


def _close_inherited_descriptors(keep: tuple[int, ...]) -> None:
    """Close everything above standard error except ``keep``: database and broker sockets, listening
    sockets, log files, other children's pipes."""
    low = 3
    for fd in sorted(keep):
        if fd < low:
            continue
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(low, os.sysconf("SC_OPEN_MAX")))


def _apply_lifetime_limits(limits: Limits, mapped: int) -> tuple[int, int]:
    """The hard limits, for the child's whole life; returns them (CPU seconds, address-space bytes)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu_hard = limits.cpu_seconds_per_document * (limits.max_documents + 1)
    _, previous = resource.getrlimit(resource.RLIMIT_CPU)
    if previous != resource.RLIM_INFINITY:
        cpu_hard = min(cpu_hard, previous)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_hard, cpu_hard))
    address_space_hard = mapped + limits.memory_bytes + 2 * limits.max_growth_bytes
    _, previous = resource.getrlimit(resource.RLIMIT_AS)
    if previous != resource.RLIM_INFINITY:
        address_space_hard = min(address_space_hard, previous)
    resource.setrlimit(resource.RLIMIT_AS, (address_space_hard, address_space_hard))
    return cpu_hard, address_space_hard


def _apply_document_limits(limits: Limits, cpu_hard: int, address_space_hard: int) -> None:
    """The soft limits for the next document: one CPU budget from now, ``memory_bytes`` more than now."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = min(cpu_hard, math.ceil(usage.ru_utime + usage.ru_stime) + limits.cpu_seconds_per_document)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu_hard))
    sizes = statm("self")
    address_space = min(address_space_hard, (sizes[0] if sizes else 0) + limits.memory_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space_hard))
