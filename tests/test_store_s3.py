"""The document stores' promises, on the filesystem and on a real S3-compatible server (SeaweedFS).

Round trips, an exclusive put that never replaces another document, integrity checked against the
database's digest on both stores (a file changed behind the store's back is never stamped or served),
keys limited to our own shapes, a store that is down answering StoreUnavailable within its timeouts
(the web's within one short attempt), what readiness sees (a store we can't write is not ready), a server
that ignores conditional writes refused, and a node pointed at the wrong store retrying instead of
refunding. The settings that choose and bound the store are checked here too, and that a web process on
the filesystem store never loads boto3.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.config import load_settings, production_problems
from shared.devtools.services import free_port, start_seaweedfs
from shared.services import housekeeping
from shared.store import (DocumentCorrupt, DocumentExists, DocumentMissing, FilesystemStore, S3Store,
                          StoreMisconfigured, StoreUnavailable, stamped_key, store_from_settings, upload_key)
from tests.conftest import BOTH_STORES, make_pdf, wait_until
from tests.test_light_web import run_web


def s3_store(seaweed, **overrides) -> S3Store:
    return store_from_settings(load_settings({**seaweed.env(), "DEVELOPMENT": "1"}, **overrides))


@pytest.fixture(params=["fs", "s3"])
def any_store(request, tmp_path):
    if request.param == "fs":
        return FilesystemStore(tmp_path / "documents")
    return s3_store(request.getfixturevalue("seaweedfs"))


def test_a_document_comes_back_byte_for_byte(any_store) -> None:
    document = make_pdf(pages=2)
    key = upload_key(uuid.uuid4())
    any_store.put(key, document)
    any_store.put(key, document)  # an idempotent retry of the same upload
    assert any_store.get(key) == document
    any_store.delete(key)
    with pytest.raises(DocumentMissing):
        any_store.get(key)
    any_store.delete(key)  # deleting what is gone is no error


def test_an_exclusive_put_never_replaces_another_document(any_store) -> None:
    key = stamped_key(uuid.uuid4(), 1)
    first, second = make_pdf(text="attempt one"), make_pdf(text="attempt two")
    any_store.put(key, first, exclusive=True)
    any_store.put(key, first, exclusive=True)  # the same bytes again: a retry whose answer was lost
    with pytest.raises(DocumentExists):
        any_store.put(key, second, exclusive=True)
    assert any_store.get(key) == first


def test_only_our_own_key_shapes_name_a_document(any_store) -> None:
    order_id = uuid.uuid4()
    for bad in (upload_key(order_id) + "\n", f"uploads/../{order_id}.pdf", f"/etc/{order_id}.pdf",
                f"uploads/{order_id}.pdf.tmp", "uploads/x.pdf", ""):
        with pytest.raises(ValueError):
            any_store.put(bad, b"x")
        with pytest.raises(ValueError):
            any_store.get(bad)


def test_missing_document_is_missing_not_unavailable(any_store) -> None:
    with pytest.raises(DocumentMissing) as caught:
        any_store.get(upload_key(uuid.uuid4()))
    assert not isinstance(caught.value, DocumentCorrupt)
    assert repr(any_store) in caught.value.message  # which store missed it: the node's, for the logs


def test_bytes_that_are_not_the_recorded_ones_are_corrupt_on_both_stores(any_store, tmp_path) -> None:
    """The caller passes the digest PostgreSQL recorded; a file rewritten behind the store's back (on S3
    with a matching metadata digest, which the store's own check can't tell apart) is corrupt."""
    key = stamped_key(uuid.uuid4(), 1)
    document, other = make_pdf(text="the buyer's"), make_pdf(text="someone else's")
    any_store.put(key, document, exclusive=True)
    assert any_store.get(key, sha256=hashlib.sha256(document).hexdigest()) == document
    _rewrite(any_store, key, other)
    assert any_store.get(key) == other  # the store alone can't tell
    with pytest.raises(DocumentCorrupt):
        any_store.get(key, sha256=hashlib.sha256(document).hexdigest())


def test_an_object_changed_behind_the_stores_back_is_corrupt(seaweedfs) -> None:
    store = s3_store(seaweedfs)
    key = upload_key(uuid.uuid4())
    store.put(key, make_pdf())
    client = seaweedfs.client()
    client.put_object(Bucket=seaweedfs.bucket, Key=key, Body=b"%PDF-1.7 something else")
    with pytest.raises(DocumentCorrupt):
        store.get(key)
    # Another document's recorded hash copied along with it does not help either.
    client.put_object(Bucket=seaweedfs.bucket, Key=key, Body=b"%PDF-1.7 again",
                      Metadata={"sha256": "0" * 64})
    with pytest.raises(DocumentCorrupt):
        store.get(key)


def test_the_prefix_keeps_two_deployments_apart(seaweedfs) -> None:
    one = s3_store(seaweedfs, document_store_url=f"s3://{seaweedfs.bucket}/one")
    two = s3_store(seaweedfs, document_store_url=f"s3://{seaweedfs.bucket}/two/deep")
    key = upload_key(uuid.uuid4())
    one.put(key, b"%PDF-1.7 one")
    with pytest.raises(DocumentMissing):
        two.get(key)
    assert seaweedfs.client().head_object(Bucket=seaweedfs.bucket, Key=f"one/{key}")


def test_a_store_that_is_down_is_unavailable_within_its_timeouts(tmp_path: Path) -> None:
    seaweed = start_seaweedfs(tmp_path)
    try:
        store = s3_store(seaweed, s3_connect_timeout=1.0, s3_read_timeout=2.0, s3_max_attempts=2)
        key = upload_key(uuid.uuid4())
        store.put(key, b"%PDF-1.7 kept")
        assert store.writable()
        seaweed.stop()
        for call in (lambda: store.get(key), lambda: store.put(upload_key(uuid.uuid4()), b"x"),
                     lambda: store.put(stamped_key(uuid.uuid4(), 1), b"x", exclusive=True)):
            with pytest.raises(StoreUnavailable) as caught:
                call()
            assert not isinstance(caught.value, StoreMisconfigured)
        assert not store.writable()
        seaweed.start()
        assert store.get(key) == b"%PDF-1.7 kept"  # nothing was lost meanwhile
        assert store.writable()
    finally:
        seaweed.stop()
    assert seaweed.process is None


def test_a_server_that_accepts_and_never_answers_times_out_as_unavailable() -> None:
    """A hung store (it accepts the connection, then says nothing) costs one read timeout per attempt."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    try:
        store = S3Store("meterai", endpoint_url=f"http://127.0.0.1:{port}", access_key_id="k",
                        secret_access_key="s", connect_timeout=0.5, read_timeout=0.5, max_attempts=1)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.get(upload_key(uuid.uuid4()))
        assert time.monotonic() - started < 30  # bounded by the timeouts, not hung
    finally:
        listener.close()


def _hung_listener() -> tuple[socket.socket, list[int]]:
    """A server that accepts connections and never answers; the list counts the connections."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[int] = []

    def accept() -> None:
        held = []
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            accepted.append(1)

    threading.Thread(target=accept, daemon=True).start()
    return listener, accepted


def test_the_webs_store_makes_one_short_attempt_inside_the_proxys_timeout() -> None:
    """A web put must end (503) well before nginx's proxy_read_timeout (30 s) would resend the upload
    to another node: the web's store tries once, with short timeouts; the workers' keep their retries."""
    listener, accepted = _hung_listener()
    try:
        env = {"DOCUMENT_STORE_URL": "s3://meterai", "S3_ENDPOINT_URL": f"http://127.0.0.1:{listener.getsockname()[1]}",
               "S3_ACCESS_KEY_ID": "k", "S3_SECRET_ACCESS_KEY": "s", "S3_READ_TIMEOUT": "20",
               "S3_CONNECT_TIMEOUT": "5", "S3_MAX_ATTEMPTS": "3"}
        web = store_from_settings(load_settings(env), web=True)
        worker = store_from_settings(load_settings(env))
        assert (web.max_attempts, worker.max_attempts) == (1, 3)
        assert web.connect_timeout + web.read_timeout <= 5 < 30 and worker.read_timeout == 20
        with pytest.raises(StoreUnavailable):
            web.put(upload_key(uuid.uuid4()), b"%PDF-1.7 x")
        assert len(accepted) == 1  # one attempt, not S3_MAX_ATTEMPTS
    finally:
        listener.close()


class _FaultyProxy:
    """A real SeaweedFS behind a proxy that changes its answers (requests pass unchanged, so their
    signatures still verify): ``ignore_conditional`` turns a 412 into 200, as a server that ignores
    If-None-Match would answer; ``read_only`` refuses every PUT with 403, as read-only credentials get."""

    def __init__(self, target: str, *, ignore_conditional: bool = False, read_only: bool = False) -> None:
        host, port = target.split("//", 1)[1].split(":")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.read_only and self.command == "PUT":
                    return self._answer(403, b"<Error><Code>AccessDenied</Code></Error>")
                upstream = http.client.HTTPConnection(host, int(port), timeout=10)
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    upstream.putheader(name, value)
                upstream.endheaders(body)
                answer = upstream.getresponse()
                data = answer.read()
                if proxy.ignore_conditional and self.command == "PUT" and answer.status == 412:
                    return self._answer(200, b"", {"ETag": '"ignored"'})
                self._answer(answer.status, data, {k: v for k, v in answer.getheaders()
                                                   if k.lower() not in ("content-length", "transfer-encoding",
                                                                        "connection")})

            def _answer(self, status: int, data: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

        self.ignore_conditional, self.read_only = ignore_conditional, read_only
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_server_that_ignores_conditional_writes_is_refused_before_any_stamp_is_put(seaweedfs) -> None:
    proxy = _FaultyProxy(seaweedfs.endpoint_url, ignore_conditional=True)
    try:
        store = s3_store(seaweedfs, s3_endpoint_url=proxy.url)
        key = stamped_key(uuid.uuid4(), 1)
        with pytest.raises(StoreMisconfigured, match="S3_CONDITIONAL_WRITES=0"):
            store.put(key, b"%PDF-1.7 stamp", exclusive=True)
        with pytest.raises(DocumentMissing):
            s3_store(seaweedfs).get(key)  # refused before the stamp was put
        # Told not to rely on conditional writes, the store checks first and works.
        fallback = s3_store(seaweedfs, s3_endpoint_url=proxy.url, s3_conditional_writes=0)
        fallback.put(key, b"%PDF-1.7 stamp", exclusive=True)
        with pytest.raises(DocumentExists):
            fallback.put(key, b"%PDF-1.7 another", exclusive=True)
    finally:
        proxy.close()
    honest = s3_store(seaweedfs)  # the real server refuses the second exclusive put: the probe passes
    honest.put(stamped_key(uuid.uuid4(), 1), b"%PDF-1.7 ok", exclusive=True)


def test_a_store_we_can_read_but_not_write_is_not_ready(seaweedfs) -> None:
    proxy = _FaultyProxy(seaweedfs.endpoint_url, read_only=True)
    try:
        store = s3_store(seaweedfs, s3_endpoint_url=proxy.url)
        store._client().head_bucket(Bucket=seaweedfs.bucket)  # reading works: a HEAD would say "ok"
        assert not store.writable()
        assert store.problem()
    finally:
        proxy.close()
    assert s3_store(seaweedfs).writable()


def test_refusals_are_configuration_errors_and_readiness_says_so(seaweedfs) -> None:
    wrong_bucket = s3_store(seaweedfs, document_store_url="s3://no-such-bucket-here")
    with pytest.raises(StoreMisconfigured):
        wrong_bucket.put(upload_key(uuid.uuid4()), b"x")
    assert not wrong_bucket.writable()
    assert "does not exist" in wrong_bucket.problem()
    wrong_secret = s3_store(seaweedfs, s3_secret_access_key="not-the-secret")
    with pytest.raises(StoreMisconfigured):
        wrong_secret.get(upload_key(uuid.uuid4()))
    assert not wrong_secret.writable()
    assert s3_store(seaweedfs).writable() and s3_store(seaweedfs).problem() is None


def test_without_conditional_writes_an_exclusive_put_checks_first(seaweedfs) -> None:
    store = s3_store(seaweedfs, s3_conditional_writes=0)
    key = stamped_key(uuid.uuid4(), 2)
    store.put(key, b"%PDF-1.7 first", exclusive=True)
    with pytest.raises(DocumentExists):
        store.put(key, b"%PDF-1.7 second", exclusive=True)
    assert store.get(key) == b"%PDF-1.7 first"


def test_the_store_is_chosen_and_bounded_by_settings(tmp_path: Path) -> None:
    assert isinstance(store_from_settings(load_settings({})).inner, FilesystemStore)
    chosen = store_from_settings(load_settings({"DOCUMENT_STORE_URL": f"file://{tmp_path}/docs"})).inner
    assert isinstance(chosen, FilesystemStore) and chosen.root == tmp_path / "docs"
    legacy = load_settings({"DOCUMENT_DIR": str(tmp_path / "old")})
    assert store_from_settings(legacy).inner.root == tmp_path / "old"
    s3 = store_from_settings(load_settings({"DOCUMENT_STORE_URL": "s3://meterai-docs/prod/eu/",
                                            "S3_ENDPOINT_URL": "https://s3.example.id"})).inner
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("meterai-docs", "prod/eu/")
    for bad, says in [
        ({"DOCUMENT_STORE_URL": "s3://A_Bucket"}, "bucket name"),
        ({"DOCUMENT_STORE_URL": "s3://meterai/../x"}, "prefix"),
        ({"DOCUMENT_STORE_URL": "file://relative/path"}, "file:///absolute/path"),
        ({"DOCUMENT_STORE_URL": "ftp://x"}, "must be empty"),
        ({"DOCUMENT_STORE_URL": "s3://meterai", "S3_CHECKSUMS": "always"}, "S3_CHECKSUMS"),
        ({"DOCUMENT_STORE_URL": "s3://meterai", "S3_READ_TIMEOUT": "0"}, "S3_READ_TIMEOUT"),
        ({"DOCUMENT_STORE_URL": "s3://meterai", "S3_MAX_ATTEMPTS": "0"}, "S3_MAX_ATTEMPTS"),
        ({"DOCUMENT_STORE_URL": "s3://meterai", "S3_CONDITIONAL_WRITES": "2"}, "S3_CONDITIONAL_WRITES"),
        ({"DOCUMENT_STORE_URL": "s3://meterai", "S3_ACCESS_KEY_ID": "only-the-id"}, "go together"),
        ({"DOCUMENT_STORE_URL": "s3://meterai", "S3_ENDPOINT_URL": "127.0.0.1:9000"}, "http(s)://host"),
        ({"DOCUMENT_STORE_URL": "s3://meterai", "S3_CONNECT_TIMEOUT": "soon"}, "a number"),
    ]:
        with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
            load_settings(bad)


def test_production_refuses_plain_http_to_a_remote_store() -> None:
    def problems(endpoint: str) -> list[str]:
        return [p for p in production_problems(load_settings(
            {"DOCUMENT_STORE_URL": "s3://meterai", "S3_ENDPOINT_URL": endpoint})) if "S3_ENDPOINT_URL" in p]

    assert problems("http://10.0.0.5:8333") and problems("http://s3.internal")
    assert not problems("https://s3.internal") and not problems("http://127.0.0.1:8333")
    assert not problems("http://[::1]:8333") and not problems("http://localhost:8333")


def test_a_web_process_on_the_filesystem_store_never_loads_boto3(tmp_path: Path) -> None:
    script = """
import json, sys
import web
app = web.create_app()
assert app.test_client().get("/readyz").status_code in (200, 503)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} & {"boto3", "botocore", "s3transfer"})))
"""
    assert json.loads(run_web(script, DATA_DIR=str(tmp_path / "data"))) == []


def _ready(sys_, port: int):
    """[the /readyz answer] (a 503 is an answer too), or None while the copy isn't listening."""
    try:
        return [sys_.http.get(f"http://127.0.0.1:{port}/readyz", timeout=5)]
    except Exception:  # noqa: BLE001 - not listening yet
        return None


@BOTH_STORES
def test_a_stamped_key_taken_already_is_never_overwritten_and_the_next_attempt_stamps(sys_) -> None:
    """Something sits under the first attempt's key already: the worker does not replace it; the
    attempt is retried (a new attempt, a new key) and the order is stamped once, under that key."""
    order_id, token, view = sys_.order_awaiting_payment()
    decoy = make_pdf(text="not this order's stamp")
    sys_.store.put(stamped_key(order_id, 1), decoy, exclusive=True)
    sys_.pay(view["payment"]["gateway_order_id"])
    sys_.wait_status(order_id, token, "stamped")
    row = sys_.order_row(order_id)
    assert row["stamp_attempts"] == 2 and row["stamped_document_key"] == stamped_key(order_id, 2)
    assert sys_.store.get(stamped_key(order_id, 1)) == decoy
    download = sys_.http.get(f"{sys_.web_url}/api/v1/orders/{order_id}/document",
                             headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert download.status_code == 200 and download.content == sys_.store.get(stamped_key(order_id, 2))
    assert sys_.query("SELECT count(*) AS n FROM ledger_entries WHERE order_id = %s AND kind = 'revenue'",
                      (order_id,))[0]["n"] == 1


def test_create_with_the_store_down_answers_come_back_and_charges_nothing(sys_, tmp_path: Path) -> None:
    """A web process whose SeaweedFS is gone: /readyz says the store is down, create answers 503
    store_unavailable with Retry-After, no order, no payment; once the store is back the same request
    (same Idempotency-Key) is accepted."""
    seaweed = start_seaweedfs(tmp_path)
    port = free_port()
    sys_.launcher.start("web", name="web-s3-down", port=port,
                        env={**seaweed.env(), "S3_CONNECT_TIMEOUT": "1", "S3_MAX_ATTEMPTS": "1"})
    try:
        [ready] = wait_until(lambda: _ready(sys_, port), timeout=60, message="web copy answering")
        assert ready.status_code == 200 and ready.json()["checks"]["document_store"] == "ok", ready.text
        seaweed.stop()
        [ready] = _ready(sys_, port)
        assert ready.status_code == 503 and ready.json()["checks"]["document_store"] == "down"
        assert int(ready.headers["Retry-After"]) > 0
        key = uuid.uuid4().hex
        document = make_pdf()

        def create():
            return sys_.http.post(f"http://127.0.0.1:{port}/api/v1/orders", headers={"Idempotency-Key": key},
                                  data={"page": "1", "x": "400", "y": "80", "email": "down@example.id"},
                                  files={"document": ("surat.pdf", document, "application/pdf")}, timeout=30)

        refused = create()
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "store_unavailable"
        assert int(refused.headers["Retry-After"]) > 0
        assert sys_.query("SELECT count(*) AS n FROM orders WHERE email = 'down@example.id'")[0]["n"] == 0
        assert sys_.query("SELECT count(*) AS n FROM payments")[0]["n"] == 0
        seaweed.start()
        accepted = create()
        assert accepted.status_code == 202, accepted.text
        [row] = sys_.query("SELECT document_key FROM orders WHERE email = 'down@example.id'")
        assert seaweed.client().head_object(Bucket=seaweed.bucket, Key=row["document_key"])
    finally:
        sys_.launcher.stop("web-s3-down")
        seaweed.stop()


@BOTH_STORES
def test_a_stamped_file_lost_from_the_store_is_our_error_not_the_buyers(sys_) -> None:
    """The order says stamped but its file is gone: the download is a server error (500) naming what is
    wrong, never a 4xx that blames the buyer's request, and the order stays stamped (nothing is guessed)."""
    order_id, token, view = sys_.order_awaiting_payment()
    sys_.pay(view["payment"]["gateway_order_id"])
    sys_.wait_status(order_id, token, "stamped")
    sys_.store.delete(sys_.order_row(order_id)["stamped_document_key"])

    download = sys_.http.get(f"{sys_.web_url}/api/v1/orders/{order_id}/document",
                             headers={"Authorization": f"Bearer {token}"}, timeout=10)

    assert download.status_code == 500
    assert download.json()["error"]["code"] == "document_missing"
    assert sys_.order_row(order_id)["status"] == "stamped"


def _rewrite(store, key: str, data: bytes) -> None:
    """Change a document behind the store's back: on S3 with a matching metadata digest, as a rewrite
    by someone who knows the format would."""
    store = getattr(store, "inner", store)  # behind its breaker
    if isinstance(store, S3Store):
        store._client().put_object(Bucket=store.bucket, Key=store.prefix + key, Body=data,
                                   Metadata={"sha256": hashlib.sha256(data).hexdigest()})
    else:
        (store.root / key).write_bytes(data)


@BOTH_STORES
def test_a_stamped_file_changed_behind_the_stores_back_is_never_served(sys_) -> None:
    order_id, token, view = sys_.order_awaiting_payment()
    sys_.pay(view["payment"]["gateway_order_id"])
    sys_.wait_status(order_id, token, "stamped")
    _rewrite(sys_.store, sys_.order_row(order_id)["stamped_document_key"], make_pdf(text="forged"))

    download = sys_.http.get(f"{sys_.web_url}/api/v1/orders/{order_id}/document",
                             headers={"Authorization": f"Bearer {token}"}, timeout=10)

    assert download.status_code == 500 and download.json()["error"]["code"] == "document_corrupt"
    assert b"forged" not in download.content
    assert sys_.order_row(order_id)["status"] == "stamped"


@BOTH_STORES
def test_an_upload_changed_behind_the_stores_back_is_never_stamped(sys_) -> None:
    """The bytes under the upload's key are not the buyer's: no stamp is made from them; the order is
    refunded in full at once (invariant 1), with a reason naming our error, and its serial voided."""
    order_id, token, view = sys_.order_awaiting_payment()
    _rewrite(sys_.store, sys_.order_row(order_id)["document_key"], make_pdf(text="not the buyer's"))
    sys_.pay(view["payment"]["gateway_order_id"])
    sys_.wait_status(order_id, token, "refund_pending", "refunded")
    row = sys_.order_row(order_id)
    assert row["reason_code"] == "document_corrupt" and "kesalahan kami" in row["reason_message"]
    assert row["stamped_document_key"] is None and sys_.stored_keys(f"stamped/{order_id}") == []
    assert sys_.query("SELECT count(*) AS n FROM serials WHERE order_id = %s AND status <> 'voided'",
                      (order_id,))[0]["n"] == 0


@BOTH_STORES
def test_a_stamping_node_pointed_at_an_empty_store_retries_and_never_refunds(sys_, tmp_path) -> None:
    """Uploads are durable before the 202, so a node that can't find one has the wrong store: it says so
    at ERROR on every attempt and retries; nothing is refunded. Pointed right, it stamps the order."""
    wrong = (f"file://{tmp_path / 'empty-store'}" if sys_.seaweed is None
             else f"s3://{sys_.seaweed.bucket}/not-this-deployment/")
    sys_.stop("stamping")
    try:
        sys_.launcher.start("stamping", name="stamping-wrong-store", env={"DOCUMENT_STORE_URL": wrong})
        sys_.launcher.wait_ready(["stamping-wrong-store"], timeout=90)
        order_id, token, view = sys_.order_awaiting_payment()
        sys_.pay(view["payment"]["gateway_order_id"])

        def missed() -> list:
            return [e for e in sys_.events(order_id)
                    if "DocumentMissing" in str((e.get("detail") or {}).get("error", ""))]

        wait_until(lambda: len(missed()) >= 3, timeout=60, message="the node to miss the upload three times")
        assert sys_.order_row(order_id)["status"] in ("paid", "stamping")
        assert sys_.query("SELECT count(*) AS n FROM refunds")[0]["n"] == 0
        output = sys_.process("stamping-wrong-store").output()
        assert b"upload_missing_from_store" in output
        assert (b"empty-store" if sys_.seaweed is None else b"not-this-deployment") in output
    finally:
        sys_.launcher.stop("stamping-wrong-store")
    # Stopped mid-attempt, the node may leave its lease behind: let it run out now instead of after
    # LEASE_SECONDS, as it would on its own.
    with sys_.db() as conn:
        conn.execute("UPDATE orders SET lease_expires_at = now() - interval '1 second'"
                     " WHERE id = %s AND status = 'stamping'", (order_id,))
    sys_.start("stamping")
    housekeeping.redrive(sys_.settings)  # the retries' message went with the stopped worker, or not
    sys_.wait_status(order_id, token, "stamped", timeout=60)
    assert sys_.query("SELECT count(*) AS n FROM refunds")[0]["n"] == 0


def test_a_misconfigured_store_shows_buyers_only_that_it_is_unavailable(sys_, seaweedfs) -> None:
    """The detail (bucket, key, "check the credentials") is for the logs; the buyer reads a 503
    store_unavailable with Retry-After."""
    port = free_port()
    sys_.launcher.start("web", name="web-wrong-bucket", port=port,
                        env={**seaweedfs.env(), "DOCUMENT_STORE_URL": "s3://no-such-bucket-here"})
    try:
        wait_until(lambda: _ready(sys_, port), timeout=60, message="web copy answering")
        refused = sys_.http.post(f"http://127.0.0.1:{port}/api/v1/orders",
                                 headers={"Idempotency-Key": uuid.uuid4().hex},
                                 data={"page": "1", "x": "400", "y": "80", "email": "wrong@example.id"},
                                 files={"document": ("surat.pdf", make_pdf(), "application/pdf")}, timeout=30)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "store_unavailable" and int(refused.headers["Retry-After"]) > 0
        for detail in ("bucket", "uploads/", "credential", "S3"):
            assert detail not in error["message"]
        assert b"no-such-bucket-here" in sys_.process("web-wrong-bucket").output()
    finally:
        sys_.launcher.stop("web-wrong-bucket")


def test_a_store_that_keeps_failing_trips_its_breaker_and_calls_fail_at_once(tmp_path: Path) -> None:
    """DESIGN: a dependency that keeps failing trips a circuit breaker rather than piling up calls that
    each wait out its timeouts. Five failures in a row open it: the next calls don't reach the store;
    a missing document is an answer (the store is up); after the cool-down one probe closes it."""
    from shared.store import GuardedStore, store_breaker

    class Counting(FilesystemStore):
        calls = 0

        def get(self, key: str, *, sha256: str | None = None) -> bytes:
            Counting.calls += 1
            return super().get(key, sha256=sha256)

    blocked = tmp_path / "not-a-folder"
    blocked.write_bytes(b"")  # the store's root is a file: every read fails as unavailable
    now = [0.0]
    breaker = store_breaker()
    breaker._clock = lambda: now[0]  # noqa: SLF001 - the cool-down, counted rather than waited
    store = GuardedStore(Counting(blocked), breaker)
    key = upload_key(uuid.uuid4())
    for _ in range(5):
        with pytest.raises(StoreUnavailable):
            store.get(key)
    assert Counting.calls == 5 and breaker.state == "open"
    with pytest.raises(StoreUnavailable, match="circuit open"):
        store.get(key)
    assert Counting.calls == 5  # failed at once, without asking the store
    assert store.writable() is False  # readiness still asks the store itself

    blocked.unlink()
    blocked.mkdir()
    now[0] += breaker.cooldown_seconds
    with pytest.raises(DocumentMissing):  # the probe: an answer, so the store is up again
        store.get(key)
    assert breaker.state == "closed" and Counting.calls == 6
