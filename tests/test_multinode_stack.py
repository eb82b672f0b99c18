"""The multi-node drill's and the scaling benchmark's layout, checked without running them (each is minutes
long: ``python -m loadtests.drill --profile multi``, ``python -m loadtests.bench.scaling``).

Every node gets a data folder of its own and nothing else of its own: the signing files are outside
every node's folder, the store's settings and the secret are the same for all; the scaling benchmark's stamping
node is the Procfile's, with its slots and core changed only; the drill reads the proxy's retries from
the access-log line the shipped nginx configuration writes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from loadtests import drill, multinode
from loadtests.bench.scaling import stamping_command
from loadtests.stack import Stack, procfile_commands


def test_each_node_has_its_own_data_folder_and_shares_only_key_material_and_the_store(tmp_path: Path):
    stack = Stack(tmp_path)
    stack.store_env = {"DOCUMENT_STORE_URL": "s3://meterai/documents", "S3_ENDPOINT_URL": "http://127.0.0.1:1"}
    names = ["web-1", "web-2", "stamping-1", "stamping-2", "checkout", "beat"]
    envs = {name: stack.node_env(name) for name in names}

    folders = [Path(env["DATA_DIR"]) for env in envs.values()]
    assert len(set(folders)) == len(names)
    assert all(folder.is_dir() for folder in folders)
    for folder in folders:
        assert not any(other != folder and other.is_relative_to(folder) for other in folders)
    key_material = ("SIGNING_KEY_PATH", "SIGNING_CERT_PATH", "SIGNING_CA_CERT_PATH")
    for key in key_material:
        path = Path(envs["web-1"][key])
        assert not any(path.is_relative_to(folder) for folder in folders), f"{path} is inside a node's DATA_DIR"
    for key in key_material + ("DOCUMENT_STORE_URL", "S3_ENDPOINT_URL"):
        assert len({env[key] for env in envs.values()}) == 1, f"{key} differs between nodes"
    # The secret and the service URLs are the launcher's, one environment for every node.
    assert not any("SECRET_KEY" in env or "DATABASE_URL" in env or "DOCUMENT_DIR" in env for env in envs.values())


def test_a_node_keeps_the_callers_settings_but_never_its_own_data_folder_choice(tmp_path: Path):
    stack = Stack(tmp_path)
    env = stack.node_env("stamping-1", {"LEASE_SECONDS": "40", "DATA_DIR": "/elsewhere"})
    assert env["LEASE_SECONDS"] == "40"
    assert env["DATA_DIR"] == str(stack.node_dir("stamping-1"))


def test_the_scaling_benchmarks_stamping_node_is_the_procfiles_with_its_slots_and_core_changed():
    procfile = procfile_commands()["stamping"]
    assert "--concurrency" in procfile, "the benchmark sets the slots by rewriting --concurrency"
    pinned = stamping_command(1, 1)
    assert pinned.startswith("taskset -c 1 ")
    assert pinned.removeprefix("taskset -c 1 ").replace("--concurrency 1", "") == \
        re.sub(r"--concurrency\s+\d+", "", procfile)
    assert stamping_command(3, None).count("--concurrency 3") == 1 and "taskset" not in stamping_command(3, None)


def test_the_proxys_retries_are_read_from_the_shipped_access_log_format(tmp_path: Path):
    retried = {"time": "2026-12-01T13:52:03+00:00", "client": "198.18.0.7", "method": "POST",
               "path": "/api/v1/orders", "status": 202, "upstream": "127.0.0.1:1, 127.0.0.1:2",
               "upstream_status": "502, 202"}
    plain = {**retried, "status": 200, "upstream": "127.0.0.1:1", "upstream_status": "200"}
    failed = {**retried, "status": 502, "upstream_status": "502, 502"}
    log = tmp_path / "nginx" / "logs" / "access.log"
    log.parent.mkdir(parents=True)
    log.write_text("\n".join(json.dumps(r) for r in (retried, plain, failed, plain)) + "\n")
    stack = Stack(tmp_path)
    stack.proxy = type("Proxy", (), {"access_log": log})()

    seen = multinode.proxy_retries(stack)

    assert seen["retried"] == 2 and seen["first_upstream_status"] == {"502": 2}
    assert seen["answered_5xx"] == 1
    shipped = (Path(drill.ROOT) / "deploy" / "nginx" / "meterai.conf").read_text()
    assert '"status":$status' in shipped and '"upstream_status":"$upstream_status"' in shipped
