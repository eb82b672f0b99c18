"""The development tooling against real processes: private Redis and PostgreSQL, the one launcher, ``./dev``."""
from __future__ import annotations

import io
import os
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import psycopg
import pytest

from shared.config import load_settings
from shared.devtools.dev import data_dir_secret_key, port_clash, pytest_args, pytest_exit_code, workers_of
from shared.devtools.launcher import Launcher, LaunchError, RestartPolicy, descendants
from shared.devtools.procfile import PROCFILE, PROCFILE_DEV, ROOT, ProcessSpec, parse_procfile, process_specs, select_processes
from shared.devtools.services import (
    DEFAULT_DATA_DIR,
    DEFAULT_DATABASE_URL,
    DEFAULT_REDIS_URL,
    Configured,
    ServiceError,
    free_port,
    port_accepts,
    postgres_answers,
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


def quick(**overrides: float) -> RestartPolicy:
    """Short delays for tests; a death counts as quick unless the process stayed up a minute."""
    values = {"initial_delay": 0.05, "max_delay": 0.4, "stable_after": 60.0, "max_quick_deaths": 5}
    values.update(overrides)
    return RestartPolicy(**values)  # type: ignore[arg-type]


def restarting(specs: list[ProcessSpec], out: io.StringIO, **policy: float) -> Launcher:
    """A launcher as ``./dev up`` makes one (restarts on, output on one stream), with quick back-off."""
    return Launcher(dict(os.environ), specs=specs, out=out, restart=True, policy=quick(**policy))


def run_in_thread(launcher: Launcher) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(launcher.run()))
    runner.start()
    return runner, result


def pids(launcher: Launcher) -> dict[str, int | None]:
    return {name: process.pid for name, process in launcher.processes.items()}


def test_run_stops_every_process_on_request() -> None:
    out = io.StringIO()
    launcher = Launcher(dict(os.environ), specs=[sleeper("one"), sleeper("two")], out=out, restart=True)
    runner, result = run_in_thread(launcher)
    wait_for(lambda: "one pid" in out.getvalue() and "two pid" in out.getvalue())
    started = [int(line.split()[-1]) for line in out.getvalue().splitlines() if " pid " in line]

    launcher.request_stop()
    runner.join(timeout=15)

    assert not runner.is_alive()
    assert result == [0]
    assert len(started) == 2 and all(gone(pid) for pid in started)
    assert any(line.startswith("one | one pid") for line in out.getvalue().splitlines())


def test_a_process_that_dies_is_restarted_and_the_others_left_alone(tmp_path: Path) -> None:
    out = io.StringIO()
    launcher = restarting([sleeper("stays"), flaky("dies", tmp_path / "runs", deaths=2)], out)
    runner, result = run_in_thread(launcher)
    try:
        wait_for(lambda: "dies pid" in out.getvalue() and " run 3" in out.getvalue())
        stays_pid = launcher.processes["stays"].pid
        wait_for(lambda: launcher.processes["dies"].restarts == 2)
        time.sleep(0.3)  # the third run stays up: nothing else happens
        assert launcher.processes["dies"].alive()
        assert launcher.processes["stays"].pid == stays_pid and launcher.processes["stays"].restarts == 0
        log = out.getvalue()
        assert "dev   | dies exited with code 3; restarting in 0.05 s" in log
        assert "dev   | dies exited with code 3; restarting in 0.1 s" in log  # doubled
        assert "stopping" not in log
    finally:
        launcher.request_stop()
        runner.join(timeout=15)
    assert result == [0]
    assert all(gone(pid) for pid in pids(launcher).values() if pid)


def test_run_gives_up_and_stops_everything_when_a_process_cannot_stay_up(tmp_path: Path) -> None:
    out = io.StringIO()
    launcher = restarting([sleeper("stays"), flaky("dies", tmp_path / "runs", deaths=1000)], out, max_quick_deaths=4)

    code = launcher.run()

    assert code == 3
    log = out.getvalue()
    delays = [line.rsplit("restarting in ", 1)[1] for line in log.splitlines() if "restarting in" in line]
    assert delays == ["0.05 s", "0.1 s", "0.2 s"]  # doubling; the fourth quick death is the last
    assert "dies exited with code 3, 4 times in a row within 60 s of starting; giving up" in log
    assert "stopping everything" in log
    assert len((tmp_path / "runs").read_text().splitlines()) == 4
    assert all(gone(pid) for pid in pids(launcher).values() if pid)


def test_back_off_starts_again_from_the_first_delay_after_a_process_stayed_up(tmp_path: Path) -> None:
    """Each run stays up 1 s, longer than ``stable_after``: every death is the first of a new series."""
    out = io.StringIO()
    launcher = restarting([sleeper("stays"), sleeper("dies", exit_after=1)], out, stable_after=0.3, max_quick_deaths=1)
    runner, result = run_in_thread(launcher)
    try:
        wait_for(lambda: "dies" in launcher.processes and launcher.processes["dies"].restarts >= 3, timeout=30)
    finally:
        launcher.request_stop()
        runner.join(timeout=15)
    assert result == [0]
    delays = [line.rsplit("restarting in ", 1)[1] for line in out.getvalue().splitlines() if "restarting in" in line]
    assert len(delays) >= 3 and set(delays) == {"0.05 s"}


def test_back_off_delay_never_exceeds_the_cap(tmp_path: Path) -> None:
    out = io.StringIO()
    launcher = restarting([flaky("dies", tmp_path / "runs", deaths=1000)], out, max_delay=0.2, max_quick_deaths=6)
    assert launcher.run() == 3
    delays = [line.rsplit("restarting in ", 1)[1] for line in out.getvalue().splitlines() if "restarting in" in line]
    assert delays == ["0.05 s", "0.1 s", "0.2 s", "0.2 s", "0.2 s"]


def test_stop_request_during_a_back_off_stops_at_once_without_restarting(tmp_path: Path) -> None:
    out = io.StringIO()
    launcher = restarting([sleeper("stays"), flaky("dies", tmp_path / "runs", deaths=1000)], out, initial_delay=600)
    runner, result = run_in_thread(launcher)
    wait_for(lambda: "restarting in 600 s" in out.getvalue())
    stays_pid = launcher.processes["stays"].pid

    launcher.request_stop()
    runner.join(timeout=15)

    assert not runner.is_alive() and result == [0]
    assert launcher.processes["dies"].restarts == 0
    assert stays_pid is not None and gone(stays_pid)


def test_what_a_dead_process_left_in_its_group_is_killed(tmp_path: Path) -> None:
    """A worker's main process dies but its pool child lives on: the restart must not run next to it."""
    code = ("import os, subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print('orphan', child.pid, flush=True)\n"
            "time.sleep(0.2); os._exit(1)\n")
    out = io.StringIO()
    launcher = restarting([ProcessSpec("parent", f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}")], out,
                          initial_delay=600)
    runner, result = run_in_thread(launcher)
    try:
        wait_for(lambda: "restarting in" in out.getvalue())
        orphan = int(next(line.split()[-1] for line in out.getvalue().splitlines() if " orphan " in line))
        wait_for(lambda: gone(orphan))
    finally:
        launcher.request_stop()
        runner.join(timeout=15)
    assert result == [0]


# --- copies, stop and kill one, up or not --------------------------------------------------------------

HTTP_NODE = (
    "import http.server, os\n"
    "class Answer(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        body = os.environ['PS'].encode()\n"
    "        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()\n"
    "        self.wfile.write(body)\n"
    "    def log_message(self, *args): pass\n"
    "http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), Answer).serve_forever()\n"
)


def http_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.read().decode()


def test_copies_of_a_group_run_under_their_own_names_and_ports_and_stop_or_die_alone(tmp_path: Path) -> None:
    """Two copies of web, as a multi-node drill runs them: each answers on its own port under its own name;
    stopping one or killing the other leaves the rest up; a stopped copy comes back as it was."""
    web = ProcessSpec("web", f"{shlex.quote(sys.executable)} -c {shlex.quote(HTTP_NODE)}")
    launcher = Launcher(dict(os.environ), specs=[web, sleeper("other")], logs=tmp_path / "logs")
    ports = {"web-1": free_port(), "web-2": free_port()}
    try:
        for name, port in ports.items():
            launcher.start("web", name=name, port=port)
        launcher.start("other")
        launcher.wait_ready(timeout=30)
        assert launcher.status() == {"web-1": True, "web-2": True, "other": True}
        assert {name: http_get(f"http://127.0.0.1:{port}/readyz") for name, port in ports.items()} == \
            {"web-1": "web-1", "web-2": "web-2"}
        assert launcher.processes["web-2"].url == f"http://127.0.0.1:{ports['web-2']}"

        launcher.stop("web-2")
        assert launcher.status() == {"web-1": True, "web-2": False, "other": True}
        assert not port_accepts(ports["web-2"])

        first = launcher.processes["web-1"].pid
        launcher.kill("web-1")
        assert first is not None and gone(first)
        time.sleep(0.5)  # restarts are off: nothing brings it back
        assert launcher.status() == {"web-1": False, "web-2": False, "other": True}

        launcher.start("web-2")  # as it was: same group, same port
        launcher.wait_ready(["web-2"], timeout=30)
        assert http_get(f"http://127.0.0.1:{ports['web-2']}/") == "web-2"
        with pytest.raises(LaunchError, match="running already"):
            launcher.start("web-2")
    finally:
        launcher.stop_all()
    assert all(gone(pid) for pid in pids(launcher).values() if pid)
    assert (tmp_path / "logs" / "web-2.log").exists()


# A node like Celery's prefork one: its main process, on SIGTERM, waits for the child doing the work in hand,
# and the child, like a pool child, dies of a SIGTERM of its own.
WARM_NODE = (
    "import os, signal, subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time, sys; open(sys.argv[1], \"w\").write(\"started\"); "
    "time.sleep(1.5); open(sys.argv[1], \"w\").write(\"finished\")', os.environ['OUT']])\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(child.wait()))\n"
    "while True: time.sleep(1)\n"
)


def test_stop_lets_the_main_process_finish_the_work_in_hand_then_clears_its_group(tmp_path: Path) -> None:
    """SIGTERM goes to the main process alone (systemd's KillMode=mixed, as docs/deploy.md runs it): a
    group-wide SIGTERM killed a prefork node's pool child mid-task (a stamping lease left held, the order
    stuck until it ran out). A wrapper that doesn't pass SIGTERM on (bash running two commands) still stops
    at once: what is left in its group gets SIGTERM when the main process has ended."""
    out = tmp_path / "work"
    node = ProcessSpec("node", f"{shlex.quote(sys.executable)} -c {shlex.quote(WARM_NODE)}")
    wrapper = ProcessSpec("wrapper", "sleep 300; true")
    launcher = Launcher({**os.environ, "OUT": str(out)}, specs=[node, wrapper], logs=tmp_path / "logs", grace=8)
    try:
        launcher.start("node")
        launcher.start("wrapper")
        wait_for(lambda: out.exists(), timeout=30)
        members = descendants(launcher.processes["wrapper"].pid, include_self=True)
        assert len(members) == 2  # bash and its sleep
        launcher.stop("node", "wrapper")
        assert out.read_text() == "finished"  # the child was not cut short
        assert all(gone(pid) for pid in members)
        launcher_log = tmp_path / "logs" / "launcher.log"
        # Nothing waited out the grace period to be killed.
        assert not launcher_log.exists() or "still running" not in launcher_log.read_text()
    finally:
        launcher.stop_all()


def test_restart_on_death_is_switchable_per_process(tmp_path: Path) -> None:
    """Off by default for tests and drills (a killed process stays dead), on for a process that asks:
    killed, it is brought back; stopped on purpose, it is not."""
    launcher = Launcher(dict(os.environ), specs=[sleeper("plain"), sleeper("kept")], logs=tmp_path / "logs",
                        policy=quick())
    try:
        launcher.start("plain")
        kept = launcher.start("kept", restart=True)
        launcher.wait_ready(timeout=30)
        first = kept.pid
        launcher.kill("plain", "kept")

        wait_for(lambda: kept.restarts == 1 and kept.alive(), timeout=15)
        assert kept.pid != first
        assert not launcher.processes["plain"].alive() and launcher.processes["plain"].restarts == 0

        launcher.stop("kept")
        time.sleep(0.5)
        assert not kept.alive() and kept.restarts == 1
    finally:
        launcher.stop_all()


def test_a_celery_worker_is_up_only_once_it_logged_ready(tmp_path: Path) -> None:
    """Up is ready, not merely running: a Celery worker counts once its "ready." line is in its log."""
    go = tmp_path / "go"
    fake = tmp_path / "bin" / "celery"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport os, time\n"
                    f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\n"
                    "print('celery@host ready.', flush=True)\ntime.sleep(60)\n")
    fake.chmod(0o755)
    worker = ProcessSpec("stamping", f"{shlex.quote(str(fake))} -A workers.make_celery worker --queues stamping")
    launcher = Launcher(dict(os.environ), specs=[worker], logs=tmp_path / "logs")
    try:
        process = launcher.start("stamping")
        time.sleep(0.5)
        assert process.alive() and not launcher.up("stamping")
        with pytest.raises(LaunchError, match="not up after"):
            launcher.wait_ready(timeout=0.3)
        go.touch()
        launcher.wait_ready(timeout=15)
        assert launcher.up("stamping")
    finally:
        launcher.stop_all()


def test_a_process_that_dies_at_start_is_reported_with_its_output(tmp_path: Path) -> None:
    launcher = Launcher(dict(os.environ), specs=[ProcessSpec("web", "echo 'port 8000 is in use' >&2; exit 3")],
                        logs=tmp_path / "logs")
    try:
        launcher.start("web", port=free_port())
        with pytest.raises(LaunchError, match="web exited with code 3") as failure:
            launcher.wait_ready(timeout=30)
        assert "port 8000 is in use" in str(failure.value)
    finally:
        launcher.stop_all()


def test_the_services_defaults_are_the_settings_defaults() -> None:
    """The drills read the environment without the settings module: the same variables, the same defaults."""
    settings = load_settings({})
    configured = Configured.from_environment({})
    assert (DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL, DEFAULT_DATA_DIR) == \
        (settings.database_url, settings.redis_url, settings.data_dir)
    assert configured.database_url == settings.database_url and not configured.force_private
    assert Configured.from_environment({"PRIVATE_SERVICES": "1", "DATA_DIR": "/tmp/x"}) == \
        Configured(DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL, Path("/tmp/x"), True)


def test_procfile_names_the_production_processes_and_procfile_dev_the_stand_in_gateway() -> None:
    production = [spec.name for spec in parse_procfile(PROCFILE.read_text())]
    assert production == ["web", "polls", "checkout", "payments", "refunds", "stamping", "housekeeping", "reconcile",
                          "mail", "beat"]
    assert "standin" not in PROCFILE.read_text()  # a production process manager never starts it
    assert [spec.name for spec in parse_procfile(PROCFILE_DEV.read_text())] == ["gateway", "mailbox"]
    assert [spec.name for spec in process_specs()] == production + ["gateway", "mailbox"]
    assert [spec.name for spec in process_specs(development=None)] == production
    assert [s.name for s in select_processes(process_specs(), ["web", "gateway"])] == ["web", "gateway"]


def test_the_drills_start_what_dev_up_starts() -> None:
    from loadtests.stack import procfile_commands

    assert procfile_commands() == {spec.name: spec.command for spec in process_specs()}
    assert "shared.devtools.standin" in procfile_commands()["gateway"]


def test_every_procfile_line_is_one_command_bash_replaces_itself_with() -> None:
    """A stop's SIGTERM goes to the main process (launcher.py, docs/deploy.md's KillMode=mixed): a line
    bash has to stay around for (``&&``, ``;``, a pipe) would make bash the main process, and the group's
    SIGTERM would reach a prefork node's children mid-task."""
    for spec in process_specs():
        lexer = shlex.shlex(spec.command, posix=True, punctuation_chars=True)
        lexer.commenters = ""  # bash starts no comment inside a word
        tokens = list(lexer)
        operators = [token for token in tokens if token and set(token) <= set("&;|()<>")]
        assert operators == [] and "`" not in spec.command, (spec.name, operators)
        assert tokens[0] not in ("time", "sh", "bash"), (spec.name, tokens[0])  # a shell or timer stays the parent


def test_a_process_in_both_procfiles_is_refused(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_text("web: gunicorn app\n")
    (tmp_path / "Procfile.dev").write_text("# dev only\nweb: flask run\n")
    with pytest.raises(ValueError, match="web"):
        process_specs(tmp_path / "Procfile", tmp_path / "Procfile.dev")


def test_data_folder_secret_key_is_made_once_private_and_reused(tmp_path: Path) -> None:
    key = data_dir_secret_key(tmp_path)

    path = tmp_path / "secret-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) >= 32 and key != load_settings({}).secret_key
    assert data_dir_secret_key(tmp_path) == key  # reused
    (tmp_path / "other").mkdir()
    assert data_dir_secret_key(tmp_path / "other") != key  # one per data folder
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_data_folder_secret_key_made_by_racing_processes_is_one_key(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from shared.devtools.dev import data_dir_secret_key; "
            "print(data_dir_secret_key(Path(sys.argv[1])))")
    racers = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True) for _ in range(8)]
    keys = {racer.communicate(timeout=60)[0].strip() for racer in racers}
    assert len(keys) == 1 and keys == {(tmp_path / "secret-key").read_text().strip()}


def test_data_folder_secret_key_is_tightened_and_a_broken_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret-key"
    path.write_text("k" * 40 + "\n")
    path.chmod(0o644)
    assert data_dir_secret_key(tmp_path) == "k" * 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("short\n")
    with pytest.raises(ServiceError, match="delete it"):
        data_dir_secret_key(tmp_path)


def test_dev_up_serves_with_the_data_folder_key_and_worker_metrics_and_stops_on_sigterm(
        database_url: str, redis_server, tmp_path: Path) -> None:
    """``./dev up web gateway stamping`` for real: web and the gateway answer, the worker serves its
    metrics on the port ./dev up gave it, all got the data folder's SECRET_KEY, and SIGTERM stops
    everything with exit code 0."""
    import requests

    web_port, gateway_port, metrics_port = free_port(), free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if key != "SECRET_KEY"}
    env.update(DATABASE_URL=database_url, REDIS_URL=redis_server.url, DATA_DIR=str(tmp_path / "data"),
               PRIVATE_SERVICES="0", PORT=str(web_port), GATEWAY_PORT=str(gateway_port),
               GATEWAY_URL=f"http://127.0.0.1:{gateway_port}", PUBLIC_BASE_URL=f"http://127.0.0.1:{web_port}",
               NOTIFICATION_URL=f"http://127.0.0.1:{web_port}/api/v1/payments/notifications",
               REDIS_KEY_PREFIX="meterai-dev-up-test:", DEVELOPMENT="1",
               # Worker groups are numbered over the whole Procfile: stamping's port is the free one.
               DEV_METRICS_PORT_BASE=str(metrics_port - [s.name for s in process_specs()
                                                         if " worker " in s.command].index("stamping")))
    log = tmp_path / "dev-up.log"
    with open(log, "wb") as out:
        dev = subprocess.Popen([sys.executable, "-m", "shared.devtools.dev", "up", "web", "gateway", "stamping"],
                               cwd=ROOT, env=env,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "everything is up" in log.read_text() or dev.poll() is not None, timeout=90)
        assert dev.poll() is None, log.read_text()
        assert requests.get(f"http://127.0.0.1:{web_port}/healthz", timeout=5).status_code == 200
        assert requests.get(f"http://127.0.0.1:{gateway_port}/sandbox/faults", timeout=5).status_code == 200
        assert f"stamping {metrics_port}" in log.read_text()
        scrape = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        assert scrape.status_code == 200 and "meterai_" in scrape.text
        key = (tmp_path / "data" / "secret-key").read_text().strip()
        children = descendants(dev.pid)
        environs = [environ for environ in map(environ_of, children) if environ]
        assert len(environs) >= 2 and {environ.get("SECRET_KEY") for environ in environs} == {key}

        dev.send_signal(signal.SIGTERM)
        assert dev.wait(timeout=60) == 0, log.read_text()
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait()
    assert all(gone(pid) for pid in children)
    assert not port_accepts(web_port) and not port_accepts(gateway_port) and not port_accepts(metrics_port)


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@pytest.mark.parametrize(("pytest_code", "ours"), [(0, 0), (1, 1), (2, 2), (5, 1)])
def test_no_tests_collected_is_a_failure(pytest_code: int, ours: int) -> None:
    assert pytest_exit_code(pytest_code) == ours


@pytest.mark.parametrize(("args", "environ", "expected"), [
    ([], {}, ["-n", "2", "--dist", "loadfile"]),
    (["-k", "refund"], {}, ["-n", "2", "--dist", "loadfile", "-k", "refund"]),
    (["-k", "no_dist"], {}, ["-n", "2", "--dist", "loadfile", "-k", "no_dist"]),
    (["-k", "refund"], {"TEST_WORKERS": "3"}, ["-n", "3", "--dist", "loadfile", "-k", "refund"]),
    ([], {"TEST_WORKERS": "auto"}, ["-n", "auto", "--dist", "loadfile"]),
    (["-x"], {"TEST_WORKERS": "1"}, ["-x"]),
    (["-x"], {"TEST_WORKERS": "0"}, ["-x"]),
    (["-n", "4"], {}, ["-n", "4"]),
    (["-n0", "-k", "x"], {}, ["-n0", "-k", "x"]),
    (["--numprocesses=4"], {}, ["--numprocesses=4"]),
    (["--dist", "load"], {}, ["--dist", "load"]),
    (["-d", "--tx", "2*popen"], {}, ["-d", "--tx", "2*popen"]),
    (["-p", "no:xdist", "tests/test_mail.py"], {}, ["-p", "no:xdist", "tests/test_mail.py"]),
    (["tests/test_mail.py"], {"PYTEST_ADDOPTS": "-p no:xdist"}, ["tests/test_mail.py"]),
    (["--pdb", "tests/test_mail.py"], {}, ["--pdb", "tests/test_mail.py"]),
    (["--trace"], {}, ["--trace"]),
    (["--trace-config"], {}, ["-n", "2", "--dist", "loadfile", "--trace-config"]),
    ([], {"PYTEST_ADDOPTS": "-n 4"}, []),
])
def test_dev_test_runs_two_files_at_a_time_unless_told_otherwise(args, environ, expected) -> None:
    assert pytest_args(args, environ) == expected


@pytest.mark.parametrize(("args", "workers"), [
    ([], 1), (["-x"], 1), (["-n", "2", "--dist", "loadfile"], 2), (["-n3"], 3), (["--numprocesses=4"], 4),
    (["-n", "0"], 1), (["-d", "--tx", "3*popen"], 3), (["-n", "2", "-p", "no:xdist"], 1),
])
def test_the_workers_pytest_will_run_are_read_from_its_arguments(args, workers) -> None:
    assert workers_of(args, {}) == workers
    assert workers_of([], {"PYTEST_ADDOPTS": " ".join(args)}) == workers


def test_a_test_workers_setting_that_is_no_number_is_refused() -> None:
    from shared.devtools.services import ServiceError

    with pytest.raises(ServiceError, match="TEST_WORKERS"):
        pytest_args([], {"TEST_WORKERS": "two"})


def test_the_suite_under_two_workers_still_fails_when_no_test_is_collected(tmp_path) -> None:
    """xdist keeps pytest's exit code 5 for "no tests collected", which ./dev test turns into a failure."""
    (tmp_path / "test_nothing.py").write_text("def helper():\n    pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *pytest_args([str(tmp_path)], {})], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 5, done.stdout + done.stderr
    assert pytest_exit_code(done.returncode) == 1


def test_dev_up_refuses_two_of_its_listeners_on_one_port() -> None:
    """The poll server's port was once the stand-in gateway's: the second restarts for ever while the first
    answers the other's requests (payments reaching the poll server's 404s)."""
    settings = load_settings({})
    assert port_clash({"PORT": "8000", "POLLS_PORT": "8002"}, settings) is None
    clash = port_clash({"PORT": "8000", "POLLS_PORT": "8001"}, settings)
    assert clash and "POLLS_PORT" in clash and "GATEWAY_PORT" in clash and "8001" in clash
    assert port_clash({"PORT": "8025", "POLLS_PORT": "8002", "SMTP_HOST": "127.0.0.1", "SMTP_PORT": "8025"},
                      settings)
    assert port_clash({"PORT": "8025", "POLLS_PORT": "8002", "SMTP_HOST": "smtp.example.id", "SMTP_PORT": "8025"},
                      settings) is None  # a mail server elsewhere listens on no port of ours
