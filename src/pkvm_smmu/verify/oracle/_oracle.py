"""``IsolationOracle``: after any step, every page some StreamID (or the SMMU itself) can reach
that the host may not access.

The oracle watches the bus: a write to a page it has read (a stream table, CD table or translation
table page) drops what it derived from that page, so ``check()`` after a step re-examines only what
the step changed; register, configuration-cache, TLB and ownership changes are noticed by
comparing small signatures. ``check_full()`` evaluates everything from scratch.

Writes that bypass the bus (a test poking ``bus.ram`` directly) are not seen by ``check()``;
``check_full()`` sees them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from pkvm_smmu.hyp.mem_protect import MemProtect
from pkvm_smmu.machine.bus import Access, SystemBus
from pkvm_smmu.machine.memory import PAGE_SHIFT
from pkvm_smmu.machine.smmu.device import SmmuV3
from pkvm_smmu.verify.oracle._evaluate import Evaluator
from pkvm_smmu.verify.oracle._items import Violation
from pkvm_smmu.verify.oracle._observed import AccessMonitor, ObservedViolation
from pkvm_smmu.verify.oracle._ownership import (
    DeclaredStructures,
    HostOwnership,
    NoHypervisor,
    OwnershipView,
    StructuresSource,
)


class _NoStructures:
    reads: tuple[tuple[int, int, str], ...] = ()
    writes: tuple[tuple[int, int, str], ...] = ()


class HypSmmu(Protocol):
    def smmu_structures(self) -> DeclaredStructures: ...


class HypSmmuDriver(Protocol):
    """A hyp SMMU driver (``SmmuV3HypDriver``, the pv drivers): the SMMU it took over at an MMIO
    base, which declares its own structures."""

    def smmu_at(self, mmio_base: int) -> HypSmmu | None: ...


def hyp_structures(driver: HypSmmuDriver, smmu: SmmuV3) -> StructuresSource:
    """What ``driver`` declares for the SMMU at ``smmu.base``, asked afresh at every check."""

    def structures() -> DeclaredStructures:
        hyp = driver.smmu_at(smmu.base)
        return hyp.smmu_structures() if hyp is not None else _NoStructures()

    return structures


class IsolationOracle:
    """Decides, for every StreamID and SubstreamID of ``smmus``, what physical memory is reachable
    and reports the parts the host may not access.

    ``ownership``: ``MemProtect`` (a pKVM design), any ``OwnershipView``, or None for ``native``
    (the host owns everything). ``declared``: per SMMU name, what the hyp has the SMMU read and
    write for itself. ``observe``: also record, as they happen, device and SMMU accesses to pages
    the host may not access (``observed``).
    """

    def __init__(
        self,
        bus: SystemBus,
        smmus: Sequence[SmmuV3],
        ownership: MemProtect | OwnershipView | None = None,
        declared: Mapping[str, StructuresSource] | None = None,
        *,
        observe: bool = False,
    ) -> None:
        self.bus = bus
        self.smmus = tuple(smmus)
        if isinstance(ownership, MemProtect):
            self.ownership: OwnershipView = HostOwnership(ownership)
        else:
            self.ownership = ownership if ownership is not None else NoHypervisor()
        self.declared = dict(declared or {})
        self._evaluator = Evaluator(bus, self.smmus, self.ownership, self.declared)
        self._watched = self._evaluator.memo.watched
        self._dirty: set[int] = set()
        bus.observers.append(self._on_access)
        self.monitor = AccessMonitor(bus, self.ownership, self.declared) if observe else None

    @classmethod
    def for_pkvm(
        cls,
        bus: SystemBus,
        smmus: Sequence[SmmuV3],
        mem_protect: MemProtect,
        driver: HypSmmuDriver,
        *,
        observe: bool = False,
    ) -> IsolationOracle:
        """The oracle of a pKVM system: host ownership from ``mem_protect``, and each SMMU's
        shadow stream table, shadow command queue and IOMMU pool as the hyp's driver declares them."""
        declared = {smmu.name: hyp_structures(driver, smmu) for smmu in smmus}
        return cls(bus, smmus, mem_protect, declared, observe=observe)

    def close(self) -> None:
        """Stop watching the bus and ownership."""
        if self._on_access in self.bus.observers:
            self.bus.observers.remove(self._on_access)
        if self.monitor is not None:
            self.monitor.close()
        self.ownership.close()

    # -- checks ----------------------------------------------------------------------------------------
    def check(self) -> list[Violation]:
        """Every reachable range the host may not access, re-examining only what changed since
        the last check."""
        if self._dirty:
            dirty, self._dirty = self._dirty, set()
            self._evaluator.memo.invalidate(dirty)
        if self.monitor is not None:
            self.monitor.refresh()
        return self._evaluator.check()

    def check_full(self) -> list[Violation]:
        """The same answer as ``check()``, computed from scratch (nothing cached is used)."""
        return Evaluator(self.bus, self.smmus, self.ownership, self.declared).check()

    @property
    def observed(self) -> list[ObservedViolation]:
        """Accesses seen so far that touched a page the host may not access (``observe=True``)."""
        return list(self.monitor.violations) if self.monitor is not None else []

    # -- the bus observer ---------------------------------------------------------------------------------
    def _on_access(self, access: Access) -> None:
        if not access.is_write or access.aborted:
            return
        address = access.address
        page = address >> PAGE_SHIFT
        watched = self._watched
        if page in watched:
            self._dirty.add(page)
        last = (address + access.size - 1) >> PAGE_SHIFT
        if last != page:
            self._dirty.update(p for p in range(page + 1, last + 1) if p in watched)


__all__ = ["HypSmmuDriver", "IsolationOracle", "hyp_structures"]
