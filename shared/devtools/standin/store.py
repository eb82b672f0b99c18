"""The stand-in gateway's durable storage: its own PostgreSQL schema, migrated by meterai's one runner.

A real gateway keeps its transactions when it restarts, so the stand-in does too. Its tables live in a
schema of their own (``standin`` by default, ``STANDIN_SCHEMA``) in ``STANDIN_DATABASE_URL`` (default:
``DATABASE_URL``): the gateway's data is not ours, so it never shares meterai's tables or meterai's
migration history, and dropping the schema is the whole of "forget the gateway". Its numbered migrations
are this package's ``migrations/`` folder, applied on start by :func:`shared.db.migrate.apply_migrations`.
"""
from __future__ import annotations

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from shared.db.migrate import apply_migrations, check_schema_name
from shared.devtools.standin.records import TRANSACTION_COLUMNS, GatewayTransaction, RefundRecord

DEFAULT_SCHEMA = "standin"
PACKAGE = "shared.devtools.standin"


def migrate(conninfo: str, schema: str = DEFAULT_SCHEMA) -> list[str]:
    """Create ``schema`` if needed and apply every stand-in migration not yet recorded there."""
    return apply_migrations(conninfo, package=PACKAGE, schema=schema)


def open_pool(conninfo: str, schema: str = DEFAULT_SCHEMA, *, max_size: int = 8) -> ConnectionPool:
    """A pool of its own (never meterai's), every connection with ``search_path`` set to ``schema``."""
    check_schema_name(schema)
    return ConnectionPool(
        conninfo,
        min_size=1,
        max_size=max_size,
        kwargs={"row_factory": dict_row, "autocommit": False, "options": f"-c search_path={schema}"},
        open=True,
        name=f"standin-{schema}",
    )


def load_transaction(conn: psycopg.Connection, order_id: str, *, lock: bool = False) -> GatewayTransaction | None:
    """One transaction with its refunds; ``lock`` holds its row until the caller's transaction ends."""
    query = "SELECT * FROM transactions WHERE order_id = %s" + (" FOR UPDATE" if lock else "")
    row = conn.execute(query, (order_id,)).fetchone()
    if row is None:
        return None
    tx = GatewayTransaction(**{name: row[name] for name in TRANSACTION_COLUMNS})
    tx.refunds = [
        RefundRecord(r["refund_key"], r["amount"], r["reason"], r["created_at"], r["response"])
        for r in conn.execute("SELECT * FROM refunds WHERE order_id = %s ORDER BY seq", (order_id,)).fetchall()
    ]
    return tx


def save_status(conn: psycopg.Connection, tx: GatewayTransaction) -> None:
    conn.execute(
        "UPDATE transactions SET transaction_status = %s, payment_type = %s, fraud_status = %s,"
        " settlement_time = %s, va_bank = %s, va_number = %s, updated_at = now() WHERE order_id = %s",
        (tx.transaction_status, tx.payment_type, tx.fraud_status, tx.settlement_time, tx.va_bank,
         tx.va_number, tx.order_id),
    )
