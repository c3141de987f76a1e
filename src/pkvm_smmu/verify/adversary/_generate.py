"""A seeded generator of adversarial actions, aimed at what the system has now.

``ActionGenerator(system, rng).next()`` looks at the live system (the host driver's structures, the
memory the host may not touch, the devices' StreamIDs, the DMA mappings made so far) and returns a
short burst of actions: a register write with a value built from the register's own fields, an
STE/CD/L1 descriptor/page-table entry rewritten one field at a time followed (usually) by the
invalidation that makes the hyp look at it, a command with hostile fields, a DMA at an address that
matters, a hypercall with arguments aimed at hyp and guest pages... Uniformly random values would
almost never form a valid STE; these do, and still cover every argument the vocabulary has.

``rng`` is anything with ``random.Random``'s methods (a Hypothesis ``randoms()`` draw works too), so
the same seed and the same system give the same actions.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from pkvm_smmu.arch._bitfield import Layout
from pkvm_smmu.arch.commands import CMD_SYNC, COMMAND_LAYOUTS, Opcode, SyncCs, build_command, cfgi_all
from pkvm_smmu.arch.registers import (
    CMDQ_BASE,
    CR0,
    EVENTQ_BASE,
    GBPA,
    STRTAB_BASE,
    STRTAB_BASE_CFG,
    Reg,
    StrtabFmt,
)
from pkvm_smmu.arch.strtab import CD, CD_SIZE, L1STD, STE, STE_SIZE
from pkvm_smmu.hyp.hypercalls import Arg
from pkvm_smmu.machine.memory import PAGE_SHIFT, PAGE_SIZE
from pkvm_smmu.verify.adversary._actions import (
    DIRECTIONS,
    DMA_MODES,
    DOMAIN_KINDS,
    DONATIONS,
    U64_MAX,
    Action,
    Advance,
    Attach,
    Command,
    Dma,
    DmaMap,
    DmaUnmap,
    Donate,
    Hypercall,
    IommuMap,
    IommuUnmap,
    MemWrite,
    RegRead,
    RegWrite,
)
from pkvm_smmu.verify.adversary._system import System
from pkvm_smmu.verify.adversary._targets import (
    foreign_runs,
    host_cd_tables,
    host_l2_tables,
    host_masters,
    host_page_tables,
    host_smmus,
    host_ste_address,
)

IOVA_BASE = 0x1000_0000  # where the generator's own iommu_map calls go
_STE_FIELDS = ("V", "CONFIG", "S1CONTEXTPTR", "S1CDMAX", "S1FMT", "S1DSS", "EATS", "S2TTB", "S2VMID",
               "S2T0SZ", "S2SL0", "S2TG", "S2PS", "S2AA64", "STRW", "PRIVCFG", "INSTCFG", "SHCFG", "NSCFG",
               "S2S", "S2R", "S2PTW", "S2AFFD")  # fmt: skip
_CD_FIELDS = ("V", "TTB0", "TTB1", "T0SZ", "T1SZ", "EPD0", "EPD1", "TG0", "IPS", "AA64", "ASID", "R", "A",
              "S", "AFFD", "HD", "HA")  # fmt: skip
_REG_WEIGHTS: dict[Reg, int] = {
    Reg.CR0: 10, Reg.GBPA: 8, Reg.CR1: 2, Reg.CR2: 2, Reg.STRTAB_BASE: 5, Reg.STRTAB_BASE_CFG: 4,
    Reg.CMDQ_BASE: 3, Reg.CMDQ_PROD: 2, Reg.CMDQ_CONS: 1, Reg.EVENTQ_BASE: 4, Reg.PRIQ_BASE: 3,
    Reg.EVENTQ_IRQ_CFG0: 3, Reg.PRIQ_IRQ_CFG0: 2, Reg.GERROR_IRQ_CFG0: 3, Reg.IRQ_CTRL: 3,
    Reg.GERRORN: 2, Reg.EVENTQ_PROD: 1, Reg.EVENTQ_CONS: 2, Reg.PRIQ_CONS: 1, Reg.GATOS_CTRL: 1,
    Reg.GATOS_SID: 1, Reg.GATOS_ADDR: 1, Reg.IDR0: 1, Reg.CR0ACK: 1,
}  # fmt: skip
# Commands the SMMU rejects (CERROR_ILL) stop the hyp's shadow queue for good under v4: every later
# trap then waits out the hyp's timeouts and the host takes a GERROR interrupt storm. They are kept
# rare (about one command in twenty) so that most episodes explore something else.
_OPCODE_WEIGHTS: dict[int, float] = {
    Opcode.CFGI_STE: 10, Opcode.CFGI_STE_RANGE: 5, Opcode.CFGI_CD: 5, Opcode.CFGI_CD_ALL: 3,
    Opcode.TLBI_NH_ALL: 2, Opcode.TLBI_NH_ASID: 3, Opcode.TLBI_NH_VA: 3, Opcode.TLBI_S2_IPA: 3,
    Opcode.TLBI_S12_VMALL: 2, Opcode.TLBI_NSNH_ALL: 2, Opcode.TLBI_EL2_ALL: 0.25, Opcode.SYNC: 5,
    Opcode.ATC_INV: 3, Opcode.PREFETCH_CONFIG: 2, Opcode.PREFETCH_ADDR: 1, Opcode.PRI_RESP: 0.25,
    Opcode.RESUME: 0.25, Opcode.STALL_TERM: 0.25, Opcode.CFGI_VMS_PIDM: 0.25, Opcode.TLBI_S_EL2_ALL: 0.25,
    0x7F: 0.25,  # no such opcode
}  # fmt: skip
_CR0_BITS = (CR0.SMMUEN, CR0.PRIQEN, CR0.EVENTQEN, CR0.CMDQEN, CR0.ATSCHK)
_CR0_ENABLES = CR0.SMMUEN.in_place_mask | CR0.EVENTQEN.in_place_mask | CR0.CMDQEN.in_place_mask
_WIDE = frozenset({Reg.STRTAB_BASE, Reg.CMDQ_BASE, Reg.EVENTQ_BASE, Reg.PRIQ_BASE, Reg.GATOS_ADDR,
                   Reg.EVENTQ_IRQ_CFG0, Reg.PRIQ_IRQ_CFG0, Reg.GERROR_IRQ_CFG0, Reg.GATOS_SID})  # fmt: skip
_PAGE_TARGETS = ("buffer", "buffer", "mapping", "cmdq", "strtab", "l2", "cd", "pgtable", "foreign", "evtq")
# What a queue that must stay alive may carry: commands this SMMU accepts with the sane fields.
_QUEUE_SAFE = frozenset({
    Opcode.CFGI_STE, Opcode.CFGI_STE_RANGE, Opcode.CFGI_CD, Opcode.CFGI_CD_ALL, Opcode.TLBI_NH_ALL,
    Opcode.TLBI_NH_ASID, Opcode.TLBI_S12_VMALL, Opcode.TLBI_NSNH_ALL, Opcode.SYNC, Opcode.PREFETCH_CONFIG,
})  # fmt: skip
_LEGAL_OPCODES = {op: w for op, w in _OPCODE_WEIGHTS.items() if op in _QUEUE_SAFE}
_SANE_FIELDS: dict[str, Callable[[Any], int]] = {
    "SSID": lambda rng: rng.choice((0, 1, 2)),
    "SSV": lambda rng: 0,
    "LEAF": lambda rng: rng.randrange(2),
    "ASID": lambda rng: rng.choice((0, 1, 2, 3, 0xFFFF)),
    "VMID": lambda rng: rng.choice((0, 1, 2, 0xFF)),
    "RANGE": lambda rng: rng.choice((0, 4, 8, 31)),
    "ADDR": lambda rng: 0,
    "MSIADDR": lambda rng: 0,
    "CS": lambda rng: rng.choice((SyncCs.NONE, SyncCs.SEV, SyncCs.IRQ)),
    "GLOBAL": lambda rng: rng.randrange(2),
    "SIZE": lambda rng: rng.choice((0, 1, 12, 52)),
}


def _weighted(rng: Any, weights: Mapping[Any, float]) -> Any:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys], k=1)[0]


def _field_value(rng: Any, layout: type[Layout], name: str, addresses: list[int]) -> tuple[int, bool]:
    """A hostile value for one field: (value, is it an address)."""
    f = layout.field(name)
    if f.addr_lo is not None:
        address = rng.choice(addresses) if addresses and rng.random() < 0.85 else rng.getrandbits(48)
        top = f.hi + 1 - f.lo + f.addr_lo  # the address bits the field holds
        return address & ((1 << top) - 1) & ~((1 << f.addr_lo) - 1), True
    width = f.hi - f.lo + 1
    roll = rng.random()
    if roll < 0.3:
        return 0, False
    if roll < 0.5:
        return (1 << width) - 1, False
    return rng.getrandbits(width), False


def _fit(layout: type[Layout], name: str, address: int) -> int:
    """``address`` cut to what an address field holds."""
    f = layout.field(name)
    lo = f.addr_lo or 0
    return address & ((1 << (f.hi + 1 - f.lo + lo)) - 1) & ~((1 << lo) - 1)


def _set(layout: type[Layout], value: int, name: str, field_value: int, is_address: bool) -> int:
    f = layout.field(name)
    return f.set_address(value, field_value) if is_address else f.set(value, field_value)


class ActionGenerator:
    """Produces bursts of actions aimed at ``system`` as it is when asked."""

    def __init__(self, system: System, rng: Any | None = None, *, keep_queue_alive: bool = False) -> None:
        self.system = system
        self.rng: Any = rng if rng is not None else random.Random(0)
        # Never stop the hyp's command queue: no illegal or malformed commands, no clearing of
        # CR0.CMDQEN, no PROD/CONS games. Under v4 a stopped queue makes every later trap wait out
        # the hyp's 1 s (modeled) timeout, and the host's GERROR handler livelocks with the SMMU.
        self.keep_queue_alive = keep_queue_alive
        self.iovas: list[int] = []  # IOVAs the generator's iommu_map calls used
        self._kinds: dict[Callable[[], list[Action]], int] = {
            self._reg_write: 18,
            self._reg_read: 3,
            self._structure_write: 22,
            self._command: 10,
            self._dma: 16,
            self._hypercall: 6,
            self._donate: 7,
            self._attach: 4,
            self._dma_map: 5,
            self._dma_unmap: 2,
            self._iommu_map: 5,
            self._iommu_unmap: 2,
            self._advance: 2,
        }

    def next(self) -> list[Action]:
        """The next burst (one to three actions)."""
        return list(_weighted(self.rng, self._kinds)())

    # -- what matters now ----------------------------------------------------------------------------------
    def addresses(self) -> list[int]:
        """Physical addresses worth pointing things at: foreign memory first, then the host's own
        structures and buffers, MMIO, and the edges of the address space."""
        s = self.system
        rng = self.rng
        out: list[int] = []
        for start, size, _ in foreign_runs(s):
            out.append(start)
            pages = size >> PAGE_SHIFT
            if pages > 1:
                out.append(start + (rng.randrange(pages) << PAGE_SHIFT))
        for smmu in host_smmus(s):
            for queue in (smmu.cmdq.q if smmu.cmdq is not None else None, smmu.evtq, smmu.priq):
                if queue is not None:
                    out.append(queue.base_dma)
            if smmu.strtab_cfg.strtab_dma:
                out.append(smmu.strtab_cfg.strtab_dma)
        out.extend(host_l2_tables(s))
        out.extend(host_cd_tables(s))
        out.extend(host_page_tables(s))
        out.extend(s.adv.buffers)
        out.extend(m.paddr for m in s.adv.mappings)
        out.extend(smmu.base for smmu in s.smmus)
        out.extend(s.doorbells)
        out.extend((0, 1 << 40, (1 << 48) - PAGE_SIZE, U64_MAX & ~(PAGE_SIZE - 1)))
        return out

    def _address(self) -> int:
        return int(self.rng.choice(self.addresses()))

    def _sids(self) -> list[int]:
        return sorted({sid for (_, sid) in self.system.sid_owner})

    def _sid(self) -> int:
        rng = self.rng
        roll = rng.random()
        sids = self._sids()
        if roll < 0.75 and sids:
            return int(rng.choice(sids))
        if roll < 0.9:
            return int(rng.randrange(1 << 9))
        return int(rng.choice((1 << 16, (1 << 32) - 1, rng.getrandbits(32))))

    def _smmu(self) -> int:
        return int(self.rng.randrange(max(1, len(self.system.smmus))))

    # -- registers -------------------------------------------------------------------------------------------
    def _register_value(self, reg: Reg) -> int:
        rng = self.rng
        if reg in (Reg.CR0, Reg.CR0ACK) and self.system.smmus:
            smmu = self.system.smmus[0]
            # Usually one bit flipped from what the host last wrote (the SMMU's CR0 under v4), so
            # the queues mostly stay enabled: a disabled command queue makes every later trap wait
            # out the hyp's 1 s timeout, which is most of a campaign's time.
            value = smmu.regs.cr0
            if rng.random() < 0.25 or self.keep_queue_alive:
                value |= _CR0_ENABLES
            bit = rng.choices(
                _CR0_BITS, weights=(3, 2, 2, 0, 3) if self.keep_queue_alive else (3, 2, 2, 1, 3)
            )[0]
            return int(value ^ bit.in_place_mask)
        if reg == Reg.GBPA:
            value = GBPA.UPDATE.in_place_mask if rng.random() < 0.7 else 0
            if rng.random() < 0.4:
                value |= GBPA.ABORT.in_place_mask
            if rng.random() < 0.2:
                value |= GBPA.SHCFG.insert(rng.randrange(4)) | GBPA.PRIVCFG.insert(rng.randrange(4))
            return value
        if reg == Reg.STRTAB_BASE:
            return (
                STRTAB_BASE.ADDR.insert_address(_fit(STRTAB_BASE, "ADDR", self._address()))
                | STRTAB_BASE.RA.in_place_mask
            )
        if reg == Reg.STRTAB_BASE_CFG:
            fmt = rng.choice((StrtabFmt.LINEAR, StrtabFmt.TWO_LEVEL, 3))
            log2 = rng.choice((0, 1, 5, 8, 16, 24, 32, 63))
            split = rng.choice((6, 8, 10, 0, 31))
            return STRTAB_BASE_CFG.encode(FMT=fmt, LOG2SIZE=log2, SPLIT=split)
        if reg in (Reg.CMDQ_BASE, Reg.EVENTQ_BASE, Reg.PRIQ_BASE):
            layout = CMDQ_BASE if reg == Reg.CMDQ_BASE else EVENTQ_BASE
            log2 = rng.choice((0, 1, 4, 8, 10, 19, 31))
            address = _fit(layout, "ADDR", self._address())
            return int(layout.ADDR.insert_address(address) | layout.LOG2SIZE.insert(log2))
        if reg in (Reg.EVENTQ_IRQ_CFG0, Reg.PRIQ_IRQ_CFG0, Reg.GERROR_IRQ_CFG0, Reg.GATOS_ADDR):
            return self._address() & ((1 << 56) - 4)
        if reg == Reg.IRQ_CTRL:
            return int(rng.randrange(8))
        if reg in (Reg.CMDQ_PROD, Reg.CMDQ_CONS):
            # Where the host driver's queue is, mostly: a PROD ahead of the driver's own makes its
            # next PROD write land behind CONS, and the hyp then copies the whole queue (2^19
            # entries, minutes of wall-clock time) in one trap. That is worth finding, not often.
            smmus = host_smmus(self.system)
            queue = smmus[0].cmdq.q if smmus and smmus[0].cmdq is not None else None
            roll = rng.random()
            if queue is None or (roll < 0.02 and not self.keep_queue_alive):
                return int(rng.getrandbits(20))
            here = queue.prod if reg == Reg.CMDQ_PROD else queue.cons
            if roll < 0.9 or self.keep_queue_alive:
                return int(here)
            return int(queue.inc_prod_n(here, rng.choice((1, 2, 8))) if roll < 0.97 else here ^ (1 << 31))
        if reg in (Reg.EVENTQ_CONS, Reg.PRIQ_CONS, Reg.EVENTQ_PROD):
            roll = rng.random()
            if roll < 0.5:
                return int(rng.randrange(64))
            if roll < 0.8:
                return int(rng.randrange(1 << 20))
            return int(rng.getrandbits(32))
        if reg == Reg.GATOS_SID:
            return self._sid()
        return int(rng.getrandbits(32))

    def _reg_write(self) -> list[Action]:
        rng = self.rng
        if rng.random() < 0.9:
            reg = _weighted(rng, _REG_WEIGHTS)
            wide = reg in _WIDE
            size = 8 if wide and rng.random() < 0.85 else 4
            if rng.random() < 0.05:
                size = rng.choice((1, 2, 8))
            offset = int(reg)
        else:
            size = rng.choice((1, 2, 4, 8))
            offset = rng.randrange(0x20000 // size) * size
            reg = Reg.IDR0
        value = self._register_value(reg) if offset == int(reg) else int(rng.getrandbits(8 * size))
        actions: list[Action] = [RegWrite(self._smmu(), offset, size, value)]
        if reg in (Reg.GBPA, Reg.CR0) and rng.random() < 0.3:
            actions.append(Advance(rng.choice((1000, 100_000))))
        return actions

    def _reg_read(self) -> list[Action]:
        rng = self.rng
        reg = _weighted(rng, _REG_WEIGHTS)
        return [RegRead(self._smmu(), int(reg), rng.choice((4, 4, 8, 1)))]

    # -- the host's structures ------------------------------------------------------------------------------
    def _structure_write(self) -> list[Action]:
        rng = self.rng
        kind = rng.choices(("ste", "cd", "l1std", "pte", "cmdq", "other"), weights=(9, 4, 2, 4, 1, 2))[0]
        if kind == "ste":
            return self._ste_write()
        if kind == "cd":
            return self._cd_write()
        if kind == "l1std":
            return self._l1std_write()
        if kind == "pte":
            return self._pte_write()
        if kind == "cmdq":
            return self._cmdq_write()
        target = rng.choice(("buffer", "foreign", "raw", "shadow-strtab", "shadow-cmdq", "evtq", "priq"))
        offset = rng.randrange(PAGE_SIZE // 8) * 8 if target != "raw" else self._address()
        return [MemWrite(target, rng.randrange(4), offset, 8, int(rng.getrandbits(64)))]

    def _ram_u64(self, address: int | None) -> int:
        if address is None:
            return 0
        data = self.system.machine.bus.ram.read(address, 8)
        return int.from_bytes(data, "little") if data else 0

    def _ste_write(self) -> list[Action]:
        rng = self.rng
        sid = self._sid() if rng.random() < 0.9 else rng.randrange(1 << 8)
        address = host_ste_address(self.system, sid)
        current = 0
        if address is not None:
            data = self.system.machine.bus.ram.read(address, STE_SIZE)
            current = STE.from_bytes(data) if data else 0
        name = rng.choice(_STE_FIELDS)
        value, is_address = _field_value(rng, STE, name, self.addresses())
        if name == "CONFIG":
            value = rng.choice((0b000, 0b100, 0b101, 0b110, 0b111, 0b001))
        elif name == "S1CDMAX":
            # Mostly small tables: a CD table of 2^20 entries is 16k pages the oracle walks each time
            # the STE changes, for little more than a table of 2^6 shows.
            value = rng.choice((0, 0, 1, 2, 4, 6)) if rng.random() < 0.9 else rng.randrange(32)
        new = _set(STE, current, name, value, is_address)
        if rng.random() < 0.2:  # a second field
            other = rng.choice(_STE_FIELDS)
            value, is_address = _field_value(rng, STE, other, self.addresses())
            new = _set(STE, new, other, value, is_address)
        actions: list[Action] = []
        old_words, new_words = STE.to_words(current), STE.to_words(new)
        for index, (old, word) in enumerate(zip(old_words, new_words, strict=True)):
            if old != word:
                actions.append(MemWrite("ste", sid, 8 * index, 8, word))
        if rng.random() < 0.8:
            actions.append(Command(0, build_command(Opcode.CFGI_STE, SID=sid, LEAF=1), rng.random() < 0.9))
        return actions

    def _cd_write(self) -> list[Action]:
        rng = self.rng
        masters = host_masters(self.system)
        tables = [(m, m.cd_table.cdtab_dma) for m in masters if m.cd_table.cdtab_dma]
        if not tables:
            return self._ste_write()
        index = rng.randrange(len(tables))
        master, base = tables[index]
        ssid = 0 if rng.random() < 0.7 else rng.randrange(4)
        current = int.from_bytes(self.system.machine.bus.ram.read(base + ssid * CD_SIZE, CD_SIZE), "little")
        name = rng.choice(_CD_FIELDS)
        value, is_address = _field_value(rng, CD, name, self.addresses())
        new = _set(CD, current, name, value, is_address)
        actions: list[Action] = []
        for word in range(CD_SIZE // 8):
            old_word = (current >> (64 * word)) & U64_MAX
            new_word = (new >> (64 * word)) & U64_MAX
            if old_word != new_word:
                actions.append(MemWrite("cd", index, ssid * CD_SIZE + 8 * word, 8, new_word))
        if rng.random() < 0.8 and master.streams:
            command = build_command(Opcode.CFGI_CD, SID=master.streams[0], SSID=ssid, LEAF=1)
            actions.append(Command(0, command, True))
        return actions

    def _l1std_write(self) -> list[Action]:
        rng = self.rng
        index = rng.randrange(4)
        span = rng.choice((0, 1, 8, 9, 12, 31))
        desc = L1STD.encode(SPAN=span) | L1STD.L2PTR.insert_address(_fit(L1STD, "L2PTR", self._address()))
        actions: list[Action] = [MemWrite("strtab", 0, index * 8, 8, desc)]
        if rng.random() < 0.7:
            sid = index << 8 | rng.randrange(256)
            leaf = rng.random() < 0.5
            command = (
                build_command(Opcode.CFGI_STE, SID=sid, LEAF=int(leaf)) if rng.random() < 0.7 else cfgi_all()
            )
            actions.append(Command(0, command, True))
        return actions

    def _pte_write(self) -> list[Action]:
        rng = self.rng
        roots = host_page_tables(self.system)
        if not roots:
            return self._ste_write()
        index = rng.randrange(len(roots))
        slot = rng.choice((0, 1, 2, rng.randrange(512)))
        address = self._address() & ~(PAGE_SIZE - 1) & ((1 << 48) - 1)
        kind = rng.random()
        if kind < 0.5:
            desc = address | 0b11 | (1 << 10) | (0b01 << 6)  # table or page, AF, AP=RW at EL0
        elif kind < 0.8:
            desc = (address & ~((1 << 21) - 1)) | 0b01 | (1 << 10) | (0b01 << 6)  # block
        else:
            desc = int(rng.getrandbits(64))
        actions: list[Action] = [MemWrite("pgtable", index, slot * 8, 8, desc)]
        if rng.random() < 0.6:
            opcode = rng.choice(
                (Opcode.TLBI_NH_ALL, Opcode.TLBI_NH_ASID, Opcode.TLBI_S12_VMALL, Opcode.TLBI_NSNH_ALL)
            )
            actions.append(Command(0, build_command(opcode), True))
        return actions

    def _cmdq_write(self) -> list[Action]:
        """A command written into the host's queue memory at its next free slot; published behind
        the host driver's back only sometimes (the driver then reuses the slot and its PROD no
        longer moves, so every command it issues after times out)."""
        rng = self.rng
        command = self._hostile_command()
        smmus = host_smmus(self.system)
        queue = smmus[0].cmdq.q if smmus and smmus[0].cmdq is not None else None
        slot = queue.idx(queue.prod) if queue is not None else rng.randrange(16)
        actions: list[Action] = [
            MemWrite("cmdq", 0, slot * 16, 8, command & U64_MAX),
            MemWrite("cmdq", 0, slot * 16 + 8, 8, command >> 64),
        ]
        if queue is not None and rng.random() < 0.1 and not self.keep_queue_alive:
            actions.append(RegWrite(0, int(Reg.CMDQ_PROD), 4, queue.inc_prod_n(queue.prod, 1)))
        return actions

    # -- commands --------------------------------------------------------------------------------------------
    def _hostile_command(self) -> int:
        """Mostly well-formed commands with hostile targets (StreamIDs, VMIDs, addresses); one in
        thirty with every field random, which the SMMU may reject (CERROR_ILL stops its queue)."""
        rng = self.rng
        opcode = _weighted(rng, _LEGAL_OPCODES if self.keep_queue_alive else _OPCODE_WEIGHTS)
        if opcode not in COMMAND_LAYOUTS:
            return int(opcode | rng.getrandbits(120) << 8)
        if opcode == Opcode.CFGI_STE_RANGE and rng.random() < 0.5:
            return cfgi_all()
        layout = COMMAND_LAYOUTS[Opcode(opcode)]
        command = build_command(opcode)
        hostile = rng.random() < 0.03 and not self.keep_queue_alive
        for f in layout.FIELDS:
            name = f.name
            if name == "OPCODE" or (not hostile and name not in _SANE_FIELDS) or rng.random() > 0.5:
                continue
            if name == "SID":
                command = f.set(command, self._sid() & ((1 << (f.hi - f.lo + 1)) - 1))
            elif hostile or f.addr_lo is not None:
                value, is_address = _field_value(rng, layout, name, self.addresses())
                command = _set(layout, command, name, value, is_address)
            else:
                command = f.set(command, _SANE_FIELDS[name](rng) & ((1 << (f.hi - f.lo + 1)) - 1))
        if opcode == Opcode.SYNC and rng.random() < 0.5:
            command = CMD_SYNC.CS.set(command, SyncCs.IRQ)
            command = CMD_SYNC.MSIADDR.set_address(command, _fit(CMD_SYNC, "MSIADDR", self._address()))
        return int(command)

    def _command(self) -> list[Action]:
        rng = self.rng
        return [Command(self._smmu(), self._hostile_command(), rng.random() < 0.8)]

    # -- hypercalls and ownership ----------------------------------------------------------------------------
    def _hypercall(self) -> list[Action]:
        rng = self.rng
        calls = self.system.pkvm.hypercalls
        names = list(calls.names)
        if rng.random() < 0.05 or not names:
            return [Hypercall(rng.choice(("__pkvm_nope", "", "kvm_iommu_map")), (rng.getrandbits(64),))]
        name = rng.choice(names)
        spec = calls.arg_spec(name) or ()
        args = [self._hypercall_arg(kind) for kind in spec]
        if rng.random() < 0.05:
            args = args[:-1] if args and rng.random() < 0.5 else [*args, int(rng.getrandbits(64))]
        return [Hypercall(name, tuple(args))]

    def _hypercall_arg(self, kind: Arg) -> int:
        rng = self.rng
        if rng.random() < 0.08:
            return int(rng.choice((0, U64_MAX, 1 << 63, rng.getrandbits(64))))
        if kind in (Arg.PFN, Arg.PAGE_ADDR):
            address = self._address()
            return address >> PAGE_SHIFT if kind is Arg.PFN else address & ~(PAGE_SIZE - 1)
        if kind is Arg.GFN:
            return int(rng.randrange(0x100, 0x200))
        if kind is Arg.NR_PAGES:
            return int(rng.choice((1, 2, 16, 512)))
        if kind is Arg.HANDLE:
            handles = list(self.system.adv.vms.values()) or [0x1000]
            return int(rng.choice([*handles, 0x1000, 0x1001]))
        if kind is Arg.PROT:
            return int(rng.randrange(8))
        if kind is Arg.BOOL:
            return int(rng.randrange(2))
        return int(rng.choice((0, 1, rng.randrange(16), rng.getrandbits(16), self._sid(), self._address())))

    def _page_ref(self) -> tuple[str, int, int]:
        rng = self.rng
        target = rng.choice(_PAGE_TARGETS)
        return target, rng.randrange(8), rng.choice((0, 0, 0, PAGE_SIZE))

    def _donate(self) -> list[Action]:
        rng = self.rng
        how = rng.choice(list(DONATIONS))
        target, index, offset = self._page_ref()
        actions: list[Action] = [Donate(how, target, index, offset)]
        if rng.random() < 0.3:
            actions.append(self._dma()[0])
        return actions

    # -- devices ---------------------------------------------------------------------------------------------
    def _iova(self) -> int:
        rng = self.rng
        choices = [m.dma for m in self.system.adv.mappings] + self.iovas
        if choices and rng.random() < 0.6:
            return int(rng.choice(choices)) + rng.choice((0, 0, 8, PAGE_SIZE - 8))
        if rng.random() < 0.5:
            return self._address()
        return int(rng.choice((0, IOVA_BASE, rng.getrandbits(32) & ~7, rng.getrandbits(48))))

    def _dma(self) -> list[Action]:
        rng = self.rng
        mode = rng.choices(list(DMA_MODES), weights=(50, 15, 15, 20))[0]
        address = self._address() if mode == "translated" else self._iova()
        ssid = None if rng.random() < 0.85 else rng.choice((0, 1, rng.randrange(1 << 20)))
        size = rng.choice((4, 8, 64, 256, PAGE_SIZE))
        return [Dma(self._smmu(), self._sid(), ssid, address, size, rng.random() < 0.5, mode)]

    # -- the host's driver operations ------------------------------------------------------------------------
    def _device(self) -> int:
        return int(self.rng.randrange(max(1, len(self.system.devices))))

    def _attach(self) -> list[Action]:
        return [Attach(self._device(), self.rng.choice(list(DOMAIN_KINDS)))]

    def _dma_map(self) -> list[Action]:
        rng = self.rng
        target = rng.choice(("buffer", "buffer", "buffer", "foreign", "cmdq", "strtab", "raw"))
        offset = self._address() if target == "raw" else rng.choice((0, 0, 0x800))
        size = rng.choice((PAGE_SIZE, PAGE_SIZE, 64, 2 * PAGE_SIZE))
        actions: list[Action] = [DmaMap(self._device(), target, rng.randrange(8), offset, size,
                                        rng.choice(DIRECTIONS))]  # fmt: skip
        if rng.random() < 0.5:
            actions.append(Dma(0, self._sid(), None, self._iova(), 8, rng.random() < 0.5))
        return actions

    def _dma_unmap(self) -> list[Action]:
        return [DmaUnmap(int(self.rng.randrange(8)))]

    def _iommu_map(self) -> list[Action]:
        rng = self.rng
        iova = IOVA_BASE + rng.randrange(64) * PAGE_SIZE
        if iova not in self.iovas:
            self.iovas.append(iova)
        target = rng.choice(("buffer", "foreign", "foreign", "cmdq", "strtab", "l2", "pgtable", "raw"))
        offset = self._address() if target == "raw" else 0
        size = rng.choice((PAGE_SIZE, PAGE_SIZE, 2 * PAGE_SIZE, 2 << 20))
        prot = rng.choice((1, 2, 3, 3, 7, 0x23))
        return [IommuMap(self._device(), iova, target, rng.randrange(8), offset, size, prot)]

    def _iommu_unmap(self) -> list[Action]:
        rng = self.rng
        iova = rng.choice(self.iovas) if self.iovas else IOVA_BASE
        return [IommuUnmap(self._device(), iova, rng.choice((PAGE_SIZE, 2 << 20)))]

    def _advance(self) -> list[Action]:
        # Long advances are rare: with a stopped queue the host takes a GERROR interrupt every
        # few hundred modeled nanoseconds, so 10 ms costs several seconds of simulation.
        rng = self.rng
        return [Advance(int(rng.choice((1000, 100_000, 1_000_000)) if rng.random() < 0.97 else 10_000_000))]


__all__ = ["ActionGenerator"]
