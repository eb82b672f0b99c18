"""Signing stamped documents, checked by independent validators: pyHanko's with our root as the only
trust anchor, and poppler's ``pdfsig`` (a different implementation, NSS underneath) when installed; and
compared with pyHanko's signer, the reference (``tests/reference_signer.py``).

No services: the signer works on bytes and a folder for its key material, which the development tooling
makes (``shared/devtools/pki.py``) and production only loads.
"""
from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pypdf
import pytest
from cryptography import x509
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import fields, signers
from pyhanko.sign.validation import validate_pdf_signature
from pyhanko.sign.validation.status import SignatureCoverageLevel
from pyhanko_certvalidator import ValidationContext

from shared.config import load_settings
from shared.devtools.pki import ensure_dev_pki, ensure_pki
from shared.errors import TransientError
from shared.stamping import DocumentRejected, DocumentUnreadable, preflight, stamp_document
from shared.stamping.signing import (
    PkiPaths,
    SigningUnavailable,
    load_signer,
    pki_paths,
    sign_pdf,
    signer_from_settings,
    stamp_and_sign,
)
from tests.conftest import ROOT, make_pdf
from tests.reference_signer import pyhanko_signer, sign_with_pyhanko

SERIAL = "0123456789ABCDEFGHIJKL"
OTHER_SERIAL = "ZYXWVUTSRQPONMLKJIHGFE"


def stamped(document: bytes, serial: str = SERIAL, page: int = 1) -> bytes:
    return stamp_document(document, page=page, x=400, y=80, serial=serial,
                          verify_url=f"https://meterai.example.id/verify/{serial}")


def validate(data: bytes, trust_root, index: int = -1):
    reader = PdfFileReader(io.BytesIO(data), strict=False)
    embedded = reader.embedded_signatures[index]
    context = ValidationContext(trust_roots=[trust_root], allow_fetching=False)
    return embedded, validate_pdf_signature(embedded, context)


def development_signer(data_dir: Path, **env: str):
    """The signer of a development machine: the tooling makes the CA, then production loads it."""
    settings = load_settings(env, data_dir=str(data_dir))
    ensure_dev_pki(settings)
    return signer_from_settings(settings)


@pytest.fixture
def signer(tmp_path):
    return development_signer(tmp_path)


@dataclass(frozen=True)
class Buyer:
    ca_certificate: object
    cms_signer: object  # pyHanko's: buyers sign with their own tools


@pytest.fixture
def buyer(tmp_path):
    """Somebody else's signing identity, under a root of their own (made the same way, elsewhere)."""
    folder = tmp_path / "buyer-pki"
    paths = PkiPaths(folder / "key.pem", folder / "cert.pem", folder / "ca.pem")
    ensure_pki(paths)
    return Buyer(load_signer(paths).ca_certificate, pyhanko_signer(paths))


def buyer_signed(buyer, document: bytes, *, certify: bool = False,
                 permissions: fields.MDPPerm = fields.MDPPerm.FILL_FORMS) -> bytes:
    metadata = signers.PdfSignatureMetadata(field_name="TandaTanganPelamar", md_algorithm="sha256",
                                            certify=certify, docmdp_permissions=permissions)
    writer = IncrementalPdfFileWriter(io.BytesIO(document))
    return signers.sign_pdf(writer, metadata, signer=buyer.cms_signer).getvalue()


def pdfsig(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / f"checked-{len(data)}.pdf"
    path.write_bytes(data)
    result = subprocess.run(["pdfsig", str(path)], capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


needs_pdfsig = pytest.mark.skipif(shutil.which("pdfsig") is None,
                                  reason="poppler-utils (pdfsig) is not installed")


def test_signed_document_is_intact_trusted_and_covers_the_entire_file(signer):
    document = stamped(make_pdf(pages=2))

    signed = sign_pdf(document, signer, serial=SERIAL)

    assert signed.startswith(document)  # an incremental update after the stamp
    embedded, status = validate(signed, signer.ca_certificate)
    assert embedded.field_name == f"eMeterai-{SERIAL}"
    assert embedded.sig_object["/Reason"] == f"e-Meterai {SERIAL}"
    assert embedded.sig_object["/SubFilter"] == "/ETSI.CAdES.detached"  # PAdES
    assert status.intact and status.valid and status.trusted
    assert status.coverage == SignatureCoverageLevel.ENTIRE_FILE
    assert status.md_algorithm == "sha256"
    assert status.bottom_line


def test_signature_does_not_chain_to_someone_elses_root(signer, buyer):
    signed = sign_pdf(stamped(make_pdf()), signer, serial=SERIAL)

    _, status = validate(signed, buyer.ca_certificate)

    assert status.intact and status.valid
    assert not status.trusted


def test_bytes_appended_after_signing_leave_the_signature_short_of_the_file(signer):
    signed = sign_pdf(stamped(make_pdf()), signer, serial=SERIAL)
    writer = IncrementalPdfFileWriter(io.BytesIO(signed))
    writer.root["/Lang"] = generic.TextStringObject("id-ID")
    writer.update_root()
    altered = io.BytesIO()
    writer.write(altered)

    _, status = validate(altered.getvalue(), signer.ca_certificate)

    assert status.intact
    assert status.coverage == SignatureCoverageLevel.ENTIRE_REVISION


@needs_pdfsig
def test_pdfsig_accepts_the_signature_over_the_whole_document(signer, tmp_path):
    signed = sign_pdf(stamped(make_pdf()), signer, serial=SERIAL)

    report = pdfsig(signed, tmp_path)

    assert f"Signature Field Name: eMeterai-{SERIAL}" in report
    assert "Signature Validation: Signature is Valid." in report
    assert "Total document signed" in report
    assert "Signing Hash Algorithm: SHA-256" in report


def test_a_buyer_signature_stays_valid_after_our_stamp_and_signature(signer, buyer, tmp_path):
    original = buyer_signed(buyer, make_pdf(pages=2))

    result = sign_pdf(stamped(original, page=2), signer, serial=SERIAL)

    assert result.startswith(original)  # the buyer's signed revision is kept byte for byte
    theirs, their_status = validate(result, buyer.ca_certificate, index=0)
    assert theirs.field_name == "TandaTanganPelamar"
    assert their_status.intact and their_status.valid and their_status.trusted
    assert their_status.coverage == SignatureCoverageLevel.ENTIRE_REVISION
    ours, our_status = validate(result, signer.ca_certificate, index=1)
    assert ours.field_name == f"eMeterai-{SERIAL}"
    assert our_status.bottom_line and our_status.coverage == SignatureCoverageLevel.ENTIRE_FILE
    if shutil.which("pdfsig"):
        assert pdfsig(result, tmp_path).count("Signature Validation: Signature is Valid.") == 2


def test_a_document_stamped_twice_keeps_both_e_meterai_signatures(signer):
    first = sign_pdf(stamped(make_pdf(pages=2), SERIAL, page=1), signer, serial=SERIAL)

    second = sign_pdf(stamped(first, OTHER_SERIAL, page=2), signer, serial=OTHER_SERIAL)

    assert second.startswith(first)
    _, earlier = validate(second, signer.ca_certificate, index=0)
    later_sig, later = validate(second, signer.ca_certificate, index=1)
    assert earlier.intact and earlier.trusted and earlier.coverage == SignatureCoverageLevel.ENTIRE_REVISION
    assert later_sig.field_name == f"eMeterai-{OTHER_SERIAL}" and later.bottom_line


def test_preflight_refuses_a_certified_document_that_allows_no_changes(buyer):
    locked = buyer_signed(buyer, make_pdf(), certify=True, permissions=fields.MDPPerm.NO_CHANGES)

    with pytest.raises(DocumentRejected) as refused:
        preflight(locked, page=1, x=400, y=80, max_bytes=2**21, max_pages=10)

    assert refused.value.code == "certified_no_changes"


def test_a_certified_document_that_allows_form_filling_is_stamped_incrementally(signer, buyer):
    certified = buyer_signed(buyer, make_pdf(), certify=True, permissions=fields.MDPPerm.FILL_FORMS)

    result = sign_pdf(stamped(certified), signer, serial=SERIAL)

    assert result.startswith(certified)
    _, theirs = validate(result, buyer.ca_certificate, index=0)
    assert theirs.intact and theirs.valid


def test_key_is_loaded_once_per_process(tmp_path):
    settings = load_settings({}, data_dir=str(tmp_path))
    first = development_signer(tmp_path)
    paths = pki_paths(settings)

    for path in paths.all():  # were the key read per document, signing would now fail
        path.rename(path.with_name(path.name + ".moved"))
    again = signer_from_settings(load_settings({"DATA_DIR": str(tmp_path)}))
    signed = sign_pdf(stamped(make_pdf()), again, serial=SERIAL)

    assert again is first
    _, status = validate(signed, first.ca_certificate)
    assert status.bottom_line


def test_development_pki_is_made_in_an_empty_folder(tmp_path):
    paths = pki_paths(load_settings({}, data_dir=str(tmp_path / "fresh")))

    assert ensure_pki(paths) is True
    assert ensure_pki(paths) is False  # second run: already there, untouched

    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    issuer = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    ca.verify_directly_issued_by(ca)  # self-signed root
    issuer.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.content_commitment
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    assert not list(paths.key.parent.glob("*.tmp")) and not list(paths.key.parent.glob(".*.tmp"))


def test_concurrent_first_runs_make_exactly_one_pki(tmp_path):
    folder = tmp_path / "data"
    script = (
        "import sys, time\n"
        "from shared.config import load_settings\n"
        "from shared.devtools.pki import ensure_dev_pki\n"
        "from shared.stamping.signing import signer_from_settings\n"
        "settings = load_settings({}, data_dir=sys.argv[1])\n"
        "while time.time() < float(sys.argv[2]): pass\n"
        "created = ensure_dev_pki(settings)\n"
        "print(created, signer_from_settings(settings).certificate.sha256.hex())\n"
    )
    start_at = time.time() + 3  # after their imports, all processes race from the same instant
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [subprocess.Popen([sys.executable, "-c", script, str(folder), str(start_at)], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(4)]
    outputs = [run.communicate(timeout=120) for run in runs]

    assert all(run.returncode == 0 for run in runs), outputs
    lines = [out.split() for out, _ in outputs]
    assert sorted(created for created, _ in lines) == ["False", "False", "False", "True"]
    assert len({fingerprint for _, fingerprint in lines}) == 1


def test_production_never_makes_key_material_it_does_not_find(tmp_path):
    """Not even with the development switch on: only the tooling makes a CA; the signer and the
    verification's root only load."""
    from shared.stamping.key_material import trust_root_der

    settings = load_settings({"SIGNING_DEV_PKI": "1"}, data_dir=str(tmp_path))

    with pytest.raises(SigningUnavailable) as missing:
        signer_from_settings(settings)
    with pytest.raises(SigningUnavailable):
        trust_root_der(settings)

    assert isinstance(missing.value, TransientError)  # retried, never refunded
    assert not (tmp_path / "pki").exists()


def test_the_tooling_makes_nothing_when_development_pki_is_off(tmp_path):
    settings = load_settings({"SIGNING_DEV_PKI": "0"}, data_dir=str(tmp_path))

    assert ensure_dev_pki(settings) is False

    assert not (tmp_path / "pki").exists()
    with pytest.raises(SigningUnavailable):
        signer_from_settings(settings)


def test_the_tooling_command_makes_the_development_ca_for_the_environment(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATA_DIR": str(tmp_path / "data")}
    first = subprocess.run([sys.executable, "-m", "shared.devtools.pki"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    again = subprocess.run([sys.executable, "-m", "shared.devtools.pki"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)

    assert first.returncode == 0 and "made" in first.stdout, first
    assert again.returncode == 0 and "already in place" in again.stdout, again
    signer = signer_from_settings(load_settings({"DATA_DIR": str(tmp_path / "data")}))
    assert signer.ca_certificate.subject.native["organization_name"] == "meterai (development)"


def test_partial_key_material_is_reported_not_overwritten(tmp_path):
    settings = load_settings({}, data_dir=str(tmp_path))
    paths = pki_paths(settings)
    paths.cert.parent.mkdir(parents=True)
    paths.cert.write_bytes(b"an operator's certificate")

    with pytest.raises(SigningUnavailable):
        ensure_dev_pki(settings)
    with pytest.raises(SigningUnavailable):
        signer_from_settings(settings)

    assert paths.cert.read_bytes() == b"an operator's certificate"
    assert not paths.key.exists()


def test_a_passphrase_protected_key_needs_its_passphrase(tmp_path):
    protected = load_settings({"SIGNING_KEY_PASSPHRASE": "rahasia-negara"}, data_dir=str(tmp_path))
    signer = development_signer(tmp_path, SIGNING_KEY_PASSPHRASE="rahasia-negara")
    assert b"ENCRYPTED" in pki_paths(protected).key.read_bytes()
    signed = sign_pdf(stamped(make_pdf()), signer, serial=SERIAL)
    assert validate(signed, signer.ca_certificate)[1].bottom_line

    with pytest.raises(SigningUnavailable):
        signer_from_settings(load_settings({"SIGNING_KEY_PASSPHRASE": "salah"}, data_dir=str(tmp_path)))


def test_a_malformed_serial_is_refused(signer):
    with pytest.raises(ValueError):
        sign_pdf(stamped(make_pdf()), signer, serial="not-a-serial")


# --- the one-pass path: stamp and signature in a single incremental update ------------------------

def stamped_and_signed(signer, document: bytes, serial: str = SERIAL, page: int = 1) -> bytes:
    return stamp_and_sign(document, signer, page=page, x=400, y=80, serial=serial,
                          verify_url=f"https://meterai.example.id/verify/{serial}")


def appended_objects(original: bytes, result: bytes) -> int:
    return result[len(original):].count(b" obj\n")


def test_stamp_and_sign_keeps_the_original_as_a_prefix_and_signs_the_entire_file(signer, tmp_path):
    original = make_pdf(pages=2)

    result = stamped_and_signed(signer, original, page=2)

    assert result.startswith(original)
    embedded, status = validate(result, signer.ca_certificate)
    assert embedded.field_name == f"eMeterai-{SERIAL}"
    assert embedded.sig_object["/SubFilter"] == "/ETSI.CAdES.detached"
    assert status.bottom_line and status.coverage == SignatureCoverageLevel.ENTIRE_FILE
    assert SERIAL in pypdf.PdfReader(io.BytesIO(result)).pages[1].extract_text()
    if shutil.which("pdfsig"):
        report = pdfsig(result, tmp_path)
        assert "Signature Validation: Signature is Valid." in report and "Total document signed" in report


def test_the_signature_carries_exactly_the_pades_baseline_attributes(signer):
    embedded, _ = validate(stamped_and_signed(signer, make_pdf()), signer.ca_certificate)

    signer_info = embedded.signed_data["signer_infos"][0]
    attributes = [attribute["type"].native for attribute in signer_info["signed_attrs"]]
    assert sorted(attributes) == ["content_type", "message_digest", "signing_certificate_v2"]
    ess = next(attribute["values"][0] for attribute in signer_info["signed_attrs"]
               if attribute["type"].native == "signing_certificate_v2")
    assert ess["certs"][0]["cert_hash"].native == signer.certificate.sha256
    assert signer_info["digest_algorithm"]["algorithm"].native == "sha256"


def test_the_update_does_not_grow_with_the_document(signer):
    short, long = make_pdf(pages=1), make_pdf(pages=10)

    assert appended_objects(short, stamped_and_signed(signer, short)) == \
        appended_objects(long, stamped_and_signed(signer, long))


def test_a_document_with_a_cross_reference_stream_gets_one_too(signer, tmp_path):
    from pyhanko.pdf_utils.writer import copy_into_new_writer

    writer = copy_into_new_writer(PdfFileReader(io.BytesIO(make_pdf(pages=2))),
                                  writer_kwargs={"stream_xrefs": True})
    buffer = io.BytesIO()
    writer.write(buffer)
    original = buffer.getvalue()

    result = stamped_and_signed(signer, original, page=2)

    assert result.startswith(original) and b"/Type /XRef" in result[len(original):]
    _, status = validate(result, signer.ca_certificate)
    assert status.bottom_line and status.coverage == SignatureCoverageLevel.ENTIRE_FILE
    if shutil.which("pdfsig"):
        assert "Signature Validation: Signature is Valid." in pdfsig(result, tmp_path)


def test_a_document_whose_cross_reference_table_is_broken_is_rewritten_then_signed(signer):
    original = make_pdf(pages=2)
    broken = original[:original.rindex(b"startxref")] + b"startxref\n12\n%%EOF\n"

    result = stamped_and_signed(signer, broken)

    assert not result.startswith(broken)  # normalised by a full rewrite first
    _, status = validate(result, signer.ca_certificate)
    assert status.bottom_line and status.coverage == SignatureCoverageLevel.ENTIRE_FILE


def test_one_pass_keeps_a_buyer_signature_valid(signer, buyer):
    original = buyer_signed(buyer, make_pdf(pages=2))

    result = stamped_and_signed(signer, original, page=2)

    assert result.startswith(original)
    _, theirs = validate(result, buyer.ca_certificate, index=0)
    assert theirs.intact and theirs.valid and theirs.coverage == SignatureCoverageLevel.ENTIRE_REVISION
    _, ours = validate(result, signer.ca_certificate, index=1)
    assert ours.bottom_line and ours.coverage == SignatureCoverageLevel.ENTIRE_FILE


def test_one_pass_and_two_steps_draw_the_same_stamp(signer):
    from tests.test_stamping_kernel import pink_bbox, render

    original = make_pdf(pages=1)
    one_pass = stamped_and_signed(signer, original)
    two_steps = sign_pdf(stamped(original), signer, serial=SERIAL)

    assert pink_bbox(render(one_pass, 0)) == pink_bbox(render(two_steps, 0)) is not None


def test_one_pass_refuses_what_stamping_refuses(signer):
    with pytest.raises(DocumentRejected) as outside:
        stamp_and_sign(make_pdf(), signer, page=1, x=10_000, y=0, serial=SERIAL,
                       verify_url="https://meterai.example.id/verify/x")
    assert outside.value.code == "stamp_outside_page"

    with pytest.raises(DocumentUnreadable):
        stamp_and_sign(b"%PDF-1.7\n" + b"\x00 garbage" * 50, signer, page=1, x=0, y=0, serial=SERIAL,
                       verify_url="https://meterai.example.id/verify/x")
    with pytest.raises(ValueError):
        stamp_and_sign(make_pdf(), signer, page=1, x=0, y=0, serial="bad", verify_url="https://x.id/")


# --- one route, pyHanko as the reference ----------------------------------------------------------

def signer_info(data: bytes):
    embedded = PdfFileReader(io.BytesIO(data), strict=False).embedded_signatures[-1]
    return embedded, embedded.signed_data, embedded.signed_data["signer_infos"][0]


def test_our_signature_is_what_pyhankos_signer_makes_for_the_same_document(tmp_path):
    """The same stamped letter signed by our route and by pyHanko's signer with the same key: the same
    signature dictionary, signer, algorithms, certificates and fixed signed attributes, and both validate
    alike. Only what must differ does: the bytes signed, hence the digest and the signature value."""
    signer = development_signer(tmp_path)
    document = stamped(make_pdf(pages=2))

    ours = sign_pdf(document, signer, serial=SERIAL)
    reference = sign_with_pyhanko(document, pyhanko_signer(pki_paths(load_settings({}, data_dir=str(tmp_path)))),
                                  serial=SERIAL)

    (our_sig, our_data, our_info), (ref_sig, ref_data, ref_info) = signer_info(ours), signer_info(reference)
    assert sorted(our_sig.sig_object.keys()) == sorted(ref_sig.sig_object.keys())
    for key in ("/Type", "/Filter", "/SubFilter", "/Reason", "/Location"):
        assert our_sig.sig_object[key] == ref_sig.sig_object[key], key
    assert our_sig.field_name == ref_sig.field_name == f"eMeterai-{SERIAL}"
    assert our_info["sid"].dump() == ref_info["sid"].dump()
    assert our_info["digest_algorithm"].dump() == ref_info["digest_algorithm"].dump()
    assert our_info["signature_algorithm"].dump() == ref_info["signature_algorithm"].dump()
    assert sorted(c.dump() for c in our_data["certificates"]) == sorted(c.dump() for c in ref_data["certificates"])

    def fixed_attributes(info) -> dict[str, bytes]:
        return {a["type"].native: a.dump() for a in info["signed_attrs"] if a["type"].native != "message_digest"}

    assert fixed_attributes(our_info) == fixed_attributes(ref_info)
    for signed in (ours, reference):
        _, status = validate(signed, signer.ca_certificate)
        assert status.bottom_line and status.coverage == SignatureCoverageLevel.ENTIRE_FILE


@pytest.mark.parametrize("key_kind", ["ed25519", "dsa"])
def test_a_key_our_signer_cannot_use_is_refused_when_it_is_loaded(tmp_path, key_kind):
    """Not at the first document (where every order would fail its signature): at load, with the key type
    named and what to configure instead."""
    from cryptography.hazmat.primitives.asymmetric import dsa, ed25519

    from tests.test_delivery import issuer_with_key

    key = ed25519.Ed25519PrivateKey.generate() if key_kind == "ed25519" else dsa.generate_private_key(2048)
    paths = issuer_with_key(tmp_path / key_kind, key)

    with pytest.raises(SigningUnavailable) as refused:
        load_signer(paths)

    assert "RSA" in refused.value.message and "ECDSA" in refused.value.message
    assert "SIGNING_KEY_PATH" in refused.value.message
    assert isinstance(refused.value, TransientError)


def test_a_document_that_must_be_rewritten_is_normalised_first_then_stamped_as_an_update(signer):
    """One stamp representation: the rare document that can't take an update as it is (here a broken
    startxref) is written whole by pypdf, unstamped, and that normalised file gets the same incremental
    stamp and signature as every other document."""
    original = make_pdf(pages=2)
    broken = original[:original.rindex(b"startxref")] + b"startxref\n12\n%%EOF\n"

    result = stamped_and_signed(signer, broken)

    normalised = result[:result.index(b"%%EOF") + len(b"%%EOF")]
    unstamped = pypdf.PdfReader(io.BytesIO(normalised))
    assert len(unstamped.pages) == 2
    assert b"/MeteraiStamp" not in normalised and b"/MeteraiArt" not in normalised
    assert SERIAL not in unstamped.pages[0].extract_text()
    appended = result[len(normalised):]
    assert appended.count(b"%%EOF") == 1  # stamp and signature: one update on top of the normalised file
    assert b"/MeteraiArt" in appended and f"eMeterai-{SERIAL}".encode() in appended
    _, status = validate(result, signer.ca_certificate)
    assert status.bottom_line and status.coverage == SignatureCoverageLevel.ENTIRE_FILE
