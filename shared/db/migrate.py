"""Numbered SQL migrations, applied in order by the one runner the app, the CLI, the tests and the stand-in
gateway share.

Each file in a package's ``migrations/`` folder named ``NNNN_name.sql`` runs once, in its own transaction,
recorded in ``schema_migrations``. meterai's own migrations (``shared.db``) live in the connection's schema;
a package that keeps its tables apart (the stand-in gateway) passes ``schema``: it is created if needed, the
migrations run with ``search_path`` set to it, and its history is its own ``<schema>.schema_migrations``.
An advisory lock per schema, held by each file's transaction, makes two processes starting at once apply
each file once, without making runners on different schemas wait for each other.
"""
from __future__ import annotations

import hashlib
import re
from importlib import resources

from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

if TYPE_CHECKING:
    from shared.config import Settings

# meterai's own history (no schema): the lock id it has always used, so old and new runners exclude each
# other (a transaction's advisory lock and a session's on one id conflict).
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


def migration_database_url(settings: "Settings") -> str:
    """Where ``meterai migrate`` connects: MIGRATE_DATABASE_URL (PostgreSQL itself when DATABASE_URL is a
    pooler), else DATABASE_URL."""
    return settings.migrate_database_url or settings.database_url


def apply_migrations(conninfo: str, *, package: str = "shared.db", schema: str | None = None) -> list[str]:
    """Apply every migration of ``package`` not yet recorded (in ``schema``, when given); return the names
    applied now.

    Each file runs in a transaction of its own that first takes the schema's advisory lock for that
    transaction only, then looks whether the file is recorded. Nothing outlives a transaction (no session
    lock, ``SET LOCAL`` for the search path, nothing prepared), so the runner is correct through a
    transaction-mode pooler too, where consecutive statements may reach different server connections: a
    session lock taken there could be released on another connection, or never.
    """
    if schema is not None:
        check_schema_name(schema)
    files = migration_files(package)
    applied: list[str] = []
    with psycopg.connect(conninfo, autocommit=True, prepare_threshold=None) as conn:
        for name, text in files:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_id(schema),))
                if schema is not None:
                    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
                    conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                if conn.execute("SELECT 1 FROM schema_migrations WHERE name = %s", (name,)).fetchone():
                    continue
                conn.execute(text)
                conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
            applied.append(name)
    return applied
