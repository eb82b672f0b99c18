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
    RestartPolicy,
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


def flaky(name: str, marker: Path, deaths: int, code: int = 3) -> ProcessSpec:
    """A Procfile entry that exits with ``code`` the first ``deaths`` times it runs, then stays up: each run
    appends a line to ``marker`` so the count survives the restarts."""
    script = (
        "import os, sys, time\n"
        f"path = {str(marker)!r}\n"
        "with open(path, 'a') as f: f.write('run\\n')\n"
        "runs = len(open(path).read().splitlines())\n"
        "print('" + name + " pid', os.getpid(), 'run', runs, flush=True)\n"
        f"sys.exit({code}) if runs <= {deaths} else time.sleep(60)\n"
    )
    return ProcessSpec(name, f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}")


def run_in_thread(supervisor: Supervisor) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(supervisor.run()))
    runner.start()
    return runner, result


def quick(**overrides: float) -> RestartPolicy:
    """Short delays for tests; a death counts as quick unless the process stayed up a minute."""
    values = {"initial_delay": 0.05, "max_delay": 0.4, "stable_after": 60.0, "max_quick_deaths": 5}
    values.update(overrides)
    return RestartPolicy(**values)  # type: ignore[arg-type]


def test_supervisor_restarts_a_process_that_dies_and_leaves_the_others_alone(tmp_path: Path) -> None:
    out = io.StringIO()
    supervisor = Supervisor([sleeper("stays"), flaky("dies", tmp_path / "runs", deaths=2)],
                            lambda name: dict(os.environ), out=out, restart=quick())
    runner, result = run_in_thread(supervisor)
    try:
        wait_for(lambda: "dies pid" in out.getvalue() and " run 3" in out.getvalue())
        stays_pid = supervisor.pids["stays"]
        wait_for(lambda: supervisor.restarts.get("dies", 0) == 2)
        time.sleep(0.3)  # the third run stays up: nothing else happens
        assert supervisor.processes["dies"].poll() is None
        assert supervisor.pids["stays"] == stays_pid and supervisor.restarts["stays"] == 0
        log = out.getvalue()
        assert "dev   | dies exited with code 3; restarting in 0.05 s" in log
        assert "dev   | dies exited with code 3; restarting in 0.1 s" in log  # doubled
        assert "stopping" not in log
    finally:
        supervisor.request_stop()
        runner.join(timeout=15)
    assert result == [0]
    assert all(gone(pid) for pid in supervisor.pids.values())


def test_supervisor_gives_up_and_stops_everything_when_a_process_cannot_stay_up(tmp_path: Path) -> None:
    out = io.StringIO()
    supervisor = Supervisor([sleeper("stays"), flaky("dies", tmp_path / "runs", deaths=1000)],
                            lambda name: dict(os.environ), out=out, restart=quick(max_quick_deaths=4))

    code = supervisor.run()

    assert code == 3
    log = out.getvalue()
    delays = [line.rsplit("restarting in ", 1)[1] for line in log.splitlines() if "restarting in" in line]
    assert delays == ["0.05 s", "0.1 s", "0.2 s"]  # doubling; the fourth quick death is the last
    assert "dies exited with code 3, 4 times in a row within 60 s of starting; giving up" in log
    assert len((tmp_path / "runs").read_text().splitlines()) == 4
    assert all(gone(pid) for pid in supervisor.pids.values())


def test_back_off_starts_again_from_the_first_delay_after_a_process_stayed_up(tmp_path: Path) -> None:
    """Each run stays up 1 s, longer than ``stable_after``: every death is the first of a new series."""
    out = io.StringIO()
    supervisor = Supervisor([sleeper("stays"), sleeper("dies", exit_after=1)], lambda name: dict(os.environ),
                            out=out, restart=quick(stable_after=0.3, max_quick_deaths=1))
    runner, result = run_in_thread(supervisor)
    try:
        wait_for(lambda: supervisor.restarts.get("dies", 0) >= 3, timeout=30)
    finally:
        supervisor.request_stop()
        runner.join(timeout=15)
    assert result == [0]
    delays = [line.rsplit("restarting in ", 1)[1] for line in out.getvalue().splitlines() if "restarting in" in line]
    assert len(delays) >= 3 and set(delays) == {"0.05 s"}


def test_back_off_delay_never_exceeds_the_cap(tmp_path: Path) -> None:
    out = io.StringIO()
    supervisor = Supervisor([flaky("dies", tmp_path / "runs", deaths=1000)], lambda name: dict(os.environ),
                            out=out, restart=quick(max_delay=0.2, max_quick_deaths=6))
    assert supervisor.run() == 3
    delays = [line.rsplit("restarting in ", 1)[1] for line in out.getvalue().splitlines() if "restarting in" in line]
    assert delays == ["0.05 s", "0.1 s", "0.2 s", "0.2 s", "0.2 s"]


def test_stop_request_during_a_back_off_stops_at_once_without_restarting(tmp_path: Path) -> None:
    out = io.StringIO()
    supervisor = Supervisor([sleeper("stays"), flaky("dies", tmp_path / "runs", deaths=1000)],
                            lambda name: dict(os.environ), out=out, restart=quick(initial_delay=600))
    runner, result = run_in_thread(supervisor)
    wait_for(lambda: "restarting in 600 s" in out.getvalue())
    stays_pid = supervisor.pids["stays"]

    supervisor.request_stop()
    runner.join(timeout=15)

    assert not runner.is_alive() and result == [0]
    assert supervisor.restarts["dies"] == 0
    assert gone(stays_pid)


def test_supervisor_kills_what_a_dead_process_left_in_its_group(tmp_path: Path) -> None:
    """A worker's main process dies but its pool child lives on: the restart must not run next to it."""
    code = ("import os, subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print('orphan', child.pid, flush=True)\n"
            "time.sleep(0.2); os._exit(1)\n")
    out = io.StringIO()
    supervisor = Supervisor([ProcessSpec("parent", f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}")],
                            lambda name: dict(os.environ), out=out, restart=quick(initial_delay=600))
    runner, result = run_in_thread(supervisor)
    try:
        wait_for(lambda: "restarting in" in out.getvalue())
        orphan = int(next(line.split()[-1] for line in out.getvalue().splitlines() if " orphan " in line))
        wait_for(lambda: gone(orphan))
    finally:
        supervisor.request_stop()
        runner.join(timeout=15)
    assert result == [0]


def test_procfile_names_every_process() -> None:
    names = [spec.name for spec in parse_procfile(PROCFILE.read_text())]
    assert names == ["web", "gateway", "checkout", "payments", "refunds", "stamping", "housekeeping",
                     "beat"]


@pytest.mark.parametrize(("pytest_code", "ours"), [(0, 0), (1, 1), (2, 2), (5, 1)])
def test_no_tests_collected_is_a_failure(pytest_code: int, ours: int) -> None:
    assert pytest_exit_code(pytest_code) == ours
