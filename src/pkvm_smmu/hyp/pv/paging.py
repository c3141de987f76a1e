"""``pv-paging`` (RFC v2, Android's pKVM): the host allocates domains, attaches StreamIDs and maps
and unmaps pages by hypercall; the hyp fills the page tables from its pool, builds every STE (and
the CD of a stage-1 domain), and refcounts every page it maps for DMA so that no such page can be
donated or shared until it is unmapped and the SMMU TLBs no longer hold it.

Domain ids are the host's choice, 1 .. ``MAX_DOMAINS`` - 1 (and below the SMMUs' ASID/VMID width);
a stage-1 domain uses its id as ASID (VMID 0), a stage-2 domain as VMID. Domain 0 is the identity
domain (the shared identity stage-2), preallocated and not mappable by the host.

Memory: the identity stage-2, stream tables and queues come from the IOMMU pool carved out at boot
(ACK's atomic pool); domain page tables and CDs come from a pool that starts empty and that the host
tops up by donating pages when a hypercall returns -ENOMEM (RFC v2's memory requests).

Hypercalls and their errors (every one: -ENODEV before pKVM's IOMMU is up):

==================  =======================================  ========================================
hypercall           arguments                                result / errors
==================  =======================================  ========================================
``alloc_domain``    ``domain, type`` (ANY, S1, S2)           0; -EINVAL bad id or type, -EEXIST,
                                                             -ENOMEM (top up and retry)
``free_domain``     ``domain``                               0; -ENOENT, -EINVAL identity domain,
                                                             -EBUSY while StreamIDs are attached
``attach_dev``      ``domain, iommu, sid, pasid``            0; -ENODEV iommu, -EINVAL sid,
                                                             -EOPNOTSUPP pasid != 0, -ENOENT domain,
                                                             -ENOMEM, -ETIMEDOUT
``detach_dev``      ``domain, iommu, sid, pasid``            0; as attach, -EINVAL when the sid is
                                                             not attached to that domain
``map_pages``       ``domain, iova, paddr, pgsize,           bytes mapped; -ENOENT domain, -EINVAL
                    pgcount, prot``                          identity domain / prot / pgsize /
                                                             pgcount / alignment, -EOVERFLOW when a
                                                             range wraps 64 bits, -ERANGE beyond the
                                                             domain's IAS or the PA range, -EPERM /
                                                             -EBUSY pages the host may not map,
                                                             -EEXIST, -ENOMEM when nothing mapped
``unmap_pages``     ``domain, iova, pgsize, pgcount``        bytes unmapped (0 at a hole); argument
                                                             errors as map_pages
``iova_to_phys``    ``domain, iova``                         address, 0 unmapped; -ENOENT, -EINVAL
``topup_pool``      ``pfn, nr_pages``                        0; -EINVAL more than TOPUP_MAX_PAGES,
                                                             the donation's error
==================  =======================================  ========================================

map_pages takes the DMA references first (``host_use_dma``) and drops those of pages it did not map;
unmap_pages clears the PTEs, invalidates (TLBI + CMD_SYNC on every SMMU the domain is attached to),
and only then drops the references, so a page becomes donatable only once no TLB can reach it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pkvm_smmu.arch.pv_iommu_abi import (
    HVC_ALLOC_DOMAIN,
    HVC_ATTACH_DEV,
    HVC_DETACH_DEV,
    HVC_FREE_DOMAIN,
    HVC_IOVA_TO_PHYS,
    HVC_MAP_PAGES,
    HVC_TOPUP_POOL,
    HVC_UNMAP_PAGES,
    IDENTITY_DOMAIN_ID,
    IOMMU_NO_PASID,
    IOMMU_PROT_MASK,
    MAX_DOMAINS,
    TOPUP_MAX_PAGES,
    Caps,
    DomainType,
)
from pkvm_smmu.arch.vmsa import GRANULES
from pkvm_smmu.hyp.hypercalls import U64_MAX, Arg
from pkvm_smmu.hyp.pool import HypPool
from pkvm_smmu.hyp.pv.driver import Hypercall, PvIommu
from pkvm_smmu.hyp.pv.smmu import PvSmmuV3, abort_ste, s1_cd, s1_ste, s2_ste
from pkvm_smmu.machine.memory import PAGE_SHIFT, PAGE_SIZE, Ram
from pkvm_smmu.pgtable.config import PageTableConfig
from pkvm_smmu.pgtable.gather import IotlbGather
from pkvm_smmu.pgtable.prot import Prot
from pkvm_smmu.pgtable.table import IoPageTable, MapResult
from pkvm_smmu.trace import TraceBus

if TYPE_CHECKING:
    from pkvm_smmu.hyp.pkvm import Pkvm

_RW = int(Prot.READ | Prot.WRITE)


class TopUpPool:
    """The IOMMU's host pool (ACK ``iommu_host_pool``): empty at boot, grown by host donations; a
    ``PageAllocator`` for domain page tables and CDs. Each donation is a buddy ``HypPool``."""

    def __init__(self, ram: Ram, trace: TraceBus) -> None:
        self._ram = ram
        self._trace = trace
        self.chunks: list[HypPool] = []

    @property
    def granule_size(self) -> int:
        return PAGE_SIZE

    @property
    def free_pages_count(self) -> int:
        return sum(chunk.free_page_count for chunk in self.chunks)

    @property
    def pages_in_use(self) -> int:
        return sum(chunk.used_pages for chunk in self.chunks)

    def add(self, pfn: int, nr_pages: int) -> None:
        self.chunks.append(HypPool(pfn, nr_pages, ram=self._ram, name="iommu-host", trace=self._trace))

    def alloc_pages(self, count: int) -> int | None:
        for chunk in self.chunks:
            pa = chunk.alloc_pages(count)
            if pa is not None:
                return pa
        return None

    def alloc_page(self) -> int | None:
        return self.alloc_pages(1)

    def free_pages(self, pa: int, count: int) -> None:
        for chunk in self.chunks:
            if chunk.contains(pa):
                chunk.free_pages(pa, count)
                return
        raise ValueError(f"iommu host pool: {pa:#x} is not ours")

    def free_page(self, pa: int) -> None:
        self.free_pages(pa, 1)


class DomainPageTable(IoPageTable):
    """io-pgtable's ``map_pages``/``unmap_pages``: the page size is the host's, not re-chosen."""

    _forced_pgsize: int | None = None

    def map_pages(self, iova: int, paddr: int, pgsize: int, pgcount: int, prot: int) -> MapResult:
        self._forced_pgsize = pgsize
        try:
            return self.map(iova, paddr, pgsize * pgcount, prot)
        finally:
            self._forced_pgsize = None

    def unmap_pages(self, iova: int, pgsize: int, pgcount: int, gather: IotlbGather) -> int:
        self._forced_pgsize = pgsize
        try:
            return self.unmap(iova, pgsize * pgcount, gather)
        finally:
            self._forced_pgsize = None

    def _pgsize(self, iova: int, paddr: int, size: int) -> tuple[int, int]:
        forced = self._forced_pgsize
        if forced is None:
            return super()._pgsize(iova, paddr, size)
        return forced, size // forced


@dataclass(eq=False)
class PvDomain:
    """``struct kvm_hyp_iommu_domain``: its table (None for the identity domain) and who uses it."""

    domain_id: int
    stage: int  # 0 identity, 1 or 2
    table: DomainPageTable | None = None
    cd_pa: int | None = None
    endpoints: set[tuple[int, int]] = field(default_factory=set)  # (iommu, sid)

    @property
    def refs(self) -> int:
        """ACK's atomic refcount: 1 for the allocation, one per attached endpoint."""
        return 1 + len(self.endpoints)

    def smmus(self) -> set[int]:
        return {iommu for iommu, _ in self.endpoints}


class PvPagingIommu(PvIommu):
    design = "pv-paging"
    caps_flags = Caps.IDENTITY | Caps.BLOCKING | Caps.PAGING

    def __init__(self, pkvm: Pkvm) -> None:
        super().__init__(pkvm)
        self.host_pool = TopUpPool(self.pkvm.bus.ram, self.trace)
        self.domains: dict[int, PvDomain] = {}
        self._attached: dict[tuple[int, int], int] = {}  # (iommu, sid) -> domain id
        self.driver.extra_reads = self.host_pool_extent

    def host_pool_extent(self) -> tuple[tuple[int, int, str], ...]:
        """Where domain page tables and CDs may be: every page the host donated to the pool."""
        return tuple(
            (chunk.base_pfn << PAGE_SHIFT, chunk.nr_pages << PAGE_SHIFT, "IOMMU host pool")
            for chunk in self.host_pool.chunks
        )

    def hypercalls(self) -> list[Hypercall]:
        u64 = Arg.U64
        return [
            *super().hypercalls(),
            (HVC_ALLOC_DOMAIN, self.alloc_domain, (u64, u64)),
            (HVC_FREE_DOMAIN, self.free_domain, (u64,)),
            (HVC_ATTACH_DEV, self.attach_dev, (u64, u64, u64, u64)),
            (HVC_DETACH_DEV, self.detach_dev, (u64, u64, u64, u64)),
            (HVC_MAP_PAGES, self.map_pages, (u64, u64, u64, u64, u64, u64)),
            (HVC_UNMAP_PAGES, self.unmap_pages, (u64, u64, u64, u64)),
            (HVC_IOVA_TO_PHYS, self.iova_to_phys, (u64, u64)),
            (HVC_TOPUP_POOL, self.topup_pool, (Arg.PFN, Arg.NR_PAGES)),
        ]

    # -- geometry ----------------------------------------------------------------------------------
    def max_domains(self) -> int:
        bits = min((min(smmu.vmid_bits, smmu.asid_bits) for smmu in self.smmus), default=8)
        return min(MAX_DOMAINS, 1 << bits)

    def domain_config(self, stage: int) -> PageTableConfig | None:
        """4 KiB granule, IAS 48 (stage 1) or the smallest OAS (stage 2), the SMMUs' common page
        sizes; None without SMMUs or when they share no such table."""
        if not self.smmus:
            return None
        oas = min(smmu.oas for smmu in self.smmus)
        bitmap = -1
        for smmu in self.smmus:
            bitmap &= smmu.pgsize_bitmap
        if not bitmap & PAGE_SIZE:
            return None
        try:
            granule = GRANULES[PAGE_SIZE]
            base = PageTableConfig(stage=stage, granule=granule, ias=48 if stage == 1 else oas, oas=oas)
            return PageTableConfig(
                stage=stage,
                granule=granule,
                ias=base.ias,
                oas=oas,
                pgsize_bitmap=bitmap & base.pgsize_bitmap,
                coherent_walk=all(smmu.coherent for smmu in self.smmus),
            )
        except ValueError:
            return None

    def domain_pgsize_bitmap(self) -> int:
        config = self.domain_config(1)
        return config.pgsize_bitmap if config is not None else 0

    def domain_ias(self) -> int:
        config = self.domain_config(1)
        return config.ias if config is not None else 0

    # -- domains -----------------------------------------------------------------------------------
    def _domain(self, domain_id: int) -> PvDomain | None:
        if not self.iommu.initialized:
            return None
        if domain_id == IDENTITY_DOMAIN_ID and domain_id not in self.domains:
            self.domains[domain_id] = PvDomain(domain_id, 0)
        return self.domains.get(domain_id)

    def alloc_domain(self, domain_id: int, domain_type: int) -> int:
        if not self.iommu.initialized:
            return -errno.ENODEV
        if not IDENTITY_DOMAIN_ID < domain_id < self.max_domains():
            return -errno.EINVAL
        if domain_type not in tuple(DomainType):
            return -errno.EINVAL
        if domain_id in self.domains:
            return -errno.EEXIST
        stage = 2 if domain_type == DomainType.S2 else 1  # every taken-over SMMU has both stages
        config = self.domain_config(stage)
        if config is None:
            return -errno.EINVAL
        try:
            table = DomainPageTable(config, self.iommu.memory, self.host_pool)
        except MemoryError:
            return -errno.ENOMEM
        domain = PvDomain(domain_id, stage, table)
        if stage == 1:
            cd_pa = self.host_pool.alloc_page()
            if cd_pa is None:
                table.free_all()
                return -errno.ENOMEM
            domain.cd_pa = cd_pa
            self.iommu.memory.write_table(cd_pa, s1_cd(config, table.root, domain_id).to_bytes(64, "little"))
        self.domains[domain_id] = domain
        self.emit("domain.alloc", domain=domain_id, stage=stage, pgd=table.root)
        return 0

    def free_domain(self, domain_id: int) -> int:
        domain = self._domain(domain_id)
        if domain is None:
            return -errno.ENODEV if not self.iommu.initialized else -errno.ENOENT
        if domain.table is None:
            return -errno.EINVAL
        if domain.endpoints:
            return -errno.EBUSY
        table = domain.table
        # Nothing can walk the table any more (detach invalidated its tag), so what is still
        # mapped goes at once; its references drop like an unmap's.
        for run in list(table.walk_runs()):
            paddr = table.iova_to_phys(run.iova)
            if paddr is not None:
                self.mem_protect.host_unuse_dma(paddr >> PAGE_SHIFT, run.size >> PAGE_SHIFT)
        table.free_all()
        if domain.cd_pa is not None:
            self.host_pool.free_page(domain.cd_pa)
        del self.domains[domain_id]
        self.emit("domain.free", domain=domain_id)
        return 0

    # -- attach --------------------------------------------------------------------------------------
    def _endpoint(self, iommu_id: int, sid: int, pasid: int) -> PvSmmuV3 | int:
        smmu = self.smmu(iommu_id)
        if smmu is None:
            return -errno.ENODEV
        if not smmu.sid_valid(sid):
            return -errno.EINVAL
        if pasid != IOMMU_NO_PASID:
            return -errno.EOPNOTSUPP
        return smmu

    def _ste_for(self, domain: PvDomain) -> int | None:
        if domain.stage == 0:
            idmap = self.iommu.idmap
            return None if idmap is None else s2_ste(idmap.config, idmap.root, 0)
        assert domain.table is not None
        if domain.stage == 1:
            assert domain.cd_pa is not None
            return s1_ste(domain.cd_pa)
        return s2_ste(domain.table.config, domain.table.root, domain.domain_id)

    def attach_dev(self, domain_id: int, iommu_id: int, sid: int, pasid: int) -> int:
        smmu = self._endpoint(iommu_id, sid, pasid)
        if isinstance(smmu, int):
            return smmu
        domain = self._domain(domain_id)
        if domain is None:
            return -errno.ENOENT
        key = (iommu_id, sid)
        current = self._attached.get(key)
        if current == domain_id:
            return 0
        ste = self._ste_for(domain)
        if ste is None:
            return -errno.ENODEV
        ret = smmu.install_ste(sid, ste, f"attach_dev domain {domain_id}")
        if ret:
            return ret
        if current is not None:
            self._drop_endpoint(self.domains[current], smmu, sid)
        domain.endpoints.add(key)
        self._attached[key] = domain_id
        return 0

    def detach_dev(self, domain_id: int, iommu_id: int, sid: int, pasid: int) -> int:
        smmu = self._endpoint(iommu_id, sid, pasid)
        if isinstance(smmu, int):
            return smmu
        domain = self._domain(domain_id)
        if domain is None:
            return -errno.ENOENT
        if self._attached.get((iommu_id, sid)) != domain_id:
            return -errno.EINVAL
        ret = smmu.install_ste(sid, abort_ste(), f"detach_dev domain {domain_id}")
        if ret:
            return ret
        self._drop_endpoint(domain, smmu, sid)
        return 0

    def _drop_endpoint(self, domain: PvDomain, smmu: PvSmmuV3, sid: int) -> None:
        """After the StreamID left the domain: the SMMU may still cache the domain's translations
        under its tag, so they go now (a later unmap only invalidates where it is attached)."""
        key = (smmu.index, sid)
        domain.endpoints.discard(key)
        self._attached.pop(key, None)
        if domain.stage == 1:
            smmu.cfgi_cd(sid)
        if domain.stage and smmu.tlb_inv_all(domain.stage, domain.domain_id):
            self.iommu.warn("TLB invalidation on detach timed out", smmu=smmu.name, sid=sid)

    # -- map / unmap ---------------------------------------------------------------------------------
    def _check_range(self, domain: PvDomain, iova: int, pgsize: int, pgcount: int, paddr: int = 0) -> int:
        """The argument checks map and unmap share (ACK's, with an exact errno each)."""
        table = domain.table
        if table is None:
            return -errno.EINVAL
        config = table.config
        if pgsize <= 0 or pgsize & (pgsize - 1) or not pgsize & config.pgsize_bitmap or pgcount <= 0:
            return -errno.EINVAL
        size = pgsize * pgcount
        if size > U64_MAX or iova + size - 1 > U64_MAX or paddr + size - 1 > U64_MAX:
            return -errno.EOVERFLOW
        if iova + size > 1 << config.ias:
            return -errno.ERANGE
        if paddr + size > min(1 << config.oas, self.mem_protect.max_pfn << PAGE_SHIFT):
            return -errno.ERANGE
        if (iova | paddr) & (pgsize - 1):
            return -errno.EINVAL
        return 0

    def map_pages(self, domain_id: int, iova: int, paddr: int, pgsize: int, pgcount: int, prot: int) -> int:
        domain = self._domain(domain_id)
        if domain is None:
            return -errno.ENODEV if not self.iommu.initialized else -errno.ENOENT
        if prot & ~IOMMU_PROT_MASK or not prot & _RW:
            return -errno.EINVAL
        ret = self._check_range(domain, iova, pgsize, pgcount, paddr)
        if ret:
            return ret
        assert domain.table is not None
        size = pgsize * pgcount
        mp = self.mem_protect
        ret = mp.host_use_dma(paddr >> PAGE_SHIFT, size >> PAGE_SHIFT)
        if ret:
            return ret
        table = domain.table
        ptes, pages = table.pte_writes, table.pages_allocated
        mapped, error = table.map_pages(iova, paddr, pgsize, pgcount, prot)
        if mapped < size:
            # The host calls again for the rest (or unmaps what was done): no references for it.
            mp.host_unuse_dma((paddr + mapped) >> PAGE_SHIFT, (size - mapped) >> PAGE_SHIFT)
        self.emit(
            "map", domain=domain_id, iova=iova, paddr=paddr, size=size, mapped=mapped, error=error,
            pte_writes=table.pte_writes - ptes, table_pages=table.pages_allocated - pages,
        )  # fmt: skip
        return mapped if mapped else error

    def unmap_pages(self, domain_id: int, iova: int, pgsize: int, pgcount: int) -> int:
        domain = self._domain(domain_id)
        if domain is None:
            return -errno.ENODEV if not self.iommu.initialized else -errno.ENOENT
        ret = self._check_range(domain, iova, pgsize, pgcount)
        if ret:
            return ret
        table = domain.table
        assert table is not None
        size = pgsize * pgcount
        leaves = [(leaf.iova, leaf.size) for leaf in table.walk_leaves(iova, iova + size)]
        phys = {start: table.iova_to_phys(start) for start, _ in leaves}
        gather = IotlbGather()
        ptes, pages = table.pte_writes, table.pages_allocated
        unmapped = table.unmap_pages(iova, pgsize, pgcount, gather)
        if not unmapped:
            return 0
        # Clear, then invalidate and wait, then let the pages go: the order the design relies on.
        stage, tag = domain.stage, domain.domain_id
        failed = [
            index
            for index in sorted(domain.smmus())
            if self.smmus[index].tlb_inv_range(stage, tag, iova, unmapped, pgsize, True)
        ]
        if failed:
            # A device may still reach the pages: they keep their references (leaked, not donatable).
            self.iommu.warn("TLB invalidation on unmap timed out", domain=domain_id, smmus=failed)
        else:
            table.release_freed_tables(gather)
            for start, length in leaves:
                paddr = phys[start]
                if start >= iova and start + length <= iova + unmapped and paddr is not None:
                    self.mem_protect.host_unuse_dma(paddr >> PAGE_SHIFT, length >> PAGE_SHIFT)
        self.emit(
            "unmap", domain=domain_id, iova=iova, size=size, unmapped=unmapped,
            pte_writes=table.pte_writes - ptes, table_pages=table.pages_allocated - pages,
        )  # fmt: skip
        return unmapped

    def iova_to_phys(self, domain_id: int, iova: int) -> int:
        domain = self._domain(domain_id)
        if domain is None:
            return -errno.ENODEV if not self.iommu.initialized else -errno.ENOENT
        if domain.table is None:
            return -errno.EINVAL
        return domain.table.iova_to_phys(iova) or 0

    # -- memory ---------------------------------------------------------------------------------------
    def topup_pool(self, pfn: int, nr_pages: int) -> int:
        """The host gives pages for domain tables (after an -ENOMEM)."""
        if not self.iommu.initialized:
            return -errno.ENODEV
        if nr_pages > TOPUP_MAX_PAGES:
            return -errno.EINVAL
        ret = self.mem_protect.host_donate_hyp(pfn, nr_pages)
        if ret:
            return ret
        self.host_pool.add(pfn, nr_pages)
        self.emit("pool.topup", pfn=pfn, pages=nr_pages, free=self.host_pool.free_pages_count)
        return 0


__all__ = ["DomainPageTable", "PvDomain", "PvPagingIommu", "TopUpPool"]
