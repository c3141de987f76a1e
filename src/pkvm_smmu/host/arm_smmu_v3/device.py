"""One SMMUv3 as the driver sees it: probe (``arm_smmu_device_probe``), hardware discovery
(``arm_smmu_device_hw_probe``), queue and stream-table allocation, the reset sequence
(``arm_smmu_device_reset``), STE installation with the hitless update algorithm, and the
interrupt entry points.

Everything reaches the SMMU through the CPU port: registers with 32/64-bit accesses at
``base + offset`` (Page 1 registers at ``base + 0x10000``), queues and tables in coherent memory
the host allocated. Only architected register and queue behaviour is used, so the driver works
unmodified on an SMMU emulated by pKVM (IDR0 without MSI/S2P/HYP/VMID16).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pkvm_smmu.arch.commands import Opcode, build_command, cfgi_all
from pkvm_smmu.arch.registers import (
    CMDQ_BASE,
    CR0,
    CR1,
    CR2,
    GBPA,
    IDR0,
    IDR1,
    IDR3,
    IDR5,
    IIDR,
    IRQ_CFG0,
    IRQ_CFG1,
    IRQ_CFG2,
    IRQ_CTRL,
    OAS_BITS,
    PAGE1_OFFSET,
    STRTAB_BASE,
    STRTAB_BASE_CFG,
    QueueCacheability,
    Reg,
    Shareability,
    StallModel,
    StrtabFmt,
    TtEndian,
    Ttf,
)
from pkvm_smmu.arch.strtab import L1STD, STE, STE_SIZE
from pkvm_smmu.host.arm_smmu_v3.features import (
    ARM_SMMU_POLL_TIMEOUT_US,
    CMDQ_BATCH_ENTRIES,
    CMDQ_ENT_SZ_SHIFT,
    CMDQ_MAX_SZ_SHIFT,
    EVTQ_ENT_SZ_SHIFT,
    EVTQ_MAX_SZ_SHIFT,
    PAGE_SHIFT,
    PRIQ_ENT_SZ_SHIFT,
    PRIQ_MAX_SZ_SHIFT,
    STRTAB_L1_SZ_SHIFT,
    STRTAB_SPLIT,
    Feat,
    Opt,
    feat_names,
)
from pkvm_smmu.host.arm_smmu_v3.mmio import HwFault, Mmio, fault_to_errno
from pkvm_smmu.host.arm_smmu_v3.queue import CommandQueue, Queue
from pkvm_smmu.host.arm_smmu_v3.ste import make_abort_ste, make_bypass_ste
from pkvm_smmu.host.hw import Cpu
from pkvm_smmu.pgtable.allocator import PageAllocator
from pkvm_smmu.pgtable.memory import TableMemory
from pkvm_smmu.smmu_lib.entry import SteWriterOps, to_words, write_entry
from pkvm_smmu.trace.bus import TraceBus

if TYPE_CHECKING:
    from pkvm_smmu.host.arm_smmu_v3.domain import Master

ARM_SMMU_REG_SZ = 0x10000  # one 64 KiB register page
SZ_64K = 0x10000
SZ_128K = 0x20000
ARM_SMMU_MEMATTR_DEVICE_NGNRE = 0x1
IIDR_IMPLEMENTER_ARM = 0x43B
IIDR_PRODUCTID_ARM_MMU_600 = 0x483
IIDR_PRODUCTID_ARM_MMU_700 = 0x487


class DmaMemory(Protocol):
    """What the driver needs from the host's memory allocator (``dma_alloc_coherent``)."""

    def dma_alloc_coherent(self, size: int) -> int | None:
        """Zeroed, physically contiguous memory naturally aligned for ``size``; None when out."""
        ...

    def dma_free_coherent(self, pa: int, size: int) -> int: ...


@dataclass(frozen=True)
class ArmSmmuParams:
    """Module parameters and firmware facts (Linux: ``disable_bypass``, ``disable_msipolling``,
    the DT node's ``dma-coherent`` and quirk properties, the kernel's VHE state)."""

    disable_bypass: bool = True
    disable_msipolling: bool = False
    coherent: bool = True  # "dma-coherent" in the SMMU's node
    options: Opt = Opt.NONE  # quirks from firmware ("hisilicon,broken-prefetch-cmd" ...)
    vhe: bool = False  # the kernel runs at EL2 with E2H (not under pKVM)
    kdump: bool = False


@dataclass
class StrtabCfg:
    """``arm_smmu_strtab_cfg``."""

    strtab_dma: int = 0
    size: int = 0  # bytes of the linear table or the L1 table
    num_l1_ents: int = 0
    l2: dict[int, int] = field(default_factory=dict)  # L1 index -> L2 table PA
    strtab_base: int = 0
    strtab_base_cfg: int = 0


MsiAlloc = Callable[[str], tuple[int, int] | None]  # source name -> (doorbell PA, data)


class ArmSmmuDevice:
    """``struct arm_smmu_device``."""

    def __init__(
        self,
        cpu: Cpu,
        mm: DmaMemory,
        base: int,
        size: int,
        *,
        name: str = "smmu",
        params: ArmSmmuParams | None = None,
        pgtable_memory: TableMemory | None = None,
        pgtable_allocator: PageAllocator | None = None,
        trace: TraceBus | None = None,
        irqs: Sequence[str] = (),
        msi_alloc: MsiAlloc | None = None,
    ) -> None:
        self.cpu = cpu
        self.mmio = Mmio(cpu)
        self.mm = mm
        self.ioaddr = base
        self.res_size = size
        self.name = name
        self.component = f"arm-smmu-v3.{name}"
        self.params = params if params is not None else ArmSmmuParams()
        self.pgtable_memory = pgtable_memory
        self.pgtable_allocator = pgtable_allocator
        self.trace = trace if trace is not None else TraceBus()
        self.irq_names = tuple(irqs)  # the DT "interrupt-names" the platform gave us
        self.msi_alloc = msi_alloc
        self.features = Feat.COHERENCY if self.params.coherent else Feat.NONE
        self.options = self.params.options
        self.base = base
        self.page1 = base + PAGE1_OFFSET
        self.ias = 0
        self.oas = 0
        self.asid_bits = 8
        self.vmid_bits = 8
        self.sid_bits = 0
        self.ssid_bits = 0
        self.pgsize_bitmap = 0
        self.max_stalls = 0
        self.cmdq_shift = 0
        self.evtq_shift = 0
        self.priq_shift = 0
        self.cmdq: CommandQueue | None = None
        self.evtq: Queue | None = None
        self.priq: Queue | None = None
        self.strtab_cfg = StrtabCfg()
        self.streams: dict[int, Master] = {}  # StreamID -> master (Linux's rb-tree)
        self.vmid_map: set[int] = set()
        self.asid_map: set[int] = set()
        self.combined_irq = "combined" in self.irq_names
        self.irqs_with_msi: set[str] = set()
        self.probed = False

    # -- tracing ------------------------------------------------------------------------------
    def emit(self, kind: str, **fields: Any) -> None:
        if self.trace.enabled:
            self.trace.emit(self.component, kind, **fields)

    def dev_err(self, message: str, **fields: Any) -> None:
        self.emit("err", message=message, **fields)

    def dev_warn(self, message: str, **fields: Any) -> None:
        self.emit("warn", message=message, **fields)

    def dev_info(self, message: str, **fields: Any) -> None:
        self.emit("info", message=message, **fields)

    def on_fault(self, where: str, fault: HwFault) -> None:
        self.dev_err("CPU access faulted", where=where, address=fault.address, access=fault.what)

    # -- register helpers ---------------------------------------------------------------------
    def reg_addr(self, reg: Reg) -> int:
        off = int(reg)
        if off >= PAGE1_OFFSET:
            return self.page1 + (off - PAGE1_OFFSET)
        return self.base + off

    def readl(self, reg: Reg) -> int:
        return self.mmio.readl(self.reg_addr(reg))

    def writel(self, value: int, reg: Reg) -> None:
        self.mmio.writel(value, self.reg_addr(reg))

    def writeq(self, value: int, reg: Reg) -> None:
        self.mmio.writeq(value, self.reg_addr(reg))

    def write_reg_sync(self, value: int, reg: Reg, ack: Reg) -> int:
        """``arm_smmu_write_reg_sync``: write, then poll the ACK register until it matches."""
        self.writel(value, reg)
        return self.mmio.poll_timeout(lambda: self.readl(ack) == value, ARM_SMMU_POLL_TIMEOUT_US)

    def update_gbpa(self, set_bits: int, clr_bits: int) -> int:
        """GBPA takes one write with UPDATE set, and only while UPDATE reads 0."""
        update = GBPA.UPDATE.in_place_mask
        reg = [0]

        def idle() -> bool:
            reg[0] = self.readl(Reg.GBPA)
            return not reg[0] & update

        ret = self.mmio.poll_timeout(idle, ARM_SMMU_POLL_TIMEOUT_US)
        if ret:
            return ret
        value = (reg[0] & ~clr_bits) | set_bits
        self.writel(value | update, Reg.GBPA)
        ret = self.mmio.poll_timeout(idle, ARM_SMMU_POLL_TIMEOUT_US)
        if ret:
            self.dev_err("GBPA not responding to update")
        return ret

    # -- probe --------------------------------------------------------------------------------
    @fault_to_errno()
    def probe(self) -> int:
        """``arm_smmu_device_probe`` up to (not including) IOMMU registration: 0 or -errno."""
        self.emit("probe.start", base=self.ioaddr, size=self.res_size)
        if self.res_size < self.resource_size():
            self.dev_err("MMIO region too small", size=self.res_size)
            return -errno.EINVAL
        if self.options & Opt.PAGE0_REGS_ONLY:
            self.page1 = self.base
        ret = self.hw_probe()
        if ret:
            return ret
        ret = self.init_structures()
        if ret:
            return ret
        ret = self.device_reset()
        if ret:
            return ret
        self.probed = True
        self.emit("probe.done", features=feat_names(self.features), ias=self.ias, oas=self.oas)
        return 0

    def resource_size(self) -> int:
        return SZ_64K if self.options & Opt.PAGE0_REGS_ONLY else SZ_128K

    def hw_probe(self) -> int:
        """``arm_smmu_device_hw_probe``: read IDR0/1/3/5 and adapt."""
        coherent = bool(self.features & Feat.COHERENCY)
        f = self.features
        reg = self.readl(Reg.IDR0)
        if IDR0.ST_LEVEL.get(reg) == 1:
            f |= Feat.TWO_LVL_STRTAB
        if IDR0.CD2L.get(reg):
            f |= Feat.TWO_LVL_CDTAB
        endian = IDR0.TTENDIAN.get(reg)
        if endian == TtEndian.MIXED:
            f |= Feat.TT_LE | Feat.TT_BE
        elif endian == TtEndian.LE:
            f |= Feat.TT_LE
        else:
            self.dev_err("unknown/unsupported TT endianness!")
            return -errno.ENXIO
        if IDR0.PRI.get(reg):
            f |= Feat.PRI
        if IDR0.ATS.get(reg):
            f |= Feat.ATS
        if IDR0.SEV.get(reg):
            f |= Feat.SEV
        if IDR0.MSI.get(reg):
            f |= Feat.MSI
            if coherent and not self.params.disable_msipolling:
                self.options |= Opt.MSIPOLL
        if IDR0.HYP.get(reg):
            f |= Feat.HYP
            if self.params.vhe:
                f |= Feat.E2H
        httu = IDR0.HTTU.get(reg)
        if httu >= 2:
            f |= Feat.HD
        if httu >= 1:
            f |= Feat.HA
        if bool(IDR0.COHACC.get(reg)) != coherent:
            self.dev_warn("IDR0.COHACC overridden by FW configuration", coherent=coherent)
        stall = IDR0.STALL_MODEL.get(reg)
        if stall == StallModel.FORCE:
            f |= Feat.STALL_FORCE | Feat.STALLS
        elif stall == StallModel.STALL:
            f |= Feat.STALLS
        if IDR0.S1P.get(reg):
            f |= Feat.TRANS_S1
        if IDR0.S2P.get(reg):
            f |= Feat.TRANS_S2
        if not IDR0.S1P.get(reg) and not IDR0.S2P.get(reg):
            self.dev_err("no translation support!")
            return -errno.ENXIO
        ttf = IDR0.TTF.get(reg)
        if ttf == Ttf.AARCH32_64:
            self.ias = 40
        elif ttf != Ttf.AARCH64:
            self.dev_err("AArch64 table format not supported!")
            return -errno.ENXIO
        self.asid_bits = 16 if IDR0.ASID16.get(reg) else 8
        self.vmid_bits = 16 if IDR0.VMID16.get(reg) else 8

        reg = self.readl(Reg.IDR1)
        if IDR1.TABLES_PRESET.get(reg) or IDR1.QUEUES_PRESET.get(reg) or IDR1.REL.get(reg):
            self.dev_err("embedded implementation not supported")
            return -errno.ENXIO
        if IDR1.ATTR_TYPES_OVR.get(reg):
            f |= Feat.ATTR_TYPES_OVR
        self.cmdq_shift = min(CMDQ_MAX_SZ_SHIFT, IDR1.CMDQS.get(reg))
        if self.cmdq_shift <= CMDQ_BATCH_ENTRIES.bit_length() - 1:
            # One batch plus a CMD_SYNC must fit in the queue.
            self.dev_err(f"command queue size <= {CMDQ_BATCH_ENTRIES} entries not supported")
            return -errno.ENXIO
        self.evtq_shift = min(EVTQ_MAX_SZ_SHIFT, IDR1.EVENTQS.get(reg))
        self.priq_shift = min(PRIQ_MAX_SZ_SHIFT, IDR1.PRIQS.get(reg))
        self.ssid_bits = IDR1.SSIDSIZE.get(reg)
        self.sid_bits = IDR1.SIDSIZE.get(reg)
        if self.sid_bits <= STRTAB_SPLIT:
            f &= ~Feat.TWO_LVL_STRTAB  # a single L2 table would cover every SID: go linear

        reg = self.readl(Reg.IDR3)
        if IDR3.RIL.get(reg):
            f |= Feat.RANGE_INV
        if IDR3.FWB.get(reg):
            f |= Feat.S2FWB

        reg = self.readl(Reg.IDR5)
        self.max_stalls = IDR5.STALL_MAX.get(reg)
        if IDR5.GRAN64K.get(reg):
            self.pgsize_bitmap |= (1 << 16) | (1 << 29)
        if IDR5.GRAN16K.get(reg):
            self.pgsize_bitmap |= (1 << 14) | (1 << 25)
        if IDR5.GRAN4K.get(reg):
            self.pgsize_bitmap |= (1 << 12) | (1 << 21) | (1 << 30)
        if IDR5.VAX.get(reg) == 1:
            f |= Feat.VAX
        oas = IDR5.OAS.get(reg)
        if oas in OAS_BITS and OAS_BITS[oas] <= 52:
            self.oas = OAS_BITS[oas]
            if self.oas == 52:
                self.pgsize_bitmap |= 1 << 42  # 4 TiB blocks with 64 KiB granules
        else:
            self.dev_info("unknown output address size. Truncating to 48-bit")
            self.oas = 48
        if not self.pgsize_bitmap:
            self.dev_err("no supported translation granule")
            return -errno.ENXIO
        self.ias = max(self.ias, self.oas)
        if f & Feat.TRANS_S1 and f & Feat.TRANS_S2:
            f |= Feat.NESTING
        self.features = f
        self.iidr_probe()
        self.dev_info("ias/oas", ias=self.ias, oas=self.oas, features=feat_names(self.features))
        return 0

    def iidr_probe(self) -> None:
        """Errata by implementation (``arm_smmu_device_iidr_probe``)."""
        reg = self.readl(Reg.IIDR)
        if IIDR.IMPLEMENTER.get(reg) != IIDR_IMPLEMENTER_ARM:
            return
        product, variant, revision = IIDR.PRODUCTID.get(reg), IIDR.VARIANT.get(reg), IIDR.REVISION.get(reg)
        if product == IIDR_PRODUCTID_ARM_MMU_600:
            if variant == 0 and revision <= 2:
                self.features &= ~Feat.SEV  # erratum 1076982
            if variant < 2:
                self.features &= ~Feat.NESTING  # erratum 1209401
        elif product == IIDR_PRODUCTID_ARM_MMU_700:
            self.features &= ~(Feat.BTM | Feat.NESTING)  # errata 2268618, 2812531
            self.options |= Opt.CMDQ_FORCE_SYNC

    # -- in-memory structures -----------------------------------------------------------------
    def init_structures(self) -> int:
        ret = self.init_queues()
        if ret:
            return ret
        return self.init_strtab()

    def _init_one_queue(self, shift: int, ent_size: int, prod: Reg, cons: Reg, name: str) -> Queue | int:
        """Allocate a queue, halving it while allocation fails and it is larger than a page."""
        while True:
            qsz = (1 << shift) * ent_size
            base = self.mm.dma_alloc_coherent(qsz)
            if base is not None or qsz < (1 << PAGE_SHIFT) or shift == 0:
                break
            shift -= 1
        if base is None:
            self.dev_err(f"failed to allocate queue ({qsz:#x} bytes) for {name}")
            return -errno.ENOMEM
        if base & (qsz - 1):
            self.dev_warn(f"{name} is not naturally aligned", base=base)
        self.dev_info(f"allocated {1 << shift} entries for {name}")
        q = Queue(base, shift, ent_size, self.reg_addr(prod), self.reg_addr(cons))
        q.q_base = CMDQ_BASE.RA.in_place_mask | CMDQ_BASE.ADDR.insert_address(base & ~31)
        q.q_base |= CMDQ_BASE.LOG2SIZE.insert(shift)
        return q

    def init_queues(self) -> int:
        q = self._init_one_queue(
            self.cmdq_shift, 1 << CMDQ_ENT_SZ_SHIFT, Reg.CMDQ_PROD, Reg.CMDQ_CONS, "cmdq"
        )
        if isinstance(q, int):
            return q
        self.cmdq = CommandQueue(self.mmio, q, lambda: self.options, self.trace, self.component)
        q = self._init_one_queue(
            self.evtq_shift, 1 << EVTQ_ENT_SZ_SHIFT, Reg.EVENTQ_PROD, Reg.EVENTQ_CONS, "evtq"
        )
        if isinstance(q, int):
            return q
        self.evtq = q
        if not self.features & Feat.PRI:
            return 0
        q = self._init_one_queue(
            self.priq_shift, 1 << PRIQ_ENT_SZ_SHIFT, Reg.PRIQ_PROD, Reg.PRIQ_CONS, "priq"
        )
        if isinstance(q, int):
            return q
        self.priq = q
        return 0

    def _initial_ste(self) -> int:
        return make_abort_ste() if self.params.disable_bypass else make_bypass_ste(self.features)

    def init_initial_stes(self, pa: int, nent: int) -> None:
        """Fill a table not yet visible to the SMMU: no update sequence needed."""
        self.mmio.write_mem(pa, STE.to_bytes(self._initial_ste()) * nent)

    def init_strtab(self) -> int:
        cfg = self.strtab_cfg
        if self.features & Feat.TWO_LVL_STRTAB:
            size = STRTAB_L1_SZ_SHIFT - 3  # log2 of L1 descriptors that fit in 1 MiB
            size = min(size, self.sid_bits - STRTAB_SPLIT)
            cfg.num_l1_ents = 1 << size
            size += STRTAB_SPLIT
            if size < self.sid_bits:
                self.dev_warn(f"2-level strtab only covers {size}/{self.sid_bits} bits of SID")
            cfg.size = cfg.num_l1_ents * 8
            strtab = self.mm.dma_alloc_coherent(cfg.size)
            if strtab is None:
                self.dev_err(f"failed to allocate l1 stream table ({cfg.size} bytes)")
                return -errno.ENOMEM
            cfg.strtab_base_cfg = STRTAB_BASE_CFG.encode(
                FMT=StrtabFmt.TWO_LEVEL, LOG2SIZE=size, SPLIT=STRTAB_SPLIT
            )
        else:
            cfg.num_l1_ents = 1 << self.sid_bits
            cfg.size = cfg.num_l1_ents * STE_SIZE
            strtab = self.mm.dma_alloc_coherent(cfg.size)
            if strtab is None:
                self.dev_err(f"failed to allocate linear stream table ({cfg.size} bytes)")
                return -errno.ENOMEM
            cfg.strtab_base_cfg = STRTAB_BASE_CFG.encode(FMT=StrtabFmt.LINEAR, LOG2SIZE=self.sid_bits)
            self.init_initial_stes(strtab, cfg.num_l1_ents)
        cfg.strtab_dma = strtab
        cfg.strtab_base = STRTAB_BASE.ADDR.insert_address(strtab & ~63) | STRTAB_BASE.RA.in_place_mask
        return 0

    def sid_in_range(self, sid: int) -> bool:
        limit = self.strtab_cfg.num_l1_ents
        if self.features & Feat.TWO_LVL_STRTAB:
            limit <<= STRTAB_SPLIT
        return 0 <= sid < limit

    def init_l2_strtab(self, sid: int) -> int:
        """Allocate the L2 table covering ``sid`` on first use, fill it, then publish its L1STD."""
        cfg = self.strtab_cfg
        idx = sid >> STRTAB_SPLIT
        if idx in cfg.l2:
            return 0
        size = STE_SIZE << STRTAB_SPLIT
        l2 = self.mm.dma_alloc_coherent(size)
        if l2 is None:
            self.dev_err(f"failed to allocate l2 stream table for SID {sid}")
            return -errno.ENOMEM
        self.init_initial_stes(l2, 1 << STRTAB_SPLIT)
        desc = L1STD.encode(SPAN=STRTAB_SPLIT + 1) | L1STD.L2PTR.insert_address(l2)
        self.mmio.write_u64(cfg.strtab_dma + idx * 8, desc)  # one 64-bit store
        cfg.l2[idx] = l2
        if self.probed and self.cmdq is not None:
            # Not in Linux: the SMMU may have cached the invalid (Span=0) L1STD when a stray
            # access used this SID, and only CFGI_STE with Leaf=0 drops it (IHI 0070 §3.21).
            self.cmdq.issue_cmd_with_sync(build_command(Opcode.CFGI_STE, SID=idx << STRTAB_SPLIT, LEAF=0))
        return 0

    def init_sid_strtab(self, sid: int) -> int:
        if not self.sid_in_range(sid):
            return -errno.ERANGE
        if self.features & Feat.TWO_LVL_STRTAB:
            return self.init_l2_strtab(sid)
        return 0

    def ste_addr(self, sid: int) -> int:
        """``arm_smmu_get_step_for_sid`` (the L2 table must exist)."""
        cfg = self.strtab_cfg
        if self.features & Feat.TWO_LVL_STRTAB:
            return cfg.l2[sid >> STRTAB_SPLIT] + (sid & ((1 << STRTAB_SPLIT) - 1)) * STE_SIZE
        return cfg.strtab_dma + sid * STE_SIZE

    def read_ste(self, sid: int) -> int:
        return STE.from_bytes(self.mmio.read_mem(self.ste_addr(sid), STE_SIZE))

    # -- reset --------------------------------------------------------------------------------
    def device_disable(self) -> int:
        ret = self.write_reg_sync(0, Reg.CR0, Reg.CR0ACK)
        if ret:
            self.dev_err("failed to clear cr0")
        return ret

    def device_reset(self) -> int:
        """``arm_smmu_device_reset``; every enable is polled through CR0ACK."""
        assert self.cmdq is not None and self.evtq is not None
        abort = GBPA.ABORT.in_place_mask
        if CR0.SMMUEN.get(self.readl(Reg.CR0)):
            self.dev_warn("SMMU currently enabled! Resetting...")
            self.update_gbpa(abort, 0)
        ret = self.device_disable()
        if ret:
            return ret
        # From here SMMUEN=0: incoming traffic follows GBPA.
        set_bits, clr_bits = (abort, 0) if self.params.disable_bypass else (0, abort)
        ret = self.update_gbpa(set_bits, clr_bits)
        if ret:
            return ret

        self.writel(
            CR1.encode(
                TABLE_SH=Shareability.ISH,
                TABLE_OC=QueueCacheability.WB,
                TABLE_IC=QueueCacheability.WB,
                QUEUE_SH=Shareability.ISH,
                QUEUE_OC=QueueCacheability.WB,
                QUEUE_IC=QueueCacheability.WB,
            ),
            Reg.CR1,
        )
        self.writel(CR2.encode(PTM=1, RECINVSID=1, E2H=int(bool(self.features & Feat.E2H))), Reg.CR2)

        self.writeq(self.strtab_cfg.strtab_base, Reg.STRTAB_BASE)
        self.writel(self.strtab_cfg.strtab_base_cfg, Reg.STRTAB_BASE_CFG)

        q = self.cmdq.q
        self.writeq(q.q_base, Reg.CMDQ_BASE)
        q.prod = q.cons = 0
        self.writel(q.prod, Reg.CMDQ_PROD)
        self.writel(q.cons, Reg.CMDQ_CONS)
        enables = CR0.CMDQEN.in_place_mask
        ret = self.write_reg_sync(enables, Reg.CR0, Reg.CR0ACK)
        if ret:
            self.dev_err("failed to enable command queue")
            return ret

        # Configuration before TLBs, so a prefetch cannot refill the TLBs from stale config.
        # Like Linux, a failed invalidation is reported (by the queue) but does not stop the reset.
        self.cmdq.issue_cmd_with_sync(cfgi_all())
        if self.features & Feat.HYP:
            self.cmdq.issue_cmd_with_sync(build_command(Opcode.TLBI_EL2_ALL))
        self.cmdq.issue_cmd_with_sync(build_command(Opcode.TLBI_NSNH_ALL))

        evtq = self.evtq
        self.writeq(evtq.q_base, Reg.EVENTQ_BASE)
        evtq.prod = evtq.cons = 0
        self.writel(evtq.prod, Reg.EVENTQ_PROD)
        self.writel(evtq.cons, Reg.EVENTQ_CONS)
        enables |= CR0.EVENTQEN.in_place_mask
        ret = self.write_reg_sync(enables, Reg.CR0, Reg.CR0ACK)
        if ret:
            self.dev_err("failed to enable event queue")
            return ret

        if self.features & Feat.PRI and self.priq is not None:
            priq = self.priq
            self.writeq(priq.q_base, Reg.PRIQ_BASE)
            priq.prod = priq.cons = 0
            self.writel(priq.prod, Reg.PRIQ_PROD)
            self.writel(priq.cons, Reg.PRIQ_CONS)
            enables |= CR0.PRIQEN.in_place_mask
            ret = self.write_reg_sync(enables, Reg.CR0, Reg.CR0ACK)
            if ret:
                self.dev_err("failed to enable PRI queue")
                return ret

        if self.features & Feat.ATS:
            enables |= CR0.ATSCHK.in_place_mask
            ret = self.write_reg_sync(enables, Reg.CR0, Reg.CR0ACK)
            if ret:
                self.dev_err("failed to enable ATS check")
                return ret

        ret = self.setup_irqs()
        if ret:
            self.dev_err("failed to setup irqs")
            return ret

        if self.params.kdump:
            enables &= ~(CR0.EVENTQEN.in_place_mask | CR0.PRIQEN.in_place_mask)
        enables |= CR0.SMMUEN.in_place_mask
        ret = self.write_reg_sync(enables, Reg.CR0, Reg.CR0ACK)
        if ret:
            self.dev_err("failed to enable SMMU interface")
            return ret
        self.emit("reset.done", cr0=enables)
        return 0

    # -- interrupts ---------------------------------------------------------------------------
    def setup_msis(self) -> None:
        """Clear the MSI addresses; with MSIs and an MSI allocator, program one per source."""
        self.writeq(0, Reg.GERROR_IRQ_CFG0)
        self.writeq(0, Reg.EVENTQ_IRQ_CFG0)
        sources = [("eventq", Reg.EVENTQ_IRQ_CFG0, Reg.EVENTQ_IRQ_CFG1, Reg.EVENTQ_IRQ_CFG2)]
        sources.append(("gerror", Reg.GERROR_IRQ_CFG0, Reg.GERROR_IRQ_CFG1, Reg.GERROR_IRQ_CFG2))
        if self.features & Feat.PRI:
            self.writeq(0, Reg.PRIQ_IRQ_CFG0)
            sources.append(("priq", Reg.PRIQ_IRQ_CFG0, Reg.PRIQ_IRQ_CFG1, Reg.PRIQ_IRQ_CFG2))
        if not self.features & Feat.MSI:
            return
        if self.msi_alloc is None:
            self.dev_info("msi_domain absent - falling back to wired irqs")
            return
        for name, cfg0, cfg1, cfg2 in sources:
            msi = self.msi_alloc(name)
            if msi is None:
                self.dev_warn("failed to allocate MSIs - falling back to wired irqs")
                return
            doorbell, data = msi
            self.writeq(IRQ_CFG0.ADDR.insert_address(doorbell & ~3), cfg0)
            self.writel(IRQ_CFG1.encode(DATA=data), cfg1)
            self.writel(IRQ_CFG2.encode(MEMATTR=ARM_SMMU_MEMATTR_DEVICE_NGNRE), cfg2)
            self.irqs_with_msi.add(name)

    def setup_irqs(self) -> int:
        ret = self.write_reg_sync(0, Reg.IRQ_CTRL, Reg.IRQ_CTRLACK)
        if ret:
            self.dev_err("failed to disable irqs")
            return ret
        if not self.combined_irq:
            self.setup_msis()
            for name, what in (("eventq", "events"), ("gerror", "errors")):
                if name not in self.irq_names and name not in self.irqs_with_msi:
                    self.dev_warn(f"no {name} irq - {what} will not be reported!")
        irqen = IRQ_CTRL.encode(EVENTQ_IRQEN=1, GERROR_IRQEN=1)
        if self.features & Feat.PRI:
            irqen |= IRQ_CTRL.PRIQ_IRQEN.in_place_mask
        if self.write_reg_sync(irqen, Reg.IRQ_CTRL, Reg.IRQ_CTRLACK):
            self.dev_warn("failed to enable irqs")
        return 0

    def irq_handlers(self) -> dict[str, Callable[[], bool]]:
        """What the kernel's interrupt plumbing calls, by DT interrupt name (or MSI source)."""
        handlers: dict[str, Callable[[], bool]] = {
            "eventq": self.handle_evtq_irq,
            "gerror": self.handle_gerror_irq,
            "combined": self.handle_combined_irq,
        }
        if self.features & Feat.PRI:
            handlers["priq"] = self.handle_priq_irq
        return handlers

    @fault_to_errno(default=False)
    def handle_evtq_irq(self) -> bool:
        from pkvm_smmu.host.arm_smmu_v3.events import evtq_thread

        return evtq_thread(self)

    @fault_to_errno(default=False)
    def handle_priq_irq(self) -> bool:
        from pkvm_smmu.host.arm_smmu_v3.events import priq_thread

        return priq_thread(self)

    @fault_to_errno(default=False)
    def handle_gerror_irq(self) -> bool:
        from pkvm_smmu.host.arm_smmu_v3.events import gerror_handler

        return gerror_handler(self)

    def handle_combined_irq(self) -> bool:
        """``arm_smmu_combined_irq_handler`` + its thread."""
        handled = self.handle_gerror_irq()
        handled = self.handle_evtq_irq() or handled
        if self.features & Feat.PRI:
            handled = self.handle_priq_irq() or handled
        return handled

    def poll_irqs(self) -> bool:
        """Run every handler once (for tests and kernels without interrupt plumbing)."""
        return self.handle_combined_irq()

    # -- STE installation ---------------------------------------------------------------------
    def write_ste(self, sid: int, target: int) -> int:
        """``arm_smmu_write_ste``: the update algorithm on the live STE, then a prefetch hint."""
        assert self.cmdq is not None
        writer = SteWriter(self, sid)
        entry = to_words(self.read_ste(sid))
        write_entry(writer, entry, to_words(target))
        if not self.options & Opt.SKIP_PREFETCH:
            self.cmdq.issue_cmd(build_command(Opcode.PREFETCH_CONFIG, SID=sid))
        self.emit("ste.write", sid=sid, ste=STE.pretty(target), syncs=writer.syncs)
        return writer.ret


class SteWriter(SteWriterOps):
    """STE writer: 64-bit stores into the stream table, sync = CFGI_STE(leaf) + CMD_SYNC."""

    def __init__(self, smmu: ArmSmmuDevice, sid: int) -> None:
        self.smmu = smmu
        self.sid = sid
        self.addr = smmu.ste_addr(sid)
        self.syncs = 0
        self.ret = 0

    def write_qword(self, index: int, value: int) -> None:
        self.smmu.mmio.write_u64(self.addr + 8 * index, value)

    def sync(self) -> None:
        assert self.smmu.cmdq is not None
        self.syncs += 1
        ret = self.smmu.cmdq.issue_cmd_with_sync(build_command(Opcode.CFGI_STE, SID=self.sid, LEAF=1))
        self.ret = self.ret or ret


__all__ = [
    "ArmSmmuDevice",
    "ArmSmmuParams",
    "DmaMemory",
    "MsiAlloc",
    "SteWriter",
    "StrtabCfg",
]
