"""The IOMMU-core-facing half of the driver: masters (``arm_smmu_master``), CD tables, the
identity/blocked/paging/nested domains and attach (``arm_smmu_attach_dev`` with its
prepare/install/commit sequence), map/unmap through io-pgtable, and TLB/ATC invalidation.

Every STE and CD change goes through ``entry.write_entry`` (CFGI + CMD_SYNC after each step that
changed the entry)."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pkvm_smmu.arch.commands import Opcode, build_command
from pkvm_smmu.arch.strtab import CD, CD_SIZE, L1CD, STE, Eats, S1Dss, S1Fmt, SteConfig
from pkvm_smmu.arch.vmsa import GRANULES
from pkvm_smmu.host.arm_smmu_v3.cd import make_s1_cd
from pkvm_smmu.host.arm_smmu_v3.features import (
    CTXDESC_L2_ENTRIES,
    CTXDESC_LINEAR_CDMAX,
    CTXDESC_SPLIT,
    IOMMU_NO_PASID,
    PAGE_SHIFT,
    Feat,
)
from pkvm_smmu.host.arm_smmu_v3.mmio import fault_to_errno
from pkvm_smmu.host.arm_smmu_v3.queue import CmdqBatch, atc_inv_cmd, tlb_inv_range_cmds
from pkvm_smmu.host.arm_smmu_v3.ste import (
    VSTE_ALLOWED,
    CdTableCfg,
    make_abort_ste,
    make_bypass_ste,
    make_cdtable_ste,
    make_nested_domain_ste,
    make_s2_domain_ste,
)
from pkvm_smmu.host.iommu.ops import (
    DomainType,
    IommuCap,
    IommuDomain,
    IommuFwspec,
    IommuResvRegion,
    ResvType,
)
from pkvm_smmu.pgtable.config import PageTableConfig
from pkvm_smmu.pgtable.gather import IotlbGather
from pkvm_smmu.pgtable.prot import Prot
from pkvm_smmu.pgtable.table import IoPageTable
from pkvm_smmu.smmu_lib.entry import CdWriterOps, to_words, write_entry

if TYPE_CHECKING:
    from pkvm_smmu.host.arm_smmu_v3.device import ArmSmmuDevice, DmaMemory

MSI_IOVA_BASE = 0x0800_0000  # the software-managed MSI window every domain reserves
MSI_IOVA_LENGTH = 0x10_0000
VA_BITS = 48  # the kernel's VA size, which caps stage-1 input addresses (Linux: min(ias, VA_BITS))
MAX_TLBI_OPS_SHIFT = 3  # arm_smmu_inv_size_too_big: 1 << (log2(granule) - 3) commands at most


def dev_name(dev: Any) -> str:
    name = getattr(dev, "name", None)
    return str(name) if name else repr(dev)


# -- CD tables ------------------------------------------------------------------------------------


@dataclass
class CdTable:
    """``arm_smmu_ctx_desc_cfg``: a master's CD table, linear or two-level with 64 KiB leaves."""

    cdtab_dma: int = 0
    s1fmt: int = S1Fmt.LINEAR
    s1cdmax: int = 0
    num_ents: int = 0  # CDs (linear) or L1CDs (two-level)
    l2: dict[int, int] = field(default_factory=dict)  # L1 index -> leaf table PA
    used_ssids: int = 0
    in_ste: bool = False

    @property
    def allocated(self) -> bool:
        return self.cdtab_dma != 0

    @property
    def table_bytes(self) -> int:
        return self.num_ents * (CD_SIZE if self.s1fmt == S1Fmt.LINEAR else 8)

    def cfg(self) -> CdTableCfg:
        return CdTableCfg(self.cdtab_dma, self.s1fmt, self.s1cdmax)


class Master:
    """``arm_smmu_master``: one device behind the SMMU and its StreamIDs."""

    def __init__(self, smmu: ArmSmmuDevice, dev: Any, sids: Sequence[int]) -> None:
        self.smmu = smmu
        self.dev = dev
        self.dev_name = dev_name(dev)
        self.streams = list(sids)
        self.ssid_bits = 0
        self.stall_enabled = False
        self.ats_enabled = False
        self.ste_ats_enabled = False
        self.cd_table = CdTable()
        self.domain: IommuDomain | None = None  # what is attached to the RID

    def unique_sids(self) -> list[int]:
        """Bridged PCI devices can repeat an ID; each STE is written once."""
        return list(dict.fromkeys(self.streams))


class CdWriter(CdWriterOps):
    """CD writer: 64-bit stores into the CD, sync = CFGI_CD(ssid, leaf) for every StreamID."""

    def __init__(self, master: Master, ssid: int, address: int) -> None:
        self.master = master
        self.ssid = ssid
        self.address = address
        self.syncs = 0

    def write_qword(self, index: int, value: int) -> None:
        self.master.smmu.mmio.write_u64(self.address + 8 * index, value)

    def sync(self) -> None:
        self.syncs += 1
        sync_cd(self.master, self.ssid, True)


def sync_cd(master: Master, ssid: int, leaf: bool) -> int:
    smmu = master.smmu
    assert smmu.cmdq is not None
    batch = smmu.cmdq.batch()
    for sid in master.streams:
        batch.add(build_command(Opcode.CFGI_CD, SID=sid, SSID=ssid, LEAF=int(leaf)))
    return batch.submit()


def alloc_cd_tables(master: Master) -> int:
    smmu = master.smmu
    table = master.cd_table
    table.s1cdmax = master.ssid_bits
    max_contexts = 1 << table.s1cdmax
    if not smmu.features & Feat.TWO_LVL_CDTAB or max_contexts <= CTXDESC_L2_ENTRIES:
        table.s1fmt = S1Fmt.LINEAR
        table.num_ents = max_contexts
    else:
        table.s1fmt = S1Fmt.TWO_LEVEL_64K
        table.num_ents = -(-max_contexts // CTXDESC_L2_ENTRIES)
    pa = smmu.mm.dma_alloc_coherent(table.table_bytes)
    if pa is None:
        smmu.dev_warn("failed to allocate context descriptor table")
        return -errno.ENOMEM
    table.cdtab_dma = pa
    return 0


def free_cd_tables(master: Master) -> None:
    smmu = master.smmu
    table = master.cd_table
    for l2 in table.l2.values():
        smmu.mm.dma_free_coherent(l2, CTXDESC_L2_ENTRIES * CD_SIZE)
    if table.allocated:
        smmu.mm.dma_free_coherent(table.cdtab_dma, table.table_bytes)
    master.cd_table = CdTable()


def get_cd_ptr(master: Master, ssid: int) -> int | None:
    table = master.cd_table
    if not table.allocated:
        return None
    if table.s1fmt == S1Fmt.LINEAR:
        return table.cdtab_dma + ssid * CD_SIZE
    l2 = table.l2.get(ssid >> CTXDESC_SPLIT)
    return None if l2 is None else l2 + (ssid & (CTXDESC_L2_ENTRIES - 1)) * CD_SIZE


def alloc_cd_ptr(master: Master, ssid: int) -> int | None:
    """The CD slot for ``ssid``, allocating the table (and its leaf) on first use."""
    table = master.cd_table
    if not table.allocated and alloc_cd_tables(master):
        return None
    if table.s1fmt == S1Fmt.TWO_LEVEL_64K:
        idx = ssid >> CTXDESC_SPLIT
        if idx not in table.l2:
            l2 = master.smmu.mm.dma_alloc_coherent(CTXDESC_L2_ENTRIES * CD_SIZE)
            if l2 is None:
                return None
            table.l2[idx] = l2
            master.smmu.mmio.write_u64(
                table.cdtab_dma + idx * 8, L1CD.encode(V=1) | L1CD.L2PTR.insert_address(l2)
            )
            sync_cd(master, ssid, False)  # an invalid L1CD may be cached
    return get_cd_ptr(master, ssid)


def write_cd_entry(master: Master, ssid: int, address: int, target: int) -> None:
    cur = CD.from_bytes(master.smmu.mmio.read_mem(address, CD_SIZE))
    if ssid != IOMMU_NO_PASID and bool(CD.V.get(cur)) != bool(CD.V.get(target)):
        master.cd_table.used_ssids += -1 if CD.V.get(cur) else 1
    writer = CdWriter(master, ssid, address)
    write_entry(writer, to_words(cur), to_words(target))
    master.smmu.emit("cd.write", dev=master.dev_name, ssid=ssid, cd=CD.pretty(target), syncs=writer.syncs)


def clear_cd(master: Master, ssid: int) -> None:
    if not master.cd_table.allocated:
        return
    address = get_cd_ptr(master, ssid)
    if address is not None:
        write_cd_entry(master, ssid, address, 0)


def ssids_in_use(table: CdTable) -> bool:
    return table.used_ssids > 0


# -- STE installation and ATS ---------------------------------------------------------------------


def install_ste_for_dev(master: Master, target: int) -> int:
    master.cd_table.in_ste = bool(STE.V.get(target)) and STE.CONFIG.get(target) == SteConfig.S1_TRANS
    master.ste_ats_enabled = STE.EATS.get(target) == Eats.TRANS
    ret = 0
    for sid in master.unique_sids():
        ret = master.smmu.write_ste(sid, target) or ret
    return ret


def ats_supported(master: Master) -> bool:
    """IDR0.ATS and a PCI function with an ATS capability behind an ATS-capable root complex."""
    if not master.smmu.features & Feat.ATS:
        return False
    fwspec = getattr(master.dev, "iommu_fwspec", None)
    if fwspec is not None and getattr(fwspec, "pci_rc_ats", True) is False:
        return False
    return bool(getattr(master.dev, "ats_supported", False))


def atc_inv_master(master: Master, ssid: int) -> int:
    smmu = master.smmu
    assert smmu.cmdq is not None
    batch = smmu.cmdq.batch()
    for sid in master.streams:
        batch.add(atc_inv_cmd(sid, ssid, 0, 0))
    return batch.submit()


def enable_ats(master: Master) -> None:
    smmu = master.smmu
    stu = (smmu.pgsize_bitmap & -smmu.pgsize_bitmap).bit_length() - 1  # smallest translation unit
    atc_inv_master(master, IOMMU_NO_PASID)  # ATC_INV of PASID 0 flushes the whole ATC
    enable = getattr(master.dev, "pci_enable_ats", None)
    if enable is not None and enable(stu):
        smmu.dev_err("Failed to enable ATS", dev=master.dev_name, stu=stu)


def disable_ats(master: Master) -> None:
    disable = getattr(master.dev, "pci_disable_ats", None)
    if disable is not None:
        disable()


@dataclass
class AttachState:
    """``arm_smmu_attach_state``."""

    master: Master
    old_domain: IommuDomain | None
    ssid: int = IOMMU_NO_PASID
    cd_needs_ats: bool = False
    ats_enabled: bool = False


def attach_prepare(state: AttachState, new_domain: IommuDomain) -> None:
    """Decide EATS, put the master on the new domain's invalidation list before the hardware
    changes, and turn ATS off at the device first if it is going away."""
    master = state.master
    tracked = new_domain if isinstance(new_domain, ArmSmmuDomain) else None
    if isinstance(new_domain, ArmSmmuNestedDomain):
        tracked = new_domain.parent
    if tracked is not None or state.cd_needs_ats:
        # EATS only with page tables: bypass/abort STEs refuse ATS traffic anyway.
        state.ats_enabled = ats_supported(master)
    if tracked is not None:
        if state.ats_enabled:
            tracked.nr_ats_masters += 1
        tracked.master_domains.append((master, state.ssid))
    if not state.ats_enabled and master.ats_enabled:
        disable_ats(master)


def attach_commit(state: AttachState) -> None:
    master = state.master
    if state.ats_enabled and not master.ats_enabled:
        enable_ats(master)
    elif state.ats_enabled and master.ats_enabled:
        atc_inv_master(master, state.ssid)  # the translation changed
    elif master.ats_enabled:
        atc_inv_master(master, IOMMU_NO_PASID)  # ATS switched off: flush everything
    was_ats = master.ats_enabled
    master.ats_enabled = state.ats_enabled
    old = state.old_domain
    tracked = old.parent if isinstance(old, ArmSmmuNestedDomain) else old
    if isinstance(tracked, ArmSmmuDomain):
        tracked.remove_master(master, state.ssid, was_ats)


# -- domains --------------------------------------------------------------------------------------


class ArmSmmuStaticDomain(IommuDomain):
    """The identity (bypass STE) and blocked (abort STE) domains."""

    def __init__(self, ops: ArmSmmuIommuOps, domain_type: DomainType) -> None:
        super().__init__(domain_type)
        self.ops = ops

    @fault_to_errno()
    def attach_dev(self, dev: Any) -> int:
        master = self.ops.master_of(dev)
        if master is None:
            return -errno.ENODEV
        smmu = master.smmu
        identity = self.type is DomainType.IDENTITY
        ste = make_bypass_ste(smmu.features) if identity else make_abort_ste()
        s1dss = S1Dss.BYPASS if identity else S1Dss.TERMINATE
        state = AttachState(master, master.domain)
        if ssids_in_use(master.cd_table):
            # PASIDs keep their CD table; the RID gets identity/blocked through S1DSS.
            state.cd_needs_ats = True
            attach_prepare(state, self)
            ste = make_cdtable_ste(master.cd_table.cfg(), smmu.features, state.ats_enabled, s1dss)
        else:
            attach_prepare(state, self)
        ret = install_ste_for_dev(master, ste)
        attach_commit(state)
        master.domain = self
        clear_cd(master, IOMMU_NO_PASID)
        return ret


class ArmSmmuDomain(IommuDomain):
    """A paging domain: stage 1 (ASID, CD) when the SMMU has it, else stage 2 (VMID)."""

    STAGE1 = 1
    STAGE2 = 2

    def __init__(self, ops: ArmSmmuIommuOps, *, nest_parent: bool = False) -> None:
        super().__init__(DomainType.UNMANAGED)
        self.ops = ops
        self.smmu: ArmSmmuDevice | None = None
        self.stage = self.STAGE2 if nest_parent else self.STAGE1
        self.nest_parent = nest_parent
        self.pgtbl: IoPageTable | None = None
        self.asid = 0
        self.vmid = 0
        self.master_domains: list[tuple[Master, int]] = []
        self.nr_ats_masters = 0

    # -- finalise (arm_smmu_domain_finalise) ---------------------------------------------------
    def finalise(self, smmu: ArmSmmuDevice) -> int:
        if not smmu.features & Feat.TRANS_S1:
            self.stage = self.STAGE2
        if not smmu.features & Feat.TRANS_S2:
            if self.nest_parent:
                return -errno.EOPNOTSUPP
            self.stage = self.STAGE1
        if self.stage == self.STAGE1:
            ias = 52 if smmu.features & Feat.VAX else 48
            cfg = _pgtable_config(smmu, 1, min(ias, VA_BITS), smmu.ias)
        else:
            cfg = _pgtable_config(smmu, 2, smmu.ias, smmu.oas)
        if cfg is None:
            return -errno.EINVAL
        memory = smmu.pgtable_memory
        if memory is None:
            return -errno.ENODEV
        allocator = smmu.pgtable_allocator
        if allocator is None or allocator.granule_size != cfg.granule.size:
            allocator = DmaPageAllocator(smmu.mm, cfg.granule.size)
        try:
            pgtbl = IoPageTable(cfg, memory, allocator, flush_ops=self)
        except MemoryError:
            return -errno.ENOMEM
        ret = self._alloc_id(smmu)
        if ret:
            pgtbl.free_all()
            return ret
        self.pgtbl = pgtbl
        self.pgsize_bitmap = cfg.pgsize_bitmap
        self.aperture_end = (1 << cfg.ias) - 1
        self.smmu = smmu
        smmu.emit(
            "domain.finalise",
            stage=self.stage,
            asid=self.asid,
            vmid=self.vmid,
            ias=cfg.ias,
            oas=cfg.oas,
            granule=cfg.granule.size,
            root=pgtbl.root,
        )
        return 0

    def _alloc_id(self, smmu: ArmSmmuDevice) -> int:
        if self.stage == self.STAGE1:
            free = _lowest_free(smmu.asid_map, 1, (1 << smmu.asid_bits) - 1)
            if free is None:
                return -errno.ENOSPC
            smmu.asid_map.add(free)
            self.asid = free
        else:
            # VMID 0 is kept for stage-2-bypass (stage-1-only) STEs.
            free = _lowest_free(smmu.vmid_map, 1, (1 << smmu.vmid_bits) - 1)
            if free is None:
                return -errno.ENOSPC
            smmu.vmid_map.add(free)
            self.vmid = free
        return 0

    def remove_master(self, master: Master, ssid: int, was_ats: bool) -> None:
        if (master, ssid) in self.master_domains:
            self.master_domains.remove((master, ssid))
            if was_ats:
                self.nr_ats_masters -= 1

    # -- attach (arm_smmu_attach_dev) -------------------------------------------------------------
    @fault_to_errno()
    def attach_dev(self, dev: Any) -> int:
        master = self.ops.master_of(dev)
        if master is None:
            return -errno.ENOENT
        smmu = master.smmu
        if self.smmu is None:
            ret = self.finalise(smmu)
            if ret:
                return ret
        elif self.smmu is not smmu:
            return -errno.EINVAL
        assert self.pgtbl is not None
        cdptr = None
        if self.stage == self.STAGE1:
            cdptr = alloc_cd_ptr(master, IOMMU_NO_PASID)
            if cdptr is None:
                return -errno.ENOMEM
        elif ssids_in_use(master.cd_table):
            return -errno.EBUSY
        state = AttachState(master, master.domain)
        attach_prepare(state, self)
        if self.stage == self.STAGE1:
            assert cdptr is not None
            cd = make_s1_cd(self.asid, self.pgtbl.config, self.pgtbl.root, stall_enabled=master.stall_enabled)
            write_cd_entry(master, IOMMU_NO_PASID, cdptr, cd)
            ste = make_cdtable_ste(
                master.cd_table.cfg(), smmu.features, state.ats_enabled, S1Dss.SSID0,
                stall_enabled=master.stall_enabled,
            )  # fmt: skip
            ret = install_ste_for_dev(master, ste)
        else:
            ret = install_ste_for_dev(master, self.s2_ste(master, state.ats_enabled))
            clear_cd(master, IOMMU_NO_PASID)
        attach_commit(state)
        master.domain = self
        return ret

    def s2_ste(self, master: Master, ats_enabled: bool) -> int:
        assert self.pgtbl is not None and self.smmu is not None
        return make_s2_domain_ste(
            self.vmid, self.pgtbl.config, self.pgtbl.root, self.smmu.features, ats_enabled,
            stall_enabled=master.stall_enabled,
        )  # fmt: skip

    # -- map / unmap ----------------------------------------------------------------------------
    def map_pages(self, iova: int, paddr: int, pgsize: int, pgcount: int, prot: Prot) -> tuple[int, int]:
        if self.pgtbl is None:
            return 0, -errno.ENODEV
        before = (self.pgtbl.pte_writes, self.pgtbl.pages_allocated)
        result = self.pgtbl.map(iova, paddr, pgsize * pgcount, prot)
        self._trace_pgtable("map", before)
        return result.mapped, result.error

    def unmap_pages(self, iova: int, pgsize: int, pgcount: int, gather: IotlbGather) -> int:
        if self.pgtbl is None:
            return 0
        before = (self.pgtbl.pte_writes, self.pgtbl.pages_allocated)
        unmapped = self.pgtbl.unmap(iova, pgsize * pgcount, gather)
        self._trace_pgtable("unmap", before)
        return unmapped

    def _trace_pgtable(self, op: str, before: tuple[int, int]) -> None:
        """What one update cost the table: descriptors written, table pages taken (or freed)."""
        if self.pgtbl is not None and self.smmu is not None:
            self.smmu.emit(
                "pgtable",
                op=op,
                pte_writes=self.pgtbl.pte_writes - before[0],
                table_pages=self.pgtbl.pages_allocated - before[1],
            )

    def iova_to_phys(self, iova: int) -> int:
        if self.pgtbl is None:
            return 0
        pa = self.pgtbl.iova_to_phys(iova)
        return pa or 0

    def free_gathered_tables(self, gather: IotlbGather) -> None:
        if self.pgtbl is not None:
            before = (self.pgtbl.pte_writes, self.pgtbl.pages_allocated)
            self.pgtbl.release_freed_tables(gather)
            if self.pgtbl.pages_allocated != before[1]:
                self._trace_pgtable("free", before)

    # -- invalidation ---------------------------------------------------------------------------
    @fault_to_errno(default=None)
    def iotlb_sync(self, gather: IotlbGather) -> None:
        """Range TLBIs for what the unmaps gathered, one CMD_SYNC, then the ATCs."""
        if self.smmu is None or not gather.ranges:
            return
        assert self.smmu.cmdq is not None
        batch = self.smmu.cmdq.batch()
        for r in gather.ranges:
            self._tlb_inv_range(batch, r.start, r.end - r.start, r.pgsize, r.leaf)
        batch.submit()
        self._nested_s1_flush()
        self.atc_inv_domain(gather.start or 0, (gather.end or 0) - (gather.start or 0))

    def tlb_flush_walk(self, iova: int, size: int, granule: int) -> None:
        """io-pgtable's synchronous flush when it removes a table (``arm_smmu_tlb_inv_walk``)."""
        self.tlb_inv_range_domain(iova, size, granule, False)

    @fault_to_errno(default=None)
    def tlb_inv_range_domain(self, iova: int, size: int, granule: int, leaf: bool) -> None:
        if self.smmu is None:
            return
        assert self.smmu.cmdq is not None
        batch = self.smmu.cmdq.batch()
        self._tlb_inv_range(batch, iova, size, granule, leaf)
        batch.submit()
        self._nested_s1_flush()
        # Not leaf-only: a whole table may have gone.
        self.atc_inv_domain(iova, size)

    def _tlb_inv_range(self, batch: CmdqBatch, iova: int, size: int, granule: int, leaf: bool) -> None:
        smmu = self.smmu
        assert smmu is not None
        if self.stage == self.STAGE1:
            opcode = Opcode.TLBI_EL2_VA if smmu.features & Feat.E2H else Opcode.TLBI_NH_VA
            nsize, ids = self._asid_all_cmd(), {"ASID": self.asid}
        else:
            opcode = Opcode.TLBI_S2_IPA
            nsize, ids = build_command(Opcode.TLBI_S12_VMALL, VMID=self.vmid), {"VMID": self.vmid}
        range_inv = bool(smmu.features & Feat.RANGE_INV)
        if not range_inv and size >= (1 << (granule.bit_length() - 1 - MAX_TLBI_OPS_SHIFT)) * granule:
            batch.add(nsize)  # too many per-granule commands: invalidate the whole context
            return
        for cmd in tlb_inv_range_cmds(
            opcode, iova, size, granule, leaf, self.pgsize_bitmap, range_inv, **ids
        ):
            batch.add(cmd)

    def _asid_all_cmd(self) -> int:
        assert self.smmu is not None
        if self.smmu.features & Feat.E2H:
            return build_command(Opcode.TLBI_EL2_ASID, ASID=self.asid)
        return build_command(Opcode.TLBI_NH_ASID, ASID=self.asid)

    def _nested_s1_flush(self) -> None:
        # A change of a nesting parent's S2 must flush the guests' combined S1 entries too.
        if self.nest_parent and self.smmu is not None and self.smmu.cmdq is not None:
            self.smmu.cmdq.issue_cmd_with_sync(build_command(Opcode.TLBI_NH_ALL, VMID=self.vmid))

    @fault_to_errno(default=None)
    def flush_iotlb_all(self) -> None:
        """``arm_smmu_tlb_inv_context``."""
        smmu = self.smmu
        if smmu is None or smmu.cmdq is None:
            return
        if self.stage == self.STAGE1:
            smmu.cmdq.issue_cmd_with_sync(self._asid_all_cmd())
        else:
            smmu.cmdq.issue_cmd_with_sync(build_command(Opcode.TLBI_S12_VMALL, VMID=self.vmid))
        self.atc_inv_domain(0, 0)

    def atc_inv_domain(self, iova: int, size: int) -> int:
        smmu = self.smmu
        if smmu is None or smmu.cmdq is None or not smmu.features & Feat.ATS or not self.nr_ats_masters:
            return 0
        batch = smmu.cmdq.batch()
        for master, ssid in self.master_domains:
            if not master.ats_enabled:
                continue
            for sid in master.streams:
                batch.add(atc_inv_cmd(sid, ssid, iova, size))
        return batch.submit()

    # -- teardown -------------------------------------------------------------------------------
    def free(self) -> None:
        smmu = self.smmu
        if smmu is None or self.pgtbl is None:
            return
        self.flush_iotlb_all()  # free_io_pgtable_ops flushes before the tables go
        self.pgtbl.free_all()
        self.pgtbl = None
        if self.stage == self.STAGE1:
            smmu.asid_map.discard(self.asid)
        else:
            smmu.vmid_map.discard(self.vmid)
        smmu.emit("domain.free", stage=self.stage, asid=self.asid, vmid=self.vmid)


class ArmSmmuNestedDomain(IommuDomain):
    """A guest-owned stage 1 (its vSTE: CD table pointer at an IPA, S1DSS...) over a stage-2
    nesting parent."""

    def __init__(self, ops: ArmSmmuIommuOps, parent: ArmSmmuDomain, vste: int, enable_ats: bool) -> None:
        super().__init__(DomainType.NESTED)
        self.ops = ops
        self.parent = parent
        self.vste = vste
        self.enable_ats = enable_ats

    @fault_to_errno()
    def attach_dev(self, dev: Any) -> int:
        master = self.ops.master_of(dev)
        if master is None:
            return -errno.ENOENT
        if self.parent.smmu is not master.smmu:
            return -errno.EINVAL
        if ssids_in_use(master.cd_table):
            return -errno.EBUSY
        state = AttachState(master, master.domain, cd_needs_ats=self.enable_ats)
        attach_prepare(state, self)
        state.ats_enabled = state.ats_enabled and self.enable_ats
        ste = make_nested_domain_ste(self.vste, self.parent.s2_ste(master, state.ats_enabled))
        ret = install_ste_for_dev(master, ste)
        attach_commit(state)
        master.domain = self
        clear_cd(master, IOMMU_NO_PASID)
        return ret


# -- helpers --------------------------------------------------------------------------------------


def _lowest_free(used: set[int], lo: int, hi: int) -> int | None:
    for value in range(lo, hi + 1):
        if value not in used:
            return value
    return None


def _pgtable_config(smmu: ArmSmmuDevice, stage: int, ias: int, oas: int) -> PageTableConfig | None:
    """io-pgtable's granule choice (the CPU page size when the SMMU has it, else the smallest it
    has) and the page sizes the SMMU supports with that granule."""
    bitmap = smmu.pgsize_bitmap
    page = 1 << PAGE_SHIFT
    granules = [size for size in sorted(GRANULES) if bitmap & size]
    if not granules:
        return None
    g = GRANULES[page] if bitmap & page else GRANULES[granules[0]]
    if oas > 48 and g.size != 1 << 16:
        oas = 48  # a 52-bit output needs the 64 KiB granule here
    coherent = bool(smmu.features & Feat.COHERENCY)
    try:
        reachable = PageTableConfig(stage=stage, granule=g, ias=min(ias, 48), oas=oas).pgsize_bitmap
        return PageTableConfig(
            stage=stage,
            granule=g,
            ias=min(ias, 48),
            oas=oas,
            pgsize_bitmap=bitmap & reachable,
            coherent_walk=coherent,
        )
    except ValueError:
        return None


class DmaPageAllocator:
    """Table pages from ``dma_alloc_coherent`` (zeroed, naturally aligned), any granule."""

    def __init__(self, mm: DmaMemory, granule: int) -> None:
        self.mm = mm
        self._granule = granule

    @property
    def granule_size(self) -> int:
        return self._granule

    def alloc_page(self) -> int | None:
        return self.mm.dma_alloc_coherent(self._granule)

    def alloc_pages(self, count: int) -> int | None:
        return self.mm.dma_alloc_coherent(self._granule * count)

    def free_page(self, pa: int) -> None:
        self.mm.dma_free_coherent(pa, self._granule)

    def free_pages(self, pa: int, count: int) -> None:
        self.mm.dma_free_coherent(pa, self._granule * count)


# -- the iommu_ops --------------------------------------------------------------------------------


class ArmSmmuIommuOps:
    """``arm_smmu_ops`` for one SMMU: what the IOMMU core calls."""

    def __init__(self, smmu: ArmSmmuDevice) -> None:
        self.smmu = smmu
        self.pgsize_bitmap = smmu.pgsize_bitmap
        self.identity_domain: IommuDomain | None = ArmSmmuStaticDomain(self, DomainType.IDENTITY)
        self.blocked_domain: IommuDomain | None = ArmSmmuStaticDomain(self, DomainType.BLOCKED)
        self._masters: dict[int, Master] = {}

    def master_of(self, dev: Any) -> Master | None:
        return self._masters.get(id(dev))

    def of_xlate(self, dev: Any, args: list[int]) -> int:
        fwspec = getattr(dev, "iommu_fwspec", None)
        if not isinstance(fwspec, IommuFwspec) or not args:
            return -errno.EINVAL
        fwspec.ids.append(int(args[0]))
        return 0

    @fault_to_errno()
    def probe_device(self, dev: Any) -> Any:
        """``arm_smmu_probe_device``: a master for the device's StreamIDs, L2 stream tables for
        each, the SSID width and stall capability."""
        smmu = self.smmu
        if id(dev) in self._masters:
            return -errno.EBUSY
        fwspec = getattr(dev, "iommu_fwspec", None)
        if not isinstance(fwspec, IommuFwspec) or not fwspec.ids:
            return -errno.ENODEV
        master = Master(smmu, dev, fwspec.ids)
        added: list[int] = []
        for sid in fwspec.ids:
            ret = smmu.init_sid_strtab(sid)
            if not ret and sid in smmu.streams:
                smmu.dev_warn(f"stream {sid} already in tree", dev=master.dev_name)
                ret = -errno.EINVAL
            if ret:
                for s in added:
                    del smmu.streams[s]
                smmu.emit("probe_device", dev=master.dev_name, sids=list(fwspec.ids), result=ret)
                return ret
            smmu.streams[sid] = master
            added.append(sid)
        pasid_bits = int(getattr(dev, "pasid_num_bits", 0) or 0)
        master.ssid_bits = min(smmu.ssid_bits, pasid_bits)
        if not smmu.features & Feat.TWO_LVL_CDTAB:
            master.ssid_bits = min(master.ssid_bits, CTXDESC_LINEAR_CDMAX)
        can_stall = bool(getattr(dev, "dma_can_stall", False))
        master.stall_enabled = bool(smmu.features & Feat.STALLS and can_stall) or bool(
            smmu.features & Feat.STALL_FORCE
        )
        self._masters[id(dev)] = master
        smmu.emit(
            "probe_device", dev=master.dev_name, sids=list(fwspec.ids), ssid_bits=master.ssid_bits, result=0
        )
        return smmu

    @fault_to_errno(default=None)
    def release_device(self, dev: Any) -> None:
        master = self._masters.get(id(dev))
        if master is None:
            return
        assert self.blocked_domain is not None
        self.blocked_domain.attach_dev(dev)  # back to what the stream table starts with
        for sid in master.streams:
            if self.smmu.streams.get(sid) is master:
                del self.smmu.streams[sid]
        if master.cd_table.allocated:
            free_cd_tables(master)
        del self._masters[id(dev)]

    def domain_alloc_paging(self, dev: Any) -> IommuDomain | int:
        return self.domain_alloc_paging_flags(dev)

    def domain_alloc_paging_flags(self, dev: Any, *, nest_parent: bool = False) -> IommuDomain | int:
        """A paging domain, finalised for ``dev``'s SMMU; ``nest_parent`` forces stage 2."""
        if nest_parent and not self.smmu.features & Feat.NESTING:
            return -errno.EOPNOTSUPP
        domain = ArmSmmuDomain(self, nest_parent=nest_parent)
        ret = domain.finalise(self.smmu)
        return ret if ret else domain

    def domain_alloc_nested(self, parent: IommuDomain, vste: int) -> IommuDomain | int:
        """A nested domain from a guest's vSTE (words 0-1) over a stage-2 nesting parent."""
        if not isinstance(parent, ArmSmmuDomain) or not parent.nest_parent or parent.smmu is not self.smmu:
            return -errno.EINVAL
        if vste & ~VSTE_ALLOWED:
            return -errno.EIO
        if STE.V.get(vste):
            cfg = STE.CONFIG.get(vste)
            if cfg not in (SteConfig.ABORT, SteConfig.BYPASS, SteConfig.S1_TRANS):
                return -errno.EIO
        eats = STE.EATS.get(vste)
        if eats not in (Eats.ABT, Eats.TRANS):
            return -errno.EIO
        vste &= ~STE.EATS.in_place_mask  # EATS follows the attach's ATS decision
        return ArmSmmuNestedDomain(self, parent, vste, eats == Eats.TRANS)

    def def_domain_type(self, dev: Any) -> DomainType | None:
        return None

    def capable(self, dev: Any, cap: IommuCap) -> bool:
        features = self.smmu.features
        if cap is IommuCap.CACHE_COHERENCY:
            return bool(features & Feat.COHERENCY)  # a coherent TCU implies coherent TBUs
        if cap in (IommuCap.NOEXEC, IommuCap.DEFERRED_FLUSH):
            return True
        if cap is IommuCap.DIRTY_TRACKING:
            return features & (Feat.HD | Feat.COHERENCY) == Feat.HD | Feat.COHERENCY
        return False

    def get_resv_regions(self, dev: Any) -> list[IommuResvRegion]:
        prot = Prot.WRITE | Prot.NOEXEC | Prot.MMIO
        return [IommuResvRegion(MSI_IOVA_BASE, MSI_IOVA_LENGTH, prot, ResvType.SW_MSI)]


__all__ = [
    "ArmSmmuDomain",
    "ArmSmmuIommuOps",
    "ArmSmmuNestedDomain",
    "ArmSmmuStaticDomain",
    "AttachState",
    "CdTable",
    "CdWriter",
    "DmaPageAllocator",
    "Master",
    "alloc_cd_ptr",
    "clear_cd",
    "install_ste_for_dev",
    "sync_cd",
    "write_cd_entry",
]
