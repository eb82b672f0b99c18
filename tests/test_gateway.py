"""The payment adapter against the stand-in gateway, both real HTTP servers on localhost.

Nothing is mocked: the stand-in runs in a werkzeug thread, a second tiny server plays our notification
endpoint, and every assertion goes through :class:`MidtransGateway` or the stand-in's sandbox API, the
way the workers and the drills use them.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterator, TypeVar

import psycopg
import pytest
import requests
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response

from shared.config import load_settings
from shared.payments.gateway import (
    CircuitBreaker,
    GatewayRejected,
    GatewayUnavailable,
    MidtransGateway,
    format_gross_amount,
    gateway_from_settings,
    notification_signature,
    parse_gross_amount,
    verify_notification,
)
from shared.devtools.standin import create_standin_app

SERVER_KEY = "SB-Mid-server-test-key"
PRICE = 12_500
T = TypeVar("T")


class Receiver:
    """Our notification endpoint, stripped to what the tests need: it keeps every body it receives and
    can be told to fail the first few deliveries."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.fail_first = 0
        self._seen = 0
        self._changed = threading.Condition()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        with self._changed:
            self._seen += 1
            if self._seen <= self.fail_first:
                return Response("not yet", status=503)(environ, start_response)
            self.bodies.append(json.loads(request.get_data()))
            self._changed.notify_all()
        return Response("OK")(environ, start_response)

    def wait_for(self, count: int, timeout: float = 3.0) -> list[dict[str, Any]]:
        with self._changed:
            self._changed.wait_for(lambda: len(self.bodies) >= count, timeout=timeout)
            return list(self.bodies)


def _serve(app: Any) -> tuple[BaseWSGIServer, str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    # A short poll interval keeps shutdown() (and so each test's teardown) quick.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    app = Receiver()
    server, url = _serve(app)
    yield app, url + "/notifications"
    server.shutdown()


@pytest.fixture
def standin_schema(database_url: str) -> Iterator[str]:
    """A schema of its own per test, so every test meets a gateway that has never seen an order."""
    schema = f"standin_t{uuid.uuid4().hex[:12]}"
    yield schema
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def standin_url(receiver: tuple[Receiver, str], database_url: str, standin_schema: str) -> Iterator[str]:
    """A fresh stand-in per test; its public URL is only known after binding, so the app is wrapped."""
    holder: dict[str, Any] = {}
    server, url = _serve(lambda environ, start_response: holder["app"](environ, start_response))
    holder["app"] = create_standin_app(
        SERVER_KEY, receiver[1], url, sandbox=True, database_url=database_url, schema=standin_schema, seed=7,
        notification_retry_delays=(0.05, 0.1, 0.2),
    )
    yield url
    server.shutdown()
    holder["app"].extensions["standin_gateway"].close()


@pytest.fixture
def gateway(standin_url: str) -> MidtransGateway:
    return MidtransGateway(standin_url, SERVER_KEY, timeout=2.0, breaker=CircuitBreaker())


def sandbox(base_url: str, method: str, path: str, body: dict[str, Any] | None = None) -> requests.Response:
    return requests.request(method, f"{base_url}/sandbox/{path}", json=body, timeout=5)


def paid_order(gateway: MidtransGateway, order_id: str, payment_type: str = "qris") -> None:
    gateway.create_transaction(order_id, PRICE, email="budi@example.id", item_name="e-Meterai Rp10.000")
    answer = sandbox(gateway.base_url, "POST", f"pay/{order_id}", {"payment_type": payment_type})
    assert answer.status_code == 200, answer.text


def delivered_notification(base_url: str, order_id: str) -> dict[str, Any] | None:
    [delivery] = sandbox(base_url, "GET", f"transactions/{order_id}").json()["notifications"]
    return delivery if delivery["delivered"] else None


def eventually(probe: Callable[[], T | None], timeout: float = 3.0) -> T:
    """Poll ``probe`` until it returns something: the stand-in records a delivery only after our
    endpoint has answered, a moment after the receiver has the body."""
    deadline = time.monotonic() + timeout
    while (result := probe()) is None:
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)
    return result


# --- amounts and signatures ------------------------------------------------------------------------

def test_gross_amount_is_written_and_read_as_midtrans_text() -> None:
    assert format_gross_amount(12_500) == "12500.00"
    assert format_gross_amount(0) == "0.00"
    assert parse_gross_amount("12500.00") == 12_500
    assert parse_gross_amount("12500") == 12_500
    assert parse_gross_amount(format_gross_amount(987_654_321)) == 987_654_321


@pytest.mark.parametrize("text", ["12500.50", "12500.01", "-12500.00", "", "abc", "12,500.00"])
def test_gross_amount_with_a_fraction_or_garbage_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_gross_amount(text)


def test_negative_amount_cannot_be_formatted() -> None:
    with pytest.raises(ValueError):
        format_gross_amount(-1)


def test_forged_or_incomplete_notification_fails_verification() -> None:
    body = {"order_id": "MTR-1", "status_code": "200", "gross_amount": "12500.00"}
    body["signature_key"] = notification_signature("MTR-1", "200", "12500.00", SERVER_KEY)
    assert verify_notification(body, SERVER_KEY)
    assert not verify_notification(body | {"gross_amount": "1.00"}, SERVER_KEY)
    assert not verify_notification(body | {"status_code": "201"}, SERVER_KEY)
    assert not verify_notification(body, "another-merchant-key")
    assert not verify_notification({k: v for k, v in body.items() if k != "signature_key"}, SERVER_KEY)
    assert not verify_notification(body | {"gross_amount": 12500}, SERVER_KEY)


# --- create, status, pay, notify -------------------------------------------------------------------

def test_created_transaction_is_pending_and_has_a_pay_page(gateway: MidtransGateway) -> None:
    created = gateway.create_transaction("MTR-create", PRICE, email="a@example.id", item_name="e-Meterai")

    assert created.redirect_url == f"{gateway.base_url}/snap/v2/vtweb/{created.token}"
    status = gateway.get_status("MTR-create")
    assert status is not None
    assert (status.transaction_status, status.status_code, status.gross_amount) == ("pending", "201", PRICE)
    page = requests.get(created.redirect_url, timeout=5)
    assert page.status_code == 200 and "Bayar sekarang" in page.text


def test_same_order_id_cannot_be_created_twice(gateway: MidtransGateway) -> None:
    gateway.create_transaction("MTR-twice", PRICE, email="a@example.id", item_name="e-Meterai")
    with pytest.raises(GatewayRejected, match="already been taken"):
        gateway.create_transaction("MTR-twice", PRICE, email="a@example.id", item_name="e-Meterai")


def test_unknown_order_has_no_status(gateway: MidtransGateway) -> None:
    assert gateway.get_status("MTR-never-created") is None


def test_payment_sends_a_notification_whose_signature_verifies(
    gateway: MidtransGateway, receiver: tuple[Receiver, str]
) -> None:
    paid_order(gateway, "MTR-paid")

    [notification] = receiver[0].wait_for(1)
    assert verify_notification(notification, SERVER_KEY)
    assert notification["transaction_status"] == "settlement"
    assert notification["gross_amount"] == "12500.00"
    assert notification["currency"] == "IDR"
    status = gateway.get_status("MTR-paid")
    assert status is not None
    assert status.transaction_status == "settlement"
    assert (status.status_code, status.payment_type) == ("200", "qris")
    assert status.transaction_id == notification["transaction_id"]


def test_credit_card_payment_is_captured_and_accepted(
    gateway: MidtransGateway, receiver: tuple[Receiver, str]
) -> None:
    paid_order(gateway, "MTR-card", "credit_card")

    [notification] = receiver[0].wait_for(1)
    assert (notification["transaction_status"], notification["fraud_status"]) == ("capture", "accept")
    status = gateway.get_status("MTR-card")
    assert status is not None and status.fraud_status == "accept"


def test_expired_order_notifies_expire(gateway: MidtransGateway, receiver: tuple[Receiver, str]) -> None:
    gateway.create_transaction("MTR-expire", PRICE, email="a@example.id", item_name="e-Meterai")
    assert sandbox(gateway.base_url, "POST", "expire/MTR-expire").status_code == 200

    [notification] = receiver[0].wait_for(1)
    assert notification["transaction_status"] == "expire" and verify_notification(notification, SERVER_KEY)
    assert sandbox(gateway.base_url, "POST", "pay/MTR-expire").status_code == 409


def test_duplicate_notifications_knob_delivers_extra_copies(
    gateway: MidtransGateway, receiver: tuple[Receiver, str]
) -> None:
    sandbox(gateway.base_url, "POST", "faults", {"duplicate_notifications": 2})
    paid_order(gateway, "MTR-dup")

    bodies = receiver[0].wait_for(3)
    time.sleep(0.1)
    assert len(receiver[0].bodies) == 3
    assert {json.dumps(b, sort_keys=True) for b in bodies} == {json.dumps(bodies[0], sort_keys=True)}


def test_stale_notification_can_arrive_after_the_settlement(
    gateway: MidtransGateway, receiver: tuple[Receiver, str]
) -> None:
    paid_order(gateway, "MTR-stale")
    receiver[0].wait_for(1)
    sandbox(gateway.base_url, "POST", "notify/MTR-stale", {"transaction_status": "pending"})

    first, second = receiver[0].wait_for(2)
    assert (first["transaction_status"], second["transaction_status"]) == ("settlement", "pending")
    assert second["status_code"] == "201" and verify_notification(second, SERVER_KEY)


def test_dropped_notification_never_arrives_but_status_query_still_answers(
    gateway: MidtransGateway, receiver: tuple[Receiver, str]
) -> None:
    sandbox(gateway.base_url, "POST", "faults", {"drop_notifications": True})
    paid_order(gateway, "MTR-drop")

    assert receiver[0].wait_for(1, timeout=0.3) == []
    status = gateway.get_status("MTR-drop")
    assert status is not None and status.transaction_status == "settlement"
    record = sandbox(gateway.base_url, "GET", "transactions/MTR-drop").json()
    assert [n["dropped"] for n in record["notifications"]] == [True]


def test_notification_is_retried_until_our_endpoint_accepts_it(
    gateway: MidtransGateway, receiver: tuple[Receiver, str]
) -> None:
    receiver[0].fail_first = 2
    paid_order(gateway, "MTR-retry")

    assert len(receiver[0].wait_for(1)) == 1
    delivery = eventually(lambda: delivered_notification(gateway.base_url, "MTR-retry"))
    assert delivery["attempts"] == 3


# --- refunds ---------------------------------------------------------------------------------------

def test_refund_is_idempotent_by_refund_key(gateway: MidtransGateway) -> None:
    paid_order(gateway, "MTR-refund")

    first = gateway.refund("MTR-refund", refund_key="refund-1", amount=PRICE, reason="gagal dibubuhkan")
    again = gateway.refund("MTR-refund", refund_key="refund-1", amount=PRICE, reason="gagal dibubuhkan")

    assert first.refunded and again.refunded
    assert first.status_code == again.status_code == "200"
    record = sandbox(gateway.base_url, "GET", "transactions/MTR-refund").json()
    assert [r["refund_key"] for r in record["refunds"]] == ["refund-1"]
    assert record["refunded_amount"] == PRICE
    status = gateway.get_status("MTR-refund")
    assert status is not None and status.transaction_status == "refund"


def test_refund_with_a_new_key_after_full_refund_is_refused(gateway: MidtransGateway) -> None:
    paid_order(gateway, "MTR-refund-2")
    assert gateway.refund("MTR-refund-2", refund_key="k1", amount=PRICE, reason="x").refunded

    second = gateway.refund("MTR-refund-2", refund_key="k2", amount=PRICE, reason="x")

    assert (second.refunded, second.status_code) == (False, "412")
    assert len(sandbox(gateway.base_url, "GET", "transactions/MTR-refund-2").json()["refunds"]) == 1


def test_virtual_account_payment_cannot_be_refunded_by_api(gateway: MidtransGateway) -> None:
    paid_order(gateway, "MTR-va", "bank_transfer")

    result = gateway.refund("MTR-va", refund_key="refund-va", amount=PRICE, reason="x")

    assert (result.refunded, result.status_code) == (False, "412")
    assert result.message == "Merchant cannot modify the status of the transaction"
    assert sandbox(gateway.base_url, "GET", "transactions/MTR-va").json()["refunds"] == []


def test_refund_refused_for_payment_type_named_in_fault_knob(gateway: MidtransGateway) -> None:
    sandbox(gateway.base_url, "POST", "faults", {"refuse_refunds_for": ["gopay"]})
    paid_order(gateway, "MTR-gopay", "gopay")

    assert not gateway.refund("MTR-gopay", refund_key="r", amount=PRICE, reason="x").refunded


def test_unpaid_order_cannot_be_refunded(gateway: MidtransGateway) -> None:
    gateway.create_transaction("MTR-unpaid", PRICE, email="a@example.id", item_name="e-Meterai")

    assert not gateway.refund("MTR-unpaid", refund_key="r", amount=PRICE, reason="x").refunded


# --- failures --------------------------------------------------------------------------------------

def test_gateway_errors_surface_as_unavailable(gateway: MidtransGateway) -> None:
    paid_order(gateway, "MTR-500")
    sandbox(gateway.base_url, "POST", "faults", {"error_rate": 1})

    with pytest.raises(GatewayUnavailable):
        gateway.get_status("MTR-500")
    with pytest.raises(GatewayUnavailable):
        gateway.refund("MTR-500", refund_key="r", amount=PRICE, reason="x")
    with pytest.raises(GatewayUnavailable):
        gateway.create_transaction("MTR-500-b", PRICE, email="a@example.id", item_name="e-Meterai")


def test_gateway_timeout_surfaces_as_unavailable(standin_url: str) -> None:
    impatient = MidtransGateway(standin_url, SERVER_KEY, timeout=0.2, breaker=CircuitBreaker())
    sandbox(standin_url, "POST", "faults", {"timeout_rate": 1, "timeout_sleep_seconds": 1.0})

    # The stand-in answers after a second (and still does the work): only giving up at 0.2 s raises.
    with pytest.raises(GatewayUnavailable):
        impatient.get_status("MTR-slow")


def test_unreachable_gateway_is_unavailable() -> None:
    server = make_server("127.0.0.1", 0, Response("gone"))
    port = server.server_port
    server.server_close()
    nowhere = MidtransGateway(f"http://127.0.0.1:{port}", SERVER_KEY, timeout=0.5, breaker=CircuitBreaker())

    with pytest.raises(GatewayUnavailable):
        nowhere.get_status("MTR-x")


def test_wrong_server_key_is_rejected_not_retried(standin_url: str) -> None:
    stranger = MidtransGateway(standin_url, "SB-Mid-server-wrong", timeout=2.0, breaker=CircuitBreaker())

    with pytest.raises(GatewayRejected):
        stranger.get_status("MTR-x")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_circuit_opens_after_repeated_failures_and_closes_after_cooldown(standin_url: str) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=2, cooldown_seconds=30, clock=clock)
    adapter = MidtransGateway(standin_url, SERVER_KEY, timeout=2.0, breaker=breaker)
    sandbox(standin_url, "POST", "faults", {"error_rate": 1})
    for _ in range(2):
        with pytest.raises(GatewayUnavailable):
            adapter.get_status("MTR-cb")

    sandbox(standin_url, "DELETE", "faults")
    with pytest.raises(GatewayUnavailable) as refused:
        adapter.get_status("MTR-cb")
    assert refused.value.code == "gateway_circuit_open"

    clock.now += 30
    assert breaker.state == "half_open"
    assert adapter.get_status("MTR-cb") is None
    assert breaker.state == "closed"


def test_fault_knobs_are_validated_merged_and_reset(standin_url: str) -> None:
    assert sandbox(standin_url, "POST", "faults", {"no_such_knob": 1}).status_code == 400
    assert sandbox(standin_url, "POST", "faults", {"error_rate": 2}).status_code == 400
    sandbox(standin_url, "POST", "faults", {"latency_ms": 5})
    merged = sandbox(standin_url, "POST", "faults", {"duplicate_notifications": 1}).json()
    assert (merged["latency_ms"], merged["duplicate_notifications"]) == (5, 1)
    reset = sandbox(standin_url, "DELETE", "faults").json()
    assert (reset["latency_ms"], reset["duplicate_notifications"]) == (0, 0)


def test_gateway_from_settings_talks_to_the_configured_gateway(standin_url: str) -> None:
    settings = load_settings({}, gateway_url=standin_url, gateway_server_key=SERVER_KEY)
    configured = gateway_from_settings(settings)

    assert isinstance(configured, MidtransGateway)
    assert configured.get_status("MTR-nobody") is None


# --- closing unpaid transactions, scoped faults, money types ----------------------------------------

def test_merchant_expiry_closes_a_pending_transaction_and_notifies(
    gateway: MidtransGateway, receiver: tuple[Receiver, str]
) -> None:
    gateway.create_transaction("MTR-close", PRICE, email="a@example.id", item_name="e-Meterai")

    closed = gateway.expire_transaction("MTR-close")

    assert (closed.closed, closed.status_code, closed.transaction_status) == (True, "407", "expire")
    status = gateway.get_status("MTR-close")
    assert status is not None and status.transaction_status == "expire"
    [notification] = receiver[0].wait_for(1)
    assert notification["transaction_status"] == "expire" and verify_notification(notification, SERVER_KEY)
    assert sandbox(gateway.base_url, "POST", "pay/MTR-close").status_code == 409  # can't be paid now
    again = gateway.expire_transaction("MTR-close")
    assert (again.closed, again.status_code) == (False, "412")


def test_a_paid_transaction_cannot_be_expired_or_cancelled(gateway: MidtransGateway) -> None:
    paid_order(gateway, "MTR-paid-close")

    for close in (gateway.expire_transaction, gateway.cancel_transaction):
        answer = close("MTR-paid-close")
        assert (answer.closed, answer.status_code) == (False, "412")
    status = gateway.get_status("MTR-paid-close")
    assert status is not None and status.transaction_status == "settlement"


def test_cancel_closes_a_pending_transaction(gateway: MidtransGateway) -> None:
    gateway.create_transaction("MTR-cancel", PRICE, email="a@example.id", item_name="e-Meterai")

    answer = gateway.cancel_transaction("MTR-cancel")

    assert (answer.closed, answer.status_code, answer.transaction_status) == (True, "200", "cancel")
    assert gateway.expire_transaction("MTR-nobody").status_code == "404"


def test_bank_that_settles_after_expiry_sends_settlement_after_expire(
    gateway: MidtransGateway, receiver: tuple[Receiver, str]
) -> None:
    gateway.create_transaction("MTR-late", PRICE, email="a@example.id", item_name="e-Meterai")
    sandbox(gateway.base_url, "POST", "expire/MTR-late")
    late = sandbox(gateway.base_url, "POST", "pay/MTR-late",
                   {"payment_type": "bank_transfer", "bank": "bni", "after_expiry": True})

    assert late.status_code == 200
    first, second = receiver[0].wait_for(2)
    assert (first["transaction_status"], second["transaction_status"]) == ("expire", "settlement")
    status = gateway.get_status("MTR-late")
    assert status is not None and status.transaction_status == "settlement"
    assert status.va_bank == "bni" and status.va_number and status.va_number.isdigit()


def test_faults_can_target_one_endpoint_for_a_fixed_number_of_calls(gateway: MidtransGateway) -> None:
    gateway.create_transaction("MTR-scoped", PRICE, email="a@example.id", item_name="e-Meterai")
    knobs = sandbox(gateway.base_url, "POST", "faults",
                    {"error_rate": 1, "endpoints": ["status"], "max_faults": 2}).json()
    assert knobs["injected"] == {"error": 0, "timeout": 0}

    for _ in range(2):
        with pytest.raises(GatewayUnavailable):
            gateway.get_status("MTR-scoped")
    assert gateway.get_status("MTR-scoped") is not None  # budget spent: healthy again
    assert gateway.refund("MTR-scoped", refund_key="r", amount=PRICE, reason="x").status_code == "412"
    assert sandbox(gateway.base_url, "GET", "faults").json()["injected"] == {"error": 2, "timeout": 0}
    assert sandbox(gateway.base_url, "POST", "faults", {"endpoints": ["nope"]}).status_code == 400


@pytest.mark.parametrize("amount", [12500.0, "12500", True, -1])
def test_amounts_must_be_integer_rupiah_before_anything_is_sent(gateway: MidtransGateway, amount: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        gateway.create_transaction("MTR-float", amount, email="a@example.id", item_name="e-Meterai")
    with pytest.raises((TypeError, ValueError)):
        gateway.refund("MTR-float", refund_key="r", amount=amount, reason="x")
    assert gateway.get_status("MTR-float") is None


class BlackHole:
    """A gateway that is dead the worst way: it accepts connections and never answers. Counts them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_breaker_stops_waiting_on_a_gateway_that_never_answers() -> None:
    hole = BlackHole()
    try:
        adapter = MidtransGateway(hole.url, SERVER_KEY, timeout=0.3,
                                  breaker=CircuitBreaker(threshold=3, cooldown_seconds=60))
        for _ in range(3):
            with pytest.raises(GatewayUnavailable) as waited:
                adapter.get_status("MTR-dead")
            assert waited.value.code == "gateway_unavailable"  # each waited out its timeout
        for _ in range(50):
            with pytest.raises(GatewayUnavailable) as refused:
                adapter.refund("MTR-dead", refund_key="r", amount=PRICE, reason="x")
            assert refused.value.code == "gateway_circuit_open"
        assert len(hole.accepted) == 3  # fifty calls, none of them reached the wire
    finally:
        hole.close()


def test_gateway_from_settings_uses_the_configured_breaker(standin_url: str) -> None:
    settings = load_settings({}, gateway_url=standin_url, gateway_server_key=SERVER_KEY,
                             gateway_breaker_threshold=1, gateway_breaker_cooldown_seconds=123.0)
    configured = gateway_from_settings(settings)

    assert isinstance(configured, MidtransGateway)
    assert (configured._breaker.threshold, configured._breaker.cooldown_seconds) == (1, 123.0)


def test_payment_links_expire_no_later_than_we_expire_the_order():
    from shared.config import load_settings
    from shared.payments.gateway import gateway_from_settings

    gateway = gateway_from_settings(load_settings({"PAYMENT_TIMEOUT_SECONDS": "7200"}))
    assert gateway.payment_window_minutes == 120


# --- card captures settle later; a capture is voided, a settlement refunded -------------------------

def test_card_capture_cannot_be_refunded_only_voided(gateway: MidtransGateway, receiver: tuple[Receiver, str]) -> None:
    paid_order(gateway, "MTR-card-void", "credit_card")

    refused = gateway.refund("MTR-card-void", refund_key="r1", amount=PRICE, reason="x")
    assert (refused.refunded, refused.status_code) == (False, "412")  # Midtrans: not settled yet
    voided = gateway.cancel_transaction("MTR-card-void")

    assert (voided.closed, voided.status_code, voided.transaction_status) == (True, "200", "cancel")
    status = gateway.get_status("MTR-card-void")
    assert status is not None and status.transaction_status == "cancel"
    assert [n["transaction_status"] for n in receiver[0].wait_for(2)] == ["capture", "cancel"]
    assert gateway.expire_transaction("MTR-card-void").status_code == "412"


def test_settled_card_payment_cannot_be_voided_only_refunded(
    gateway: MidtransGateway, receiver: tuple[Receiver, str]
) -> None:
    paid_order(gateway, "MTR-card-settled", "credit_card")
    assert gateway.expire_transaction("MTR-card-settled").status_code == "412"  # a capture never expires

    settled = sandbox(gateway.base_url, "POST", "settle/MTR-card-settled")
    assert settled.status_code == 200 and settled.json()["transaction_status"] == "settlement"
    assert sandbox(gateway.base_url, "POST", "settle/MTR-card-settled").status_code == 409

    assert gateway.cancel_transaction("MTR-card-settled").status_code == "412"
    assert gateway.refund("MTR-card-settled", refund_key="r1", amount=PRICE, reason="x").refunded
    assert [n["transaction_status"] for n in receiver[0].wait_for(3)] == ["capture", "settlement", "refund"]


def test_card_captures_settle_by_themselves_after_the_configured_time(
    gateway: MidtransGateway, receiver: tuple[Receiver, str]
) -> None:
    assert sandbox(gateway.base_url, "POST", "faults", {"card_settlement_seconds": 0}).status_code == 200
    paid_order(gateway, "MTR-card-auto", "credit_card")

    notes = receiver[0].wait_for(2, timeout=10)
    assert [n["transaction_status"] for n in notes] == ["capture", "settlement"]
    status = gateway.get_status("MTR-card-auto")
    assert status is not None and status.transaction_status == "settlement"
    assert sandbox(gateway.base_url, "POST", "faults", {"card_settlement_seconds": -1}).status_code == 400


# --- the list of captures -----------------------------------------------------------------------------

def test_captures_of_a_period_are_listed_for_the_merchant_only(gateway: MidtransGateway) -> None:
    from datetime import datetime, timedelta, timezone

    start = datetime.now(timezone.utc) - timedelta(seconds=5)
    paid_order(gateway, "MTR-list-qris")
    paid_order(gateway, "MTR-list-card", "credit_card")
    gateway.cancel_transaction("MTR-list-card")  # a voided capture is still a capture to account for
    gateway.create_transaction("MTR-list-unpaid", PRICE, email="a@example.id", item_name="e-Meterai")
    gateway.refund("MTR-list-qris", refund_key="r", amount=PRICE, reason="x")
    end = datetime.now(timezone.utc) + timedelta(seconds=5)

    listed = {c.gateway_order_id: c for c in gateway.list_captures(start, end)}

    assert set(listed) == {"MTR-list-qris", "MTR-list-card"}
    assert (listed["MTR-list-qris"].transaction_status, listed["MTR-list-qris"].refunded) == ("refund", PRICE)
    assert (listed["MTR-list-card"].transaction_status, listed["MTR-list-card"].payment_type) == (
        "cancel", "credit_card")
    assert listed["MTR-list-qris"].gross_amount == PRICE and listed["MTR-list-qris"].captured_at
    assert gateway.list_captures(end, end + timedelta(hours=1)) == []
    anonymous = requests.get(f"{gateway.base_url}/sandbox/captures",
                             params={"from": start.isoformat(), "to": end.isoformat()}, timeout=5)
    assert anonymous.status_code == 401  # buyers' payments are the merchant's business


def test_a_gateway_without_a_capture_list_says_so(receiver: tuple[Receiver, str]) -> None:
    from datetime import datetime, timezone

    server, url = _serve(Response('{"status_code": "404"}', status=404, mimetype="application/json"))
    try:
        plain = MidtransGateway(url, SERVER_KEY, timeout=2.0, breaker=CircuitBreaker())
        with pytest.raises(GatewayRejected) as refused:
            plain.list_captures(datetime(2024, 9, 1, tzinfo=timezone.utc), datetime(2024, 9, 2, tzinfo=timezone.utc))
        assert refused.value.code == "no_capture_list"
    finally:
        server.shutdown()


# --- ids no transaction can have ------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v2/MTR%00x/status", "/v2/%00/refund", "/v2/a%00/cancel", "/v2/a%00/expire",
                                  "/sandbox/pay/MTR%00x", "/sandbox/transactions/%00", "/sandbox/settle/%00",
                                  "/sandbox/notify/%00", "/sandbox/expire/%00", "/snap/v2/vtweb/%00"])
def test_a_nul_byte_in_an_id_is_an_unknown_transaction_not_an_error(standin_url: str, path: str) -> None:
    method = "GET" if path.endswith("/status") or "transactions" in path or "vtweb" in path else "POST"
    answer = requests.request(method, standin_url + path, auth=(SERVER_KEY, ""), json={}, timeout=5)

    assert answer.status_code == 404, answer.text
    assert answer.json()["status_code"] == "404"


def test_text_the_database_cannot_hold_is_refused_at_create_and_refund(gateway: MidtransGateway) -> None:
    for bad in ({"order_id": "MTR-\x00"}, {"order_id": "MTR bad/id"}):
        body = {"transaction_details": {**bad, "gross_amount": PRICE}}
        answer = requests.post(f"{gateway.base_url}/snap/v1/transactions", json=body, auth=(SERVER_KEY, ""),
                               timeout=5)
        assert answer.status_code == 400, answer.text
    body = {"transaction_details": {"order_id": "MTR-nul-mail", "gross_amount": PRICE},
            "customer_details": {"email": "a\x00@example.id"}}
    assert requests.post(f"{gateway.base_url}/snap/v1/transactions", json=body, auth=(SERVER_KEY, ""),
                         timeout=5).status_code == 400
    paid_order(gateway, "MTR-nul-refund")
    answer = requests.post(f"{gateway.base_url}/v2/MTR-nul-refund/refund", auth=(SERVER_KEY, ""),
                           json={"refund_key": "k\x00", "amount": PRICE}, timeout=5)
    assert answer.status_code == 400
    assert gateway.get_status("MTR-nul-refund").transaction_status == "settlement"  # type: ignore[union-attr]


class ForwardProxy:
    """A plain HTTP forward proxy (what an egress proxy is to us): takes ``GET http://host:port/path``,
    fetches it and answers with what it got. Records each request line."""

    def __init__(self) -> None:
        import http.client
        import http.server
        import socketserver
        from urllib.parse import urlsplit

        seen: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                seen.append(f"GET {self.path}")
                target = urlsplit(self.path)
                upstream = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=5)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "host")}
                upstream.request("GET", target.path + (f"?{target.query}" if target.query else ""), headers=headers)
                answer = upstream.getresponse()
                body = answer.read()
                upstream.close()
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.getheader("Content-Type") or "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.seen = seen
        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_egress_proxy_named_by_the_environment_is_used_and_read_once(standin_url: str, monkeypatch) -> None:
    """Production may reach Midtrans only through an egress proxy (HTTPS_PROXY / HTTP_PROXY, NO_PROXY):
    the adapter reads the environment once, when it is made (not on every call: a quarter of its CPU per
    call), and every call then goes through the proxy, or straight to a host NO_PROXY names."""
    proxy = ForwardProxy()
    try:
        for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
        through = MidtransGateway(standin_url, SERVER_KEY, timeout=5, breaker=CircuitBreaker())
        assert through._session.verify == "/etc/ssl/certs/ca-certificates.crt"  # the CA bundle kept too
        monkeypatch.delenv("HTTP_PROXY")  # read once: a later change of the environment is not looked at
        assert through.get_status("MTR-via-proxy") is None  # the stand-in's answer, through the proxy
        assert through.get_status("MTR-via-proxy-2") is None
        assert proxy.seen == [f"GET {standin_url}/v2/MTR-via-proxy/status",
                              f"GET {standin_url}/v2/MTR-via-proxy-2/status"]

        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        direct = MidtransGateway(standin_url, SERVER_KEY, timeout=5, breaker=CircuitBreaker())
        assert direct.get_status("MTR-direct") is None
        assert len(proxy.seen) == 2  # NO_PROXY names the gateway's host: not through the proxy
    finally:
        proxy.close()
