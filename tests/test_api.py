"""The HTTP contract's edges: bad input is refused clearly, nothing is stored or charged."""
from __future__ import annotations

import uuid

from tests.conftest import make_pdf


def _count_orders(sys_) -> int:
    return sys_.query("SELECT count(*) AS n FROM orders")[0]["n"]


def test_create_without_idempotency_key_is_400(sys_):
    r = sys_.http.post(f"{sys_.web_url}/api/v1/orders",
                       data={"page": "1", "x": "10", "y": "10", "email": "a@b.id"},
                       files={"document": ("a.pdf", make_pdf(), "application/pdf")}, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "missing_idempotency_key"
    assert _count_orders(sys_) == 0


def test_create_without_document_is_400(sys_):
    r = sys_.http.post(f"{sys_.web_url}/api/v1/orders", headers={"Idempotency-Key": "k1"},
                       data={"page": "1", "x": "10", "y": "10", "email": "a@b.id"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_document"


def test_not_a_pdf_is_refused_before_anything_is_stored(sys_):
    r = sys_.create(b"GIF89a this is an image")
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "not_pdf"
    assert r.json()["error"]["message"]
    assert _count_orders(sys_) == 0


def test_oversized_document_is_413(sys_):
    big = make_pdf() + b"%" + b"x" * (sys_.settings.max_document_bytes + 10)
    r = sys_.create(big)
    assert r.status_code == 413
    assert _count_orders(sys_) == 0


def test_bad_fields_are_422_with_the_field_named(sys_):
    for kwargs, code in [({"page": 0}, "invalid_page"), ({"x": -5}, "invalid_x"),
                         ({"email": "not-an-email"}, "invalid_email")]:
        r = sys_.create(make_pdf(), **kwargs)
        assert r.status_code == 422, (kwargs, r.text)
        assert r.json()["error"]["code"] == code
    r = sys_.http.post(f"{sys_.web_url}/api/v1/orders", headers={"Idempotency-Key": uuid.uuid4().hex},
                       data={"page": "satu", "x": "1", "y": "1", "email": "a@b.id"},
                       files={"document": ("a.pdf", make_pdf(), "application/pdf")}, timeout=10)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_page"
    assert _count_orders(sys_) == 0


def test_page_beyond_the_document_is_rejected_before_payment(sys_):
    r = sys_.create(make_pdf(pages=2), page=5)
    assert r.status_code == 202
    body = r.json()
    view = sys_.wait_status(body["order_id"], body["access_token"], "rejected")
    assert view["reason"]["code"] == "page_out_of_range"
    assert "payment" not in view
    assert sys_.query("SELECT count(*) AS n FROM payments")[0]["n"] == 0


def test_status_needs_the_right_token(sys_):
    r = sys_.create()
    order_id = r.json()["order_id"]
    url = f"{sys_.web_url}/api/v1/orders/{order_id}"
    assert sys_.http.get(url, timeout=5).status_code == 401
    wrong = sys_.http.get(url, headers={"Authorization": "Bearer nope"}, timeout=5)
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
    unknown = sys_.http.get(f"{sys_.web_url}/api/v1/orders/{uuid.uuid4()}",
                            headers={"Authorization": "Bearer x"}, timeout=5)
    assert unknown.status_code == 404
    stored = sys_.query("SELECT access_token_hashes FROM orders")[0]["access_token_hashes"]
    assert r.json()["access_token"] not in stored and len(stored) == 1


def test_document_before_stamping_is_409(sys_):
    body = sys_.create().json()
    r = sys_.http.get(f"{sys_.web_url}/api/v1/orders/{body['order_id']}/document",
                      headers={"Authorization": f"Bearer {body['access_token']}"}, timeout=5)
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_stamped"


def test_unknown_serial_is_404(sys_):
    r = sys_.http.get(f"{sys_.web_url}/api/v1/verify/{'A' * 22}", timeout=5)
    assert r.status_code == 404
    assert sys_.http.get(f"{sys_.web_url}/api/v1/verify/short", timeout=5).status_code == 404


def test_health_and_readiness_report_each_dependency(sys_):
    assert sys_.http.get(f"{sys_.web_url}/healthz", timeout=5).json() == {"status": "ok"}
    ready = sys_.http.get(f"{sys_.web_url}/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "document_store": "ok"}


def test_openapi_documents_every_routed_path(sys_):
    from web import create_app

    spec = sys_.http.get(f"{sys_.web_url}/api/v1/openapi.json", timeout=5).json()
    assert spec["openapi"].startswith("3.")
    app = create_app(sys_.settings)
    machine_prefixes = ("/api/", "/ops/", "/healthz", "/readyz")  # HTML pages are for people
    routed = {rule.rule.replace("<", "{").replace(">", "}") for rule in app.url_map.iter_rules()
              if rule.endpoint != "static" and rule.rule.startswith(machine_prefixes)}
    documented = set(spec["paths"])
    assert documented <= routed
    assert routed - {"/api/v1/openapi.json"} <= documented


def test_hostile_field_values_get_4xx_not_5xx(sys_):
    for kwargs, code in [({"page": 99999999999}, "invalid_page"), ({"x": 1e300}, "invalid_x"),
                         ({"email": "a\x00b@c.id"}, "invalid_email")]:
        r = sys_.create(make_pdf(), **kwargs)
        assert r.status_code == 422, (kwargs, r.text)
        assert r.json()["error"]["code"] == code
    r = sys_.http.get(f"{sys_.web_url}/api/v1/orders/urn:uuid:{uuid.uuid4()}",
                      headers={"Authorization": "Bearer x"}, timeout=5)
    assert r.status_code == 404
    r = sys_.http.post(f"{sys_.web_url}/api/v1/payments/notifications",
                       data='{"order_id": "\\ud800", "status_code": "200", "gross_amount": "12500.00",'
                            ' "transaction_status": "settlement", "signature_key": "ab"}',
                       headers={"Content-Type": "application/json"}, timeout=5)
    assert r.status_code == 403, r.text
    assert _count_orders(sys_) == 0


def test_http_statuses_are_chosen_in_the_web_layer_from_the_code():
    """Core exceptions carry a code and a message; web/errors.py alone maps codes to statuses."""
    from shared import admission, orders, store
    from shared.errors import DomainError, PermanentError, TransientError
    from shared.stamping import DocumentRejected
    from web.errors import status_for

    assert not hasattr(DomainError("x"), "status")
    cases = [(DocumentRejected("not_pdf", "x"), 415), (DocumentRejected("too_large", "x"), 413),
             (DocumentRejected("page_out_of_range", "x"), 422), (orders.IdempotencyConflict("x"), 409),
             (admission.SalesPaused("x"), 503), (admission.InvalidAdmission("x", code="ticket_used"), 410),
             (store.StoreUnavailable("x"), 503), (TransientError("x", code="something_new"), 503),
             (PermanentError("x", code="something_new"), 422), (DomainError("x", code="something_new"), 400)]
    for exc, status in cases:
        assert status_for(exc) == status, exc.code
