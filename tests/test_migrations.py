"""Upgrading a database of the previous release: what migrations 0003 and 0004 make of old rows."""
from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

import psycopg
import pytest
from psycopg.rows import dict_row

from shared.db import migrate
from shared.services.ledger import ledger_report
from shared.config import load_settings

DEV_KEY = "meterai-dev-secret-change-me"


def _legacy_token_hash(secret: str, order_id: uuid.UUID) -> str:
    token = base64.urlsafe_b64encode(
        hmac.new(secret.encode(), f"order-access:{order_id}".encode(), hashlib.sha256).digest()
    ).rstrip(b"=").decode()
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture
def old_database(database_url):
    """A fresh database at the previous release's schema (migrations 0001-0002 only)."""
    admin = psycopg.conninfo.make_conninfo(database_url, dbname="postgres")
    name = f"meterai_upgrade_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = psycopg.conninfo.make_conninfo(database_url, dbname=name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_migrations (name text PRIMARY KEY,"
                     " applied_at timestamptz NOT NULL DEFAULT now())")
        for file, text in migrate.migration_files()[:2]:
            conn.execute(text)
            conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (file,))
    yield url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _order(conn, status: str, secret: str, **extra) -> uuid.UUID:
    order_id = uuid.uuid4()
    columns = {"id": order_id, "idempotency_key": uuid.uuid4().hex, "request_fingerprint": "f",
               "access_token_hash": _legacy_token_hash(secret, order_id), "email": "a@b.id", "status": status,
               "amount_idr": 12500, "page": 1, "x": 1, "y": 1, "document_key": "uploads/x.pdf",
               "document_sha256": "0" * 64, "document_bytes": 10, **extra}
    conn.execute(f"INSERT INTO orders ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})",
                 list(columns.values()))
    return order_id


def test_upgrade_revokes_development_key_tokens_and_keeps_the_rest(old_database):
    with psycopg.connect(old_database, autocommit=True) as conn:
        exposed = _order(conn, "created", DEV_KEY)
        kept = _order(conn, "created", "a-production-secret-of-thirty-two-chars")
    assert migrate.apply_migrations(old_database)[:2] == ["0003_access_tokens_and_idempotency.sql",
                                                          "0004_payments_per_transaction.sql"]
    with psycopg.connect(old_database, row_factory=dict_row) as conn:
        hashes = {row["id"]: row["access_token_hashes"]
                  for row in conn.execute("SELECT id, access_token_hashes FROM orders")}
    assert hashes[kept] == [_legacy_token_hash("a-production-secret-of-thirty-two-chars", kept)]
    assert hashes[exposed] != [_legacy_token_hash(DEV_KEY, exposed)]  # anyone could compute that one
    assert hashes[exposed][0].startswith("revoked:")


def test_upgrade_books_old_money_per_transaction_and_watches_what_was_never_booked(old_database):
    with psycopg.connect(old_database, autocommit=True) as conn:
        stamped = _order(conn, "stamped", DEV_KEY, serial="A" * 22, stamped_document_key="stamped/x.pdf",
                         refund_due_at=None)
        own, second = f"MTR-{stamped.hex}-1", f"MTR-{stamped.hex}-2"
        conn.execute("INSERT INTO payments (gateway_order_id, order_id, amount_idr, captured_at, gateway_status,"
                     " updated_at) VALUES (%s, %s, 12500, now() - interval '10 days', 'settlement',"
                     " now() - interval '10 days')", (own, stamped))
        # Paid a second time; the old code only logged it: never booked, long ago.
        conn.execute("INSERT INTO payments (gateway_order_id, order_id, amount_idr, gateway_status, updated_at)"
                     " VALUES (%s, %s, 12500, 'settlement', now() - interval '10 days')", (second, stamped))
        for kind in ("captured", "revenue"):
            conn.execute("INSERT INTO ledger_entries (order_id, kind, amount_idr) VALUES (%s, %s, 12500)",
                         (stamped, kind))
        manual = _order(conn, "refund_manual", DEV_KEY)
        paid = f"MTR-{manual.hex}-1"
        conn.execute("INSERT INTO payments (gateway_order_id, order_id, amount_idr, captured_at, gateway_status)"
                     " VALUES (%s, %s, 12500, now(), 'settlement')", (paid, manual))
        conn.execute("INSERT INTO ledger_entries (order_id, kind, amount_idr) VALUES (%s, 'captured', 12500)",
                     (manual,))
        conn.execute("INSERT INTO refunds (order_id, gateway_order_id, refund_key, amount_idr, status, reason)"
                     " VALUES (%s, %s, %s, 12500, 'manual', 'stamp_deadline')", (manual, paid, f"refund-{manual}"))
    migrate.apply_migrations(old_database)
    with psycopg.connect(old_database, row_factory=dict_row) as conn:
        payments = {row["gateway_order_id"]: row for row in conn.execute("SELECT * FROM payments")}
        ledger = conn.execute("SELECT gateway_order_id, kind FROM ledger_entries ORDER BY id").fetchall()
        refund = conn.execute("SELECT * FROM refunds").fetchone()
    assert payments[own]["capture_role"] == "order" and payments[second]["capture_role"] is None
    assert {(r["gateway_order_id"], r["kind"]) for r in ledger} == {(own, "captured"), (own, "revenue"),
                                                                    (paid, "captured")}
    assert payments[second]["next_poll_at"] is not None  # asked again, so it gets booked and refunded
    assert payments[own]["next_poll_at"] is None  # old, final and booked: left alone
    assert refund["gateway_order_id"] == paid and refund["manual_since"] is not None
    report = ledger_report(load_settings({"DATABASE_URL": old_database}))
    # Until the watch asks the gateway about it, the ledger report names the one unbooked capture.
    problems = {money.order_id: problems for money, problems in report.imbalances}
    assert list(problems) == [str(stamped)] and second in problems[str(stamped)][0]


def test_migrate_goes_to_migrate_database_url_when_set(old_database):
    """Web and workers may reach PostgreSQL through a transaction-mode pooler; ``meterai migrate`` takes
    its advisory lock on the primary named by MIGRATE_DATABASE_URL instead (here DATABASE_URL answers
    nowhere, so a migration that used it would fail)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "DEVELOPMENT": "1", "MIGRATE_DATABASE_URL": old_database,
           "DATABASE_URL": "host=127.0.0.1 port=1 dbname=nowhere connect_timeout=1"}
    result = subprocess.run([sys.executable, "-m", "shared.cli", "migrate"], env=env, capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    applied = json.loads(result.stdout.strip().splitlines()[-1])["applied"]
    assert applied == [name for name, _ in migrate.migration_files()[2:]]
