"""The dev environment helpers against real processes: private Redis and PostgreSQL, and the Procfile supervisor."""
from __future__ import annotations

import io
import os
import pwd
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import psycopg
import pytest

from shared.devenv import (
    PROCFILE,
    ProcessSpec,
    Supervisor,
    parse_procfile,
    postgres_answers,
    pytest_exit_code,
    redis_answers,
    start_private_postgres,
    start_private_redis,
)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def sleeper(name: str, exit_after: float | None = None) -> ProcessSpec:
    """A Procfile entry: a Python process that prints its pid, then sleeps (a minute, or ``exit_after`` s)."""
    code = f"import os, time; print('{name} pid', os.getpid()); time.sleep({exit_after or 60})"
    return ProcessSpec(name, f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}")


@pytest.fixture
def postgres_dir() -> Iterator[Path]:
    """A folder under /tmp the postgres user can use when we are root (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="meterai-devenv-", dir="/tmp"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(path, user.pw_uid, user.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_private_redis_answers_until_stopped(tmp_path: Path) -> None:
    redis = start_private_redis(tmp_path)
    try:
        assert redis_answers(redis.url)
        redis.restart()
        assert redis_answers(redis.url)
    finally:
        redis.stop()
    assert not redis_answers(redis.url)


def test_private_postgres_answers_and_keeps_tables_until_stopped(postgres_dir: Path) -> None:
    postgres = start_private_postgres(postgres_dir)
    try:
        assert postgres_answers(postgres.url)
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE ping (id int PRIMARY KEY)")
            conn.execute("INSERT INTO ping VALUES (1)")
            assert conn.execute("SELECT count(*) FROM ping").fetchone() == (1,)
        again = start_private_postgres(postgres_dir)  # a second ./dev finds it running: shares it, doesn't stop it
        assert again.port == postgres.port and not again.owned
        again.stop()
        assert postgres_answers(postgres.url)
    finally:
        postgres.stop()
    assert not postgres_answers(postgres.url)


def test_supervisor_stop_terminates_every_process() -> None:
    out = io.StringIO()
    supervisor = Supervisor([sleeper("one"), sleeper("two")], lambda name: dict(os.environ), out=out)
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(supervisor.run()))
    runner.start()
    wait_for(lambda: "one pid" in out.getvalue() and "two pid" in out.getvalue())
    pids = [int(line.split()[-1]) for line in out.getvalue().splitlines() if " pid " in line]

    supervisor.request_stop()
    runner.join(timeout=15)

    assert not runner.is_alive()
    assert result == [0]
    assert len(pids) == 2 and all(gone(pid) for pid in pids)
    assert any(line.startswith("one | one pid") for line in out.getvalue().splitlines())


def test_supervisor_stops_everything_when_one_process_dies() -> None:
    out = io.StringIO()
    supervisor = Supervisor([sleeper("stays"), sleeper("dies", exit_after=0.5)], lambda name: dict(os.environ), out=out)

    code = supervisor.run()

    assert code != 0
    assert "dies exited with code 0" in out.getvalue()
    assert all(gone(pid) for pid in supervisor.pids.values())


def test_procfile_names_every_process() -> None:
    names = [spec.name for spec in parse_procfile(PROCFILE.read_text())]
    assert names == ["web", "gateway", "checkout", "payments", "refunds", "stamping", "housekeeping",
                     "beat"]


@pytest.mark.parametrize(("pytest_code", "ours"), [(0, 0), (1, 1), (2, 2), (5, 1)])
def test_no_tests_collected_is_a_failure(pytest_code: int, ours: int) -> None:
    assert pytest_exit_code(pytest_code) == ours
