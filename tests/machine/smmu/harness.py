"""A bare-metal SMMUv3 programming harness for tests (not the project's host driver).

It plays the part of privileged software on a machine with RAM and one ``SmmuV3``: it allocates the
stream table, CD tables, page tables and queues in RAM, programs the registers (queue bases,
STRTAB_BASE/CFG, CR0 enables with ACK polling on the modeled clock), writes STEs and CDs in the
architected layouts, submits commands through the command queue (write the entry, bump PROD,
poll CONS on the clock) and reads event records back from the event queue memory.

Everything it does to the SMMU goes through the SMMU's MMIO registers and RAM, as software would;
it never calls into the SMMU model's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pkvm_smmu.arch.commands import CMD_SIZE, Opcode, build_command, cfgi_all
from pkvm_smmu.arch.events import EVENT_SIZE, EventType, decode_event
from pkvm_smmu.arch.queues import q_inc, q_slot, q_space
from pkvm_smmu.arch.registers import (
    CMDQ_BASE,
    CMDQ_CONS,
    CR0,
    CR2,
    EVENTQ_BASE,
    EVENTQ_CONS,
    EVENTQ_PROD,
    REG_SIZE,
    STRTAB_BASE,
    STRTAB_BASE_CFG,
    CmdqError,
    Reg,
    StrtabFmt,
)
from pkvm_smmu.arch.strtab import CD, CD_SIZE, L1CD, L1STD, STE, STE_SIZE, SteConfig
from pkvm_smmu.arch.vmsa import GRANULES
from pkvm_smmu.machine.bus import HYP_CPU, ExternalAbort, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.irq import InterruptController
from pkvm_smmu.machine.smmu import SmmuFeatures, SmmuOptions, SmmuV3
from pkvm_smmu.pgtable import (
    BusTableMemory,
    IoPageTable,
    PageTableConfig,
    Prot,
    RangePageAllocator,
)
from pkvm_smmu.pgtable.memory import Buffer

SMMU_BASE = 0x0900_0000
RAM_BASE = 0x8000_0000
RAM_SIZE = 0x4000_0000  # 1 GiB, sparse
RW = Prot.READ | Prot.WRITE
POLL_TIMEOUT_US = 10_000.0


class HarnessError(AssertionError):
    """The harness could not do what a test asked (a test-setup problem, not a model result)."""


@dataclass
class Machine:
    bus: SystemBus
    clock: Clock
    smmu: SmmuV3
    irq: InterruptController


def make_machine(
    features: SmmuFeatures | None = None,
    options: SmmuOptions | None = None,
    *,
    ram_base: int = RAM_BASE,
    ram_size: int = RAM_SIZE,
) -> Machine:
    bus = SystemBus()
    clock = Clock()
    bus.add_ram(ram_base, ram_size)
    irq = InterruptController()
    smmu = SmmuV3("smmu0", bus, clock, features or SmmuFeatures(), SMMU_BASE, irq=irq, options=options)
    return Machine(bus, clock, smmu, irq)


class Stage2TableMemory:
    """``TableMemory`` for stage-1 tables that live at IPAs: every access goes through ``s2``."""

    def __init__(self, inner: BusTableMemory, s2: IoPageTable) -> None:
        self.inner = inner
        self.s2 = s2
        self._granule = s2.granule.size

    def _pa(self, ipa: int) -> int:
        pa = self.s2.iova_to_phys(ipa)
        if pa is None:
            raise HarnessError(f"IPA {ipa:#x} of a stage-1 table is not mapped at stage 2")
        return pa

    def _pieces(self, ipa: int, length: int) -> list[tuple[int, int]]:
        out = []
        while length > 0:
            chunk = min(length, self._granule - (ipa % self._granule))
            out.append((self._pa(ipa), chunk))
            ipa += chunk
            length -= chunk
        return out

    def read_u64(self, pa: int) -> int:
        return self.inner.read_u64(self._pa(pa))

    def write_u64(self, pa: int, value: int) -> None:
        self.inner.write_u64(self._pa(pa), value)

    def read_table(self, pa: int, length: int) -> bytes:
        return b"".join(self.inner.read_table(p, n) for p, n in self._pieces(pa, length))

    def write_table(self, pa: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        done = 0
        for p, n in self._pieces(pa, len(view)):
            self.inner.write_table(p, view[done : done + n])
            done += n

    def zero_page(self, pa: int, size: int = 4096) -> None:
        for p, n in self._pieces(pa, size):
            self.inner.write_table(p, bytes(n))


class IpaPageAllocator:
    """Hands out table pages at IPAs: physical pages from ``phys``, mapped in ``s2`` at PA + offset."""

    def __init__(self, phys: RangePageAllocator, s2: IoPageTable, ipa_offset: int) -> None:
        self.phys = phys
        self.s2 = s2
        self.ipa_offset = ipa_offset

    @property
    def granule_size(self) -> int:
        return self.phys.granule_size

    def _map(self, pa: int, size: int) -> int:
        ipa = pa + self.ipa_offset
        step = max(size, self.s2.granule.size)
        base = ipa & ~(step - 1)
        if self.s2.iova_to_phys(base) is None:
            result = self.s2.map(base, pa & ~(step - 1), step, RW | Prot.CACHE)
            if result.error:
                raise HarnessError(f"cannot map table IPA {ipa:#x} at stage 2: {result}")
        return ipa

    def alloc_page(self) -> int | None:
        pa = self.phys.alloc_page()
        return None if pa is None else self._map(pa, self.granule_size)

    def alloc_pages(self, count: int) -> int | None:
        pa = self.phys.alloc_pages(count)
        return None if pa is None else self._map(pa, count * self.granule_size)

    def free_page(self, pa: int) -> None:
        self.phys.free_page(pa - self.ipa_offset)

    def free_pages(self, pa: int, count: int) -> None:
        self.phys.free_pages(pa - self.ipa_offset, count)


@dataclass
class StreamTable:
    base: int
    log2size: int
    two_level: bool
    split: int = 0
    l2: dict[int, int] = field(default_factory=dict)  # L1 index -> L2 table PA


class SmmuHarness:
    """Driver-like helper over one machine. ``init()`` brings the SMMU up; builders return ints."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.bus = machine.bus
        self.clock = machine.clock
        self.smmu = machine.smmu
        self.memory = BusTableMemory(self.bus, HYP_CPU)
        ram = next(r for r in self.bus.ram_regions())
        self._next = ram.base
        self._end = ram.end
        self.strtab: StreamTable | None = None
        self.cmdq_base = 0
        self.cmdq_log2 = 0
        self.evtq_base = 0
        self.evtq_log2 = 0
        self._cmdq_prod = 0

    # -- memory --------------------------------------------------------------------------------
    def alloc(self, size: int, align: int = 4096) -> int:
        """Zeroed RAM, bump-allocated (never freed)."""
        align = max(align, 8)
        base = -(-self._next // align) * align
        if base + size > self._end:
            raise HarnessError(f"harness RAM exhausted allocating {size:#x} bytes")
        self._next = base + size
        self.bus.ram.zero(base, size)
        return base

    def page_allocator(self, granule: int = 4096, pages: int = 512) -> RangePageAllocator:
        base = self.alloc(granule * pages, granule)
        return RangePageAllocator(base, granule * pages, granule, memory=self.memory)

    def write_mem(self, address: int, data: bytes) -> None:
        if self.bus.write_bytes(HYP_CPU, address, data) is not None:
            raise HarnessError(f"write to {address:#x} aborted")

    def read_mem(self, address: int, length: int) -> bytes:
        data = self.bus.read_bytes(HYP_CPU, address, length)
        if isinstance(data, ExternalAbort):
            raise HarnessError(f"read of {address:#x} aborted")
        return data

    def write_u64(self, address: int, value: int) -> None:
        if self.bus.write(HYP_CPU, address, 8, value) is not None:
            raise HarnessError(f"write to {address:#x} aborted")

    def read_u64(self, address: int) -> int:
        value = self.bus.read(HYP_CPU, address, 8)
        if isinstance(value, ExternalAbort):
            raise HarnessError(f"read of {address:#x} aborted")
        return value

    # -- registers -----------------------------------------------------------------------------
    def write_reg(self, reg: Reg, value: int) -> None:
        size = REG_SIZE[reg]
        if self.bus.write(HYP_CPU, self.smmu.base + int(reg), size, value) is not None:
            raise HarnessError(f"write to {reg.name} aborted")

    def read_reg(self, reg: Reg) -> int:
        value = self.bus.read(HYP_CPU, self.smmu.base + int(reg), REG_SIZE[reg])
        if isinstance(value, ExternalAbort):
            raise HarnessError(f"read of {reg.name} aborted")
        return value

    def poll(self, condition: object, what: str, timeout_us: float = POLL_TIMEOUT_US) -> None:
        assert callable(condition)
        if not self.clock.poll(condition, timeout_us):
            raise HarnessError(f"timed out waiting for {what}")

    def set_cr0(self, value: int) -> None:
        """Write CR0 and wait for CR0ACK to match (the architected enable handshake)."""
        self.write_reg(Reg.CR0, value)
        self.poll(lambda: self.read_reg(Reg.CR0ACK) == value, f"CR0ACK == {value:#x}")

    def cr0(self) -> int:
        return self.read_reg(Reg.CR0)

    def enable(self, smmuen: bool = True, *, atschk: bool | None = None) -> None:
        value = self.cr0()
        value = CR0.SMMUEN.set(value, int(smmuen))
        if atschk is not None:
            value = CR0.ATSCHK.set(value, int(atschk))
        self.set_cr0(value)

    def set_cr2(self, *, recinvsid: bool = False) -> None:
        self.write_reg(Reg.CR2, CR2.encode(RECINVSID=int(recinvsid)))

    # -- bring-up ------------------------------------------------------------------------------
    def init(
        self,
        *,
        log2size: int = 8,
        two_level: bool = False,
        split: int = 6,
        cmdq_log2: int = 6,
        evtq_log2: int = 6,
        recinvsid: bool = True,
        atschk: bool = False,
        enable: bool = True,
    ) -> SmmuHarness:
        """Queues, stream table, CR2, enables, CFGI_ALL + TLBI_NSNH_ALL + SYNC, then SMMUEN."""
        self.cmdq_log2, self.evtq_log2 = cmdq_log2, evtq_log2
        self.cmdq_base = self.alloc(max(CMD_SIZE << cmdq_log2, 32), max(CMD_SIZE << cmdq_log2, 32))
        self.evtq_base = self.alloc(max(EVENT_SIZE << evtq_log2, 32), max(EVENT_SIZE << evtq_log2, 32))
        self.write_reg(Reg.CMDQ_BASE, CMDQ_BASE.encode(LOG2SIZE=cmdq_log2) | self.cmdq_base)
        self.write_reg(Reg.CMDQ_PROD, 0)
        self.write_reg(Reg.CMDQ_CONS, 0)
        self._cmdq_prod = 0
        self.write_reg(Reg.EVENTQ_BASE, EVENTQ_BASE.encode(LOG2SIZE=evtq_log2) | self.evtq_base)
        self.write_reg(Reg.EVENTQ_PROD, 0)
        self.write_reg(Reg.EVENTQ_CONS, 0)
        self.configure_strtab(log2size=log2size, two_level=two_level, split=split)
        self.set_cr2(recinvsid=recinvsid)
        self.set_cr0(CR0.encode(CMDQEN=1, EVENTQEN=1))
        err = self.submit(cfgi_all(), build_command(Opcode.TLBI_NSNH_ALL))
        if err is not CmdqError.NONE:
            raise HarnessError(f"init commands failed: {err.name}")
        if enable:
            self.set_cr0(CR0.encode(CMDQEN=1, EVENTQEN=1, SMMUEN=1, ATSCHK=int(atschk)))
        return self

    def configure_strtab(self, *, log2size: int, two_level: bool, split: int = 6) -> StreamTable:
        """Allocate a stream table and program STRTAB_BASE/CFG (SMMUEN must be 0)."""
        if two_level:
            l1_entries = max(1, 1 << max(0, log2size - split))
            size = l1_entries * 8
        else:
            size = STE_SIZE << log2size
        base = self.alloc(size, max(size, 64))
        fmt = StrtabFmt.TWO_LEVEL if two_level else StrtabFmt.LINEAR
        self.write_reg(Reg.STRTAB_BASE, STRTAB_BASE.ADDR.insert_address(base))
        self.write_reg(
            Reg.STRTAB_BASE_CFG,
            STRTAB_BASE_CFG.encode(LOG2SIZE=log2size, SPLIT=split if two_level else 0, FMT=fmt),
        )
        self.strtab = StreamTable(base, log2size, two_level, split)
        return self.strtab

    # -- stream table --------------------------------------------------------------------------
    def set_l1std(self, l1_index: int, span: int, l2ptr: int) -> None:
        """Write one raw L1STD."""
        assert self.strtab is not None and self.strtab.two_level
        self.write_u64(
            self.strtab.base + 8 * l1_index, L1STD.encode(SPAN=span) | L1STD.L2PTR.insert_address(l2ptr)
        )

    def ste_address(self, sid: int) -> int:
        """Where the STE of ``sid`` lives (for two-level tables, allocating a full L2 table)."""
        st = self.strtab
        assert st is not None
        if not st.two_level:
            return st.base + sid * STE_SIZE
        l1_index = sid >> st.split
        l2 = st.l2.get(l1_index)
        if l2 is None:
            size = STE_SIZE << st.split
            l2 = self.alloc(size, size)
            st.l2[l1_index] = l2
            self.set_l1std(l1_index, st.split + 1, l2)
        return l2 + (sid & ((1 << st.split) - 1)) * STE_SIZE

    def write_ste(self, sid: int, ste: int) -> int:
        """Write all 64 bytes of the STE of ``sid``; returns its address."""
        address = self.ste_address(sid)
        self.write_mem(address, STE.to_bytes(ste))
        return address

    def read_ste(self, sid: int) -> int:
        return STE.from_bytes(self.read_mem(self.ste_address(sid), STE_SIZE))

    # -- STE builders --------------------------------------------------------------------------
    @staticmethod
    def ste_abort() -> int:
        return STE.encode(V=1, CONFIG=SteConfig.ABORT)

    @staticmethod
    def ste_bypass(**extra: int) -> int:
        return STE.encode(V=1, CONFIG=SteConfig.BYPASS, **extra)

    @staticmethod
    def ste_s1(cd_table: int, *, cdmax: int = 0, fmt: int = 0, dss: int = 0, **extra: int) -> int:
        return STE.encode(
            V=1, CONFIG=SteConfig.S1_TRANS, S1FMT=fmt, S1CDMAX=cdmax, S1DSS=dss, **extra
        ) | STE.S1CONTEXTPTR.insert_address(cd_table)

    @staticmethod
    def s2_fields(s2: IoPageTable, vmid: int, *, s2r: bool = True, **extra: int) -> int:
        fields = {**s2.config.vtcr_fields(), "S2VMID": vmid, "S2R": int(s2r), **extra}
        return STE.encode(**fields) | STE.S2TTB.insert_address(s2.root)

    def ste_s2(self, s2: IoPageTable, vmid: int = 1, *, s2r: bool = True, **extra: int) -> int:
        return STE.encode(V=1, CONFIG=SteConfig.S2_TRANS) | self.s2_fields(s2, vmid, s2r=s2r, **extra)

    def ste_nested(
        self,
        cd_table_ipa: int,
        s2: IoPageTable,
        vmid: int = 1,
        *,
        cdmax: int = 0,
        fmt: int = 0,
        dss: int = 0,
        s2r: bool = True,
        **extra: int,
    ) -> int:
        s1 = STE.encode(V=1, CONFIG=SteConfig.NESTED, S1FMT=fmt, S1CDMAX=cdmax, S1DSS=dss)
        return s1 | STE.S1CONTEXTPTR.insert_address(cd_table_ipa) | self.s2_fields(s2, vmid, s2r=s2r, **extra)

    # -- CDs -----------------------------------------------------------------------------------
    @staticmethod
    def cd(pt: IoPageTable, asid: int = 1, *, record: bool = True, abort: bool = True, **extra: int) -> int:
        """A valid stage-1 CD for ``pt`` (TTB0; TTB1 disabled)."""
        fields = {**pt.config.cd_fields(), "V": 1, "ASID": asid, "R": int(record), "A": int(abort), **extra}
        return CD.encode(**fields) | CD.TTB0.insert_address(pt.root)

    def cd_table(self, entries: int = 1) -> int:
        size = CD_SIZE * max(entries, 1)
        return self.alloc(size, max(size, 64))

    def write_cd(self, table: int, index: int, cd: int, *, memory: object | None = None) -> int:
        """Write the CD at ``table[index]`` (``table`` is an IPA when ``memory`` translates)."""
        address = table + index * CD_SIZE
        if memory is None:
            self.write_mem(address, CD.to_bytes(cd))
        else:
            assert isinstance(memory, Stage2TableMemory)
            memory.write_table(address, CD.to_bytes(cd))
        return address

    def write_l1cd(self, table: int, index: int, l2ptr: int, valid: bool = True) -> None:
        self.write_u64(table + 8 * index, L1CD.encode(V=int(valid)) | L1CD.L2PTR.insert_address(l2ptr))

    # -- page tables ---------------------------------------------------------------------------
    def s1_table(self, granule: int = 4096, ias: int = 48, oas: int = 48, pages: int = 256) -> IoPageTable:
        config = PageTableConfig(stage=1, granule=GRANULES[granule], ias=ias, oas=oas)
        return IoPageTable(config, self.memory, self.page_allocator(granule, pages))

    def s2_table(self, granule: int = 4096, ias: int = 48, oas: int = 48, pages: int = 256) -> IoPageTable:
        config = PageTableConfig(stage=2, granule=GRANULES[granule], ias=ias, oas=oas)
        return IoPageTable(config, self.memory, self.page_allocator(granule, pages))

    def nested_s1_table(
        self,
        s2: IoPageTable,
        ipa_offset: int,
        granule: int = 4096,
        ias: int = 48,
        oas: int = 48,
        pages: int = 64,
    ) -> tuple[IoPageTable, Stage2TableMemory]:
        """A stage-1 table whose pages live at IPAs (PA + ``ipa_offset``) that ``s2`` maps."""
        config = PageTableConfig(stage=1, granule=GRANULES[granule], ias=ias, oas=oas)
        phys = self.page_allocator(max(granule, s2.granule.size), pages)
        if granule < phys.granule_size:
            # A smaller stage-1 granule: carve stage-1 pages out of the stage-2-sized ones.
            phys = RangePageAllocator(phys.base, phys.size, granule, memory=self.memory)
        memory = Stage2TableMemory(self.memory, s2)
        allocator = IpaPageAllocator(phys, s2, ipa_offset)
        return IoPageTable(config, memory, allocator), memory

    def nested_alloc(self, s2: IoPageTable, ipa_offset: int, size: int) -> tuple[int, int]:
        """RAM mapped at stage 2 at PA + ``ipa_offset``: (ipa, pa)."""
        g = s2.granule.size
        span = -(-size // g) * g
        pa = self.alloc(span, g)
        result = s2.map(pa + ipa_offset, pa, span, RW | Prot.CACHE)
        if result.error:
            raise HarnessError(f"cannot map {span:#x} bytes at IPA {pa + ipa_offset:#x}: {result}")
        return pa + ipa_offset, pa

    def buffer(self, size: int = 4096, align: int = 4096) -> int:
        """A DMA target in RAM."""
        return self.alloc(size, align)

    # -- commands ------------------------------------------------------------------------------
    def cmdq_cons(self) -> int:
        return self.read_reg(Reg.CMDQ_CONS)

    def submit(self, *commands: int, sync: bool = True, wait: bool = True) -> CmdqError:
        """Queue ``commands`` (plus a CMD_SYNC when ``sync``), ring PROD, wait for CONS to catch up.

        Returns CMDQ_CONS.ERR (NONE when everything was consumed). On an error the queue is left
        stopped on the failing command, as the architecture leaves it.
        """
        todo = [*commands, build_command(Opcode.SYNC)] if sync else list(commands)
        qs = self.cmdq_log2
        for command in todo:
            self.poll(
                lambda: (
                    q_space(self._cmdq_prod, CMDQ_CONS.RD.get(self.cmdq_cons()), qs) > 0
                    or CMDQ_CONS.ERR.get(self.cmdq_cons()) != 0
                ),
                "command queue space",
            )
            if CMDQ_CONS.ERR.get(self.cmdq_cons()):
                break
            slot = q_slot(self._cmdq_prod, qs)
            self.write_mem(self.cmdq_base + slot * CMD_SIZE, command.to_bytes(CMD_SIZE, "little"))
            self._cmdq_prod = q_inc(self._cmdq_prod, 1, qs)
            self.write_reg(Reg.CMDQ_PROD, self._cmdq_prod)
        if not wait:
            return CmdqError.NONE

        def drained() -> bool:
            cons = self.cmdq_cons()
            return CMDQ_CONS.ERR.get(cons) != 0 or CMDQ_CONS.RD.get(cons) == self._cmdq_prod

        self.poll(drained, "command queue to drain")
        return CmdqError(CMDQ_CONS.ERR.get(self.cmdq_cons()))

    def cfgi_ste(self, sid: int, leaf: bool = True) -> CmdqError:
        return self.submit(build_command(Opcode.CFGI_STE, SID=sid, LEAF=int(leaf)))

    def cfgi_cd(self, sid: int, ssid: int = 0, leaf: bool = True) -> CmdqError:
        return self.submit(build_command(Opcode.CFGI_CD, SID=sid, SSID=ssid, LEAF=int(leaf)))

    def cfgi_all(self) -> CmdqError:
        return self.submit(cfgi_all())

    def tlbi_nh_all(self, vmid: int = 0) -> CmdqError:
        return self.submit(build_command(Opcode.TLBI_NH_ALL, VMID=vmid))

    def tlbi_nh_asid(self, asid: int, vmid: int = 0) -> CmdqError:
        return self.submit(build_command(Opcode.TLBI_NH_ASID, ASID=asid, VMID=vmid))

    def tlbi_nh_va(self, va: int, asid: int, vmid: int = 0, leaf: bool = True) -> CmdqError:
        return self.submit(
            build_command(Opcode.TLBI_NH_VA, ASID=asid, VMID=vmid, LEAF=int(leaf), ADDR=va & ~0xFFF)
        )

    def tlbi_s2_ipa(self, ipa: int, vmid: int, leaf: bool = True) -> CmdqError:
        return self.submit(build_command(Opcode.TLBI_S2_IPA, VMID=vmid, LEAF=int(leaf), ADDR=ipa & ~0xFFF))

    def tlbi_s12_vmall(self, vmid: int) -> CmdqError:
        return self.submit(build_command(Opcode.TLBI_S12_VMALL, VMID=vmid))

    def tlbi_nsnh_all(self) -> CmdqError:
        return self.submit(build_command(Opcode.TLBI_NSNH_ALL))

    def atc_inv(self, sid: int, address: int = 0, size: int = 52, ssid: int | None = None) -> CmdqError:
        fields = {"SID": sid, "SIZE": size, "ADDR": address & ~0xFFF}
        if ssid is not None:
            fields.update(SSV=1, SSID=ssid)
        return self.submit(build_command(Opcode.ATC_INV, **fields))

    # -- events --------------------------------------------------------------------------------
    def events(self) -> list[int]:
        """Consume every record the SMMU has written to the event queue (oldest first)."""
        qs = self.evtq_log2
        prod_reg = self.read_reg(Reg.EVENTQ_PROD)
        cons_reg = self.read_reg(Reg.EVENTQ_CONS)
        prod, cons = EVENTQ_PROD.WR.get(prod_reg), EVENTQ_CONS.RD.get(cons_reg)
        out = []
        while cons != prod:
            slot = q_slot(cons, qs)
            raw = self.read_mem(self.evtq_base + slot * EVENT_SIZE, EVENT_SIZE)
            out.append(int.from_bytes(raw, "little"))
            cons = q_inc(cons, 1, qs)
        overflow = EVENTQ_PROD.OVFLG.get(prod_reg)
        self.write_reg(Reg.EVENTQ_CONS, EVENTQ_CONS.encode(RD=cons, OVACKFLG=overflow))
        return out

    def decoded_events(self) -> list[tuple[EventType | int, dict[str, int]]]:
        return [decode_event(e) for e in self.events()]

    def one_event(self) -> tuple[EventType | int, dict[str, int]]:
        """Exactly one new event record, decoded."""
        events = self.decoded_events()
        if len(events) != 1:
            raise AssertionError(f"expected one event record, got {events}")
        return events[0]


IPA_OFFSET = 0x40_0000_0000  # nested streams: table IPAs are PA + this
DATA_IPA = 0x7_0000_0000
NESTED_VA = 0x5555_0000_0000


@dataclass
class NestedStream:
    """A nested (stage 1 + stage 2) stream whose stage-1 tables and CD live at IPAs."""

    sid: int
    vmid: int
    asid: int
    va: int  # NESTED_VA, mapped by stage 1 to DATA_IPA ...
    ipa: int
    pa: int  # ... which stage 2 maps to this buffer (2 * the larger granule)
    size: int
    s1: IoPageTable
    s2: IoPageTable
    s1_memory: Stage2TableMemory
    cd_ipa: int
    cd_pa: int


def nested_stream(
    h: SmmuHarness,
    s1_granule: int = 4096,
    s2_granule: int = 4096,
    *,
    sid: int = 5,
    vmid: int = 2,
    asid: int = 4,
    **ste_fields: int,
) -> NestedStream:
    s2 = h.s2_table(s2_granule, ias=48)
    s1, s1_memory = h.nested_s1_table(s2, IPA_OFFSET, s1_granule, ias=48)
    size = 2 * max(s1_granule, s2_granule)
    buf = h.buffer(size, size // 2)
    map_pages(s2, DATA_IPA, buf, size)
    map_pages(s1, NESTED_VA, DATA_IPA, size)
    cd_ipa, cd_pa = h.nested_alloc(s2, IPA_OFFSET, 64)
    h.write_cd(cd_ipa, 0, h.cd(s1, asid=asid), memory=s1_memory)
    h.write_ste(sid, h.ste_nested(cd_ipa, s2, vmid, **ste_fields))
    return NestedStream(sid, vmid, asid, NESTED_VA, DATA_IPA, buf, size, s1, s2, s1_memory, cd_ipa, cd_pa)


def harness(
    features: SmmuFeatures | None = None, options: SmmuOptions | None = None, **init: object
) -> SmmuHarness:
    """A machine with an initialised SMMU (``init`` keywords go to ``SmmuHarness.init``)."""
    h = SmmuHarness(make_machine(features, options))
    h.init(**init)  # type: ignore[arg-type]
    return h


def map_pages(pt: IoPageTable, iova: int, pa: int, size: int, prot: int = RW) -> None:
    result = pt.map(iova, pa, size, prot)
    if result.error or result.mapped != size:
        raise HarnessError(f"map {iova:#x} -> {pa:#x} ({size:#x}) failed: {result}")
