"""No node-local state (issue 11, point 3; docs/node-local-state.md).

Nodes share only PostgreSQL, Redis, the document store and the environment: two beats at once do no
work twice, beat keeps nothing on disk, web and workers with data folders of their own serve one order
together, key material can come from the environment, and a worker that finds no key material retries
without making any.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import WORKERS, wait_until
from shared.config import load_settings, production_problems
from shared.devtools.pki import ensure_dev_pki
from shared.services import housekeeping
from shared.stamping.key_material import (
    InlinePem,
    SigningUnavailable,
    key_material_problems,
    pki_paths,
    require_key_material,
    trust_root_der,
)
from shared.stamping.signing import signer_from_settings

ROOT = Path(__file__).resolve().parents[1]


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` (relative), empty when it doesn't exist."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def shared_env(sys_) -> dict[str, str]:
    """What every "node" is given besides its own DATA_DIR: the store and the key material, by path,
    outside every node's data folder (the session's, which no node below uses as its DATA_DIR)."""
    paths = pki_paths(sys_.settings)
    return {"DOCUMENT_DIR": str(sys_.settings.documents_path), "SIGNING_KEY_PATH": str(paths.key),
            "SIGNING_CERT_PATH": str(paths.cert), "SIGNING_CA_CERT_PATH": str(paths.ca_cert)}



def _sent(process, job: str) -> int:
    return process.output().count(f"Sending due task {job} ".encode())


def test_two_beats_at_once_refund_each_order_once_and_keep_nothing_on_disk(sys_):
    """One beat is the rule; two stay harmless: with two beats (and two housekeeping workers, so their
    sweeps really overlap) every job runs twice as often, and each order is still refunded once."""
    ids = sys_.paid_orders_past_deadline(4)
    often = {"SWEEP_INTERVAL_SECONDS": "0.3", "REDRIVE_INTERVAL_SECONDS": "0.3",
             "RECONCILE_INTERVAL_SECONDS": "0.3", "EXPIRE_UNPAID_INTERVAL_SECONDS": "0.3"}
    beat_dirs = [sys_.tmp / f"beat-{n}-data" for n in (1, 2)]
    names = ["beat-1", "beat-2", "housekeeping-2"]
    try:
        sys_.launcher.start("housekeeping", name="housekeeping-2")
        for name, data_dir in zip(names, beat_dirs):
            sys_.launcher.start("beat", name=name, env={**often, "DATA_DIR": str(data_dir)})
        sys_.launcher.wait_ready(names, timeout=90)
        beats = [sys_.process(name) for name in names[:2]]
        wait_until(lambda: sys_.query("SELECT count(*) AS n FROM orders WHERE status = 'refunded'")[0]["n"]
                   == len(ids), timeout=90, message="every order refunded")
        # Both beats kept sweeping (and redriving the refunds) while the refunds were made, and after.
        wait_until(lambda: all(_sent(b, "sweep-refunds") >= 5 and _sent(b, "redrive") >= 5 for b in beats),
                   timeout=60, message="both beats sending their jobs")
        assert all(b.alive() for b in beats)
    finally:
        sys_.launcher.stop(*names)

    assert sys_.query("SELECT count(*) AS n FROM ledger_entries WHERE kind = 'refunded'")[0]["n"] == len(ids)
    assert sys_.query("SELECT count(*) AS n FROM refunds")[0]["n"] == len(ids)
    totals = {row["kind"]: row["s"] for row in sys_.query(
        "SELECT kind, sum(amount_idr) AS s FROM ledger_entries GROUP BY kind")}
    assert totals == {"captured": 12500 * len(ids), "refunded": 12500 * len(ids)}
    for order_id in ids:
        gateway_order_id = sys_.query("SELECT gateway_order_id FROM payments WHERE order_id = %s",
                                      (order_id,))[0]["gateway_order_id"]
        assert len(sys_.gateway_record(gateway_order_id)["refunds"]) == 1
        moves = [e["to_status"] for e in sys_.events(order_id)]
        assert moves.count("refund_pending") == 1 and moves.count("refunded") == 1, moves
    # Beat keeps its schedule in memory: nothing in its data folder, no schedule file where it ran.
    assert [files_under(d) for d in beat_dirs] == [[], []]
    assert not list(ROOT.glob("celerybeat-schedule*"))


def test_web_and_workers_with_data_folders_of_their_own_serve_an_order_together(sys_):
    """Two "nodes": web with DATA_DIR=A, every worker with DATA_DIR=B, sharing only PostgreSQL, Redis,
    the environment, the store and the key material (outside both). An order is created on A, checked,
    paid, stamped and signed on B, downloaded and verified on A; neither folder holds anything."""
    node_a, node_b = sys_.tmp / "node-a", sys_.tmp / "node-b"
    common = shared_env(sys_)
    web_port = sys_.process("web").port
    copies = ["web-a", *(f"{group}-b" for group in WORKERS)]
    sys_.stop("web", *WORKERS)
    try:
        sys_.launcher.start("web", name="web-a", port=web_port, env={**common, "DATA_DIR": str(node_a)})
        for group in WORKERS:
            sys_.launcher.start(group, name=f"{group}-b", env={**common, "DATA_DIR": str(node_b)})
        sys_.launcher.wait_ready(copies, timeout=120)

        order_id, token, view = sys_.order_awaiting_payment()
        sys_.pay(view["payment"]["gateway_order_id"])
        done = sys_.wait_status(order_id, token, "stamped", timeout=60)
        document = sys_.http.get(f"{sys_.web_url}/api/v1/orders/{order_id}/document",
                                 headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert document.status_code == 200 and document.content.startswith(b"%PDF")
        verified = sys_.http.post(f"{sys_.web_url}/api/v1/verify", timeout=30,
                                  files={"document": ("dokumen.pdf", document.content, "application/pdf")})
        assert verified.status_code == 200 and verified.json()["valid"] is True, verified.text
        assert verified.json()["serial"] == done["serial"]
        # Each process ran in its own folder, and the order went through both nodes.
        assert sys_.process("web-a").env["DATA_DIR"] == str(node_a)
        assert sys_.process("stamping-b").env["DATA_DIR"] == str(node_b)
        assert b"stamp_order" in sys_.process("stamping-b").output()
    finally:
        sys_.launcher.stop(*copies)
        sys_.start("web", *WORKERS)

    # Nothing either node wrote is something the other reads: they wrote nothing at all.
    assert files_under(node_a) == [] and files_under(node_b) == []


def test_a_worker_without_key_material_retries_and_makes_none(sys_):
    """The development CA is made by the tooling before processes start, never by a process: a stamping
    worker with SIGNING_DEV_PKI=1 and an empty data folder says what is missing and retries (the order
    waits, nothing is refunded), and writes no key material; with the key back, the order is stamped."""
    empty = sys_.tmp / "no-key-node"
    sys_.stop("stamping")
    try:
        sys_.launcher.start("stamping", name="stamping-nokey",
                            env={"DATA_DIR": str(empty), "SIGNING_DEV_PKI": "1",
                                 "DOCUMENT_DIR": str(sys_.settings.documents_path)})
        sys_.launcher.wait_ready(["stamping-nokey"], timeout=90)
        order_id, token, view = sys_.order_awaiting_payment()
        sys_.pay(view["payment"]["gateway_order_id"])

        def refused() -> list:
            return [e for e in sys_.events(order_id)
                    if "Signing key material is missing" in str((e.get("detail") or {}).get("error", ""))]

        wait_until(lambda: len(refused()) >= 2, timeout=60, message="the worker to refuse twice")
        assert sys_.order_row(order_id)["status"] in ("paid", "stamping")
        assert sys_.query("SELECT count(*) AS n FROM refunds")[0]["n"] == 0
        assert str(empty / "pki") in refused()[0]["detail"]["error"]
    finally:
        sys_.launcher.stop("stamping-nokey")
    assert files_under(empty) == []

    sys_.start("stamping")
    housekeeping.redrive(sys_.settings)  # the retries' message went with the stopped worker, or not
    sys_.wait_status(order_id, token, "stamped", timeout=60)


# -- key material from the environment ---------------------------------------------------------------

@pytest.fixture
def dev_pem(tmp_path) -> dict[str, str]:
    """A development CA made by the tooling, as PEM text for SIGNING_*_PEM."""
    settings = load_settings({}, data_dir=str(tmp_path / "made"))
    ensure_dev_pki(settings)
    paths = pki_paths(settings)
    return {"SIGNING_KEY_PEM": paths.key.read_text(), "SIGNING_CERT_PEM": paths.cert.read_text(),
            "SIGNING_CA_CERT_PEM": paths.ca_cert.read_text()}


def test_key_material_from_the_environment_signs_and_verifies_like_files(tmp_path, dev_pem):
    from_files = load_settings({}, data_dir=str(tmp_path / "made"))
    from_env = load_settings(dev_pem, data_dir=str(tmp_path / "empty"))

    assert all(isinstance(item, InlinePem) for item in pki_paths(from_env).all())
    assert key_material_problems(from_env) == []
    require_key_material(from_env, "worker")
    certificate = signer_from_settings(from_files).certificate.dump()
    assert signer_from_settings(from_env).certificate.dump() == certificate
    assert trust_root_der(from_env) == trust_root_der(from_files)
    assert ensure_dev_pki(from_env) is False  # configured: nothing to make
    assert not (tmp_path / "empty").exists()
    # Platforms that can't hold a newline in a variable pass "\n"; the secret never lands in a message.
    escaped = load_settings({k: v.replace("\n", "\\n") for k, v in dev_pem.items()}, data_dir=str(tmp_path))
    assert signer_from_settings(escaped).certificate.dump() == certificate
    named = str(pki_paths(from_env).key)
    assert "PRIVATE KEY" not in named and "SIGNING_KEY_PEM" in named


def test_a_development_ca_given_as_pem_is_still_refused_in_production(dev_pem):
    problems = production_problems(load_settings({**dev_pem, "SIGNING_DEV_PKI": "0"}))
    assert any("development PKI" in p for p in problems)


@pytest.mark.parametrize("item", ["KEY", "CERT", "CA_CERT"])
def test_a_path_and_a_pem_for_the_same_item_is_a_configuration_error(item, dev_pem):
    with pytest.raises(ValueError, match=f"SIGNING_{item}_PATH and SIGNING_{item}_PEM"):
        load_settings({**dev_pem, f"SIGNING_{item}_PATH": "/etc/meterai/x.pem"})


def test_missing_key_material_is_named_item_by_item_and_never_made(tmp_path, dev_pem):
    nothing = load_settings({"SIGNING_DEV_PKI": "0"}, data_dir=str(tmp_path / "node"))
    problems = key_material_problems(nothing)
    assert len(problems) == 3 and all("can't be read" in p for p in problems)
    with pytest.raises(SigningUnavailable, match="can't start without its signing key material"):
        require_key_material(nothing, "stamping")

    # Part given in the environment, part missing: the tooling refuses to make the rest.
    partial = load_settings({"SIGNING_KEY_PEM": dev_pem["SIGNING_KEY_PEM"]}, data_dir=str(tmp_path / "node"))
    with pytest.raises(SigningUnavailable, match="incomplete"):
        ensure_dev_pki(partial)
    assert files_under(tmp_path / "node") == []

    junk = load_settings({"SIGNING_KEY_PEM": "not a key", "SIGNING_CERT_PEM": "nope",
                          "SIGNING_CA_CERT_PEM": "nope"})
    assert [p.split(" in ")[0] for p in key_material_problems(junk)] == [
        "the signing key", "the issuer certificate", "the root certificate"]
