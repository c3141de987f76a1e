"""Who may touch what: the host's view of page ownership, and what the hyp declares the SMMU may
access for the hyp's own purposes.

Every stream is the host's (it drives every device), so a device may reach what the host may
access. The SMMU may in addition read what the hyp declares it reads (shadow stream table, shadow
command queue, identity stage-2 tables) and write what the hyp declares it writes.
"""

from __future__ import annotations

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


class HostOwnership:
    """``MemProtect``'s host view, followed through its ownership listener."""

    def __init__(self, mem_protect: MemProtect) -> None:
        self.mem_protect = mem_protect
        self.version = 0
        mem_protect.add_host_ownership_listener(self)

    @property
    def blocked(self) -> Mapping[int, object]:
        return self.mem_protect.host_blocked

    def host_access_changed(self, pfn: int, nr_pages: int, prot: Prot, is_mmio: bool) -> None:
        self.version += 1

    def blocked_runs(self) -> Iterable[tuple[int, int, str]]:
        return ((pfn, count, str(owner)) for pfn, count, owner in self.mem_protect.non_host_owned_ranges())

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
