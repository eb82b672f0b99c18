"""Verification end to end: documents stamped and signed by the real workers, checked over HTTP.

Forgeries are made the way people make them: an incremental update appended to a stamped file, bytes
edited inside it, the stamped page merged into another PDF, the signature stripped, a signature from
some other root, and documents carrying serials we never issued or have voided by a refund. (The
sandbox the checks run in, its time limit and its busy answer: ``tests/test_sandbox.py``.)
"""
from __future__ import annotations

import io
import secrets
import string

import pypdf
import pypdfium2 as pdfium
import zxingcpp
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter

from shared.devtools.pki import ensure_pki
from shared.stamping import stamp_document
from shared.stamping.signing import PkiPaths, load_signer, sign_pdf, signer_from_settings
from tests.conftest import BOTH_STORES, make_pdf


def random_serial() -> str:
    return "".join(secrets.choice(string.digits + string.ascii_uppercase) for _ in range(22))


def stamped_order(sys_, document: bytes | None = None, **placement) -> tuple[str, str, bytes]:
    """(order_id, serial, stamped PDF) for an order paid and stamped by the real workers."""
    order_id, token, view = sys_.order_awaiting_payment(document, **placement)
    sys_.pay(view["payment"]["gateway_order_id"])
    done = sys_.wait_status(order_id, token, "stamped")
    r = sys_.http.get(f"{sys_.web_url}/api/v1/orders/{order_id}/document",
                      headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200
    return order_id, done["serial"], r.content


def verify(sys_, document: bytes, path: str = "/api/v1/verify"):
    return sys_.http.post(f"{sys_.web_url}{path}",
                          files={"document": ("dokumen.pdf", document, "application/pdf")}, timeout=30)


def our_signature_on(sys_, document: bytes, serial: str) -> bytes:
    """A document stamped and signed with our real key for ``serial``, outside any order."""
    stamped = stamp_document(document, page=1, x=400, y=80, serial=serial,
                             verify_url=f"{sys_.web_url}/verify/{serial}")
    return sign_pdf(stamped, signer_from_settings(sys_.settings), serial=serial)


def assert_invalid(response, reason: str, serial: str | None = None) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["valid"] is False and body["reason"] == reason, body
    assert body["message"]
    if serial is not None:
        assert body["serial"] == serial
    return body


@BOTH_STORES
def test_genuine_stamped_document_is_valid_with_its_serial_and_time(sys_):
    order_id, serial, document = stamped_order(sys_)

    r = verify(sys_, document)

    assert r.status_code == 200, r.text
    body = r.json()
    row = sys_.query("SELECT s.document_sha256, o.stamped_at, o.stamped_sha256 FROM serials s"
                     " JOIN orders o ON o.id = s.order_id WHERE s.serial = %s", (serial,))[0]
    assert body["valid"] is True and "reason" not in body
    assert body["serial"] == serial
    assert body["stamped_at"] == row["stamped_at"].isoformat()
    assert body["document_sha256"] == row["document_sha256"] == row["stamped_sha256"]
    by_serial = sys_.http.get(f"{sys_.web_url}/api/v1/verify/{serial}", timeout=10).json()
    assert by_serial == {"serial": serial, "status": "used", "stamped_at": body["stamped_at"],
                         "document_sha256": body["document_sha256"]}


def test_document_changed_after_stamping_is_invalid(sys_):
    _, serial, document = stamped_order(sys_)

    appended = IncrementalPdfFileWriter(io.BytesIO(document))  # a later "small edit" in a PDF editor
    appended.root["/Lang"] = generic.TextStringObject("id-ID")
    appended.update_root()
    buffer = io.BytesIO()
    appended.write(buffer)
    assert_invalid(verify(sys_, buffer.getvalue()), "modified_after_stamping", serial)

    # An edit in place, same length, inside the signed bytes: the page becomes Letter-wide.
    assert document.count(b"595.2756") >= 1
    edited = document.replace(b"595.2756", b"612.0000")
    assert_invalid(verify(sys_, edited), "signature_invalid", serial)


def test_stamp_pasted_onto_another_document_is_invalid(sys_):
    _, serial, document = stamped_order(sys_, make_pdf(pages=1), page=1)

    forged = pypdf.PdfWriter()
    forged.append(pypdf.PdfReader(io.BytesIO(make_pdf(pages=2, text="Dokumen lain"))))
    forged.add_page(pypdf.PdfReader(io.BytesIO(document)).pages[0])  # the stamped page, moved over
    buffer = io.BytesIO()
    forged.write(buffer)
    assert_invalid(verify(sys_, buffer.getvalue()), "not_signed")

    stripped = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(document)))
    del stripped.root_object["/AcroForm"]
    for page in stripped.pages:
        if "/Annots" in page:
            del page["/Annots"]
    buffer = io.BytesIO()
    stripped.write(buffer)
    assert_invalid(verify(sys_, buffer.getvalue()), "not_signed")


def test_serial_we_never_issued_is_invalid(sys_):
    serial = random_serial()
    document = our_signature_on(sys_, make_pdf(), serial)

    assert_invalid(verify(sys_, document), "unknown_serial", serial)
    missing = sys_.http.get(f"{sys_.web_url}/api/v1/verify/{serial}", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_serial"


@BOTH_STORES
def test_serial_voided_by_a_refund_is_invalid(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    # stamping fails for good: refund
    sys_.replace_upload(order_id, b"%PDF-1.7\n" + b"\x00garbage" * 100)
    sys_.pay(view["payment"]["gateway_order_id"])
    done = sys_.wait_status(order_id, token, "refunded")
    [voided] = sys_.query("SELECT serial, status FROM serials WHERE order_id = %s", (order_id,))
    assert voided["status"] == "voided" and done["refund"]["amount"] == 12500

    document = our_signature_on(sys_, make_pdf(), voided["serial"])

    assert_invalid(verify(sys_, document), "serial_voided", voided["serial"])
    by_serial = sys_.http.get(f"{sys_.web_url}/api/v1/verify/{voided['serial']}", timeout=10).json()
    assert by_serial == {"serial": voided["serial"], "status": "voided"}
    page = sys_.http.get(f"{sys_.web_url}/verify/{voided['serial']}", timeout=10)
    assert page.status_code == 200 and "dibatalkan" in page.text


def test_signature_from_another_root_is_invalid(sys_, tmp_path):
    _, serial, _ = stamped_order(sys_)
    paths = PkiPaths(tmp_path / "key.pem", tmp_path / "cert.pem", tmp_path / "ca.pem")
    ensure_pki(paths)  # a look-alike "development CA" somebody made for themselves
    forger = load_signer(paths)
    forged = sign_pdf(stamp_document(make_pdf(), page=1, x=400, y=80, serial=serial,
                                     verify_url=f"{sys_.web_url}/verify/{serial}"), forger, serial=serial)

    assert_invalid(verify(sys_, forged), "untrusted_signer", serial)


def test_uploads_that_are_not_checkable_pdfs_are_refused(sys_):
    not_pdf = verify(sys_, b"GIF89a not a pdf at all")
    assert not_pdf.status_code == 415 and not_pdf.json()["error"]["code"] == "not_pdf"

    too_large = verify(sys_, b"%PDF-1.7\n" + b"0" * sys_.settings.verify_max_bytes)
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "too_large"

    missing = sys_.http.post(f"{sys_.web_url}/api/v1/verify", data={"x": "1"}, timeout=10)
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_document"

    garbage = verify(sys_, b"%PDF-1.7\n" + b"\x00garbage" * 100)
    assert_invalid(garbage, "unreadable")


def test_public_pages_speak_bahasa_indonesia(sys_):
    _, serial, document = stamped_order(sys_)

    form = sys_.http.get(f"{sys_.web_url}/verify", timeout=10)
    assert form.status_code == 200 and form.headers["Content-Type"].startswith("text/html")
    assert '<html lang="id">' in form.text and "Verifikasi dokumen e-Meterai" in form.text
    assert 'enctype="multipart/form-data"' in form.text and 'name="document"' in form.text

    serial_page = sys_.http.get(f"{sys_.web_url}/verify/{serial}", timeout=10)
    assert serial_page.status_code == 200 and serial_page.headers["Content-Type"].startswith("text/html")
    assert serial in serial_page.text and "telah dipakai" in serial_page.text
    assert "WIB" in serial_page.text

    genuine = verify(sys_, document, path="/verify")
    assert genuine.status_code == 200 and "e-Meterai sah" in genuine.text and serial in genuine.text

    altered = verify(sys_, document.replace(b"595.2756", b"612.0000"), path="/verify")
    assert altered.status_code == 200 and "e-Meterai tidak sah" in altered.text

    refused = verify(sys_, b"bukan pdf", path="/verify")
    assert refused.status_code == 415 and "bukan dokumen PDF" in refused.text

    unknown = sys_.http.get(f"{sys_.web_url}/verify/{random_serial()}", timeout=10)
    assert unknown.status_code == 404 and "tidak terdaftar" in unknown.text

    typed = sys_.http.get(f"{sys_.web_url}/verify", params={"serial": serial.lower()},
                          allow_redirects=False, timeout=10)
    assert typed.status_code == 303 and typed.headers["Location"].endswith(f"/verify/{serial}")


def test_qr_code_on_the_stamp_decodes_to_the_verify_url(sys_):
    _, serial, document = stamped_order(sys_, make_pdf(pages=2), page=2, x=380, y=90)

    pdf = pdfium.PdfDocument(document)
    try:
        image = pdf[1].render(scale=4).to_pil().convert("L")
    finally:
        pdf.close()
    codes = zxingcpp.read_barcodes(image)

    expected = f"{sys_.web_url}/verify/{serial}"
    assert [code.text for code in codes if code.format == zxingcpp.BarcodeFormat.QRCode] == [expected]
    page = sys_.http.get(expected, timeout=10)
    assert page.status_code == 200 and serial in page.text
