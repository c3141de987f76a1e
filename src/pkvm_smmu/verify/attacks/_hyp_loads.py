"""A watcher the adversary's tools lacked: hyp loads from RAM the hyp was never given.

pKVM's hyp maps only what it owns or what the host shared with it, so an EL2 load from a page in
NOPAGE state for the hyp is the hyp following a host-controlled pointer into memory it may not
use (a guest's or one never shared and pinned). The oracle watches the SMMU and devices, not the
hyp's own CPU, hence this bus observer.
"""

from __future__ import annotations

from dataclasses import dataclass

from pkvm_smmu.hyp.contracts import PageState
from pkvm_smmu.hyp.mem_protect import MemProtect
from pkvm_smmu.machine.bus import Access, InitiatorKind, SystemBus
from pkvm_smmu.machine.memory import PAGE_SHIFT


@dataclass(frozen=True)
class HypLoad:
    """One hyp load from a page the hyp has no mapping of."""

    address: int
    size: int
    owner: str

    @property
    def signature(self) -> str:
        return f"observed:hyp:read:{self.owner.rstrip('0123456789') or self.owner}"

    def __str__(self) -> str:
        return (
            f"the hyp read {self.size} bytes at {self.address:#x}: page {self.address >> PAGE_SHIFT:#x} "
            f"is owned by {self.owner} and not shared with the hyp"
        )


class HypLoadWatcher:
    """Records EL2 loads from RAM pages whose hyp state is NOPAGE."""

    def __init__(self, bus: SystemBus, mem_protect: MemProtect) -> None:
        self.bus = bus
        self.mem_protect = mem_protect
        self.loads: list[HypLoad] = []
        bus.observers.append(self._observe)

    def _observe(self, access: Access) -> None:
        if access.is_write or access.aborted or access.initiator.kind is not InitiatorKind.CPU_EL2:
            return
        if not self.bus.is_ram(access.address):
            return
        pfn = access.address >> PAGE_SHIFT
        if self.mem_protect.hyp_state(pfn) is PageState.NOPAGE:
            self.loads.append(HypLoad(access.address, access.size, str(self.mem_protect.owner_of(pfn))))

    def take(self) -> list[HypLoad]:
        loads, self.loads = self.loads, []
        return loads

    def close(self) -> None:
        if self._observe in self.bus.observers:
            self.bus.observers.remove(self._observe)


__all__ = ["HypLoad", "HypLoadWatcher"]
