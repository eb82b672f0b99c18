"""The stand-in gateway's durable storage: its own PostgreSQL schema, its own tiny migration runner.

A real gateway keeps its transactions when it restarts, so the stand-in does too. Its tables live in a
schema of their own (``standin`` by default, ``STANDIN_SCHEMA``) in ``STANDIN_DATABASE_URL`` (default:
``DATABASE_URL``): the gateway's data is not ours, so it never shares meterai's tables or meterai's
migration history, and dropping the schema is the whole of "forget the gateway".

Migrations are the numbered ``standin_migrations/NNNN_name.sql`` files, applied on start, each once, in
its own transaction, recorded in ``<schema>.schema_migrations``, under an advisory lock so two stand-ins
starting together apply each file once.
"""
from __future__ import annotations

import hashlib
import re
from importlib import resources

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

DEFAULT_SCHEMA = "standin"
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def check_schema_name(schema: str) -> str:
    """Schema names go into ``search_path`` and DDL, so only plain lower-case identifiers are allowed."""
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"not a plain schema name: {schema!r}")
    return schema


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("shared.payments") / "standin_migrations"
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(p.name, p.read_text(encoding="utf-8")) for p in files]


def _lock_id(schema: str) -> int:
    # A stable 63-bit id per schema, so stand-ins on different schemas don't wait for each other.
    return int.from_bytes(hashlib.sha256(f"standin:{schema}".encode()).digest()[:8], "big") >> 1


def migrate(conninfo: str, schema: str = DEFAULT_SCHEMA) -> list[str]:
    """Create ``schema`` if needed and apply every stand-in migration not yet recorded there."""
    check_schema_name(schema)
    applied: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_lock_id(schema),))
        try:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            for name, text in migration_files():
                if name in done:
                    continue
                with conn.transaction():
                    conn.execute(text)
                    conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
                applied.append(name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_lock_id(schema),))
    return applied


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
