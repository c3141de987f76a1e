"""The host stage-2 as the host's EL1 CPU sees it once pKVM has deprivileged the host.

A host access to a page the host may touch proceeds to the bus. An access to a non-memory page the
hypervisor owns (a donated MMIO page) is a data abort that ``handle_host_mem_abort`` offers to the
registered ``DataAbortHandler``s in order, the IOMMU driver first (v4 patch 12); the first that
handles it returns the emulated value and the host instruction is skipped. Anything else is a stage-2
fault reported back to the host.

In pKVM the abort reports the page (HPFAR) and patch 12 adds FAR[11:0]; the model has the full
address already, so the handlers get exactly the address the host used.
"""

from __future__ import annotations

from pkvm_smmu.hyp.contracts import DataAbortHandler
from pkvm_smmu.hyp.mem_protect import MemProtect
from pkvm_smmu.machine.cpu import CpuFault
from pkvm_smmu.machine.memory import PAGE_SHIFT
from pkvm_smmu.trace import TraceBus


class HostStage2:
    """A ``Stage2Hook`` for the host's EL1 ``CpuPort``."""

    def __init__(self, mem_protect: MemProtect, trace: TraceBus) -> None:
        self.mem_protect = mem_protect
        self.trace = trace
        self._handlers: list[DataAbortHandler] = []
        self._owner_map = mem_protect.host_blocked

    # -- data-abort handlers --------------------------------------------------------------------
    def add_data_abort_handler(self, handler: DataAbortHandler, *, first: bool = False) -> None:
        if first:
            self._handlers.insert(0, handler)
        else:
            self._handlers.append(handler)

    def remove_data_abort_handler(self, handler: DataAbortHandler) -> None:
        self._handlers = [existing for existing in self._handlers if existing is not handler]

    @property
    def data_abort_handlers(self) -> tuple[DataAbortHandler, ...]:
        return tuple(self._handlers)

    # -- Stage2Hook -----------------------------------------------------------------------------
    def handle(self, address: int, size: int, is_write: bool, value: int) -> int | CpuFault | None:
        owners = self._owner_map
        if not owners:
            return None
        pfn = address >> PAGE_SHIFT
        last = (address + max(size, 1) - 1) >> PAGE_SHIFT
        if pfn not in owners and (last == pfn or last not in owners):
            return None
        return self._abort(address, size, is_write, value, pfn if pfn in owners else last)

    def _abort(self, address: int, size: int, is_write: bool, value: int, pfn: int) -> int | CpuFault:
        mp = self.mem_protect
        owner = mp.owner_of(pfn)
        if owner.kind == "hyp" and not mp.is_memory(pfn):
            # Markers around the handling, so checkers can tell what one trap did (double fetches).
            self._mark("trap.begin", address, size, is_write)
            for handler in self._handlers:
                result = handler.handle_host_dabt(address, size, is_write, value)
                if result is not None:
                    if self.trace.enabled:
                        self.trace.emit(
                            "hyp",
                            "trap",
                            address=address,
                            size=size,
                            direction="write" if is_write else "read",
                            value=value if is_write else result,
                        )
                    self._mark("trap.end", address, size, is_write)
                    return 0 if is_write else result
            self._mark("trap.end", address, size, is_write)
            reason = f"stage-2 fault: MMIO page {pfn:#x} owned by hyp, access not handled"
        else:
            reason = f"stage-2 fault: page {pfn:#x} owned by {owner}"
        if self.trace.enabled:
            self.trace.emit(
                "hyp",
                "stage2-fault",
                address=address,
                size=size,
                direction="write" if is_write else "read",
                owner=str(owner),
            )
        return CpuFault(address, is_write, reason)

    def _mark(self, kind: str, address: int, size: int, is_write: bool) -> None:
        if self.trace.enabled:
            direction = "write" if is_write else "read"
            self.trace.emit("hyp", kind, address=address, size=size, direction=direction)

    def allows_bulk(self, address: int, length: int, is_write: bool) -> bool:
        owners = self._owner_map
        if not owners:
            return True
        first = address >> PAGE_SHIFT
        end = ((address + max(length, 1) - 1) >> PAGE_SHIFT) + 1
        if end - first <= len(owners):
            blocked = next((pfn for pfn in range(first, end) if pfn in owners), None)
        else:
            blocked = min((pfn for pfn in owners if first <= pfn < end), default=None)
        if blocked is None:
            return True
        if self.trace.enabled:
            self.trace.emit(
                "hyp",
                "stage2-fault",
                address=address,
                size=length,
                direction="write" if is_write else "read",
                owner=str(self.mem_protect.owner_of(blocked)),
                bulk=True,
            )
        return False
