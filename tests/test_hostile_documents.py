"""Hostile documents end as a clear rejection, never a 5xx, a charge, a dead worker or a redelivery loop.

Every hostile file is written here in raw PDF syntax (no binary fixtures): broken structure, deep
nesting, a decompression bomb, page trees that are huge, exponential or cyclic. Each goes through the
real HTTP API and the real checkout worker, where the preflight runs in a sandbox child bounded in time
and memory (``shared/sandbox/``, through ``shared/stamping/isolation.py``); the buyer must get a reason
code and a message in Bahasa Indonesia, no payment may exist, and the worker must be alive and clean
afterwards (no preflight child but idle ones waiting for the next document). The sandbox itself (time,
memory, interrupted waits, reuse and recycling, verification's children) is tested in
``tests/test_sandbox.py``, with the helpers defined here.
"""
from __future__ import annotations

import io
import os
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from pypdf import PdfReader, PdfWriter

from shared import sandbox
from shared.stamping import DocumentRejected, PreflightResult, preflight
from shared.stamping.isolation import preflight_isolated
from shared.devtools.launcher import Process
from tests.conftest import System, make_pdf, wait_until

MAX_BYTES = 2 * 1024 * 1024
MAX_PAGES = 500
LIMITS = {"page": 1, "x": 400.0, "y": 80.0, "max_bytes": MAX_BYTES, "max_pages": MAX_PAGES}
BAHASA = re.compile(r"\b(dokumen|berkas|halaman)\b", re.IGNORECASE)
# What a worker log says when a pool process was killed under a task: the redelivery loop's first step.
WORKER_DEATH = re.compile(r"Hard time limit|WorkerLostError|exited with '(signal|exitcode)")
RECEIVED = re.compile(r"Task meterai\.checkout\.prepare_order\[([0-9a-f-]+)\] received")


# --- writing hostile PDFs -------------------------------------------------------------------------

def raw_pdf(objects: dict[int, bytes], *, root: int = 1) -> bytes:
    """A PDF with exactly these objects and a correct cross-reference table, so the parser gets as far as
    the hostile part."""
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets: dict[int, int] = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, objects[number])
    size = max(objects) + 1
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for number in range(1, size):
        out += b"%010d 00000 n \n" % offsets[number] if number in offsets else b"0000000000 65535 f \n"
    out += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, root, xref)
    return bytes(out)


def stream(data: bytes, entries: bytes = b"") -> bytes:
    return b"<< /Length %d %s>>\nstream\n%s\nendstream" % (len(data), entries, data)


CATALOG = b"<< /Type /Catalog /Pages 2 0 R >>"
PAGE = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R %s>>"
CONTENT = stream(b"BT /F1 12 Tf 72 700 Td (Surat Lamaran) Tj ET")


def one_page(*, page_extra: bytes = b"", content: bytes = CONTENT) -> bytes:
    return raw_pdf({1: CATALOG, 2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                    3: PAGE % page_extra, 4: content})


def truncated() -> bytes:
    source = make_pdf(pages=3)
    return source[: len(source) // 2]


def broken_xref() -> bytes:
    """The cross-reference table and trailer scrambled: no /Root to find, even by rebuilding."""
    source = make_pdf(pages=2)
    start, end = source.rindex(b"\nxref") + 1, source.rindex(b"startxref")
    return source[:start] + bytes(byte ^ 0x5A for byte in source[start:end]) + source[end:]


def garbage_after_header() -> bytes:
    return b"%PDF-1.7\n" + bytes(range(256)) * 64


def deep_arrays(depth: int = 50_000) -> bytes:
    return one_page(page_extra=b"/Junk " + b"[" * depth + b"]" * depth + b" ")


def deep_dictionaries(depth: int = 50_000) -> bytes:
    return one_page(page_extra=b"/Junk " + b"<< /A " * depth + b"1" + b" >>" * depth + b" ")


def zeros_deflated(total: int) -> bytes:
    """A zlib stream of ``total`` zero bytes, made without ever holding them: after a full flush, every
    1 MiB block of zeros compresses to the same bytes, so one block is repeated."""
    mib = 1 << 20
    compressor = zlib.compressobj(9)
    first = compressor.compress(bytes(mib)) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(mib)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + block * (total // mib - 1) + compressor.flush()


def decompression_bomb() -> bytes:
    """About 10 KB on disk, 4 GiB of page content once inflated: FlateDecode applied twice."""
    bomb = zlib.compress(zeros_deflated(4 << 30), 9)
    return one_page(content=stream(bomb, b"/Filter [/FlateDecode /FlateDecode] "))


def encrypted_with_user_password() -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(pages=1))))
    writer.encrypt(user_password="rahasia", owner_password="pemilik", algorithm="AES-256")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def zero_pages() -> bytes:
    return raw_pdf({1: CATALOG, 2: b"<< /Type /Pages /Kids [] /Count 0 >>"})


def more_pages_than_allowed(pages: int = MAX_PAGES + 100) -> bytes:
    """One page object listed over and over in /Kids: a tiny file that claims hundreds of pages."""
    kids = b"3 0 R " * pages
    return raw_pdf({1: CATALOG, 2: b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages),
                    3: PAGE % b"", 4: CONTENT})


def exponential_page_tree(levels: int = 9, fan_out: int = 10) -> bytes:
    """Each /Pages node lists the next one ``fan_out`` times: 1.8 KB that claims 10^9 pages."""
    objects = {1: CATALOG, 3: PAGE % b"", 4: CONTENT,
               2: b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b"10 0 R " * fan_out, fan_out ** levels)}
    for level in range(levels):
        kid = 10 + level + 1 if level < levels - 1 else 3
        objects[10 + level] = b"<< /Type /Pages /Parent 2 0 R /Kids [%s] >>" % ((b"%d 0 R " % kid) * fan_out)
    return raw_pdf(objects)


def kids_cycle() -> bytes:
    """The page tree's root lists itself among its kids."""
    return raw_pdf({1: CATALOG, 2: b"<< /Type /Pages /Kids [2 0 R 3 0 R] /Count 2 >>",
                    3: PAGE % b"", 4: CONTENT})


def parent_cycle() -> bytes:
    """Two /Pages nodes that are each other's parent and kid; the page inherits its MediaBox from them."""
    return raw_pdf({
        1: CATALOG,
        2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 /Parent 5 0 R >>",
        3: b"<< /Type /Page /Parent 2 0 R /Contents 4 0 R >>",
        4: CONTENT,
        5: b"<< /Type /Pages /Kids [2 0 R] /Count 1 /Parent 2 0 R /MediaBox [0 0 595 842] >>",
    })


def content_that_contains_itself() -> bytes:
    """/Contents is an array whose entries are that same array, never a stream."""
    return one_page(content=b"[4 0 R 4 0 R]")


@dataclass(frozen=True)
class Hostile:
    name: str
    build: Callable[[], bytes]
    code: str


REJECTED_BY_PREFLIGHT = [
    Hostile("truncated", truncated, "unreadable"),
    Hostile("broken_xref", broken_xref, "unreadable"),
    Hostile("garbage_after_header", garbage_after_header, "unreadable"),
    Hostile("deep_arrays", deep_arrays, "unreadable"),
    Hostile("deep_dictionaries", deep_dictionaries, "unreadable"),
    Hostile("decompression_bomb", decompression_bomb, "too_complex"),
    Hostile("encrypted_with_user_password", encrypted_with_user_password, "encrypted"),
    Hostile("zero_pages", zero_pages, "no_pages"),
    Hostile("more_pages_than_allowed", more_pages_than_allowed, "too_many_pages"),
    Hostile("exponential_page_tree", exponential_page_tree, "unreadable"),
    Hostile("kids_cycle", kids_cycle, "unreadable"),
    Hostile("parent_cycle", parent_cycle, "unreadable"),
    Hostile("content_that_contains_itself", content_that_contains_itself, "unreadable"),
]
REFUSED_AT_UPLOAD = [
    Hostile("not_a_pdf", lambda: b"GIF89a\x01\x00\x01\x00" + bytes(64), "not_pdf"),
    Hostile("empty", lambda: b"", "not_pdf"),
]


# --- processes --------------------------------------------------------------------------------------

def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) for every process we can see."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        state, parent = stat[stat.rindex(")") + 2:].split()[:2]
        table[int(entry)] = (int(parent), state)
    return table


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def children(pid: int, table: dict[int, tuple[int, str]] | None = None) -> dict[int, str]:
    table = process_table() if table is None else table
    return {child: state for child, (parent, state) in table.items() if parent == pid}


def preflight_children(worker: Process) -> dict[int, dict[int, str]]:
    """Processes below the worker's pool processes (forked preflights, finished or not), per pool process."""
    table = process_table()
    return {pool_process: children(pool_process, table) for pool_process in children(worker.pid, table)}


def only_idle_preflight_children(worker: Process) -> bool:
    """At most one preflight child per pool process (one task at a time), sleeping on its request pipe:
    none still working on a document, none exited and unreaped."""
    return all(len(found) <= 1 and set(found.values()) <= {"S"}
               for found in preflight_children(worker).values())


def checkout_workers(sys_: System) -> list[Process]:
    return [sys_.process("checkout")]


class WorkerLog:
    """What a worker wrote to its log since this object was made."""

    def __init__(self, worker: Process) -> None:
        assert worker.log is not None
        self.path = worker.log
        self.start = self.path.stat().st_size if self.path.exists() else 0

    def text(self) -> str:
        return self.path.read_bytes()[self.start:].decode("utf-8", "replace")


def assert_workers_healthy(workers: list[Process], logs: list[WorkerLog]) -> None:
    """Alive, no pool process lost under a task, no message received twice, no preflight left behind."""
    for worker, log in zip(workers, logs):
        assert worker.alive(), f"worker {worker.name} died"
        text = log.text()
        assert not WORKER_DEATH.search(text), text
        received = RECEIVED.findall(text)
        assert len(received) == len(set(received)), f"a checkout message was redelivered: {received}"
        wait_until(lambda: only_idle_preflight_children(worker), timeout=10,
                   message=f"only idle preflight children (at first look: {preflight_children(worker)})")


def assert_rejected_without_charge(sys_: System, document: bytes, code: str) -> dict:
    response = sys_.create(document)
    assert response.status_code == 202, response.text
    body = response.json()
    view = sys_.wait_status(body["order_id"], body["access_token"], "rejected", timeout=25)
    assert view["reason"]["code"] == code, view
    assert BAHASA.search(view["reason"]["message"]), view["reason"]
    assert "payment" not in view
    payments = sys_.query("SELECT count(*) AS n FROM payments WHERE order_id = %s", (body["order_id"],))
    assert payments[0]["n"] == 0
    return body


# --- through the real API and workers ----------------------------------------------------------------

@pytest.mark.parametrize("hostile", REJECTED_BY_PREFLIGHT, ids=lambda h: h.name)
def test_hostile_document_is_rejected_with_a_reason_and_no_charge(sys_: System, hostile: Hostile) -> None:
    document = hostile.build()
    assert len(document) <= sys_.settings.max_document_bytes, "the file must pass the upload's size check"
    workers = checkout_workers(sys_)
    logs = [WorkerLog(worker) for worker in workers]

    started = time.monotonic()
    assert_rejected_without_charge(sys_, document, hostile.code)

    assert time.monotonic() - started < 25
    assert_workers_healthy(workers, logs)


@pytest.mark.parametrize("hostile", REFUSED_AT_UPLOAD, ids=lambda h: h.name)
def test_what_is_not_a_pdf_is_refused_at_upload_with_a_reason(sys_: System, hostile: Hostile) -> None:
    response = sys_.create(hostile.build())

    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["code"] == hostile.code and BAHASA.search(error["message"]), error
    assert sys_.query("SELECT count(*) AS n FROM orders")[0]["n"] == 0
    assert sys_.query("SELECT count(*) AS n FROM payments")[0]["n"] == 0


@pytest.fixture
def tight_checkout_worker(sys_: System) -> Iterator[Process]:
    """The checkout queue served by one worker whose preflight gets 0.4 s: a hostile file that takes
    seconds then runs into the limit, as one that takes minutes would under the default 20 s.

    The regular workers are left stopped afterwards; ``sys_`` starts them again before the next test.
    """
    sys_.stop("checkout")
    tight = sys_.launcher.start("checkout", name="checkout-tight", env={"PREFLIGHT_TIMEOUT_SECONDS": "0.4"})
    sys_.launcher.wait_ready([tight.name])
    try:
        yield tight
    finally:
        sys_.stop(tight.name)


def test_preflight_over_its_time_budget_on_the_worker_ends_as_a_rejection(
    sys_: System, tight_checkout_worker: Process
) -> None:
    log = WorkerLog(tight_checkout_worker)

    hostile = assert_rejected_without_charge(sys_, exponential_page_tree(), "too_complex")

    # The same worker, with the same pool processes, goes on serving buyers.
    order_id, _, view = sys_.order_awaiting_payment(make_pdf(pages=1))
    assert view["payment"], view
    assert_workers_healthy([tight_checkout_worker], [log])
    events = sys_.query("SELECT to_status FROM order_events WHERE order_id = %s ORDER BY id",
                        (hostile["order_id"],))
    assert [e["to_status"] for e in events][-1:] == ["rejected"]
    from tests.test_logs import events

    assert events(log.text(), "preflight_child_failed", cause="timeout")  # the worker's JSON line


# --- the isolation itself ------------------------------------------------------------------------

def isolated(document: bytes, *, timeout_seconds: float = 20.0, memory_bytes: int = 512 << 20,
             **overrides: object) -> PreflightResult:
    arguments = {**LIMITS, **overrides}
    return preflight_isolated(document, timeout_seconds=timeout_seconds, memory_bytes=memory_bytes,
                              **arguments)  # type: ignore[arg-type]


def isolated_rejection(document: bytes, **kwargs: object) -> DocumentRejected:
    with pytest.raises(DocumentRejected) as caught:
        isolated(document, **kwargs)
    assert BAHASA.search(caught.value.message), caught.value.message
    return caught.value


def only_idle_pool_children(before: set[int]) -> bool:
    """This process's children are those it had before, plus idle sandbox children its pool knows."""
    now = children(os.getpid())
    new = set(now) - before
    return new <= set(sandbox.children()) and all(now[pid] == "S" for pid in new)


@pytest.fixture
def no_children_left() -> Iterator[None]:
    """Afterwards the test's process has no child it didn't have before, except idle sandbox children
    of its pool (sleeping on their request pipe): nothing running, nothing unreaped. And once the pool
    is shut down, none at all."""
    before = set(children(os.getpid()))
    yield
    wait_until(lambda: only_idle_pool_children(before), timeout=10,
               message=f"only idle pool children (at first look: {children(os.getpid())})")
    # Only the children this test made are its business: a server another test stopped may still be on
    # its way out, and an idle pool child an earlier test's thread made dies with that thread (its death
    # signal) and stays a zombie until the pool next looks; shutdown_children below reaps it.
    ours = set(children(os.getpid())) - before
    zombies = {pid: comm(pid) for pid, state in children(os.getpid()).items() if state == "Z" and pid in ours}
    assert not zombies, f"children left unreaped: {zombies}"
    sandbox.shutdown_children()
    assert set(children(os.getpid())) - before == set()


def test_a_broken_xref_that_can_be_rebuilt_is_accepted(no_children_left: None) -> None:
    source = make_pdf(pages=2)
    start, end = source.rindex(b"\nxref") + 1, source.rindex(b"startxref")
    zeroed = re.sub(rb"\d{10} (\d{5}) n", rb"0000000000 \1 n", source[start:end])

    assert isolated(source[:start] + zeroed + source[end:]).page_count == 2


def test_a_decompression_bomb_is_refused_on_the_page_that_would_carry_the_stamp() -> None:
    """Stamping never inflates page content, so the preflight does it, bounded, for the stamped page.
    Other pages are copied as they are and not inflated."""
    bomb = stream(zlib.compress(zeros_deflated(4 << 30), 9), b"/Filter [/FlateDecode /FlateDecode] ")
    document = raw_pdf({1: CATALOG, 2: b"<< /Type /Pages /Kids [3 0 R 5 0 R] /Count 2 >>",
                        3: PAGE % b"", 4: bomb, 5: b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842]"
                                                    b" /Contents 6 0 R >>", 6: CONTENT})

    with pytest.raises(DocumentRejected) as caught:
        preflight(document, **LIMITS)
    assert caught.value.code == "too_complex" and "halaman 1" in caught.value.message
    assert preflight(document, **{**LIMITS, "page": 2}).page_count == 2
