"""Numbered SQL migrations, applied in order by one runner that the app, the CLI and the tests share.

Each file in ``migrations/`` named ``NNNN_name.sql`` runs once, in its own transaction, recorded in
``schema_migrations``. An advisory lock makes two processes starting at once apply each file once.
"""
from __future__ import annotations

from importlib import resources

import psycopg

_LOCK_ID = 727_001


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("shared.db") / "migrations"
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(p.name, p.read_text(encoding="utf-8")) for p in files]


def apply_migrations(conninfo: str) -> list[str]:
    """Apply every migration not yet recorded; return the names applied now."""
    applied: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            for name, sql in migration_files():
                if name in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
                applied.append(name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied
