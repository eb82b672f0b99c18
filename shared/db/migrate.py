"""Numbered SQL migrations, applied in order by the one runner the app, the CLI, the tests and the stand-in
gateway share.

Each file in a package's ``migrations/`` folder named ``NNNN_name.sql`` runs once, in its own transaction,
recorded in ``schema_migrations``. meterai's own migrations (``shared.db``) live in the connection's schema;
a package that keeps its tables apart (the stand-in gateway) passes ``schema``: it is created if needed, the
migrations run with ``search_path`` set to it, and its history is its own ``<schema>.schema_migrations``.
An advisory lock per schema makes two processes starting at once apply each file once, without making
runners on different schemas wait for each other.
"""
from __future__ import annotations

import hashlib
import re
from importlib import resources

import psycopg
from psycopg import sql

# meterai's own history (no schema): the lock id it has always used, so old and new runners exclude each other.
_LOCK_ID = 727_001
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def check_schema_name(schema: str) -> str:
    """Schema names go into ``search_path`` and DDL, so only plain lower-case identifiers are allowed."""
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"not a plain schema name: {schema!r}")
    return schema


def migration_files(package: str = "shared.db") -> list[tuple[str, str]]:
    folder = resources.files(package) / "migrations"
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(p.name, p.read_text(encoding="utf-8")) for p in files]


def _lock_id(schema: str | None) -> int:
    if schema is None:
        return _LOCK_ID
    # A stable 63-bit id per schema.
    return int.from_bytes(hashlib.sha256(f"migrations:{schema}".encode()).digest()[:8], "big") >> 1


def apply_migrations(conninfo: str, *, package: str = "shared.db", schema: str | None = None) -> list[str]:
    """Apply every migration of ``package`` not yet recorded (in ``schema``, when given); return the names
    applied now."""
    if schema is not None:
        check_schema_name(schema)
    files = migration_files(package)
    applied: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_lock_id(schema),))
        try:
            if schema is not None:
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
                conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            for name, text in files:
                if name in done:
                    continue
                with conn.transaction():
                    conn.execute(text)
                    conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
                applied.append(name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_lock_id(schema),))
    return applied
