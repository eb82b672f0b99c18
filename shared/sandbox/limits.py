"""The bounds a sandbox child lives under, and how both sides measure a process's memory."""
from __future__ import annotations

import math
import resource
from dataclasses import dataclass

DEFAULT_CHILD_MAX_DOCUMENTS = 200
DEFAULT_CHILD_MAX_GROWTH_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What a child is made with; a call with other limits gets a child made with those.

    ``timeout_seconds``: wall-clock time for one document, a fork (and the job's import, when the parent
    did not preload it) included when a fresh child is needed. ``memory_bytes``: address space one
    document may add on top of what the child maps when the document arrives (the child starts as a copy
    of its parent, so an absolute limit would depend on the parent's own footprint). ``max_documents`` and
    ``max_growth_bytes``: when a child is retired (:mod:`shared.sandbox.pool`).
    """

    timeout_seconds: float
    memory_bytes: int
    max_documents: int = DEFAULT_CHILD_MAX_DOCUMENTS
    max_growth_bytes: int = DEFAULT_CHILD_MAX_GROWTH_BYTES

    def __post_init__(self) -> None:
        # At least one document per child and one byte of growth: zero would mean "never reuse" twice.
        object.__setattr__(self, "max_documents", max(1, self.max_documents))
        object.__setattr__(self, "max_growth_bytes", max(1, self.max_growth_bytes))

    @property
    def cpu_seconds_per_document(self) -> int:
        return max(1, math.ceil(self.timeout_seconds) + 1)


def statm(pid: int | str) -> tuple[int, int] | None:
    """Mapped bytes and anonymous resident bytes (resident minus file-backed: what the process itself
    allocated and touched, not the libraries' file pages it faults in) of a process, from Linux
    ``/proc``; ``None`` where unknown."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as file:
            fields = file.read().split()
        page = resource.getpagesize()
        return int(fields[0]) * page, (int(fields[1]) - int(fields[2])) * page
    except (OSError, ValueError, IndexError):
        return None
