"""The order-status cache (shared/statuscache.py) against the real system: Redis, workers, gateway.

What must hold: a poll never shows an answer older than the order's last change we know of, the cache
never lets a wrong token read an order, and without Redis the database answers.
"""
from __future__ import annotations

import dataclasses
import uuid

import redis

from shared import statuscache
from shared.devtools.services import free_port


def _entry(sys_, order_id: str) -> bytes | None:
    client = redis.Redis.from_url(sys_.settings.redis_url)
    return client.get(f"{sys_.settings.redis_key_prefix}status:{order_id}")


def test_a_poll_is_cached_and_every_status_change_drops_it(sys_):
    order_id, token, view = sys_.order_awaiting_payment()
    assert sys_.status(order_id, token)["status"] == "awaiting_payment"
    cached = _entry(sys_, order_id)
    assert cached is not None and b'"awaiting_payment"' in cached and not cached.startswith(b"d")
    assert sys_.status(order_id, token) == view | {"events": sys_.status(order_id, token)["events"]}

    sys_.pay(view["payment"]["gateway_order_id"])
    # The workers' transitions (paid, stamping, stamped) each mark the entry dirty on commit, so
    # polling straight through sees every change with no wait for an expiry.
    stamped = sys_.wait_status(order_id, token, "stamped")
    assert [e["status"] for e in stamped["events"]] == [
        "created", "awaiting_payment", "paid", "stamping", "stamped"]
    assert stamped["serial"] and stamped["payment"]["gateway_order_id"]
    assert b'"stamped"' in (_entry(sys_, order_id) or b"")


def test_the_cache_keeps_the_token_rules(sys_):
    order_id, token, _ = sys_.order_awaiting_payment()
    sys_.status(order_id, token)
    assert _entry(sys_, order_id) is not None
    url = f"{sys_.web_url}/api/v1/orders/{order_id}"
    assert sys_.http.get(url, timeout=5).status_code == 401
    wrong = sys_.http.get(url, headers={"Authorization": "Bearer not-the-token"}, timeout=5)
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
    other_id, other_token, _ = sys_.order_awaiting_payment()
    assert sys_.http.get(url, headers={"Authorization": f"Bearer {other_token}"},
                         timeout=5).status_code == 403
    assert sys_.http.get(f"{sys_.web_url}/api/v1/orders/{uuid.uuid4()}",
                         headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code == 404


def test_an_answer_read_before_a_change_is_not_cached_after_it(sys_):
    """The race the change marker closes: a poll reads the row (newest event 7), the order changes
    (event 8) and commits, then the poll tries to cache what it read."""
    order_id = str(uuid.uuid4())
    key = f"{sys_.settings.redis_key_prefix}status:{order_id}"
    try:
        statuscache.mark_changed({order_id: 8})  # what the change's commit does
        statuscache.put(order_id, 7, ["hash"], b'{"status":"old"}')
        assert statuscache.get(order_id) is None and _entry(sys_, order_id) == b"d8"
        # A poll that read after the commit caches at once; an older one can't replace it either.
        statuscache.put(order_id, 8, ["hash"], b'{"status":"new"}')
        statuscache.put(order_id, 7, ["hash"], b'{"status":"old"}')
        assert statuscache.get(order_id) == (["hash"], b'{"status":"new"}')
        # A late marker for the change this entry already shows leaves it; an older one too.
        statuscache.mark_changed({order_id: 8})
        statuscache.mark_changed({order_id: 5})
        assert statuscache.get(order_id) == (["hash"], b'{"status":"new"}')
        statuscache.mark_changed({order_id: 9})
        assert statuscache.get(order_id) is None
    finally:
        redis.Redis.from_url(sys_.settings.redis_url).delete(key)


def test_without_redis_the_database_answers(sys_):
    order_id, token, _ = sys_.order_awaiting_payment()
    dead = dataclasses.replace(sys_.settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    statuscache.configure(dead)
    try:
        order_id_str = str(order_id)
        assert statuscache.get(order_id_str) is None
        # After a failure the cache rests: the next polls go straight to the database instead of each
        # waiting out a timeout on a Redis that is stalled.
        assert statuscache._client() is None
        statuscache.put(order_id_str, 1, ["hash"], b"{}")  # silently nothing
        statuscache.mark_changed({order_id_str: 2})  # logged, not raised
        assert sys_.status(order_id, token)["status"] == "awaiting_payment"
    finally:
        statuscache.configure(sys_.settings)


def test_a_stamping_attempt_given_back_shows_at_once_and_only_by_its_holder(sys_):
    from shared.services import stamping

    order_id, token, _ = sys_.order_awaiting_payment()
    sys_.query("UPDATE orders SET status = 'stamping', refund_due_at = now() + interval '1 hour',"
               " lease_owner = 'worker-a', lease_expires_at = now() + interval '1 minute' WHERE id = %s"
               " RETURNING id", (order_id,))
    # That hand-made change bypassed transition(), so drop the cached answer by hand too.
    redis.Redis.from_url(sys_.settings.redis_url).delete(f"{sys_.settings.redis_key_prefix}status:{order_id}")
    before = sys_.status(order_id, token)["events"]
    assert _entry(sys_, order_id) is not None  # cached

    stamping.release(sys_.settings, order_id, "worker-b", "not mine")  # no lease, no event, no change
    assert sys_.status(order_id, token)["events"] == before
    stamping.release(sys_.settings, order_id, "worker-a", "gateway timeout")
    after = sys_.status(order_id, token)["events"]
    assert len(after) == len(before) + 1 and after[-1]["status"] == "stamping"
    assert len(sys_.events(order_id)) == len(after)


def test_a_poll_the_cache_answers_skips_flask_with_the_answer_flask_gives(sys_, monkeypatch):
    """Status polls the cache can answer skip Flask (web/statuspoll.py): the same body and headers as the
    route's own answer; everything else goes to the route, which never asks Redis again for that poll."""
    from flask import Flask
    from werkzeug.test import Client

    from web import create_app
    from web.statuspoll import StatusPolls

    order_id, token, _ = sys_.order_awaiting_payment()
    sys_.status(order_id, token)  # cached now
    app = create_app(sys_.settings)
    fast_path = app.wsgi_app
    while not isinstance(fast_path, StatusPolls):
        fast_path = fast_path.app
    behind, calls = fast_path.app, []
    fast_path.app = lambda environ, start_response: calls.append(environ["PATH_INFO"]) or behind(environ, start_response)
    asked: list[str] = []
    lookup = statuscache.get
    monkeypatch.setattr(statuscache, "get", lambda order: asked.append(order) or lookup(order))
    url, auth = f"/api/v1/orders/{order_id}", {"Authorization": f"Bearer {token}"}
    through_flask = Client(lambda environ, start_response: Flask.wsgi_app(app, environ, start_response))

    fast, slow = Client(app).get(url, headers=auth), through_flask.get(url, headers=auth)
    assert calls == [] and fast.status_code == slow.status_code == 200 and fast.data == slow.data
    assert fast.get_json()["status"] == "awaiting_payment"
    differ = {"X-Request-Id"}
    assert {k: v for k, v in fast.headers.items() if k not in differ} == \
        {k: v for k, v in slow.headers.items() if k not in differ}
    assert len(fast.headers["X-Request-Id"]) == 32
    assert Client(app).get(url, headers={**auth, "X-Request-Id": "proxy-id-0001"}).headers["X-Request-Id"] == \
        "proxy-id-0001"

    # A miss: the route reads the row (and caches it), asking Redis once for the poll, not twice.
    redis.Redis.from_url(sys_.settings.redis_url).delete(f"{sys_.settings.redis_key_prefix}status:{order_id}")
    asked.clear()
    missed = Client(app).get(url, headers=auth)
    assert missed.status_code == 200 and missed.data == fast.data
    assert calls == [url] and asked == [order_id] and _entry(sys_, order_id) is not None
    # A token the entry doesn't know: the row decides (403 here), asked once too.
    calls.clear(), asked.clear()
    wrong = Client(app).get(url, headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 403 and wrong.get_json()["error"]["code"] == "forbidden"
    assert calls == [url] and asked == [order_id]
    # Not the fast path's: no token (401, without a look in Redis), an id that isn't canonical (the route
    # reads the row: the cache holds canonical ids only), the download; no lookup of the fast path's (the
    # route's own, for the HEAD, as before it).
    calls.clear(), asked.clear()
    assert Client(app).get(url).status_code == 401
    assert Client(app).get(f"/api/v1/orders/{order_id.upper()}", headers=auth).data == fast.data
    assert Client(app).get(f"{url}/document", headers=auth).status_code == 409
    assert Client(app).head(url, headers=auth).status_code == 200
    assert len(calls) == 4 and asked == [order_id]
