"""The kernel benchmark's own logic: the memory-flat check and the command's machine-readable last line.

No timing assertions (the machine is shared and noisy): memory is judged as a ratio of the process's own
resident size after warm-up, and the command is only checked for what it prints.
"""
from __future__ import annotations

import json

import pytest

from loadtests.bench import kernel as bench_kernel
from loadtests.documents import make_pdf
from shared.stamping.signing import stamp_and_sign


@pytest.fixture
def signer(tmp_path):
    return bench_kernel.development_signer(tmp_path)


def test_memory_stays_flat_over_hundreds_of_stamped_and_signed_documents(signer):
    document = make_pdf(pages=1)

    def stamp_and_sign_one(data: bytes) -> bytes:
        serial, url = bench_kernel.next_serial()
        return stamp_and_sign(data, signer, page=1, x=400, y=80, serial=serial, verify_url=url)

    trend = bench_kernel.memory_trend(stamp_and_sign_one, document, documents=300, warmup=50)

    assert trend.after_warmup_bytes > 0 and trend.peak_bytes >= trend.final_bytes
    assert trend.growth <= bench_kernel.MEMORY_FLAT_GROWTH, trend
    assert trend.flat


def test_memory_check_flags_a_worker_that_keeps_every_document():
    kept: list[bytes] = []
    document = make_pdf(pages=1)

    def leaky(data: bytes) -> bytes:
        # About 1 MB written per document and never let go: the trend is relative to the whole process,
        # which under xdist has run other files first (320 MB seen), so a small leak would hide in it.
        kept.append(data * (1_000_000 // len(data) + 1))
        return data

    trend = bench_kernel.memory_trend(leaky, document, documents=300, warmup=50)

    assert not trend.flat
    assert trend.growth > bench_kernel.MEMORY_FLAT_GROWTH


def test_memory_check_refuses_a_warmup_longer_than_the_run():
    with pytest.raises(ValueError):
        bench_kernel.memory_trend(lambda data: data, b"", documents=10, warmup=10)


def test_bench_command_ends_with_one_json_line_of_ratios(capsys):
    assert bench_kernel.main(["--rounds", "1", "--batch-seconds", "0.001", "--memory-docs", "60"]) == 0

    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary["sign_1p_over_plain"] > 0 and summary["sign_10p_over_1p"] > 0
    assert set(summary["docs_per_second"]) == {f"{kind}_{pages}" for kind in
                                               ("plain", "stamp", "sign", "straightforward", "check")
                                               for pages in ("1p", "10p")} | {"rewrite_1p"}
    assert summary["check_over_sign"]["1p"] > 0 and summary["check_over_sign"]["10p"] > 0
    assert summary["rewrite_1p_over_sign_1p"] > 0
    assert summary["memory"]["documents"] == 60


def test_delivery_candidates_are_timed_against_stamp_and_sign(capsys):
    assert bench_kernel.main(["--delivery-candidates", "--rounds", "1", "--batch-seconds", "0.001"]) == 0

    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for pages in ("1p", "10p"):
        assert summary[f"sign {pages}"]["over_sign"] == 1.0
        assert summary[f"check_delivery (pikepdf, no recovery) {pages}"]["over_sign"] > 0
        assert summary[f"pyHanko strict reader + validator {pages}"]["over_sign"] > 0
