"""Every delivered document is valid: broken-but-parseable PDFs are stamped into files other readers
accept, or refused before payment; a stamped file that fails the independent re-read is refunded.

The judges are Debian's ``qpdf --check`` and poppler's ``pdfsig``: other programs than the ones that
wrote the file (pypdf and our incremental writer) and the one that checks it in production (qpdf's
library through pikepdf, not its command line, with its own settings). Tests that need them are skipped
with the reason when the packages are missing (``.ci/run`` installs them).
"""
from __future__ import annotations

import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from shared.config import load_settings
from shared.devtools.pki import ensure_dev_pki, ensure_pki
from shared.errors import PermanentError
from shared.stamping import DocumentRejected, preflight
from shared.stamping.delivery import (
    DeliveryCheckFailed,
    check_delivery,
    check_structure,
    expected_page_count,
    source_is_sound,
)
from shared.stamping.isolation import preflight_isolated
from shared.stamping.signing import PkiPaths, load_signer, sign_pdf, signer_from_settings, stamp_and_sign
from tests.broken_pdfs import CORPUS, SIGNED_CORPUS, Broken, page_tree_with_a_lying_count, signed_with_wrong_stream_length
from tests.broken_pdfs import subsection_number_overflows
from tests.conftest import BOTH_STORES, System, make_pdf, wait_until
from tests.test_logs import events

SERIAL = "0123456789ABCDEFGHIJKL"
PLACEMENT = {"page": 1, "x": 400.0, "y": 80.0}
LIMITS = {**PLACEMENT, "max_bytes": 2 * 1024 * 1024, "max_pages": 500}
BAHASA = re.compile(r"\b(dokumen|berkas|halaman)\b", re.IGNORECASE)

needs_judges = pytest.mark.skipif(shutil.which("qpdf") is None or shutil.which("pdfsig") is None,
                                  reason="the independent judges qpdf and pdfsig (Debian qpdf, poppler-utils) "
                                         "are not installed")


def qpdf_check(data: bytes, folder: Path) -> tuple[int, str]:
    path = folder / "judged-by-qpdf.pdf"
    path.write_bytes(data)
    result = subprocess.run(["qpdf", "--check", str(path)], capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


def pdfsig_report(data: bytes, folder: Path) -> str:
    path = folder / "judged-by-pdfsig.pdf"
    path.write_bytes(data)
    result = subprocess.run(["pdfsig", str(path)], capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def assert_valid_for_other_readers(data: bytes, folder: Path, serial: str = SERIAL) -> None:
    code, report = qpdf_check(data, folder)
    assert code == 0, report  # 2: errors, 3: warnings (qpdf had to repair something)
    signatures = pdfsig_report(data, folder)
    assert f"Signature Field Name: eMeterai-{serial}" in signatures, signatures
    assert "Signature Validation: Signature is Valid." in signatures, signatures
    assert "Total document signed" in signatures, signatures
    assert "Syntax Error" not in signatures, signatures


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    settings = load_settings({}, data_dir=str(tmp_path_factory.mktemp("delivery-pki")))
    ensure_dev_pki(settings)
    return signer_from_settings(settings)


def sign(document: bytes, signer, serial: str = SERIAL, **placement: float) -> bytes:
    where = {**PLACEMENT, **placement}
    return stamp_and_sign(document, signer, serial=serial, verify_url=f"https://meterai.example.id/verify/{serial}",
                          **where)  # type: ignore[arg-type]


def isolated(document: bytes) -> object:
    return preflight_isolated(document, timeout_seconds=20.0, memory_bytes=512 << 20, **LIMITS)


# --- the corpus through preflight and stamping ---------------------------------------------------------

@needs_judges
@pytest.mark.parametrize("broken", CORPUS + SIGNED_CORPUS, ids=lambda b: b.name)
def test_a_broken_document_is_refused_before_payment_or_stamped_into_a_valid_file(
    broken: Broken, signer, tmp_path: Path
) -> None:
    document = broken.build()
    try:
        accepted = isolated(document)  # in the preflight pool's child, under its limits
    except DocumentRejected as rejection:
        assert rejection.code in {"unreadable", "damaged_structure"}, rejection
        assert BAHASA.search(rejection.message), rejection.message
        return
    assert accepted == preflight(document, **LIMITS)

    delivered = sign(document, signer)

    assert_valid_for_other_readers(delivered, tmp_path)
    check_delivery(delivered, page=1, page_count=expected_page_count(document), serial=SERIAL,
                   issuer=signer.certificate)


@needs_judges
def test_the_fuzzed_kind_with_an_overflowing_subsection_is_stamped_into_a_file_readers_accept(
    signer, tmp_path: Path
) -> None:
    """The issue's file: its table numbers objects from 2^32. pypdf reads it without calling it repaired;
    appended to, it gave a file with no signature poppler could find. Now it is rewritten whole."""
    document = subsection_number_overflows()
    assert qpdf_check(document, tmp_path)[0] != 0  # broken indeed: qpdf has to reconstruct it
    assert not source_is_sound(document)

    delivered = sign(document, signer)

    assert not delivered.startswith(document)  # rewritten, not appended to
    assert_valid_for_other_readers(delivered, tmp_path)


@pytest.mark.parametrize("broken", SIGNED_CORPUS, ids=lambda b: b.name)
def test_a_signed_document_whose_update_strict_readers_could_not_follow_is_rejected_before_payment(
    broken: Broken
) -> None:
    """A signed document is only ever appended to (a rewrite breaks its signatures); appended to broken
    cross-reference data, the stamped file is one qpdf has to repair: refused, in the pool's child."""
    with pytest.raises(DocumentRejected) as caught:
        isolated(broken.build())

    assert caught.value.code == "damaged_structure"
    assert "Simpan ulang atau cetak ulang" in caught.value.message


def test_preflight_refuses_a_document_the_two_parsers_count_differently() -> None:
    """The page tree lists the outline dictionary as a kid: pypdf skips it (one page), qpdf repairs it
    into a page (two). Which pages the buyer's readers show, and so what "page 1 of 1" means, is not
    certain: refused before payment rather than stamped on a guess."""
    from tests.broken_pdfs import classic, standard_objects

    document = classic(standard_objects(o2=b"<< /Type /Pages /Kids [3 0 R 6 0 R] /Count 2 >>"))
    assert expected_page_count(document) == 2

    with pytest.raises(DocumentRejected) as caught:
        preflight(document, **LIMITS)

    assert caught.value.code == "damaged_structure"


# --- the check itself ------------------------------------------------------------------------------

def test_a_stamped_and_signed_letter_passes_the_delivery_check(signer) -> None:
    for pages, stamped_page in ((1, 1), (10, 7)):
        document = make_pdf(pages=pages)
        delivered = sign(document, signer, page=stamped_page)

        check_delivery(delivered, page=stamped_page, page_count=pages, serial=SERIAL, issuer=signer.certificate)


def failure(data: bytes, signer, **overrides: object) -> DeliveryCheckFailed:
    arguments = {"page": 1, "page_count": 2, "serial": SERIAL, "issuer": signer.certificate, **overrides}
    with pytest.raises(DeliveryCheckFailed) as caught:
        check_delivery(data, **arguments)  # type: ignore[arg-type]
    return caught.value


def test_the_delivery_check_refuses_what_is_not_our_whole_signed_stamp(signer, tmp_path: Path) -> None:
    document = make_pdf(pages=2)
    delivered = sign(document, signer)

    assert "whole file" in failure(delivered + b"\n% appended after signing\n", signer).problem
    assert "signature fields named" in failure(delivered, signer, serial="ZYXWVUTSRQPONMLKJIHGFE").problem
    assert "pages where 3 were expected" in failure(delivered, signer, page_count=3).problem
    assert "paint a form" in failure(delivered, signer, page=2).problem  # the stamp is on page 1

    other_folder = tmp_path / "another-issuer"
    other = PkiPaths(other_folder / "key.pem", other_folder / "cert.pem", other_folder / "ca.pem")
    ensure_pki(other)
    assert "not by our issuer" in failure(delivered, signer, issuer=load_signer(other).certificate).problem

    signed_only = sign_pdf(document, signer, serial=SERIAL)  # a signature, but no stamp
    assert "paint a form" in failure(signed_only, signer).problem

    def flip(at: int) -> bytes:
        changed = bytearray(delivered)
        changed[at] = ord("1") if delivered[at:at + 1] != b"1" else ord("2")
        return bytes(changed)

    contents_at = delivered.index(b"/Contents <") + len(b"/Contents <")
    assert "certificate" in failure(flip(contents_at + 400), signer).problem  # inside the embedded certificates
    value_end = delivered.index(b">", contents_at)
    while delivered[value_end - 1:value_end] == b"0":  # the zero padding after the DER
        value_end -= 1
    assert "does not verify" in failure(flip(value_end - 3), signer).problem  # the signature value itself


def test_a_file_only_a_repair_could_read_fails_the_check_as_a_permanent_error(signer) -> None:
    """What the old path delivered: the fuzzed kind stamped as an update, here written the old way."""
    from shared.stamping import kernel, signing

    document = subsection_number_overflows()
    with kernel.bounded_parsing():  # stamp_and_sign's fast path, step by step
        reader = kernel.read_document(document)
        reader.independently_sound = True  # the old decision: pypdf alone judged the table intact
        prepared = kernel.prepare_stamp(reader, serial=SERIAL, verify_url="https://meterai.example.id/v",
                                        size=100.0, **PLACEMENT)  # type: ignore[arg-type]
        assert prepared is not None
        signing._add_signature_field(prepared.update, reader, prepared.page_ref, prepared.page, SERIAL,
                                     signer.bytes_reserved)
        old_delivery = signing._seal(prepared.render(), signer)

    error = failure(old_delivery, signer, page_count=1)

    assert isinstance(error, PermanentError) and error.code == "stamp_check_failed"
    assert "without recovery" in error.problem
    assert BAHASA.search(error.message)
    copy = pickle.loads(pickle.dumps(error))  # crosses process boundaries (Celery, the pool's child)
    assert (copy.code, copy.problem, copy.message) == (error.code, error.problem, error.message)
    with pytest.raises(DeliveryCheckFailed):
        check_structure(old_delivery, page=1)


@needs_judges
def test_a_signed_document_only_a_repair_can_read_is_refused_and_the_judges_agree(signer, tmp_path: Path) -> None:
    """Its stream's /Length lies: qpdf has to recover that stream. A signed document is only ever
    appended to, and an update of data only a repair can follow is no delivery: the kernel refuses it
    (a refund, if it ever got past preflight, which refuses it before payment)."""
    from shared.stamping import DocumentUnreadable

    document = signed_with_wrong_stream_length()
    assert qpdf_check(document, tmp_path)[0] != 0
    assert not source_is_sound(document)

    with pytest.raises(DocumentUnreadable):
        sign(document, signer)
    with pytest.raises(DocumentRejected) as refused:
        isolated(document)
    assert refused.value.code == "damaged_structure"


def test_a_stamp_on_a_page_readers_do_not_show_there_fails_the_check(signer) -> None:
    """The kernel finds page 1 by /Count, readers by /Kids; where they disagree, the re-read of the
    stamped page catches it: refused before payment, and never delivered if it got past."""
    document = page_tree_with_a_lying_count()
    assert source_is_sound(document)

    with pytest.raises(DocumentRejected) as refused:
        isolated(document)
    assert refused.value.code == "damaged_structure"
    assert "paint a form" in failure(sign(document, signer), signer, page_count=2).problem


def test_a_signed_document_we_cannot_append_to_is_unreadable_at_stamping_not_a_crash(signer) -> None:
    """Its page tree is marked free: neither our update (its signatures forbid a rewrite) nor any signer
    can make a file readers accept. Stamping ends that as a permanent DocumentUnreadable (refund), not
    as an exception the worker would retry until the deadline; preflight refuses it before payment."""
    from shared.stamping import DocumentUnreadable
    from tests.broken_pdfs import signed_with_page_tree_marked_free

    with pytest.raises(DocumentUnreadable):
        sign(signed_with_page_tree_marked_free(), signer)
    with pytest.raises(DocumentRejected) as refused:
        isolated(signed_with_page_tree_marked_free())
    assert refused.value.code in {"unreadable", "damaged_structure"}


def issuer_with_key(folder: Path, issuer_key) -> PkiPaths:
    """A root and an issuer whose key is ``issuer_key`` (one the fast path leaves to pyHanko's signer)."""
    import datetime as dt

    from cryptography import x509 as cx509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root_name = cx509.Name([cx509.NameAttribute(NameOID.COMMON_NAME, "Test Root")])

    def certificate(subject: cx509.Name, public_key, ca: bool) -> cx509.Certificate:
        return (cx509.CertificateBuilder().subject_name(subject).issuer_name(root_name).public_key(public_key)
                .serial_number(cx509.random_serial_number()).not_valid_before(now)
                .not_valid_after(now + dt.timedelta(days=30))
                .add_extension(cx509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(root_key, hashes.SHA256()))

    issuer_name = cx509.Name([cx509.NameAttribute(NameOID.COMMON_NAME, "Test Issuer")])
    paths = PkiPaths(folder / "key.pem", folder / "cert.pem", folder / "ca.pem")
    pem = serialization.Encoding.PEM
    paths.ca_cert.write_bytes(certificate(root_name, root_key.public_key(), True).public_bytes(pem))
    paths.cert.write_bytes(certificate(issuer_name, issuer_key.public_key(), False).public_bytes(pem))
    paths.key.write_bytes(issuer_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return paths


def test_the_check_accepts_every_signature_a_standard_signer_makes(signer, tmp_path: Path) -> None:
    """Our route with an ECDSA issuer key, and pyHanko's signer (the reference, with the keys it signs
    with by other mechanisms too): the check judges the file and our issuer, not which CMS library made
    the signature, and refuses a foreign issuer for either."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from shared.stamping import stamp_document
    from tests.reference_signer import pyhanko_signer, sign_with_pyhanko

    document = make_pdf(pages=2)
    ec_paths = issuer_with_key(tmp_path / "ecdsa", ec.generate_private_key(ec.SECP256R1()))
    ec_signer = load_signer(ec_paths)
    assert ec_signer.template.mechanism == "ecdsa"
    by_ecdsa = sign(document, ec_signer)
    check_delivery(by_ecdsa, page=1, page_count=2, serial=SERIAL, issuer=ec_signer.certificate)

    stamped = stamp_document(document, serial=SERIAL, verify_url="https://meterai.example.id/v", **PLACEMENT)
    by_pyhanko = sign_with_pyhanko(stamped, pyhanko_signer(ec_paths), serial=SERIAL)
    check_delivery(by_pyhanko, page=1, page_count=2, serial=SERIAL, issuer=ec_signer.certificate)
    with pytest.raises(DeliveryCheckFailed):
        check_delivery(by_pyhanko, page=1, page_count=2, serial=SERIAL, issuer=signer.certificate)
    with pytest.raises(DeliveryCheckFailed):
        check_delivery(by_ecdsa, page=1, page_count=2, serial=SERIAL, issuer=signer.certificate)


@needs_judges
def test_a_document_with_earlier_updates_is_appended_to_and_other_readers_accept_it(signer, tmp_path: Path) -> None:
    """Documents saved incrementally before (a buyer's signature, an earlier e-Meterai) end in a classic
    table that doesn't start at object 0: still an update on top of their bytes, valid for the judges."""
    first = sign(make_pdf(pages=2), signer)
    other = "ZYXWVUTSRQPONMLKJIHGFE"

    second = stamp_and_sign(first, signer, page=2, x=400, y=80, serial=other,
                            verify_url=f"https://meterai.example.id/verify/{other}")

    assert second.startswith(first)
    code, report = qpdf_check(second, tmp_path)
    assert code == 0, report
    signatures = pdfsig_report(second, tmp_path)
    assert signatures.count("Signature Validation: Signature is Valid.") == 2, signatures
    check_delivery(second, page=2, page_count=2, serial=other, issuer=signer.certificate)


# --- through the real API, workers and database ---------------------------------------------------------

def test_a_broken_signed_document_is_rejected_through_the_api_with_no_payment(sys_: System) -> None:
    response = sys_.create(SIGNED_CORPUS[0].build())
    assert response.status_code == 202, response.text
    body = response.json()

    view = sys_.wait_status(body["order_id"], body["access_token"], "rejected", timeout=25)

    assert view["reason"]["code"] == "damaged_structure", view
    assert "Simpan ulang atau cetak ulang" in view["reason"]["message"]
    assert "payment" not in view
    assert sys_.query("SELECT count(*) AS n FROM payments WHERE order_id = %s", (body["order_id"],))[0]["n"] == 0


@needs_judges
def test_the_fuzzed_kind_is_paid_stamped_and_downloaded_as_a_file_readers_accept(
    sys_: System, tmp_path: Path
) -> None:
    order_id, token, view = sys_.order_awaiting_payment(subsection_number_overflows())
    sys_.pay(view["payment"]["gateway_order_id"])
    done = sys_.wait_status(order_id, token, "stamped")

    download = sys_.http.get(f"{sys_.web_url}/api/v1/orders/{order_id}/document",
                             headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert download.status_code == 200
    assert_valid_for_other_readers(download.content, tmp_path, serial=done["serial"])


@BOTH_STORES
def test_a_stamp_that_fails_the_delivery_check_is_refunded_never_stamped(sys_: System) -> None:
    """The stored upload is replaced after preflight by a document the stamping kernel still stamps and
    signs, into a file whose stamp readers show on another page than the one chosen (preflight would
    have refused it). The worker must refund it at once: no stamped file, serial voided, no retries."""
    order_id, token, view = sys_.order_awaiting_payment()
    sys_.replace_upload(order_id, page_tree_with_a_lying_count())
    log = sys_.process("stamping").log
    log_start = log.stat().st_size

    sys_.pay(view["payment"]["gateway_order_id"])
    done = sys_.wait_status(order_id, token, "refunded", "stamped")

    assert done["status"] == "refunded", done
    row = sys_.order_row(order_id)
    assert row["reason_code"] == "stamp_check_failed"
    assert row["stamped_document_key"] is None and row["stamped_at"] is None
    assert row["stamp_attempts"] == 1
    assert "stamped" not in [event["to_status"] for event in sys_.events(order_id)]
    assert BAHASA.search(done["reason"]["message"]) and "dikembalikan penuh" in done["reason"]["message"]
    assert done["refund"]["amount"] == 12500
    serials = sys_.query("SELECT status FROM serials WHERE order_id = %s", (order_id,))
    assert [s["status"] for s in serials] == ["voided"]
    assert sys_.stored_keys(f"stamped/{order_id}") == []
    # The line is written after the refund is handed on, which another worker may finish first.
    wait_until(lambda: events(log.read_bytes()[log_start:].decode("utf-8", "replace"), "stamp_failed_permanently",
                              order_id=order_id, code="stamp_check_failed"),
               message="the stamp_failed_permanently line")
