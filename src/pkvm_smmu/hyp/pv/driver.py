"""What both paravirtual designs share: the hyp IOMMU driver over the SMMUs it owns outright
(``KvmIommuOps`` behind the hyp IOMMU core, so the pool, the identity stage-2 and its updates are the
core's), the SMMU array the trusted host fills at boot, and the hypercall plumbing.

Typical use (pKVM not yet initialised)::

    pv = PvIdentityIommu(pkvm)            # or PvPagingIommu
    pv.register()                         # kvm_iommu_register_driver + hypercalls
    pv.register_smmu("smmu0", base, size, coherent=True)   # the host half, at boot
    pkvm.init(); pkvm.finalise()          # take-over happens in kvm_iommu_init
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pkvm_smmu.arch.pv_iommu_abi import HVC_CAPS, Caps, CapsQuery
from pkvm_smmu.hyp.hypercalls import Arg
from pkvm_smmu.hyp.iommu.core import KvmIommu
from pkvm_smmu.hyp.iommu.idmap import IommuCaps
from pkvm_smmu.hyp.pkvm import SMMUV3_L2_STE_PAGES, host_s2_pgtable_pages
from pkvm_smmu.hyp.pv.smmu import COMPONENT, PvSmmuV3
from pkvm_smmu.hyp.smmuv3.device import SZ_128K, SmmuDescription
from pkvm_smmu.machine.memory import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from pkvm_smmu.hyp.pkvm import Pkvm

MAX_SMMUS = 8
# Per SMMU, from the IOMMU pool: command queue (16 pages), L1 stream table, event queue, slack.
PV_SMMU_POOL_PAGES = 32

Hypercall = tuple[str, Callable[..., int], tuple[Arg, ...]]


class PvSmmuDriver:
    """``KvmIommuOps`` of the paravirtual designs: the SMMUs are the hyp's alone."""

    def __init__(self) -> None:
        self.descriptions: list[SmmuDescription] = []
        self.smmus: list[PvSmmuV3] = []
        self.iommu: KvmIommu | None = None
        self.extra_reads: Callable[[], tuple[tuple[int, int, str], ...]] = tuple

    def pool_pages(self, iommu: KvmIommu) -> int:
        """Asked at carveout time, before the host described its SMMUs: the identity stage-2, L2
        stream tables (v4 patch 14's 500 pages) and room for the queues of ``MAX_SMMUS`` SMMUs."""
        ram_pages = [region.size >> PAGE_SHIFT for region in iommu.bus.ram_regions()]
        return host_s2_pgtable_pages(ram_pages) + SMMUV3_L2_STE_PAGES + MAX_SMMUS * PV_SMMU_POOL_PAGES

    def init(self, iommu: KvmIommu) -> int:
        self.iommu = iommu
        smmus: list[PvSmmuV3] = []
        for index, desc in enumerate(self.descriptions):
            smmu = PvSmmuV3(desc, iommu, index)
            smmu.extra_reads = self.extra_reads
            ret = smmu.init_device()
            if ret:
                for taken in reversed(smmus):
                    taken.deinit_device()
                return ret
            smmus.append(smmu)
        self.smmus = smmus
        return 0

    def iommu_caps(self) -> Sequence[IommuCaps]:
        return [smmu.caps() for smmu in self.smmus]

    def tlb_inv_identity(self, iova: int, size: int, granule: int, leaf: bool) -> None:
        for smmu in self.smmus:
            smmu.tlb_inv_identity(iova, size, granule, leaf)

    def handle_host_dabt(self, address: int, size: int, is_write: bool, value: int) -> int | None:
        """Declined: a host access to an SMMU page stays a stage-2 fault."""
        return None

    def smmu_at(self, base: int) -> PvSmmuV3 | None:
        """The taken-over SMMU whose registers are at ``base`` (for the isolation oracle)."""
        return next((smmu for smmu in self.smmus if smmu.base == base), None)


class PvIommu:
    """The hyp side of one paravirtual design; subclasses add their hypercalls."""

    design = ""
    caps_flags = Caps(0)

    def __init__(self, pkvm: Pkvm) -> None:
        self.pkvm = pkvm
        self.trace = pkvm.trace
        self.mem_protect = pkvm.mem_protect
        self.driver = PvSmmuDriver()
        self.iommu = KvmIommu(pkvm, self.driver)

    # -- boot (the host is still trusted) ------------------------------------------------------------
    def register(self) -> int:
        """``kvm_iommu_register_driver`` and the design's hypercalls."""
        ret = self.pkvm.kvm_iommu_register_driver(self.iommu)
        if ret:
            return ret
        for name, handler, spec in self.hypercalls():
            self.pkvm.hypercalls.register_hypercall(name, handler, spec)
        return 0

    def register_smmu(self, name: str, base: int, size: int, coherent: bool = True) -> int:
        """One entry of the SMMU array the host half fills from the device tree before pKVM
        initialises: its index (the ``iommu`` argument of the hypercalls), or -EPERM once the
        hyp has taken the SMMUs over, -EINVAL for a bad MMIO resource, -EEXIST for a second entry
        at the same address, -ENOSPC past ``MAX_SMMUS``."""
        if self.iommu.initialized or self.pkvm.state in ("finalised", "failed"):
            ret = -errno.EPERM
        elif base < 0 or size < SZ_128K or (base | size) & (PAGE_SIZE - 1):
            ret = -errno.EINVAL
        elif any(desc.mmio_base == base for desc in self.driver.descriptions):
            ret = -errno.EEXIST
        elif len(self.driver.descriptions) >= MAX_SMMUS:
            ret = -errno.ENOSPC
        else:
            ret = len(self.driver.descriptions)
            self.driver.descriptions.append(SmmuDescription(name, base, size, coherent))
        self.emit("register_smmu", name=name, base=base, size=size, result=ret)
        return ret

    @property
    def smmus(self) -> list[PvSmmuV3]:
        return self.driver.smmus

    def emit(self, kind: str, **fields: Any) -> None:
        if self.trace.enabled:
            self.trace.emit(COMPONENT, kind, design=self.design, **fields)

    def poll_events(self) -> int:
        """Drain every SMMU's event and global-error state; the number of SMMUs that had any."""
        return sum(int(smmu.handle_evtq_irq()) | int(smmu.handle_gerror_irq()) for smmu in self.smmus)

    # -- hypercalls ---------------------------------------------------------------------------------
    def hypercalls(self) -> list[Hypercall]:
        return [(HVC_CAPS, self.hvc_caps, (Arg.U64, Arg.U64))]

    def smmu(self, iommu_id: int) -> PvSmmuV3 | None:
        """The taken-over SMMU named by a hypercall, or None (not initialised, out of range)."""
        if not self.iommu.initialized or not 0 <= iommu_id < len(self.smmus):
            return None
        return self.smmus[iommu_id]

    def hvc_caps(self, iommu_id: int, what: int) -> int:
        """What the virtualized IOMMU offers: -ENODEV for no such IOMMU, -EINVAL for an unknown
        query."""
        smmu = self.smmu(iommu_id)
        if smmu is None:
            return -errno.ENODEV
        if what == CapsQuery.FLAGS:
            return int(self.caps_flags)
        if what == CapsQuery.PGSIZE_BITMAP:
            return self.domain_pgsize_bitmap()
        if what == CapsQuery.IAS:
            return self.domain_ias()
        return -errno.EINVAL

    def domain_pgsize_bitmap(self) -> int:
        return 0

    def domain_ias(self) -> int:
        return 0


__all__ = ["MAX_SMMUS", "PV_SMMU_POOL_PAGES", "Hypercall", "PvIommu", "PvSmmuDriver"]
