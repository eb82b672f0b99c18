"""The shape of the house, executable: ``lint-imports`` checks the contracts in ``pyproject.toml``.

Why in the suite: an import rule that lives only in STYLE.md drifts the first time someone is in a hurry;
here a broken contract fails the run and lint-imports prints the chain of imports that breaks it. The
second test proves the contracts bite, on a copy of the code with one forbidden import per contract.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("shared", "web", "workers", "loadtests")

# Contracts that other work in progress still breaks, each with the change that will keep it. Only these
# may fail, and they must: a contract that starts passing is taken off this list (strict xfail).
EXPECTED_BROKEN: dict[str, str] = {}


def contracts() -> dict[str, str]:
    """Contract id -> name, as pyproject.toml declares them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {contract["id"]: contract["name"] for contract in config["contracts"]}


def lint_imports(cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-logo", "--cache-dir", str(cache)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def verdicts(output: str) -> dict[str, str]:
    """Contract name -> "KEPT" or "BROKEN", from lint-imports' summary lines."""
    found = re.findall(r"^(.+?) (KEPT|BROKEN)(?: \(\d+ ignored imports?\))?$", output, flags=re.MULTILINE)
    return {name: verdict for name, verdict in found}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} is missing: pip install -e '.[test]' (import-linter)"
    return lint_imports(ROOT, tmp_path_factory.mktemp("import-linter-cache"))


@pytest.mark.parametrize("contract", [
    pytest.param(cid, marks=pytest.mark.xfail(reason=EXPECTED_BROKEN[cid], strict=True))
    if cid in EXPECTED_BROKEN else cid
    for cid in contracts()
])
def test_import_contract_is_kept(report: subprocess.CompletedProcess[str], contract: str) -> None:
    name = contracts()[contract]
    verdict = verdicts(report.stdout).get(name)
    assert verdict is not None, f"lint-imports did not check {name!r}:\n{report.stdout}{report.stderr}"
    assert verdict == "KEPT", report.stdout


def test_every_contract_breaks_on_a_forbidden_import(tmp_path: Path) -> None:
    """The same contracts on a copy of the code with one forbidden import each: all reported broken."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    violations = {
        "production-no-devtools": ("shared/orders.py", "import shared.devtools.launcher"),
        "drills-are-clients": ("loadtests/drill.py", "import shared.config"),
        "devtools-launcher-is-a-client": ("shared/devtools/services.py", "import shared.db"),
        "core-knows-no-web-or-workers": ("shared/store/__init__.py", "import workers.tasks.base"),
        "web-is-light": ("web/pages.py", "import shared.stamping.kernel"),  # reaches pypdf, reportlab
    }
    assert set(violations) == set(contracts())  # every contract is shown to bite
    for path, line in violations.values():
        with open(tmp_path / path, "a") as source:
            source.write(f"\n{line}  # noqa: E402 - the violation under test\n")

    result = lint_imports(tmp_path, tmp_path / "cache")

    assert result.returncode == 1, result.stdout + result.stderr
    found = verdicts(result.stdout)
    assert {cid: found.get(contracts()[cid]) for cid in violations} == {cid: "BROKEN" for cid in violations}


def test_the_launcher_contract_names_every_production_module_of_shared() -> None:
    """import-linter can't forbid ``shared`` to a module inside it, so the contract lists shared's
    production modules one by one: a module added to shared must be added there too."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    [contract] = [c for c in config["contracts"] if c["id"] == "devtools-launcher-is-a-client"]
    production = {f"shared.{path.stem}" for path in (ROOT / "shared").iterdir()
                  if (path.suffix == ".py" or (path / "__init__.py").exists())
                  and path.stem not in ("__init__", "devtools")}
    assert production - set(contract["forbidden_modules"]) == set()
