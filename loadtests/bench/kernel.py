"""Kernel benchmark: documents/second for stamping and signing, next to baselines measured in the same run.

Run it as ``./bench`` from the repository root (``./bench --help`` for the knobs). What it measures, for a
1-page and a 10-page A4 letter of about 200 KB (:func:`loadtests.documents.make_pdf`, the benchmarks'
document: text plus one scanned image):

* ``plain``: a plain pypdf read + full write of the document, the yardstick the targets are ratios of;
* ``stamp``: :func:`shared.stamping.stamp_document`, the visual stamp only;
* ``sign``: stamp + signature exactly as the worker does it (:func:`shared.stamping.signing.stamp_and_sign`);
* ``straightforward``: what one would write first: the stamp drawn by reportlab per document, pypdf
  ``merge_page`` and a full rewrite, then a stock pyHanko signature (``SimpleSigner.load`` once per
  process, ``sign_pdf`` sizing the signature with a dry run);
* ``rewrite``: ``sign`` on the rare document that can't take an incremental update as it is (the 1-page
  letter with its ``startxref`` broken): normalised by pypdf first, then stamped and signed like every
  other document, reported as a ratio to ``sign``;
* ``check``: the delivery check the stamping worker runs on every signed file before it may be
  delivered (:func:`shared.stamping.delivery.check_delivery`, with the expected page count read from the
  source as the worker reads it), reported as a ratio to ``sign``.

``--delivery-candidates`` times the ways of re-reading a signed file that were considered for that
check, each as a ratio to ``sign`` in the same rounds (figures in docs/benchmarks.md, "Delivery check").

Why ratios: the machine is shared and noisy, so absolute times move between runs; every case is timed in
interleaved rounds within one process and the median per case is compared with the others of the same
run. Peak memory is the largest Python allocation (tracemalloc) while handling one document, per case.
Then the worker's memory is checked flat over many documents (``--memory-docs``, 10,000 by default):
resident set size after a warm-up against the end, as a ratio.

Ratios are the median over rounds of the two cases' times in the same round.
The last line printed is one JSON object (``sign_1p_over_plain``, ``sign_10p_over_1p`` and the rest) so a
script can track the figures.
"""
from __future__ import annotations

import argparse
import gc
import io
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

TARGET_SIGN_OVER_PLAIN = 8.0
TARGET_10P_OVER_1P = 1.1
MEMORY_FLAT_GROWTH = 0.05  # growth of resident memory after warm-up, as a fraction of it

_issued = itertools.count(1)


def next_serial() -> tuple[str, str]:
    """A fresh serial and its URL per document, as in production: nothing per-serial is cached away."""
    serial = f"{next(_issued):022d}"
    return serial, f"https://meterai.example.id/verify/{serial}"
PLACEMENT = {"page": 1, "x": 400.0, "y": 80.0}

Operation = Callable[[bytes], bytes]


# --- memory over many documents --------------------------------------------------------------------

def resident_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class MemoryTrend:
    documents: int
    warmup: int
    after_warmup_bytes: int  # resident memory once caches and allocator pools have filled
    final_bytes: int
    peak_bytes: int

    @property
    def growth(self) -> float:
        """Growth after warm-up as a fraction of the post-warm-up size: 0.0 is perfectly flat."""
        return (self.final_bytes - self.after_warmup_bytes) / self.after_warmup_bytes

    @property
    def flat(self) -> bool:
        return self.growth <= MEMORY_FLAT_GROWTH

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "growth": round(self.growth, 4), "flat": self.flat}


def memory_trend(operation: Operation, document: bytes, *, documents: int, warmup: int) -> MemoryTrend:
    """Run ``operation`` on ``document`` ``documents`` times; resident memory after ``warmup`` and at the end.

    A per-document leak of even a kilobyte shows over thousands of documents; allocator noise and the
    first-use caches (stamp art, fonts, key) are inside the warm-up.
    """
    if not 0 < warmup < documents:
        raise ValueError("warmup must be between 0 and documents")
    peak = 0
    after_warmup = 0
    for index in range(documents):
        operation(document)
        if index + 1 == warmup:
            gc.collect()
            after_warmup = resident_bytes()
        if index % 100 == 0:
            peak = max(peak, resident_bytes())
    gc.collect()
    final = resident_bytes()
    return MemoryTrend(documents, warmup, after_warmup, final, max(peak, final))


# --- timing ------------------------------------------------------------------------------------------

def timed_rounds(operations: dict[str, tuple[Operation, bytes]], *, rounds: int,
                 batch_seconds: float) -> dict[str, list[float]]:
    """Seconds per document for each operation, one sample per round; the operations take turns within
    every round, so a burst of noise from a neighbour hits them all alike."""
    batches: dict[str, int] = {}
    for name, (operation, document) in operations.items():
        operation(document)  # warm-up: caches, imports
        started = time.perf_counter()
        operation(document)
        batches[name] = max(1, int(batch_seconds / max(time.perf_counter() - started, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in operations}
    for _ in range(rounds):
        for name, (operation, document) in operations.items():
            count = batches[name]
            started = time.perf_counter()
            for _ in range(count):
                operation(document)
            samples[name].append((time.perf_counter() - started) / count)
    return samples


def paired_ratio(samples: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of ``numerator / denominator`` measured in the same round (drift cancels)."""
    return statistics.median(a / b for a, b in zip(samples[numerator], samples[denominator]))


def peak_allocation(operation: Operation, document: bytes) -> int:
    """Largest Python allocation while handling one (already warmed-up) document, in bytes."""
    gc.collect()
    tracemalloc.start()
    try:
        operation(document)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- the operations ------------------------------------------------------------------------------------

def plain_read_write(document: bytes) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(document)))
    output = io.BytesIO()
    writer.write(output)
    return output.getvalue()


def _overlay_pdf(width: float, height: float, x: float, y: float, size: float, serial: str, url: str) -> bytes:
    """The whole stamp drawn by reportlab on a page-sized overlay, per document, as one would at first."""
    import segno
    from reportlab.lib.colors import HexColor
    from reportlab.pdfgen.canvas import Canvas

    from shared.stamping import art

    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=(width, height))
    canvas.translate(x, y)
    canvas.scale(size / art.DESIGN_SIZE, size / art.DESIGN_SIZE)
    art._draw_frame(canvas)
    art._draw_guilloche(canvas)
    art._draw_emblem(canvas)
    art._draw_wording(canvas)
    matrix = tuple(tuple(bool(m) for m in row)
                   for row in segno.make_qr(url, error=art.QR_MIN_ERROR, boost_error=True).matrix)
    step = art.qr_module_size(len(matrix))
    canvas.setFillColor(HexColor("#FFFFFF"))
    canvas.rect(art.QR_X, art.QR_Y, art.QR_SIDE, art.QR_SIDE, stroke=0, fill=1)
    canvas.setFillColor(HexColor("#000000"))
    top = art.QR_Y + art.QR_SIDE - art.QR_QUIET_MODULES * step
    for row_index, row in enumerate(matrix):
        for col, dark in enumerate(row):
            if dark:
                canvas.rect(art.QR_X + (art.QR_QUIET_MODULES + col) * step, top - (row_index + 1) * step,
                            step, step, stroke=0, fill=1)
    canvas.setFillColor(HexColor(art.INK))
    canvas.setFont(art.SERIAL_FONT, 6.0)
    canvas.drawCentredString(art.DESIGN_SIZE / 2, art.SERIAL_BASELINE, serial)
    canvas.showPage()
    canvas.save()
    return buffer.getvalue()


def straightforward(stock_signer: object) -> Operation:
    """reportlab overlay + pypdf ``merge_page`` + full rewrite, then a stock pyHanko signature."""
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.sign import fields, signers
    from pypdf import PdfReader, PdfWriter

    def run(document: bytes) -> bytes:
        serial, url = next_serial()
        writer = PdfWriter(clone_from=PdfReader(io.BytesIO(document)))
        page = writer.pages[PLACEMENT["page"] - 1]
        box = page.mediabox
        overlay = PdfReader(io.BytesIO(_overlay_pdf(float(box.width), float(box.height),
                                                    PLACEMENT["x"], PLACEMENT["y"], 100.0,
                                                    serial, url))).pages[0]
        page.merge_page(overlay)
        stamped = io.BytesIO()
        writer.write(stamped)
        metadata = signers.PdfSignatureMetadata(field_name=f"eMeterai-{serial}", md_algorithm="sha256",
                                                subfilter=fields.SigSeedSubFilter.PADES,
                                                reason=f"e-Meterai {serial}", location="Indonesia")
        output = signers.sign_pdf(IncrementalPdfFileWriter(io.BytesIO(stamped.getvalue())), metadata,
                                  signer=stock_signer)
        return output.getvalue()

    return run


def development_signer(data_dir: Path) -> object:
    """The worker's signer on a development CA the tooling makes in ``data_dir`` (production only loads)."""
    from shared.config import load_settings
    from shared.devtools.pki import ensure_dev_pki
    from shared.stamping.signing import signer_from_settings

    settings = load_settings({}, data_dir=str(data_dir))
    ensure_dev_pki(settings)
    return signer_from_settings(settings)


def must_be_rewritten(document: bytes) -> bytes:
    """``document`` with a broken ``startxref``: pypdf repairs it, so it can't take an update as it is."""
    return document[:document.rindex(b"startxref")] + b"startxref\n12\n%%EOF\n"


def kernel_operations(data_dir: Path) -> tuple[Operation, Operation, Operation]:
    """(stamp only, stamp + sign as the worker does it, the straightforward baseline)."""
    from pyhanko.sign import signers

    from shared.config import load_settings
    from shared.stamping import stamp_document
    from shared.stamping.signing import pki_paths, stamp_and_sign

    signer = development_signer(data_dir)
    paths = pki_paths(load_settings({}, data_dir=str(data_dir)))
    stock = signers.SimpleSigner.load(str(paths.key), str(paths.cert), ca_chain_files=(str(paths.ca_cert),))

    def stamp(document: bytes) -> bytes:
        serial, url = next_serial()
        return stamp_document(document, serial=serial, verify_url=url, **PLACEMENT)

    def sign(document: bytes) -> bytes:
        serial, url = next_serial()
        return stamp_and_sign(document, signer, serial=serial, verify_url=url, size=100.0, **PLACEMENT)

    return stamp, sign, straightforward(stock)


def delivery_check(data_dir: Path) -> Callable[[bytes], Operation]:
    """For a source document, the worker's check of its signed file (signed once, checked every time)."""
    from shared.stamping.delivery import check_delivery, expected_page_count
    from shared.stamping.signing import stamp_and_sign

    signer = development_signer(data_dir)
    serial, url = next_serial()

    def for_document(document: bytes) -> Operation:
        signed = stamp_and_sign(document, signer, serial=serial, verify_url=url, size=100.0, **PLACEMENT)

        def check(source: bytes) -> bytes:
            check_delivery(signed, page=PLACEMENT["page"], page_count=expected_page_count(source),
                           serial=serial, issuer=signer.certificate)
            return signed

        return check

    return for_document


def delivery_candidates(data_dir: Path, document: bytes) -> dict[str, tuple[Operation, bytes]]:
    """The ways considered for re-reading a signed file with a parser other than pypdf, on ``document``."""
    import shutil
    import subprocess

    import pikepdf
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import validate_pdf_signature
    from pyhanko_certvalidator import ValidationContext

    from shared.stamping.delivery import source_is_sound
    from shared.stamping.signing import stamp_and_sign

    signer = development_signer(data_dir)
    serial, url = next_serial()
    signed = stamp_and_sign(document, signer, serial=serial, verify_url=url, size=100.0, **PLACEMENT)
    ours = delivery_check(data_dir)(document)

    def pikepdf_full_syntax_check(_: bytes) -> bytes:
        with pikepdf.open(io.BytesIO(signed), attempt_recovery=False) as pdf:  # qpdf --check, in process
            if pdf.check_pdf_syntax():
                raise AssertionError("qpdf found problems")
        return signed

    def pyhanko_strict_validation(_: bytes) -> bytes:
        reader = PdfFileReader(io.BytesIO(signed), strict=True)
        embedded = reader.embedded_regular_signatures[-1]
        context = ValidationContext(trust_roots=[signer.ca_certificate], allow_fetching=False)
        status = validate_pdf_signature(embedded, context, skip_diff=True)
        if not (status.intact and status.valid and status.trusted):
            raise AssertionError("pyHanko refused the signature")
        return signed

    def command(*arguments: str) -> Operation:
        def run(_: bytes) -> bytes:
            with tempfile.NamedTemporaryFile(suffix=".pdf") as file:
                file.write(signed)
                file.flush()
                subprocess.run([*arguments, file.name], capture_output=True, check=False)
            return signed
        return run

    def sign(data: bytes) -> bytes:
        fresh_serial, fresh_url = next_serial()  # a fresh serial (and QR code) each, as in run()
        return stamp_and_sign(data, signer, serial=fresh_serial, verify_url=fresh_url, size=100.0, **PLACEMENT)

    candidates: dict[str, tuple[Operation, bytes]] = {
        "sign": (sign, document),
        "check_delivery (pikepdf, no recovery)": (ours, document),
        # Not a candidate: the kernel's path decision, already inside ``sign`` (qpdf reads the source).
        "source_is_sound (inside sign)": (lambda data: bytes(source_is_sound(data)), document),
        "pikepdf check_pdf_syntax (qpdf --check)": (pikepdf_full_syntax_check, document),
        "pyHanko strict reader + validator": (pyhanko_strict_validation, document),
    }
    if shutil.which("pdfsig"):
        candidates["poppler pdfsig (subprocess)"] = (command("pdfsig"), document)
    if shutil.which("qpdf"):
        candidates["qpdf --check (subprocess)"] = (command("qpdf", "--check"), document)
    return candidates


def run_candidates(args: argparse.Namespace) -> dict[str, object]:
    from loadtests.documents import make_pdf

    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as data_dir:
        for pages in (1, 10):
            operations = delivery_candidates(Path(data_dir), make_pdf(args.document_bytes, pages=pages))
            samples = timed_rounds(operations, rounds=args.rounds, batch_seconds=args.batch_seconds)
            print(f"{pages}-page document: {'candidate':<42}{'ms/doc':>9}{'/ sign':>9}")
            for name, values in samples.items():
                ratio = paired_ratio(samples, name, "sign")
                print(f"{'':<16}{name:<42}{statistics.median(values) * 1000:>9.2f}{ratio:>9.2f}")
                figures[f"{name} {pages}p"] = {"ms_per_doc": round(statistics.median(values) * 1000, 3),
                                                "over_sign": round(ratio, 3)}
    return figures


# --- the command ---------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, object]:
    import logging

    from loadtests.documents import make_pdf

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # the rewrite case's document warns on every read
    documents = {"1p": make_pdf(args.document_bytes, pages=1), "10p": make_pdf(args.document_bytes, pages=10)}
    with tempfile.TemporaryDirectory(prefix="bench-kernel-") as data_dir:
        stamp, sign, baseline = kernel_operations(Path(data_dir))
        kinds = {"plain": plain_read_write, "stamp": stamp, "sign": sign, "straightforward": baseline}
        operations = {f"{kind}_{pages}": (operation, document)
                      for kind, operation in kinds.items() for pages, document in documents.items()}
        checks = delivery_check(Path(data_dir))
        operations.update({f"check_{pages}": (checks(document), document) for pages, document in documents.items()})
        operations["rewrite_1p"] = (sign, must_be_rewritten(documents["1p"]))
        samples = timed_rounds(operations, rounds=args.rounds, batch_seconds=args.batch_seconds)
        seconds = {name: statistics.median(values) for name, values in samples.items()}
        peaks = {name: peak_allocation(operation, document) for name, (operation, document) in operations.items()}
        memory = (memory_trend(sign, documents["1p"], documents=args.memory_docs,
                               warmup=max(1, min(500, args.memory_docs // 10)))
                  if args.memory_docs > 1 else None)
    print(f"{'case':<22}{'ms/doc':>10}{'docs/s':>10}{'peak KiB':>11}   (document: ~{args.document_bytes // 1000} KB)")
    for name, value in seconds.items():
        print(f"{name:<22}{value * 1000:>10.2f}{1 / value:>10.1f}{peaks[name] / 1024:>11.0f}")
    sign_over_plain = paired_ratio(samples, "sign_1p", "plain_1p")
    sign_10p_over_1p = paired_ratio(samples, "sign_10p", "sign_1p")
    straightforward_over_sign = paired_ratio(samples, "straightforward_1p", "sign_1p")
    print(f"stamp+sign 1p / plain 1p = {sign_over_plain:.2f} (target <= {TARGET_SIGN_OVER_PLAIN})")
    print(f"stamp+sign 10p / 1p      = {sign_10p_over_1p:.2f} (target <= {TARGET_10P_OVER_1P})")
    print(f"straightforward 1p / stamp+sign 1p = {straightforward_over_sign:.1f}x")
    check_over_sign = {pages: paired_ratio(samples, f"check_{pages}", f"sign_{pages}") for pages in documents}
    print(f"delivery check / stamp+sign = {check_over_sign['1p']:.2f} (1p), {check_over_sign['10p']:.2f} (10p)")
    rewrite_over_sign = paired_ratio(samples, "rewrite_1p", "sign_1p")
    print(f"rewritten first (rare) / stamp+sign 1p = {rewrite_over_sign:.2f}")
    if memory is not None:
        print(f"memory over {memory.documents} documents: {memory.after_warmup_bytes / 2**20:.1f} MiB after "
              f"warm-up -> {memory.final_bytes / 2**20:.1f} MiB ({memory.growth:+.1%}, "
              f"{'flat' if memory.flat else 'GROWING'})")
    return {
        "sign_1p_over_plain": round(sign_over_plain, 3),
        "sign_10p_over_1p": round(sign_10p_over_1p, 3),
        "straightforward_1p_over_sign_1p": round(straightforward_over_sign, 2),
        "stamp_10p_over_1p": round(paired_ratio(samples, "stamp_10p", "stamp_1p"), 3),
        "check_over_sign": {pages: round(ratio, 3) for pages, ratio in check_over_sign.items()},
        "rewrite_1p_over_sign_1p": round(rewrite_over_sign, 3),
        "targets": {"sign_1p_over_plain": TARGET_SIGN_OVER_PLAIN, "sign_10p_over_1p": TARGET_10P_OVER_1P},
        "met": sign_over_plain <= TARGET_SIGN_OVER_PLAIN and sign_10p_over_1p <= TARGET_10P_OVER_1P
        and (memory is None or memory.flat),
        "docs_per_second": {name: round(1 / value, 1) for name, value in seconds.items()},
        "ms_per_doc": {name: round(value * 1000, 3) for name, value in seconds.items()},
        "peak_alloc_kib": {name: round(value / 1024) for name, value in peaks.items()},
        "memory": memory.as_json() if memory is not None else None,
        "max_rss_mib": round(_max_rss() / 2**20, 1),
        "document_bytes": {name: len(document) for name, document in documents.items()},
    }


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per case (median)")
    parser.add_argument("--batch-seconds", type=float, default=0.15, help="about how long one timed batch runs")
    parser.add_argument("--memory-docs", type=int, default=10_000,
                        help="documents stamped and signed for the memory-flat check (0 skips it)")
    parser.add_argument("--document-bytes", type=int, default=200_000, help="size of the test documents")
    parser.add_argument("--delivery-candidates", action="store_true",
                        help="time the ways of re-reading a signed file considered for the delivery check instead")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run_candidates(args) if args.delivery_candidates else run(args)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
