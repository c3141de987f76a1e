"""Who may touch what: the host's view of page ownership, and what the hyp declares the SMMU may
access for the hyp's own purposes.

Every stream is the host's (it drives every device), so a device may reach what the host may
access. The SMMU may in addition read what the hyp declares it reads (shadow stream table, shadow
command queue, identity stage-2 tables) and write what the hyp declares it writes.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from pkvm_smmu.hyp.mem_protect import MemProtect
from pkvm_smmu.machine.memory import PAGE_SHIFT
from pkvm_smmu.pgtable.prot import Prot


class OwnershipView(Protocol):
    """Pages the host may not access, and a counter that changes whenever they change."""

    @property
    def version(self) -> int: ...

    @property
    def blocked(self) -> Mapping[int, object]:
        """Live view: pfn -> owner for every page the host may not access."""
        ...

    def blocked_runs(self) -> Iterable[tuple[int, int, str]]:
        """(first pfn, number of pages, owner name) runs, in address order."""
        ...

    def close(self) -> None: ...


class _PageRuns:
    """Disjoint, sorted ``(first pfn, end pfn, owner)`` runs, edited in place."""

    def __init__(self, runs: Iterable[tuple[int, int, str]]) -> None:
        self.runs: list[tuple[int, int, str]] = []
        for pfn, count, owner in runs:
            self.set(pfn, pfn + count, owner)

    @property
    def pages(self) -> int:
        return sum(end - start for start, end, _ in self.runs)

    def set(self, start: int, end: int, owner: str | None) -> None:
        """Pages ``[start, end)`` become ``owner``'s (None: the host's, so not in any run)."""
        runs = self.runs
        starts = [run[0] for run in runs]
        first = bisect.bisect_right(starts, start) - 1
        if first < 0 or runs[first][1] <= start:
            first += 1
        last = bisect.bisect_left(starts, end)
        replacement: list[tuple[int, int, str]] = []
        if first < last and runs[first][0] < start:
            replacement.append((runs[first][0], start, runs[first][2]))
        if owner is not None:
            replacement.append((start, end, owner))
        if first < last and runs[last - 1][1] > end:
            replacement.append((end, runs[last - 1][1], runs[last - 1][2]))
        # Join the neighbours where the same owner continues.
        lo, hi = max(first - 1, 0), min(last + 1, len(runs))
        merged: list[tuple[int, int, str]] = []
        for run in (*runs[lo:first], *replacement, *runs[last:hi]):
            if merged and merged[-1][1] == run[0] and merged[-1][2] == run[2]:
                merged[-1] = (merged[-1][0], run[1], run[2])
            else:
                merged.append(run)
        runs[lo:hi] = merged


class HostOwnership:
    """``MemProtect``'s host view, followed through its ownership listener (kept as runs, so a
    change costs what it changes, not a sort of every page the host lost)."""

    def __init__(self, mem_protect: MemProtect) -> None:
        self.mem_protect = mem_protect
        self.version = 0
        self._runs = self._rebuild()
        mem_protect.add_host_ownership_listener(self)

    def _rebuild(self) -> _PageRuns:
        return _PageRuns(
            (pfn, count, str(owner)) for pfn, count, owner in self.mem_protect.non_host_owned_ranges()
        )

    @property
    def blocked(self) -> Mapping[int, object]:
        return self.mem_protect.host_blocked

    def host_access_changed(self, pfn: int, nr_pages: int, prot: Prot, is_mmio: bool) -> None:
        self.version += 1
        owner = None if prot else str(self.mem_protect.owner_of(pfn))
        self._runs.set(pfn, pfn + nr_pages, owner)

    def blocked_runs(self) -> Iterable[tuple[int, int, str]]:
        if self._runs.pages != self.mem_protect.non_host_owned_count():
            self._runs = self._rebuild()  # a change that bypassed the listener
        return ((start, end - start, owner) for start, end, owner in self._runs.runs)

    def close(self) -> None:
        self.mem_protect.remove_host_ownership_listener(self)


class NoHypervisor:
    """The ``native`` design: the host owns everything, there is nothing to protect."""

    version = 0
    blocked: Mapping[int, object] = {}

    def blocked_runs(self) -> Iterable[tuple[int, int, str]]:
        return ()

    def close(self) -> None:
        pass


class DeclaredStructures(Protocol):
    """What the hyp has one SMMU access for itself (``hyp.smmuv3.SmmuStructures``)."""

    @property
    def reads(self) -> Sequence[tuple[int, int, str]]: ...

    @property
    def writes(self) -> Sequence[tuple[int, int, str]]: ...


# Asked at every check: the hyp may allocate structures at any time.
StructuresSource = Callable[[], DeclaredStructures]


def page_runs(runs: Iterable[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """(pfn, pages, owner) -> (start, end, owner) byte ranges."""
    return [(pfn << PAGE_SHIFT, (pfn + count) << PAGE_SHIFT, owner) for pfn, count, owner in runs]


__all__ = [
    "DeclaredStructures",
    "HostOwnership",
    "NoHypervisor",
    "OwnershipView",
    "StructuresSource",
    "page_runs",
]
