"""The Procfile format, and the two files in it: ``Procfile`` (production) and ``Procfile.dev``.

``Procfile.dev`` holds the processes that exist only to develop, test and demo (the stand-in payment
gateway): the launcher runs them next to the Procfile's for ``./dev up``, the tests and the drills; a
production process manager never sees them. Only the standard library (drills read it too).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROCFILE = ROOT / "Procfile"
PROCFILE_DEV = ROOT / "Procfile.dev"


class UnknownProcess(ValueError):
    """A name that is in neither Procfile."""


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    command: str


def parse_procfile(text: str) -> list[ProcessSpec]:
    """``name: command`` lines; blank lines and ``#`` comments are skipped."""
    specs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line)
        if not match:
            raise ValueError(f"Procfile line {number} is not 'name: command': {line!r}")
        specs.append(ProcessSpec(match.group(1), match.group(2).strip()))
    return specs


def process_specs(procfile: Path = PROCFILE, development: Path | None = PROCFILE_DEV) -> list[ProcessSpec]:
    """The Procfile's processes, then the development ones of ``Procfile.dev`` (``development=None``: only the
    production ones). A name in both is an error: one name, one process."""
    specs = parse_procfile(procfile.read_text())
    if development is not None and development.exists():
        extra = parse_procfile(development.read_text())
        clash = sorted({s.name for s in specs} & {s.name for s in extra})
        if clash:
            raise ValueError(f"{development.name} names processes the {procfile.name} has already: {', '.join(clash)}")
        specs += extra
    return specs


def select_processes(specs: list[ProcessSpec], names: Iterable[str]) -> list[ProcessSpec]:
    """The processes named (all when ``names`` is empty), in Procfile order."""
    names = list(names)
    known = {s.name for s in specs}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UnknownProcess(f"no such process in the Procfile or Procfile.dev: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
    return [s for s in specs if not names or s.name in names]
