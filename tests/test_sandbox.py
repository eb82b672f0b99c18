"""The one sandbox for parsing a stranger's PDF (``shared/sandbox/``), through both of its callers: the
preflight (a checkout worker's) and verification by upload (the web process's, under gunicorn too).

Each run is bounded: out of time → "too_complex" / ``VerificationTimeout`` (422), out of memory →
"too_complex", a crash → "unreadable", no child to be had → retry later / ``VerificationBusy`` (503).
Children are reused: one child answers many documents, and every isolation property of a child per
document still holds. A child is reused only after a clean answer; a timeout, a crash, running out of
memory or an unclean answer (any preflight rejection; every verification verdict is clean) retires it
(killed and reaped), and so do its document budget and memory growth. The next document then gets a fresh child
and the verdict it would have got anyway. A child holds none of its parent's descriptors and dies with
its parent: a test process, a Celery pool process, a gunicorn worker. Time enters these tests only as
generous deadlines, never as a measurement: a "timeout" is made by stopping the child (``SIGSTOP``) or by
a document that takes far longer than the limit, not by comparing durations.
"""
from __future__ import annotations

import ctypes
import gc

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from shared import sandbox
from shared.stamping import DocumentRejected, PreflightResult, isolation, preflight
from shared.devtools.launcher import Process
from tests.conftest import ROOT, System, make_pdf, wait_until
from tests.test_hostile_documents import (
    CATALOG,
    CONTENT,
    LIMITS,
    children,
    exponential_page_tree,
    isolated,
    isolated_rejection,
    no_children_left,  # noqa: F401 - a fixture
    raw_pdf,
)

LETTER = make_pdf(pages=2)


@pytest.fixture
def fresh_pool(no_children_left: None) -> Iterator[None]:  # noqa: F811 - the imported fixture
    """An empty pool to start with; afterwards only idle children, then none (``no_children_left``)."""
    sandbox.shutdown_children()
    assert sandbox.children() == {}
    yield


def only_child() -> int:
    found = isolation.preflight_children()
    assert len(found) == 1, found
    return next(iter(found))


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (``R``, ``S``, ``Z``, …), or ``None`` if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


def assert_reaped(pid: int) -> None:
    """Not our child any more: killed *and* waited for, no zombie left."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert pid not in children(os.getpid())
    assert pid not in isolation.preflight_children()


def gone_or_reaped_elsewhere(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for whoever adopted it (not us)."""
    return process_state(pid) in (None, "Z")


def fat_page_tree() -> bytes:
    """99,000 references to one fat page: flattening that page tree needs well over 100 MB."""
    fat_page = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R %s >>" % (
        b" ".join(b"/K%d 1" % n for n in range(19)))
    return raw_pdf({1: CATALOG, 2: b"<< /Type /Pages /Kids [%s] /Count 99000 >>" % (b"3 0 R " * 99_000),
                    3: fat_page, 4: CONTENT})


def rlimits(pid: int) -> dict[str, tuple[str, str]]:
    """``/proc/<pid>/limits`` as name → (soft, hard)."""
    found = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
        found[name] = (soft, hard)
    return found


def crash_once_busy(pid: int) -> tuple[threading.Thread, threading.Event]:
    """A thread that crashes the child ``pid`` (SIGSEGV) as soon as it starts on a document; the event
    says it did."""
    crashed = threading.Event()

    def crash() -> None:
        wait_until(lambda: process_state(pid) in ("R", "D", None), timeout=30, interval=0.001,
                   message="the child to start on the document")
        os.kill(pid, signal.SIGSEGV)
        crashed.set()

    killer = threading.Thread(target=crash)
    killer.start()
    return killer, crashed


# --- one document, bounded -------------------------------------------------------------------------

def test_isolated_preflight_gives_the_in_process_verdict(no_children_left: None) -> None:  # noqa: F811
    document = make_pdf(pages=3)

    assert isolated(document, page=3) == preflight(document, **{**LIMITS, "page": 3})
    out_of_range = isolated_rejection(document, page=4)
    assert out_of_range.code == "page_out_of_range"
    too_large = isolated_rejection(document, max_bytes=100)
    assert too_large.code == "too_large"


def test_preflight_over_its_time_budget_is_rejected_as_too_complex(no_children_left: None) -> None:  # noqa: F811
    error = isolated_rejection(exponential_page_tree(), timeout_seconds=0.05)

    # Left alone, this child would have answered "unreadable" seconds later: it was killed at the deadline.
    assert error.code == "too_complex"


def test_preflight_over_its_memory_budget_is_a_rejection_not_a_crash(no_children_left: None) -> None:  # noqa: F811
    # 99,000 references to one fat page: flattening that page tree needs well over 100 MB.
    fat_page = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R %s >>" % (
        b" ".join(b"/K%d 1" % n for n in range(19)))
    document = raw_pdf({1: CATALOG, 2: b"<< /Type /Pages /Kids [%s] /Count 99000 >>" % (b"3 0 R " * 99_000),
                        3: fat_page, 4: CONTENT})

    error = isolated_rejection(document, memory_bytes=16 << 20)

    assert error.code == "too_complex"
    assert "memori" in error.message
    assert isolated(make_pdf(pages=2), memory_bytes=16 << 20).page_count == 2  # a letter fits easily


class Interrupted(Exception):
    pass


def test_an_interrupted_wait_kills_and_reaps_the_child(no_children_left: None) -> None:  # noqa: F811
    """Celery's soft time limit raises inside the task: the child must not outlive the wait."""
    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted()

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(Interrupted):
            isolated(exponential_page_tree(), timeout_seconds=10)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # Retired on the spot, not handed back to the pool to finish that document at its leisure.
    assert sandbox.children() == {}


# --- reuse --------------------------------------------------------------------------------------------

def test_one_child_answers_many_documents_with_the_in_process_verdicts(fresh_pool: None) -> None:
    documents = [(LETTER, 1), (make_pdf(pages=3), 3), (make_pdf(pages=1, size=(300, 400)), 1), (LETTER, 2)]

    for number, (document, page) in enumerate(documents, start=1):
        assert isolated(document, page=page, x=50, y=50) == preflight(document, **{**LIMITS, "page": page,
                                                                                   "x": 50, "y": 50})
        assert list(isolation.preflight_children().values()) == [number]

    served_all = only_child()
    # Idle, waiting for the next document (it may still be on its way back to the pipe when we look).
    wait_until(lambda: process_state(served_all) == "S", timeout=10, message="the child to wait for work")


def open_descriptors(pid: int | str = "self") -> dict[int, str]:
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # the listing's own descriptor, closed by now
            pass
    return found


def test_a_child_holds_only_its_two_pipes_and_the_parent_leaks_no_descriptor(fresh_pool: None) -> None:
    import socket

    before = set(open_descriptors())
    with socket.socket() as inherited:  # stands for the worker's database and broker sockets
        isolated(LETTER)
        child = only_child()
        theirs = open_descriptors(child)
        assert inherited.fileno() not in theirs
        extra = {fd: target for fd, target in theirs.items() if fd > 2}
        assert len(extra) == 2 and all(target.startswith("pipe:") for target in extra.values()), theirs
        for _ in range(3):  # reuse, then a rejection that retires the child, then a fresh one
            isolated(LETTER)
        with pytest.raises(DocumentRejected):
            isolated(LETTER, page=5)
        isolated(LETTER)
    sandbox.shutdown_children()
    assert set(open_descriptors()) <= before


def test_a_rejection_retires_the_child_and_the_next_document_gets_a_fresh_one(fresh_pool: None) -> None:
    isolated(LETTER)
    first = only_child()

    with pytest.raises(DocumentRejected) as caught:
        isolated(LETTER, page=5)
    assert caught.value.code == "page_out_of_range"

    assert_reaped(first)
    assert isolation.preflight_children() == {}
    assert isolated(LETTER).page_count == 2
    assert only_child() != first


# --- a child that fails is never used again -------------------------------------------------------------

def test_a_timed_out_child_is_killed_and_reaped_and_the_next_document_gets_a_fresh_one(
    fresh_pool: None, caplog: pytest.LogCaptureFixture
) -> None:
    limits = {"timeout_seconds": 2.0}  # the same for every call, so the same child would serve them
    isolated(LETTER, **limits)
    stuck = only_child()
    os.kill(stuck, signal.SIGSTOP)  # it takes the document and never answers

    with caplog.at_level(logging.WARNING, logger="shared.stamping.isolation"):
        with pytest.raises(DocumentRejected) as caught:
            isolated(LETTER, **limits)

    assert caught.value.code == "too_complex"
    assert "cause=timeout" in caplog.text and "reused=True" in caplog.text
    assert_reaped(stuck)
    assert isolated(LETTER, **limits) == preflight(LETTER, **LIMITS)
    assert only_child() != stuck


def test_a_child_that_crashes_mid_document_is_reaped_and_the_next_document_gets_a_fresh_one(
    fresh_pool: None, caplog: pytest.LogCaptureFixture
) -> None:
    isolated(LETTER)
    crashing = only_child()
    wait_until(lambda: process_state(crashing) == "S", timeout=10, message="the child to wait for work")
    # The exponential page tree keeps a child busy for a second or more: crash it meanwhile.
    killer, crashed = crash_once_busy(crashing)
    try:
        with caplog.at_level(logging.WARNING, logger="shared.stamping.isolation"):
            with pytest.raises(DocumentRejected) as caught:
                isolated(exponential_page_tree())
    finally:
        killer.join()

    assert crashed.is_set()
    assert caught.value.code == "unreadable"
    assert "cause=signal_SIGSEGV" in caplog.text
    assert_reaped(crashing)
    assert isolated(LETTER) == preflight(LETTER, **LIMITS)
    assert only_child() != crashing


def test_a_child_out_of_memory_is_retired_and_the_next_document_gets_a_fresh_one(fresh_pool: None) -> None:
    tight = {"memory_bytes": 16 << 20}
    isolated(LETTER, **tight)
    exhausted = only_child()

    with pytest.raises(DocumentRejected) as caught:
        isolated(fat_page_tree(), **tight)

    assert caught.value.code == "too_complex" and "memori" in caught.value.message
    assert_reaped(exhausted)
    assert isolated(LETTER, **tight).page_count == 2  # the same headroom as the first letter had
    assert only_child() != exhausted


def test_a_child_that_died_while_idle_is_replaced_without_costing_the_document_its_verdict(
    fresh_pool: None
) -> None:
    isolated(LETTER)
    dead = only_child()
    os.kill(dead, signal.SIGKILL)
    wait_until(lambda: process_state(dead) == "Z", timeout=10, message="the idle child to die")

    assert isolated(LETTER) == preflight(LETTER, **LIMITS)  # not "too_complex": the document did nothing

    assert_reaped(dead)
    assert only_child() != dead


# --- recycling -----------------------------------------------------------------------------------------

def test_a_child_is_replaced_after_its_document_budget(fresh_pool: None) -> None:
    budget = {"child_max_documents": 3}
    isolated(LETTER, **budget)
    first = only_child()
    isolated(LETTER, **budget)
    assert isolation.preflight_children() == {first: 2}

    isolated(LETTER, **budget)  # the third and last

    assert isolation.preflight_children() == {}
    assert_reaped(first)
    isolated(LETTER, **budget)
    assert only_child() != first


def test_a_child_whose_memory_grew_is_replaced(fresh_pool: None, caplog: pytest.LogCaptureFixture) -> None:
    """How much a document leaves behind depends on the allocator's state (a letter some 16-44 KiB, a
    400-page document up to 1 MiB, sometimes next to nothing), so the bound here is one byte: the first
    document after which the child holds any memory it didn't have at the fork retires it."""
    bound = {"child_max_growth_bytes": 1}
    documents = [LETTER, make_pdf(pages=400)] * 10
    # The child is forked from this process: free heap it inherits (a long test session leaves plenty)
    # lets documents be parsed without the child mapping anything new. Hand that back to the system
    # first, so the child starts lean, as a worker's does.
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    with caplog.at_level(logging.INFO, logger="shared.sandbox.pool"):
        for served, document in enumerate(documents, start=1):
            assert isolated(document, **bound) == preflight(document, **LIMITS)
            if isolation.preflight_children() == {}:
                break

    assert isolation.preflight_children() == {}, "no document left any memory behind in twenty"
    retired = [line for line in caplog.text.splitlines() if "event=sandbox_child_retired" in line]
    assert len(retired) == 1 and "_growth" in retired[0] and f"documents={served}" in retired[0], retired
    assert_reaped(int(re.search(r"pid=(\d+)", retired[0]).group(1)))


def test_each_document_gets_its_own_cpu_budget_and_the_child_a_lifetime_cap(fresh_pool: None) -> None:
    """RLIMIT_CPU counts the child's whole life: the soft limit moves with each document, the hard limit
    caps the life. No core files."""
    isolated(LETTER, timeout_seconds=3.0, child_max_documents=10, memory_bytes=64 << 20)
    isolated(LETTER, timeout_seconds=3.0, child_max_documents=10, memory_bytes=64 << 20)
    child = only_child()
    per_document = 3 + 1

    limits = rlimits(child)

    cpu_soft, cpu_hard = (int(value) for value in limits["Max cpu time"])
    assert per_document <= cpu_soft <= per_document + 2, limits["Max cpu time"]
    assert cpu_hard == per_document * (10 + 1)
    assert limits["Max core file size"] == ("0", "0")
    address_soft, address_hard = (int(value) for value in limits["Max address space"])
    mapped = int(Path(f"/proc/{child}/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    assert abs(address_soft - (mapped + (64 << 20))) < 16 << 20, "the budget is on top of the child's size"
    assert address_soft < address_hard


# --- no child outlives its parent ------------------------------------------------------------------------

PARENT = """
import sys, time
from shared.stamping.isolation import preflight_children, preflight_isolated
document = open(sys.argv[1], "rb").read()
preflight_isolated(document, page=1, x=400, y=80, max_bytes=2 << 20, max_pages=500, timeout_seconds=20,
                   memory_bytes=512 << 20)
print(*preflight_children(), flush=True)
time.sleep(600)
"""


def test_a_child_dies_with_its_parent(tmp_path: Path) -> None:
    """An idle child would also leave on its own when the request pipe closes; a stopped one (as a child
    busy with a document doesn't read either) can only go by the death signal."""
    letter = tmp_path / "surat.pdf"
    letter.write_bytes(LETTER)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(letter)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        child = int(parent.stdout.readline())
        wait_until(lambda: children(parent.pid) == {child: "S"}, timeout=10, message="the child to wait for work")
        os.kill(child, signal.SIGSTOP)
        wait_until(lambda: process_state(child) == "T", timeout=10, message="the child to stop")
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()

    wait_until(lambda: gone_or_reaped_elsewhere(child), timeout=30, message="the orphaned child to die")


@pytest.fixture
def own_checkout_worker(sys_: System) -> Iterator[Process]:
    """The checkout queue served by a worker of this test's own, whose pool processes it may kill.

    The regular workers are left stopped afterwards; ``sys_`` starts them again before the next test.
    """
    sys_.stop("checkout")
    own = sys_.launcher.start("checkout", name="checkout-own", env={})
    sys_.launcher.wait_ready([own.name])
    try:
        yield own
    finally:
        sys_.stop(own.name)


def test_a_celery_pool_process_that_dies_takes_its_preflight_child_with_it(
    sys_: System, own_checkout_worker: Process
) -> None:
    sys_.order_awaiting_payment(make_pdf(pages=1))
    pool_processes = children(own_checkout_worker.pid)
    with_child = {pool: children(pool) for pool in pool_processes if children(pool)}
    assert len(with_child) == 1, with_child  # the pool process that ran the checkout kept its child
    (pool, preflight_child), = ((pool, next(iter(found))) for pool, found in with_child.items())
    os.kill(preflight_child, signal.SIGSTOP)  # so only the death signal can end it (not end of file)
    wait_until(lambda: process_state(preflight_child) == "T", timeout=10, message="the child to stop")

    os.kill(pool, signal.SIGKILL)  # as the kernel's OOM killer, or a hard time limit, would

    wait_until(lambda: gone_or_reaped_elsewhere(preflight_child), timeout=30,
               message="the preflight child to die with its pool process")
    _, _, view = sys_.order_awaiting_payment(make_pdf(pages=1))  # the worker replaced its pool process
    assert view["payment"], view


def test_threads_each_get_their_own_child_and_none_is_left_behind(fresh_pool: None) -> None:
    """The death signal follows the thread that forked: a child serves only its own thread, and the
    children of threads that have ended are reaped by the next check."""
    verdicts: list[PreflightResult] = []
    pids: list[set[int]] = []

    def check_letters() -> None:
        for _ in range(3):
            verdicts.append(isolated(LETTER))
        pids.append(set(isolation.preflight_children()))

    threads = [threading.Thread(target=check_letters) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert verdicts == [preflight(LETTER, **LIMITS)] * 6
    orphans = set().union(*pids)
    assert len(orphans) == 2, pids  # one child per thread, each reused for its thread's three letters
    # Dead with their threads; one may already be reaped by the other thread's next check.
    wait_until(lambda: all(process_state(pid) in ("Z", None) for pid in orphans), timeout=10,
               message="the ended threads' children to die")
    assert isolated(LETTER) == preflight(LETTER, **LIMITS)  # from this thread: a child of its own
    for pid in orphans:
        assert_reaped(pid)
    assert set(isolation.preflight_children()).isdisjoint(orphans)


# --- verification by upload: the same sandbox, from the web process ------------------------------------

def slow_to_parse_pdf(keys: int = 200_000) -> bytes:
    """A small, valid PDF whose catalog has ``keys`` entries: seconds of pure-Python parsing."""
    catalog = b"<< /Type /Catalog /Pages 2 0 R " + b"".join(b"/K%d %d " % (i, i) for i in range(keys)) + b">>"
    objects = [catalog, b"<< /Type /Pages /Kids [] /Count 0 >>"]
    out, offsets = b"%PDF-1.7\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 3\n0000000000 65535 f \n" + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size 3 /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % xref


GARBAGE_PDF = b"%PDF-1.7\n" + b"\x00garbage" * 100
VERIFY_SERIAL = "0123456789ABCDEFGHIJKL"


@pytest.fixture(scope="module")
def dev_pki(tmp_path_factory) -> Path:
    """A data folder with the development CA in it, made by the tooling as ``./dev up`` makes it."""
    from shared.config import load_settings
    from shared.devtools.pki import ensure_dev_pki

    data_dir = tmp_path_factory.mktemp("sandbox-pki")
    ensure_dev_pki(load_settings({}, data_dir=str(data_dir)))
    return data_dir


@pytest.fixture(scope="module")
def signed_letter(dev_pki: Path) -> bytes:
    from shared.config import load_settings
    from shared.stamping.signing import signer_from_settings, stamp_and_sign

    signer = signer_from_settings(load_settings({}, data_dir=str(dev_pki)))
    return stamp_and_sign(make_pdf(pages=1), signer, page=1, x=400, y=80, serial=VERIFY_SERIAL,
                          verify_url=f"https://meterai.example.id/verify/{VERIFY_SERIAL}")


@pytest.fixture(scope="module")
def trust_root(dev_pki: Path) -> bytes:
    from shared.config import load_settings
    from shared.stamping.key_material import trust_root_der

    return trust_root_der(load_settings({}, data_dir=str(dev_pki)))


def inspected(document: bytes, trust_root: bytes, timeout: float = 20.0):
    from shared.services.verification import inspect_isolated

    return inspect_isolated(document, trust_root, timeout=timeout)


def test_a_verification_that_runs_past_its_time_is_killed_not_waited_for(
    fresh_pool: None, trust_root: bytes
) -> None:
    from shared.services.verification import VerificationTimeout

    with pytest.raises(VerificationTimeout) as slow:
        inspected(slow_to_parse_pdf(), trust_root, timeout=1.0)

    # Left alone, the child would have answered seconds later; it was killed and reaped at the deadline.
    assert slow.value.code == "verification_timeout"
    assert "batas waktu" in slow.value.message
    assert sandbox.children() == {}


def test_a_verification_child_answers_every_verdict_and_is_retired_only_after_a_failure(
    fresh_pool: None, signed_letter: bytes, trust_root: bytes
) -> None:
    """Unlike the preflight's, a forged or broken upload does not retire the child: a fresh one would
    cost the web process pyHanko's import per upload. Running out of time does."""
    from shared.services.verification import VerificationTimeout

    verdicts = [inspected(document, trust_root, timeout=10.0)
                for document in (signed_letter, make_pdf(pages=1), GARBAGE_PDF, signed_letter)]

    assert [(v.outcome, v.serial) for v in verdicts] == [("ok", VERIFY_SERIAL), ("not_signed", None),
                                                           ("unreadable", None), ("ok", VERIFY_SERIAL)]
    [(child, answered)] = sandbox.children("inspect_signature").items()
    assert answered == 4  # one child, every document

    with pytest.raises(VerificationTimeout):
        inspected(slow_to_parse_pdf(), trust_root, timeout=1.0)
    assert_reaped(child)
    assert inspected(signed_letter, trust_root, timeout=10.0) == verdicts[0]  # a fresh child, the same verdict


def test_a_verification_child_that_crashes_makes_the_document_unreadable(
    fresh_pool: None, trust_root: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    inspected(make_pdf(pages=1), trust_root, timeout=60.0)  # the same limits: the same child next
    crashing = next(iter(sandbox.children("inspect_signature")))
    wait_until(lambda: process_state(crashing) == "S", timeout=10, message="the child to wait for work")
    killer, crashed = crash_once_busy(crashing)
    try:
        with caplog.at_level(logging.WARNING, logger="shared.services.verification"):
            # Under 1 MiB, so the whole document is in the pipe before the child can die reading it.
            findings = inspected(slow_to_parse_pdf(keys=60_000), trust_root, timeout=60.0)
    finally:
        killer.join()

    assert crashed.is_set()
    assert findings.outcome == "unreadable"
    assert "event=verification_child_failed" in caplog.text and "cause=signal_SIGSEGV" in caplog.text
    assert_reaped(crashing)


NO_DESCRIPTORS_LEFT = """
import json, os, resource, sys
from shared import sandbox
from shared.errors import TransientError
from shared.sandbox import jobs
from shared.services.verification import VerificationBusy, inspect_isolated
from shared.stamping.isolation import preflight_isolated

document, root = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
jobs.load("preflight")  # what a checkout worker has imported before its first document
open_now = {int(fd) for fd in os.listdir("/proc/self/fd")}
lowest_free = min(set(range(len(open_now) + 2)) - open_now)
resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
answers = {}
try:
    inspect_isolated(document, root, timeout=10)
except VerificationBusy as exc:
    answers["verify"] = [exc.code, isinstance(exc, TransientError)]
try:
    preflight_isolated(document, page=1, x=400, y=80, max_bytes=2 << 20, max_pages=500,
                       timeout_seconds=10, memory_bytes=512 << 20)
except TransientError as exc:
    answers["preflight"] = [exc.code, isinstance(exc, TransientError)]
answers["children"] = len(sandbox.children())
print(json.dumps(answers))
"""


def test_no_child_to_be_had_is_busy_for_verification_and_retry_later_for_preflight(
    tmp_path: Path, trust_root: bytes
) -> None:
    """Out of descriptors (or processes): nothing is forked, and each caller says "come back"."""
    import json

    letter, root = tmp_path / "surat.pdf", tmp_path / "root.der"
    letter.write_bytes(make_pdf(pages=1))
    root.write_bytes(trust_root)
    result = subprocess.run([sys.executable, "-c", NO_DESCRIPTORS_LEFT, str(letter), str(root)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout.splitlines()[-1])
    assert answers == {"verify": ["verification_busy", True], "preflight": ["preflight_unavailable", True],
                       "children": 0}


# --- under gunicorn, as the Procfile runs the web process ----------------------------------------------

STANDARD_SIGNALS = (1 << 31) - 1


def signals_caught(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigCgt for {pid}")


@pytest.fixture
def gunicorn_web(database_url: str, redis_server, dev_pki: Path, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """The web app under gunicorn's gthread worker, one worker process of four threads: (its URL, the
    arbiter's pid). One verification at a time, two seconds each, so a third concurrent upload finds no
    slot."""
    from shared.devtools.services import free_port

    port = free_port()
    env = {**os.environ, "DEVELOPMENT": "1", "DATABASE_URL": database_url, "REDIS_URL": redis_server.url,
           "REDIS_KEY_PREFIX": f"sandbox-{uuid.uuid4().hex[:6]}:", "DATA_DIR": str(dev_pki),
           "SECRET_KEY": "test-secret-for-the-gunicorn-sandbox-test", "RATE_LIMIT_VERIFY": "1000000/60",
           "VERIFY_CONCURRENCY": "1", "VERIFY_TIMEOUT_SECONDS": "2", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "gunicorn.log", "ab")
    arbiter = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--worker-class", "gthread",
         "--workers", "1", "--threads", "4", "--timeout", "30", "web:create_app()"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import requests

        def up() -> bool:
            try:
                return requests.get(f"{url}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return arbiter.poll() is not None
        wait_until(up, timeout=60, message="gunicorn to answer")
        assert arbiter.poll() is None, (tmp_path / "gunicorn.log").read_text()
        yield url, arbiter.pid
    finally:
        os.killpg(arbiter.pid, signal.SIGTERM)
        try:
            arbiter.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(arbiter.pid, signal.SIGKILL)
            arbiter.wait()
        log.close()


def test_verification_runs_in_the_sandbox_of_a_gunicorn_gthread_worker(
    gunicorn_web: tuple[str, int], signed_letter: bytes
) -> None:
    import requests
    from concurrent.futures import ThreadPoolExecutor

    url, arbiter = gunicorn_web

    def verify(document: bytes) -> requests.Response:
        return requests.post(f"{url}/api/v1/verify", files={"document": ("d.pdf", document, "application/pdf")},
                             timeout=60)

    unsigned = verify(make_pdf(pages=1))
    assert unsigned.status_code == 200 and unsigned.json()["reason"] == "not_signed", unsigned.text
    [worker] = children(arbiter)
    [child] = children(worker)
    wait_until(lambda: process_state(child) == "S", timeout=10, message="the child to wait for the next upload")
    extra = {fd: target for fd, target in open_descriptors(child).items() if fd > 2}
    assert len(extra) == 2 and all(target.startswith("pipe:") for target in extra.values()), extra
    # gunicorn's handlers are not the child's (bits 32 and up are the C library's own, in every process)
    assert signals_caught(worker) & STANDARD_SIGNALS and not signals_caught(child) & STANDARD_SIGNALS

    genuine = verify(signed_letter)  # signed by our CA, a serial the database doesn't know
    assert genuine.status_code == 200 and genuine.json()["reason"] == "unknown_serial", genuine.text
    with ThreadPoolExecutor(max_workers=4) as pool:  # whichever request threads take them
        assert [r.status_code for r in pool.map(verify, [make_pdf(pages=1)] * 8)] == [200] * 8
    assert list(children(worker)) == [child]  # one check at a time: one child, reused all along

    with ThreadPoolExecutor(max_workers=3) as pool:
        slow = list(pool.map(verify, [slow_to_parse_pdf()] * 3))
    statuses = sorted(response.status_code for response in slow)
    assert set(statuses) <= {422, 503} and 422 in statuses and 503 in statuses, [r.text for r in slow]
    for response in slow:
        code = response.json()["error"]["code"]
        assert code == {422: "verification_timeout", 503: "verification_busy"}[response.status_code]
        if response.status_code == 503:
            assert response.headers["Retry-After"]
    wait_until(lambda: all(state == "S" for state in children(worker).values()), timeout=10,
               message=f"only idle sandbox children (at first look: {children(worker)})")

    assert verify(make_pdf(pages=1)).status_code == 200  # a clean answer: its child stays
    idle = set(children(worker))
    assert idle and all(process_state(pid) in ("S", "R") for pid in idle), children(worker)
    os.kill(worker, signal.SIGKILL)  # as the OOM killer, or gunicorn's own timeout, would
    wait_until(lambda: all(gone_or_reaped_elsewhere(pid) for pid in idle), timeout=30,
               message="the sandbox children to die with their gunicorn worker")
