"""The hyp IOMMU core (v4 patches 09-12, 26-27): ``kvm_iommu_init``, the pool, the identity
stage-2 and the hooks pKVM calls.

``KvmIommu`` is what pKVM sees (``KvmIommuDriver``, ``HostOwnershipListener``,
``DataAbortHandler``); it runs one hardware driver (``KvmIommuOps``, the series' ``struct
kvm_iommu_ops``), here the SMMUv3 one. Boot order is the series': the driver's ``init`` takes the
hardware over, then the identity stage-2 is built from a snapshot of host ownership, and only then
do ownership changes reach it.

Choice where the series is ambiguous: as posted, ``kvm_iommu_snapshot_host_stage2`` sets the
"initialized" flag to ``!!ret``, i.e. only when the snapshot *failed*, so a working system would
never update the identity map after boot. The model follows the evident intent (updates on after a
successful snapshot); ``idmap_flag_as_posted=True`` reproduces the posted expression.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pkvm_smmu.hyp.iommu.idmap import IdentityStage2, IommuCaps, identity_config
from pkvm_smmu.hyp.iommu.pool import IommuPool
from pkvm_smmu.machine.bus import HYP_CPU
from pkvm_smmu.machine.memory import PAGE_SHIFT
from pkvm_smmu.pgtable.memory import BusTableMemory
from pkvm_smmu.pgtable.prot import Prot

if TYPE_CHECKING:
    from pkvm_smmu.hyp.pkvm import Pkvm

COMPONENT = "hyp.iommu"


class KvmIommuOps(Protocol):
    """``struct kvm_iommu_ops``: the hardware driver behind the core."""

    def pool_pages(self, iommu: KvmIommu) -> int:
        """Pages the driver wants in the IOMMU pool (called at carveout time, before ``init``)."""
        ...

    def init(self, iommu: KvmIommu) -> int:
        """Take the hardware over; 0 or a negative errno."""
        ...

    def iommu_caps(self) -> Sequence[IommuCaps]:
        """What each instance can walk, for the identity stage-2's configuration."""
        ...

    def tlb_inv_identity(self, iova: int, size: int, granule: int, leaf: bool) -> None:
        """Invalidate the identity stage-2 on every instance and wait for completion."""
        ...

    def handle_host_dabt(self, address: int, size: int, is_write: bool, value: int) -> int | None: ...


class KvmIommu:
    """The hyp IOMMU core of one pKVM instance; register it with ``Pkvm.kvm_iommu_register_driver``."""

    def __init__(self, pkvm: Pkvm, ops: KvmIommuOps, *, idmap_flag_as_posted: bool = False) -> None:
        self.pkvm = pkvm
        self.ops = ops
        self.trace = pkvm.trace
        self.bus = pkvm.bus
        self.mem_protect = pkvm.mem_protect
        self.cpu = pkvm.hyp_cpu  # EL2: no stage-2, reaches the SMMU registers and any memory
        self.memory = BusTableMemory(pkvm.bus, HYP_CPU)
        self.pool = IommuPool(None, self.memory, self.trace)
        self.idmap: IdentityStage2 | None = None
        self.idmap_flag_as_posted = idmap_flag_as_posted
        self.idmap_initialized = False  # kvm_idmap_initialized
        self.initialized = False

    # -- diagnostics ------------------------------------------------------------------------------
    def warn(self, message: str, component: str = COMPONENT, **fields: Any) -> None:
        """A ``WARN_ON`` of the series: reported, and the model carries on."""
        if self.trace.enabled:
            self.trace.emit(component, "warn", message=message, **fields)

    # -- KvmIommuDriver ---------------------------------------------------------------------------
    def kvm_iommu_pages(self) -> int:
        """The IOMMU pool's size, asked at carveout time (patch 11's per-driver hook)."""
        return self.ops.pool_pages(self)

    pool_pages = kvm_iommu_pages

    def init(self) -> int:
        """``kvm_iommu_init``: the pool, the driver's ``init``, then the identity stage-2 snapshot."""
        self.pool = IommuPool(self.pkvm.iommu_pool, self.memory, self.trace)
        ret = self.ops.init(self)
        if not ret:
            ret = self._init_idmap()
        if self.trace.enabled:
            self.trace.emit(COMPONENT, "init", result=ret, pool_pages=self.pool.pages_in_use)
        if ret:
            return ret
        self.initialized = True
        return 0

    def _init_idmap(self) -> int:
        config = identity_config(self.ops.iommu_caps())
        if config is None:
            self.warn("an IOMMU does not support PAGE_SIZE")
            return -errno.EINVAL
        try:
            idmap = IdentityStage2(
                config, self.memory, self.pool, self.trace, self.ops.tlb_inv_identity, self.warn
            )
        except MemoryError:
            return -errno.ENOMEM
        self.idmap = idmap
        # kvm_iommu_snapshot_host_stage2 (under host_mmu.lock: nothing changes ownership meanwhile).
        memory = [(region.base, region.end) for region in self.bus.ram_regions()]
        holes = [
            (pfn << PAGE_SHIFT, (pfn + count) << PAGE_SHIFT)
            for pfn, count, _owner in self.mem_protect.non_host_owned_ranges()
        ]
        ret = idmap.build(memory, holes)
        self.idmap_initialized = bool(ret) if self.idmap_flag_as_posted else not ret
        self.mem_protect.add_host_ownership_listener(self)
        return ret

    def pool_extent(self) -> tuple[tuple[int, int, str], ...]:
        """The IOMMU pool as ``(pa, size, what)``: every page of the identity stage-2 and of the
        driver's pool-backed shadow tables lies in it (what the SMMU may read for the hyp)."""
        pool = self.pkvm.iommu_pool
        if pool is None or not pool.nr_pages:
            return ()
        return ((pool.base_pfn << PAGE_SHIFT, pool.nr_pages << PAGE_SHIFT, "IOMMU pool"),)

    # -- HostOwnershipListener --------------------------------------------------------------------
    def host_access_changed(self, pfn: int, nr_pages: int, prot: Prot, is_mmio: bool) -> None:
        """``kvm_iommu_host_stage2_idmap``; ignored until the snapshot is in place."""
        if self.idmap_initialized and self.idmap is not None:
            self.idmap.host_access_changed(pfn, nr_pages, prot, is_mmio)

    # -- DataAbortHandler -------------------------------------------------------------------------
    def handle_host_dabt(self, address: int, size: int, is_write: bool, value: int) -> int | None:
        if not self.initialized:
            return None
        return self.ops.handle_host_dabt(address, size, is_write, value)


__all__ = ["KvmIommu", "KvmIommuOps"]
