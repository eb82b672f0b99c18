"""Benchmark: the isolated preflight with reused children, against a fork per document and in process.

    .venv/bin/python -m loadtests.bench.preflight            # about a minute on the 2-vCPU test machine

What a checkout task pays to check one document, three ways, on the benchmarks' 200 KB letter
(:func:`loadtests.documents.make_pdf`), in one process that has imported what a checkout worker imports
(the Flask and Celery apps and the task modules), so a fork copies a worker-sized process:

* ``in process``: :func:`shared.stamping.preflight`, no isolation at all (the floor);
* ``pooled``: :func:`shared.stamping.isolation.preflight_isolated` (the sandbox, ``shared/sandbox/``) as
  the checkout worker calls it, with
  the default child budget: one child serves a whole round (forked at its start, retired at its end);
* ``fork per document``: the same with ``child_max_documents=1``, a child per document, killed and
  reaped after its answer: what every document cost before the pool.

CPU per document is this process's CPU time plus that of its reaped children (``RUSAGE_CHILDREN``); the
pool is shut down at the end of each round, so a child's CPU is counted in the round it served. The
cases run interleaved, ``--rounds`` rounds of ``--documents`` documents each; the figures are medians
over rounds, and the ratios are taken within a round (the machine is shared and noisy).
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

from loadtests.documents import make_pdf

CASES = ("in process", "pooled", "fork per document")
PLACEMENT = {"page": 1, "x": 400.0, "y": 80.0, "max_bytes": 2 << 20, "max_pages": 500}
ISOLATION = {"size": 100.0, "timeout_seconds": 20.0, "memory_bytes": 512 << 20}


def cpu_seconds() -> float:
    """This process and every child it has reaped, user + system."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def resident_mib() -> float:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / (1 << 20)


def operations(document: bytes) -> dict[str, Callable[[], object]]:
    from shared.stamping import preflight
    from shared.stamping.isolation import preflight_isolated

    return {
        "in process": lambda: preflight(document, **PLACEMENT),
        "pooled": lambda: preflight_isolated(document, **PLACEMENT, **ISOLATION),
        "fork per document": lambda: preflight_isolated(document, **PLACEMENT, **ISOLATION,
                                                        child_max_documents=1),
    }


def one_round(operation: Callable[[], object], documents: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per document over ``documents`` documents, children reaped and counted."""
    from shared.sandbox import shutdown_children

    shutdown_children()
    cpu, wall = cpu_seconds(), time.perf_counter()
    for _ in range(documents):
        operation()
    shutdown_children()
    return 1000 * (cpu_seconds() - cpu) / documents, 1000 * (time.perf_counter() - wall) / documents


def run(args: argparse.Namespace) -> dict[str, object]:
    logging.disable(logging.WARNING)  # the development secret-key warning of create_app
    os.environ.setdefault("DEVELOPMENT", "1")  # the worker's app refuses development defaults otherwise
    import workers.make_celery  # noqa: F401 - a checkout worker's imports, so forks copy as much

    document = make_pdf(args.document_bytes)
    steps = operations(document)
    for step in steps.values():
        step()  # warm: lazy imports, the stamp art, the QR code
    cpu: dict[str, list[float]] = {case: [] for case in CASES}
    wall: dict[str, list[float]] = {case: [] for case in CASES}
    for number in range(args.rounds):
        for case in CASES:
            cpu_ms, wall_ms = one_round(steps[case], args.documents)
            cpu[case].append(cpu_ms)
            wall[case].append(wall_ms)
        print(f"round {number + 1}: " + ", ".join(f"{case} {cpu[case][-1]:.2f} ms CPU" for case in CASES),
              file=sys.stderr)

    def ratio(numerator: str, denominator: str) -> float:
        return statistics.median(n / d for n, d in zip(cpu[numerator], cpu[denominator]))

    return {
        "benchmark": "preflight",
        "command": "python -m loadtests.bench.preflight " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "document_bytes": len(document),
        "resident_mib": round(resident_mib(), 1),
        "rounds": args.rounds,
        "documents_per_round": args.documents,
        "cpu_ms_per_document": {case: round(statistics.median(cpu[case]), 2) for case in CASES},
        "wall_ms_per_document": {case: round(statistics.median(wall[case]), 2) for case in CASES},
        "pooled_over_in_process": round(ratio("pooled", "in process"), 2),
        "fork_over_in_process": round(ratio("fork per document", "in process"), 2),
        "fork_over_pooled": round(ratio("fork per document", "pooled"), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench.preflight",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--documents", type=int, default=200, help="documents per case per round")
    parser.add_argument("--document-bytes", type=int, default=200_000)
    summary = run(parser.parse_args(argv))
    print(f"process resident {summary['resident_mib']} MiB; {summary['document_bytes']:,}-byte document; "
          f"{summary['rounds']} rounds of {summary['documents_per_round']} documents per case")
    for case in CASES:
        print(f"  {case:<18} {summary['cpu_ms_per_document'][case]:6.2f} ms CPU"
              f"  {summary['wall_ms_per_document'][case]:6.2f} ms wall per document")
    print(f"CPU ratios (median of per-round ratios): pooled / in process {summary['pooled_over_in_process']},"
          f" fork per document / in process {summary['fork_over_in_process']},"
          f" fork per document / pooled {summary['fork_over_pooled']}")
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
