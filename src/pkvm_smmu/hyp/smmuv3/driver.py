"""The hyp SMMUv3 driver (``smmu_ops``, v4 patches 13-28): the ``KvmIommuOps`` behind the hyp
IOMMU core, over the array of SMMUs the host kernel described.

Typical use::

    driver = SmmuV3HypDriver([SmmuDescription("smmu0", 0x0900_0000, 0x20000)], policy="v4")
    pkvm.kvm_iommu_register_driver(KvmIommu(pkvm, driver))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pkvm_smmu.hyp.iommu.idmap import IommuCaps
from pkvm_smmu.hyp.pkvm import SMMUV3_L2_STE_PAGES, host_s2_pgtable_pages
from pkvm_smmu.hyp.smmuv3.device import HypSmmuV3, SmmuDescription
from pkvm_smmu.hyp.smmuv3.policy import V4Policy, make_policy
from pkvm_smmu.machine.memory import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from pkvm_smmu.hyp.iommu.core import KvmIommu


class SmmuV3HypDriver:
    """Every SMMU of the platform, taken over at ``init`` and emulated for the host."""

    def __init__(self, smmus: Sequence[SmmuDescription], policy: V4Policy | str = "v4") -> None:
        self.descriptions = tuple(smmus)
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.smmus: list[HypSmmuV3] = []
        self.iommu: KvmIommu | None = None

    # -- KvmIommuOps --------------------------------------------------------------------------------
    def pool_pages(self, iommu: KvmIommu) -> int:
        """Patch 14: the host stage-2's worth of table pages (the identity map) plus 500 for L2
        stream tables, when there is an SMMU at all; plus the shadow queue and stream table of any
        SMMU whose description brings no memory for them."""
        if not self.descriptions:
            return 0
        ram_pages = [region.size >> PAGE_SHIFT for region in iommu.bus.ram_regions()]
        pages = host_s2_pgtable_pages(ram_pages) + SMMUV3_L2_STE_PAGES
        for desc in self.descriptions:
            if desc.cmdq_pa is None:
                pages += -(-desc.cmdq_size // PAGE_SIZE)
            if desc.strtab_pa is None:
                pages += -(-desc.strtab_size // PAGE_SIZE)
        return pages

    def init(self, iommu: KvmIommu) -> int:
        """``smmu_init``: take over each SMMU; on a failure the ones already taken are handed back."""
        self.iommu = iommu
        smmus: list[HypSmmuV3] = []
        for desc in self.descriptions:
            smmu = HypSmmuV3(desc, iommu, self.policy)
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
        """``smmu_dabt_handler``: the SMMU whose MMIO holds ``address`` emulates the access."""
        for smmu in self.smmus:
            if smmu.contains(address):
                return smmu.handle_dabt(address - smmu.base, size, is_write, value)
        return None

    def smmu_at(self, mmio_base: int) -> HypSmmuV3 | None:
        """The SMMU taken over at ``mmio_base``, if any."""
        return next((smmu for smmu in self.smmus if smmu.base == mmio_base), None)

    def smmu(self, name: str) -> HypSmmuV3:
        for smmu in self.smmus:
            if smmu.name == name:
                return smmu
        raise KeyError(name)


__all__ = ["SmmuV3HypDriver"]
