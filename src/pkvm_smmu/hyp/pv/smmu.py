"""One SMMUv3 the hyp owns outright (v3 and RFC v2): the host never programs it.

Take-over reuses the trap-and-emulate driver's steps (MMIO donated, mini-probe, command queue and
stream table from the IOMMU pool, GBPA abort, CFGI_ALL + TLBI_NSNH_ALL), then the hyp enables the
SMMU itself: its own event queue, CR1/CR2, interrupts, SMMUEN. Host accesses to the registers are
never emulated: they fault.

Every STE the hyp has a table for is ABORT until a hypercall says otherwise: a linear stream table
is filled with ABORT STEs at take-over; a 2-level table gets each L2 table (every STE ABORT) when a
StreamID of its range is first named by a hypercall. Until then the L1 descriptor is invalid, so a
transaction on such a StreamID is terminated as well (C_BAD_STE, recorded and drained by the hyp).

STE updates are whole-entry: a live translating STE goes through ABORT first (CFGI_STE + CMD_SYNC)
when more than word 0 changes; every update ends with CFGI_STE + CMD_SYNC before returning.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pkvm_smmu.arch.commands import Opcode, build_command, decode_command
from pkvm_smmu.arch.events import EVENT_SIZE, EventType, decode_event
from pkvm_smmu.arch.queues import q_empty, q_inc, q_slot
from pkvm_smmu.arch.registers import (
    CR0,
    CR2,
    EVENTQ_BASE,
    EVENTQ_CONS,
    EVENTQ_PROD,
    GERROR,
    IDR0,
    IDR1,
    IRQ_CTRL,
    Reg,
    Shareability,
)
from pkvm_smmu.arch.strtab import CD, L1STD, STE, STE_SIZE, Cacheability, S1Dss, SteConfig, Strw
from pkvm_smmu.hyp.smmuv3.cmdq import tlbi_s2_ipa_commands, wait_for
from pkvm_smmu.hyp.smmuv3.device import COMPONENT as SMMUV3_COMPONENT
from pkvm_smmu.hyp.smmuv3.device import HypSmmuV3, SmmuDescription, SmmuStructures
from pkvm_smmu.hyp.smmuv3.policy import LINUX_CR1, STRTAB_SPLIT, V4Policy
from pkvm_smmu.machine.memory import PAGE_SIZE
from pkvm_smmu.pgtable.config import PageTableConfig

if TYPE_CHECKING:
    from pkvm_smmu.hyp.iommu.core import KvmIommu

COMPONENT = "hyp.pv"
PV_EVTQ_LOG2 = 7  # 128 records: one 4 KiB page
TLBI_MAX_OPS = 64  # above this many pages a whole-ASID/VMID invalidation is cheaper
_L2_ENTRIES = 1 << STRTAB_SPLIT
_L2_SIZE = STE_SIZE * _L2_ENTRIES
_ABORT_STE = STE.encode(V=1, CONFIG=SteConfig.ABORT)
_WORD0 = (1 << 64) - 1


_CONFIG_LABELS = {0: "abort", 4: "bypass", 5: "s1", 6: "s2", 7: "nested"}


def ste_label(ste: int) -> str:
    """What an STE does, in one word: invalid, abort, bypass, s1, s2 or nested."""
    if not STE.V.get(ste):
        return "invalid"
    config = STE.CONFIG.get(ste)
    return _CONFIG_LABELS.get(config, "abort")


def abort_ste() -> int:
    return _ABORT_STE


def s2_ste(config: PageTableConfig, s2ttb: int, vmid: int) -> int:
    """Stage-2-only translation by ``config``'s table at ``s2ttb`` (the identity stage-2 with VMID
    0, or a paging domain's stage-2 with its own VMID)."""
    fields = config.vtcr_fields()
    ste = STE.encode(V=1, CONFIG=SteConfig.S2_TRANS, S2VMID=vmid, S2PTW=1, S2R=1, **fields)
    return ste | STE.S2TTB.insert_address(s2ttb)


def s1_ste(cd_pa: int) -> int:
    """Stage-1 translation through a one-entry CD table (no substreams), NS-EL1, VMID 0."""
    return STE.encode(
        V=1,
        CONFIG=SteConfig.S1_TRANS,
        S1CDMAX=0,
        S1DSS=S1Dss.TERMINATE,
        S1CIR=Cacheability.WBRA,
        S1COR=Cacheability.WBRA,
        S1CSH=Shareability.ISH,
        STRW=Strw.NSEL1,
        S2VMID=0,
    ) | STE.S1CONTEXTPTR.insert_address(cd_pa)


def s1_cd(config: PageTableConfig, ttb0: int, asid: int) -> int:
    """A valid CD for a stage-1 domain table: TTB0 only, faults recorded and terminated."""
    cd = CD.encode(**config.cd_fields(), V=1, R=1, A=1, ASET=1, ASID=asid)
    return cd | CD.TTB0.insert_address(ttb0)


class PvSmmuV3(HypSmmuV3):
    """``struct hyp_arm_smmu_v3_device`` of the paravirtual designs."""

    def __init__(self, desc: SmmuDescription, iommu: KvmIommu, index: int) -> None:
        super().__init__(desc, iommu, V4Policy())
        self.index = index
        self.vmid_bits = 8
        self.asid_bits = 8
        self.evtq_base = 0
        self.evtq_log2 = 0
        self.evtq_cons = 0
        self.events = 0
        self.ste_syncs = 0
        self._l2: dict[int, int] = {}  # L1 index -> L2 table PA
        self._ovack = 0  # EVENTQ_CONS.OVACKFLG as last written
        # More memory the SMMU reads for the hyp (pv-paging: the pool of domain tables and CDs).
        self.extra_reads: Callable[[], tuple[tuple[int, int, str], ...]] = tuple

    def emit(self, kind: str, **fields: Any) -> None:
        if self.trace.enabled:
            self.trace.emit(COMPONENT, kind, smmu=self.name, **fields)

    # -- take-over --------------------------------------------------------------------------------
    def init_device(self) -> int:
        """The trap-and-emulate take-over, then the hyp's own enable (no emulation for the host)."""
        ret = super().init_device()
        if ret:
            return ret
        for step in (self._probe_ids, self._init_evtq, self._init_linear_strtab, self._enable):
            ret = step()
            if ret:
                self.deinit_device()
                self.emit("init", result=ret, failed_step=step.__name__.lstrip("_"))
                return ret
        self.emit("init", result=0, sid_bits=self.sid_bits, two_level=self.two_level, evtq=self.evtq_log2)
        return 0

    def deinit_device(self) -> None:
        super().deinit_device()
        self._l2.clear()

    def smmu_structures(self) -> SmmuStructures:
        """What the trap-and-emulate SMMU declares, plus the hyp's event queue (written by the
        SMMU) and whatever the design adds (domain tables)."""
        base = super().smmu_structures()
        if not self.taken_over or not self.evtq_base:
            return base
        writes = ((self.evtq_base, EVENT_SIZE << self.evtq_log2, "hyp event queue"),)
        return SmmuStructures(base.reads + self.extra_reads(), base.writes + writes)

    def handle_dabt(self, offset: int, size: int, is_write: bool, value: int) -> int:
        """Never emulated: the host has no business with these registers (the driver declines
        every abort, so this is not reached)."""
        raise AssertionError("pv SMMUs are not emulated for the host")

    def _probe_ids(self) -> int:
        idr0 = self._hw_read(Reg.IDR0, 4)
        self.vmid_bits = 16 if IDR0.VMID16.get(idr0) else 8
        self.asid_bits = 16 if IDR0.ASID16.get(idr0) else 8
        self.evtq_log2 = min(PV_EVTQ_LOG2, IDR1.EVENTQS.get(self._hw_read(Reg.IDR1, 4)))
        return 0

    def _init_evtq(self) -> int:
        base = self._shadow_memory(None, 0, EVENT_SIZE << self.evtq_log2, "event queue")
        if base is None:
            return -errno.ENOMEM
        self.evtq_base = base
        self.evtq_cons = 0
        self._hw_write(Reg.EVENTQ_BASE, 8, EVENTQ_BASE.ADDR.insert_address(base) | self.evtq_log2)
        self._hw_write(Reg.EVENTQ_PROD, 4, 0)
        self._hw_write(Reg.EVENTQ_CONS, 4, 0)
        return 0

    def _init_linear_strtab(self) -> int:
        """A linear table is small: every STE ABORT now (2-level tables get theirs per L2)."""
        if not self.two_level:
            self.write_mem(self.strtab_base, STE.to_bytes(_ABORT_STE) * self.num_ents)
        return 0

    def _enable(self) -> int:
        """CR1/CR2 as Linux programs them, event and global-error interrupts, then EVENTQEN and
        SMMUEN: from here on every StreamID aborts unless an STE says otherwise."""
        self._hw_write(Reg.CR1, 4, LINUX_CR1)
        self._hw_write(Reg.CR2, 4, CR2.encode(RECINVSID=1, PTM=1))
        irqen = IRQ_CTRL.encode(EVENTQ_IRQEN=1, GERROR_IRQEN=1)
        self._hw_write(Reg.IRQ_CTRL, 4, irqen)
        ret = wait_for(self, lambda: self._hw_read(Reg.IRQ_CTRLACK, 4) == irqen)
        if ret:
            return ret
        # ATSCHK as Android's driver sets it: Translated traffic is checked against STE.EATS, which
        # the hyp leaves at 0, instead of passing unchecked ("fast mode").
        atschk = IDR0.ATS.get(self._hw_read(Reg.IDR0, 4))
        cr0 = self._hw_read(Reg.CR0, 4) | CR0.encode(CMDQEN=1, EVENTQEN=1, SMMUEN=1, ATSCHK=atschk)
        self._hw_write(Reg.CR0, 4, cr0)
        return wait_for(self, lambda: self._hw_read(Reg.CR0ACK, 4) == cr0)

    # -- stream table -------------------------------------------------------------------------------
    def sid_valid(self, sid: int) -> bool:
        if not 0 <= sid < 1 << self.sid_bits:
            return False
        if self.two_level:
            return sid >> STRTAB_SPLIT < self.num_l1_ents
        return sid < self.num_ents

    def _ste_address(self, sid: int) -> int | None:
        """Where the STE of ``sid`` lives, allocating its L2 table (all ABORT) on first use."""
        if not self.two_level:
            return self.strtab_base + sid * STE_SIZE
        index = sid >> STRTAB_SPLIT
        l2 = self._l2.get(index)
        if l2 is None:
            l2 = self.iommu.pool.alloc_pages(_L2_SIZE // PAGE_SIZE)
            if l2 is None:
                return None
            self._pool_allocs.append((l2, _L2_SIZE // PAGE_SIZE))
            self.write_mem(l2, STE.to_bytes(_ABORT_STE) * _L2_ENTRIES)
            self.write_u64(self.strtab_base + index * 8, L1STD.encode(SPAN=STRTAB_SPLIT + 1) | l2)
            # The SMMU may hold the invalid L1 descriptor from a stray transaction: Leaf=0.
            self.cmd_sync(build_command(Opcode.CFGI_STE, SID=index << STRTAB_SPLIT, LEAF=0))
            self._l2[index] = l2
            self.emit("strtab.l2", index=index, l2=l2)
        return l2 + (sid & (_L2_ENTRIES - 1)) * STE_SIZE

    def read_ste(self, sid: int) -> int | None:
        address = self._ste_address(sid)
        data = None if address is None else self._read_mem(address, STE_SIZE)
        return None if data is None else STE.from_bytes(data)

    def install_ste(self, sid: int, target: int, why: str) -> int:
        """Write ``target`` as the STE of ``sid`` and make the SMMU use it: 0 once CFGI_STE +
        CMD_SYNC completed, -ENOMEM without an L2 table, -ETIMEDOUT when the SMMU did not finish."""
        address = self._ste_address(sid)
        if address is None:
            return -errno.ENOMEM
        data = self._read_mem(address, STE_SIZE)
        current = STE.from_bytes(data) if data is not None else 0
        old, new = STE.to_words(current), STE.to_words(target)
        syncs = 0
        ret = 0
        with self.lock:
            translating = bool(STE.V.get(current)) and STE.CONFIG.get(current) & 0b100
            if translating and old[1:] != new[1:]:
                # Break before make: the SMMU must never see a mix of old and new words.
                self.write_u64(address, _ABORT_STE)
                ret = self._cfgi_ste(sid)
                syncs += 1
            for index in range(1, len(new)):
                if new[index] != old[index]:
                    self.write_u64(address + 8 * index, new[index])
            self.write_u64(address, new[0])
            ret = self._cfgi_ste(sid) or ret
            syncs += 1
        self.ste_syncs += syncs
        self.emit(
            "ste.install",
            sid=sid,
            why=why,
            old=ste_label(current),
            new=ste_label(target),
            ste=STE.pretty(target),
            syncs=syncs,
            result=ret,
        )
        return ret

    def _cfgi_ste(self, sid: int) -> int:
        if self.cmdq is None:
            return -errno.ENODEV
        return self.cmdq.send_cmd(build_command(Opcode.CFGI_STE, SID=sid, LEAF=1))

    def cmd_sync(self, *commands: int) -> int:
        """Issue ``commands`` then CMD_SYNC and wait for the SMMU to consume them all."""
        cmdq = self.cmdq
        if cmdq is None:
            return -errno.ENODEV
        for command in commands:
            ret = cmdq.add_cmd(command)
            if ret:
                return ret
        return cmdq.sync()

    # -- TLB maintenance for paging domains -----------------------------------------------------------
    def tlb_inv_range(self, stage: int, tag: int, iova: int, size: int, granule: int, leaf: bool) -> int:
        """Invalidate ``[iova, iova + size)`` of a domain (stage 1: ``tag`` is the ASID, VMID 0;
        stage 2: ``tag`` is the VMID) and wait for CMD_SYNC."""
        bitmap = self.pgsize_bitmap
        if size // granule > TLBI_MAX_OPS and not self.range_inv:
            return self.tlb_inv_all(stage, tag)
        commands = tlbi_s2_ipa_commands(iova, size, granule, leaf, bitmap, self.range_inv, vmid=tag)
        if stage == 1:
            commands = [_as_nh_va(command, asid=tag) for command in commands]
        with self.lock:
            return self.cmd_sync(*commands)

    def tlb_inv_all(self, stage: int, tag: int) -> int:
        command = (
            build_command(Opcode.TLBI_NH_ASID, ASID=tag, VMID=0)
            if stage == 1
            else build_command(Opcode.TLBI_S12_VMALL, VMID=tag)
        )
        with self.lock:
            return self.cmd_sync(command)

    def cfgi_cd(self, sid: int) -> int:
        with self.lock:
            return self.cmd_sync(build_command(Opcode.CFGI_CD, SID=sid, SSID=0, LEAF=1))

    # -- events (the hyp owns the event queue) ---------------------------------------------------------
    def handle_evtq_irq(self, _line: str = "") -> bool:
        """Drain every event record, each one traced; True when there was one."""
        log2 = self.evtq_log2
        if not self.evtq_base:
            return False
        handled = False
        prod = self._hw_read(Reg.EVENTQ_PROD, 4)
        while not q_empty(prod & ((2 << log2) - 1), self.evtq_cons, log2):
            slot = q_slot(self.evtq_cons, log2)
            data = self._read_mem(self.evtq_base + slot * EVENT_SIZE, EVENT_SIZE)
            if data is None:
                break
            etype, fields = decode_event(int.from_bytes(data, "little"))
            name = etype.name if isinstance(etype, EventType) else f"UNKNOWN({etype:#x})"
            self.events += 1
            self.emit(
                "evtq.event", event=name, id=int(etype), **{k.lower(): int(v) for k, v in fields.items()}
            )
            self.evtq_cons = q_inc(self.evtq_cons, 1, log2)
            handled = True
        overflow = EVENTQ_PROD.OVFLG.get(prod)
        if overflow != self._ovack:
            self.emit("evtq.overflow")  # records were lost; acknowledging is all there is to do
            self._ovack = overflow
        self._hw_write(Reg.EVENTQ_CONS, 4, self.evtq_cons | EVENTQ_CONS.OVACKFLG.insert(self._ovack))
        return handled

    def handle_gerror_irq(self, _line: str = "") -> bool:
        gerror = self._hw_read(Reg.GERROR, 4)
        active = gerror ^ self._hw_read(Reg.GERRORN, 4)
        if not active:
            return False
        self.emit("gerror", active=GERROR.pretty(active))
        self._hw_write(Reg.GERRORN, 4, gerror)
        return True


def _as_nh_va(command: int, *, asid: int) -> int:
    """The TLBI_NH_VA twin of a TLBI_S2_IPA (same range fields, the ASID of a stage-1 domain)."""
    _, fields = decode_command(command)
    fields.pop("VMID", None)
    return build_command(Opcode.TLBI_NH_VA, ASID=asid, VMID=0, **fields)


__all__ = [
    "COMPONENT",
    "SMMUV3_COMPONENT",
    "PvSmmuV3",
    "abort_ste",
    "s1_cd",
    "s1_ste",
    "s2_ste",
    "ste_label",
]
