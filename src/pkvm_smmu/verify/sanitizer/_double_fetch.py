"""Check 4: a hyp handler that reads the same host-controlled memory twice while handling one trap.

Between the hyp's ``trap.begin`` and ``trap.end`` trace markers, every EL2 read of RAM the host may
write (pages it owns, shared with the hyp or not) is remembered; a read overlapping an earlier one
is a double fetch: the host may change the memory between the two, so whatever the handler checked
in one copy need not hold in the other (the root of time-of-check/time-of-use bugs).

The hyp's command-queue emulation handles the host commands of one PROD write one after the other,
each on its own, from its copy to its verdict (``cmd.pass``/``cmd.rewrite``/``cmd.drop``): reading
the same memory again for the next command is what handling two commands means, so the
remembered reads start afresh after each verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pkvm_smmu.hyp.contracts import PageState
from pkvm_smmu.machine.bus import Access, InitiatorKind
from pkvm_smmu.machine.memory import PAGE_SHIFT
from pkvm_smmu.verify.sanitizer._context import RunContext
from pkvm_smmu.verify.sanitizer._report import Check, Location, SanitizerReport


class HostPages(Protocol):
    """Who controls memory (``MemProtect``)."""

    def host_can_access(self, pfn: int) -> bool: ...

    def host_state(self, pfn: int) -> PageState: ...


@dataclass
class _Trap:
    begin: Location
    device: str  # the SMMU (or other device) whose MMIO trapped
    reads: list[tuple[int, int, Location]] = field(default_factory=list)  # [start, end) and where
    reported: set[int] = field(default_factory=set)  # indexes of first reads already reported


class DoubleFetchCheck:
    def __init__(self, run: RunContext, pages: HostPages) -> None:
        self.run = run
        self.pages = pages
        self._trap: _Trap | None = None

    @property
    def current_trap(self) -> Location | None:
        return self._trap.begin if self._trap is not None else None

    def trap_begin(self, where: Location, device: str) -> None:
        self._trap = _Trap(where, device)

    def trap_end(self) -> None:
        self._trap = None

    def command_done(self) -> None:
        """The trapped handler is done with one host command: the next is a new unit of work."""
        if self._trap is not None:
            self._trap.reads.clear()
            self._trap.reported.clear()

    def read(self, access: Access, where: Location) -> None:
        trap = self._trap
        if trap is None or access.aborted or access.initiator.kind is not InitiatorKind.CPU_EL2:
            return
        start = access.address
        end = start + access.size
        pfns = range(start >> PAGE_SHIFT, ((end - 1) >> PAGE_SHIFT) + 1)
        controlled = [pfn for pfn in pfns if self.pages.host_can_access(pfn)]
        if not controlled:
            return
        for index, (first_start, first_end, first) in enumerate(trap.reads):
            if first_start < end and start < first_end and index not in trap.reported:
                trap.reported.add(index)
                low, high = max(start, first_start), min(end, first_end)
                state = self.pages.host_state(controlled[0]).value
                self.run.add(
                    SanitizerReport(
                        Check.DOUBLE_FETCH,
                        trap.device,
                        f"host memory {low:#x}+{high - low:#x} ({state})",
                        f"read again while handling one trap (first read at seq {first.seq}, "
                        f"{first.address:#x}+{first_end - first_start:#x}): the host may change it between",
                        where,
                        trap.begin,
                        "one copy of host memory per trap, checked and used from the copy",
                    )
                )
        trap.reads.append((start, end, where))


__all__ = ["DoubleFetchCheck", "HostPages"]
