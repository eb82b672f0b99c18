"""PRIVATE_SERVICES=1: ./dev, the test fixtures and the drills start their own PostgreSQL and Redis even
when the configured ones answer, so a run can be kept off shared servers."""
from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from conftest import _admin_url
from shared.config import load_settings
from shared.devtools import dev
from shared.devtools import services as private


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data folder the postgres user can use when we are root (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="meterai-private-", dir="/tmp"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(path, user.pw_uid, user.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def configured(database_url: str, redis_server: private.RedisHandle) -> dict[str, str]:
    """Configured servers that answer: the session's PostgreSQL database and its Redis."""
    assert private.postgres_answers(database_url) and private.redis_answers(redis_server.url)
    return {"DATABASE_URL": database_url, "REDIS_URL": redis_server.url}


def server_port(url: str) -> int:
    return int(psycopg.conninfo.conninfo_to_dict(url)["port"])


def test_dev_uses_the_configured_servers_when_they_answer(configured, data_dir, monkeypatch) -> None:
    for name, value in {**configured, "DATA_DIR": str(data_dir), "PRIVATE_SERVICES": "0"}.items():
        monkeypatch.setenv(name, value)
    _, services = dev._configured_services()
    try:
        assert (services.database_url, services.redis_url) == (configured["DATABASE_URL"], configured["REDIS_URL"])
        assert services.private == []
    finally:
        services.stop()


def test_private_services_makes_dev_start_its_own_servers_anyway(configured, data_dir, monkeypatch) -> None:
    for name, value in {**configured, "DATA_DIR": str(data_dir), "PRIVATE_SERVICES": "1"}.items():
        monkeypatch.setenv(name, value)
    _, services = dev._configured_services()
    try:
        assert server_port(services.database_url) != server_port(configured["DATABASE_URL"])
        assert services.redis_url != configured["REDIS_URL"]
        assert private.postgres_answers(services.database_url) and private.redis_answers(services.redis_url)
        assert len(services.private) == 2
        database = psycopg.conninfo.conninfo_to_dict(configured["DATABASE_URL"])["dbname"]
        assert psycopg.conninfo.conninfo_to_dict(services.database_url)["dbname"] == database  # created there
        env = services.env()
        assert (env["DATABASE_URL"], env["REDIS_URL"]) == (services.database_url, services.redis_url)
        assert env["PRIVATE_SERVICES"] == "0"  # the tests run under ./dev use these, they start no third pair
    finally:
        services.stop()
    assert not private.postgres_answers(services.database_url)
    assert not private.redis_answers(services.redis_url)


def test_a_server_with_too_few_connections_for_the_test_workers_is_replaced_by_a_private_one(
        configured, data_dir, monkeypatch) -> None:
    """./dev test with two workers needs more connections than a default server's 100: a configured server
    that allows fewer than asked is not used, a private one allowing them is; one that allows enough is."""
    for name, value in {**configured, "DATA_DIR": str(data_dir), "PRIVATE_SERVICES": "0"}.items():
        monkeypatch.setenv(name, value)
    allowed = private.max_connections_of(configured["DATABASE_URL"])
    _, services = dev._configured_services(min_connections=allowed)
    try:
        assert services.database_url == configured["DATABASE_URL"] and services.private == []
    finally:
        services.stop()
    _, services = dev._configured_services(min_connections=allowed + 50)
    try:
        assert server_port(services.database_url) != server_port(configured["DATABASE_URL"])
        assert private.max_connections_of(services.database_url) == allowed + 50
        assert services.redis_url == configured["REDIS_URL"]  # Redis has no such limit: the configured one
    finally:
        services.stop()
    assert not private.postgres_answers(services.database_url)


def test_private_services_makes_the_test_fixtures_start_their_own_postgres(configured, data_dir) -> None:
    env = {**configured, "PRIVATE_SERVICES": "1"}
    admin, handle = _admin_url(data_dir, env)
    try:
        assert handle is not None and server_port(admin) != server_port(configured["DATABASE_URL"])
        assert private.postgres_answers(admin)
    finally:
        if handle is not None:
            handle.stop()
    admin, handle = _admin_url(data_dir, {**env, "PRIVATE_SERVICES": "0"})
    assert handle is None and server_port(admin) == server_port(configured["DATABASE_URL"])


def test_private_services_makes_the_drills_start_their_own_postgres(configured, data_dir, monkeypatch) -> None:
    from loadtests.stack import Stack

    for name, value in {**configured, "DATA_DIR": str(data_dir), "PRIVATE_SERVICES": "1"}.items():
        monkeypatch.setenv(name, value)
    assert load_settings().private_services == 1
    with Stack(data_dir / "drill", label="private") as stack:
        assert server_port(stack.database_url) != server_port(configured["DATABASE_URL"])
        assert any(isinstance(h, private.PostgresHandle) for h in stack._private)
        with psycopg.connect(stack.database_url) as conn:  # migrated
            assert conn.execute("SELECT count(*) FROM orders").fetchone() == (0,)
