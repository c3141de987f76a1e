"""What one SMMU can reach, in three groups with their own signatures:

- ``registers``: GBPA bypass while SMMUEN may be 0, ATS Translated traffic of ATS-capable
  endpoints while ATSCHK may be 0, the queues it reads and writes, MSI targets (GERROR and event
  queue IRQ_CFG0, CMD_SYNCs waiting in the command queue) and the stream table's first level;
- ``tables``: every StreamID with a valid STE in the stream table, through its CDs and tables;
- ``caches``: configuration the SMMU still holds (cached STEs and CDs, L1 descriptors) that is no
  longer what memory says.

A register field whose update is pending counts with both its old and new value.
"""

from __future__ import annotations

from dataclasses import dataclass

from pkvm_smmu.arch.commands import CMD_SIZE, CMD_SYNC, Opcode, SyncCs
from pkvm_smmu.arch.events import EVENT_SIZE
from pkvm_smmu.arch.registers import (
    CMDQ_CONS,
    CMDQ_PROD,
    CR0,
    GBPA,
    IRQ_CFG0,
    IRQ_CTRL,
    STRTAB_BASE,
    STRTAB_BASE_CFG,
    Reg,
    StrtabFmt,
)
from pkvm_smmu.arch.strtab import STE_SIZE
from pkvm_smmu.machine.smmu.decode import StreamConfig
from pkvm_smmu.machine.smmu.device import SmmuV3
from pkvm_smmu.verify.oracle._items import DEVICE, SMMU, Reach
from pkvm_smmu.verify.oracle._memo import DependencyMemo
from pkvm_smmu.verify.oracle._memory import MemoryView
from pkvm_smmu.verify.oracle._runs import EVERYTHING, READ, WRITE, Runs
from pkvm_smmu.verify.oracle._streams import AtsModes, Descriptors, StreamReacher, StreamResult, TlbTag
from pkvm_smmu.verify.oracle._tables import TreeWalker

_SMMUEN = CR0.SMMUEN.in_place_mask
_CMDQEN = CR0.CMDQEN.in_place_mask
_EVENTQEN = CR0.EVENTQEN.in_place_mask
_PRIQEN = CR0.PRIQEN.in_place_mask
_ATSCHK = CR0.ATSCHK.in_place_mask
_ABORT = GBPA.ABORT.in_place_mask
_UPDATE = GBPA.UPDATE.in_place_mask
_SPLIT_VALUES = (6, 8, 10)
_SNAPSHOT_REGS = (
    Reg.GBPA,
    Reg.STRTAB_BASE,
    Reg.STRTAB_BASE_CFG,
    Reg.CMDQ_BASE,
    Reg.CMDQ_PROD,
    Reg.CMDQ_CONS,
    Reg.EVENTQ_BASE,
    Reg.PRIQ_BASE,
    Reg.GERROR_IRQ_CFG0,
    Reg.EVENTQ_IRQ_CFG0,
    Reg.PRIQ_IRQ_CFG0,
)
_SNAPSHOT_INDEX = {reg: index for index, reg in enumerate(_SNAPSHOT_REGS)}


@dataclass(frozen=True, eq=False, slots=True)
class Group:
    """One group's reaches, and the TLB tags of the stream configurations in it."""

    reaches: tuple[Reach, ...]
    tags: dict[int, frozenset[TlbTag]]  # StreamID -> tags
    stream_configs: dict[int, StreamConfig]  # StreamID -> the configuration memory gives it


EMPTY = Group((), {}, {})


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The register state the SMMU's reach depends on (effective and pending values)."""

    cr0: int
    cr0ack: int
    gbpa_effective: int
    irq_ctrl: int
    irq_ctrlack: int
    regs: tuple[int, ...]
    ats_endpoints: tuple[int, ...]

    def reg(self, reg: Reg) -> int:
        return self.regs[_SNAPSHOT_INDEX[reg]]

    @property
    def maybe_enabled(self) -> bool:
        return bool((self.cr0 | self.cr0ack) & _SMMUEN)

    @property
    def maybe_disabled(self) -> bool:
        return not self.cr0 & self.cr0ack & _SMMUEN

    def smmuen_text(self) -> str:
        now, ack = self.cr0 & _SMMUEN, self.cr0ack & _SMMUEN
        if now and ack:
            return "SMMU_CR0.SMMUEN=1"
        if now:
            return "SMMU_CR0.SMMUEN=1, not yet acknowledged"
        return "SMMU_CR0ACK.SMMUEN=1, being cleared" if ack else "SMMU_CR0.SMMUEN=0"

    def maybe_on(self, bit: int) -> bool:
        return bool((self.cr0 | self.cr0ack) & bit)

    def ats_modes(self) -> AtsModes:
        both = (self.cr0 & _ATSCHK, self.cr0ack & _ATSCHK)
        return AtsModes(unchecked=not all(both), checked=any(both))


def _text(reg: Reg, value: int) -> str:
    return f"SMMU_{reg.name}={value:#x}"


class SmmuReach:
    """The reach of one ``SmmuV3``, memoised by group."""

    def __init__(self, smmu: SmmuV3, walker: TreeWalker, memory: MemoryView, memo: DependencyMemo) -> None:
        self.smmu = smmu
        self.name = smmu.name
        self.features = smmu.features
        self.memory = memory
        self.memo = memo
        self.streams = StreamReacher(smmu.name, smmu.features, walker, memory, memo)
        self._oas_mask = (1 << smmu.features.oas_bits) - 1

    def snapshot(self) -> Snapshot:
        regs = self.smmu.regs
        read = regs.read
        return Snapshot(
            regs.cr0,
            regs.cr0ack,
            regs.gbpa_effective,
            regs.irq_ctrl,
            regs.irq_ctrlack,
            tuple(read(reg) for reg in _SNAPSHOT_REGS),
            tuple(self.smmu.ats_endpoints),
        )

    def cache_signature(self) -> tuple[int, ...]:
        cache = self.smmu.config_cache
        return (
            cache.generation,
            len(cache.cached_streams()),
            len(cache.cached_contexts()),
            len(cache.cached_l1std()),
            len(cache.cached_l1cd()),
        )

    # -- registers ------------------------------------------------------------------------------------
    def registers(self, snap: Snapshot) -> Group:
        return self.memo.get(("registers", self.name), lambda: self._registers(snap), signature=snap)

    def _registers(self, snap: Snapshot) -> Group:
        reaches: list[Reach] = []
        cr0 = f"SMMU_CR0={snap.cr0:#x} (CR0ACK={snap.cr0ack:#x})"
        if snap.maybe_disabled:
            pending = snap.reg(Reg.GBPA)
            values = {snap.gbpa_effective} | ({pending & ~_UPDATE} if pending & _UPDATE else set())
            if any(not value & _ABORT for value in values):
                step = f"SMMU_GBPA={pending:#x} (in effect {snap.gbpa_effective:#x}): ABORT=0, so it bypasses"
                reaches.append(Reach(DEVICE, None, None, EVERYTHING, (f"{cr0}: SMMUEN=0", step)))
        if snap.maybe_enabled and self.features.ats and snap.ats_modes().unchecked:
            for sid in sorted(snap.ats_endpoints):
                path = (f"{cr0}: ATSCHK=0, ATS Translated transactions are not checked",
                        f"StreamID {sid:#x} is an ATS-capable endpoint")  # fmt: skip
                reaches.append(Reach(DEVICE, sid, None, EVERYTHING, path))
        if snap.maybe_on(_CMDQEN):
            base, size = self._queue(snap, Reg.CMDQ_BASE, CMD_SIZE)
            path = (f"{cr0}: CMDQEN=1", f"{_text(Reg.CMDQ_BASE, snap.reg(Reg.CMDQ_BASE))}: command fetches")
            reaches.append(Reach(SMMU, None, None, Runs(((base, base + size, READ),)), path))
            reaches.extend(self._pending_syncs(snap, base, path))
        if snap.maybe_on(_EVENTQEN):
            base, size = self._queue(snap, Reg.EVENTQ_BASE, EVENT_SIZE)
            path = (
                f"{cr0}: EVENTQEN=1",
                f"{_text(Reg.EVENTQ_BASE, snap.reg(Reg.EVENTQ_BASE))}: event records",
            )
            reaches.append(Reach(SMMU, None, None, Runs(((base, base + size, WRITE),)), path))
        if self.features.pri and snap.maybe_on(_PRIQEN):
            base, size = self._queue(snap, Reg.PRIQ_BASE, 16)
            path = (f"{cr0}: PRIQEN=1", f"{_text(Reg.PRIQ_BASE, snap.reg(Reg.PRIQ_BASE))}: page requests")
            reaches.append(Reach(SMMU, None, None, Runs(((base, base + size, WRITE),)), path))
        if self.features.msi:
            sources = [
                (Reg.GERROR_IRQ_CFG0, IRQ_CTRL.GERROR_IRQEN),
                (Reg.EVENTQ_IRQ_CFG0, IRQ_CTRL.EVENTQ_IRQEN),
            ]
            if self.features.pri:
                sources.append((Reg.PRIQ_IRQ_CFG0, IRQ_CTRL.PRIQ_IRQEN))
            irq = f"SMMU_IRQ_CTRL={snap.irq_ctrl:#x} (IRQ_CTRLACK={snap.irq_ctrlack:#x})"
            for reg, enable in sources:
                address = IRQ_CFG0.ADDR.get_address(snap.reg(reg))
                if address and (snap.irq_ctrl | snap.irq_ctrlack) & enable.in_place_mask:
                    address &= self._oas_mask
                    path = (f"{irq}: {enable.name}=1", f"{_text(reg, snap.reg(reg))}: MSI write")
                    reaches.append(Reach(SMMU, None, None, Runs(((address, address + 4, WRITE),)), path))
        return Group(tuple(reaches), {}, {})

    def _queue(self, snap: Snapshot, reg: Reg, entry_size: int) -> tuple[int, int]:
        regs = self.smmu.regs
        base = regs.queue_address(reg, entry_size) & self._oas_mask
        return base, entry_size << regs.queue_log2size(reg)

    def _pending_syncs(self, snap: Snapshot, base: int, path: tuple[str, ...]) -> list[Reach]:
        """MSI writes of CMD_SYNCs the SMMU has still to consume."""
        if not self.features.msi:
            return []
        log2 = self.smmu.regs.queue_log2size(Reg.CMDQ_BASE)
        wrap = 2 << log2
        prod = CMDQ_PROD.WR.get(snap.reg(Reg.CMDQ_PROD)) & (wrap - 1)
        cons = CMDQ_CONS.RD.get(snap.reg(Reg.CMDQ_CONS)) & (wrap - 1)
        reaches = []
        for k in range(min((prod - cons) % wrap, 1 << log2)):
            slot = (cons + k) & ((1 << log2) - 1)
            raw = self.memory.read(base + slot * CMD_SIZE, CMD_SIZE)
            if raw is None:
                continue
            command = int.from_bytes(raw, "little")
            if command & 0xFF != Opcode.SYNC or CMD_SYNC.CS.get(command) != SyncCs.IRQ:
                continue
            address = CMD_SYNC.MSIADDR.get_address(command)
            if address:
                address &= self._oas_mask
                step = f"CMD_SYNC in slot {slot} at {base + slot * CMD_SIZE:#x}: CS=IRQ, MSI to {address:#x}"
                reaches.append(Reach(SMMU, None, None, Runs(((address, address + 4, WRITE),)), (*path, step)))
        return reaches

    # -- the stream table in memory ------------------------------------------------------------------
    def tables(self, snap: Snapshot) -> Group:
        signature = (
            snap.reg(Reg.STRTAB_BASE),
            snap.reg(Reg.STRTAB_BASE_CFG),
            snap.cr0 & _SMMUEN,
            snap.cr0ack & _SMMUEN,
            snap.ats_modes(),
        )
        return self.memo.get(("tables", self.name), lambda: self._tables(snap), signature=signature)

    def strtab_geometry(self, snap: Snapshot) -> tuple[int, int, int | None]:
        """(base, log2size, split) as the SMMU uses STRTAB_BASE/CFG; split None for linear."""
        cfg = snap.reg(Reg.STRTAB_BASE_CFG)
        base = STRTAB_BASE.ADDR.get_address(snap.reg(Reg.STRTAB_BASE))
        log2size = min(STRTAB_BASE_CFG.LOG2SIZE.get(cfg), self.features.sid_bits)
        if not (STRTAB_BASE_CFG.FMT.get(cfg) == StrtabFmt.TWO_LEVEL and self.features.two_level_strtab):
            return base & ~((1 << log2size) * STE_SIZE - 1), log2size, None
        split = STRTAB_BASE_CFG.SPLIT.get(cfg)
        split = min(split if split in _SPLIT_VALUES else 6, log2size)
        base &= ~(max(1, 1 << (log2size - split)) * 8 - 1)
        return base, log2size, split

    def _tables(self, snap: Snapshot) -> Group:
        if not snap.maybe_enabled:
            return EMPTY
        base, log2size, split = self.strtab_geometry(snap)
        head = (
            snap.smmuen_text(),
            f"{_text(Reg.STRTAB_BASE, snap.reg(Reg.STRTAB_BASE))} "
            f"{_text(Reg.STRTAB_BASE_CFG, snap.reg(Reg.STRTAB_BASE_CFG))}",
        )
        builder = _GroupBuilder(self, snap)
        if split is None:
            stes = self.streams.stes(base, 0, 1 << log2size)
            builder.add_reads(stes.reads, (*head, "stream table fetches"))
            builder.add_stes(stes.found, head)
            return builder.group()
        l1_count = max(1, 1 << (log2size - split))
        l1 = self.streams.descriptors(None, base, l1_count)
        builder.add_reads(l1.reads, (*head, "L1 stream table fetches"))
        for index in l1.device_defined:
            builder.add_anything(
                index << split, 1 << split, (*head, f"L1STD[{index}] is MMIO: device-defined")
            )
        for index, desc, pa in l1.found:
            builder.add_l2(index, desc, pa, split, head)
        return builder.group()

    # -- what the SMMU still holds ------------------------------------------------------------------
    def caches(self, snap: Snapshot, tables: Group) -> Group:
        # What the group uses of the tables group: the STE each StreamID has in memory.
        memory_stes = tuple((sid, cfg.ste, cfg.address) for sid, cfg in tables.stream_configs.items())
        signature = (self.cache_signature(), snap.maybe_enabled, snap.ats_modes(), memory_stes)
        return self.memo.get(("caches", self.name), lambda: self._caches(snap, tables), signature=signature)

    def _caches(self, snap: Snapshot, tables: Group) -> Group:
        if not snap.maybe_enabled:
            return EMPTY
        cache = self.smmu.config_cache
        builder = _GroupBuilder(self, snap)
        streams = cache.cached_streams()
        variants: dict[int, list[StreamConfig]] = {}
        for sid, cfg in tables.stream_configs.items():
            variants.setdefault(sid, []).append(cfg)
        for cfg in streams:
            memory = tables.stream_configs.get(cfg.sid)
            if memory is not None and memory.ste == cfg.ste:
                continue  # what memory holds: the tables group covers it
            variants.setdefault(cfg.sid, []).append(cfg)
            origin = (f"config cache: STE of StreamID {cfg.sid:#x} (memory no longer holds it)",)
            builder.add_stream(cfg, origin)
        _, _, split = self.strtab_geometry(snap)
        l1_memory = {
            index: desc for index, desc, _ in self._memory_l1(snap).found
        } if split is not None else {}  # fmt: skip
        for index, (desc, pa) in sorted(cache.cached_l1std().items()):
            if split is None or l1_memory.get(index) == desc:
                continue
            origin = (
                f"config cache: L1STD[{index}]={desc:#x} read from {pa:#x} (memory no longer holds it)",
            )
            builder.add_l2(index, desc, pa, split, origin)
        for ctx in cache.cached_contexts():
            for stream in variants.get(ctx.sid, ()):
                if stream.s1 and stream.illegal is None:
                    origin = (
                        f"config cache: CD {ctx.index} of StreamID {ctx.sid:#x} read from {ctx.address:#x}",
                    )
                    builder.add_result(self.streams.context(stream, ctx, origin), ctx.sid)
        for (sid, l1_index), (desc, pa) in sorted(cache.cached_l1cd().items()):
            for stream in variants.get(sid, ()):
                if not (stream.s1 and stream.illegal is None and stream.s1_cdmax and stream.s1_fmt):
                    continue
                leaf_bits = 6 if stream.s1_fmt == 1 else 10
                stage2 = stream.s2_walk if stream.s2 else None
                count = min(1 << leaf_bits, 1 << stream.s1_cdmax)
                l2 = self.streams.l1cd_l2(stage2, desc, l1_index, leaf_bits, count)
                origin = (f"config cache: L1CD[{l1_index}]={desc:#x} of StreamID {sid:#x} read from {pa:#x}",)
                builder.add_cds(stream, l2.found, origin)
        return builder.group()

    def _memory_l1(self, snap: Snapshot) -> Descriptors:
        base, log2size, split = self.strtab_geometry(snap)
        assert split is not None
        return self.streams.descriptors(None, base, max(1, 1 << (log2size - split)))


class _GroupBuilder:
    def __init__(self, owner: SmmuReach, snap: Snapshot) -> None:
        self.owner = owner
        self.streams = owner.streams
        self.features = owner.features
        self.ats = snap.ats_modes()
        self.reaches: list[Reach] = []
        self.tags: dict[int, frozenset[TlbTag]] = {}
        self.configs: dict[int, StreamConfig] = {}

    def group(self) -> Group:
        return Group(tuple(self.reaches), self.tags, self.configs)

    def add_reads(self, ranges: tuple[tuple[int, int], ...], path: tuple[str, ...]) -> None:
        if ranges:
            self.reaches.append(Reach(SMMU, None, None, Runs.of((s, e, READ) for s, e in ranges), path))

    def add_anything(self, first_sid: int, count: int, path: tuple[str, ...]) -> None:
        for sid in range(first_sid, first_sid + count):
            self.reaches.append(Reach(DEVICE, sid, None, EVERYTHING, path))

    def add_result(self, result: StreamResult, sid: int) -> None:
        self.reaches.extend(result.reaches)
        if result.tags:
            self.tags[sid] = self.tags.get(sid, frozenset()) | result.tags

    def add_stream(self, cfg: StreamConfig, origin: tuple[str, ...]) -> None:
        self.add_result(self.streams.stream(cfg, origin, self.ats), cfg.sid)

    def add_stes(self, found: tuple[tuple[int, int, int], ...], origin: tuple[str, ...]) -> None:
        for sid, ste, address in found:
            cfg = self.streams.decode_ste(sid, ste, address)
            self.configs.setdefault(sid, cfg)
            self.add_stream(cfg, origin)

    def add_l2(self, index: int, desc: int, pa: int, split: int, head: tuple[str, ...]) -> None:
        l2 = self.streams.l1std_l2(desc, split)
        if l2 is None:
            return
        table, count = l2
        origin = (*head, f"L1STD[{index}]={desc:#x} at {pa:#x}: L2 table {table:#x} of {count} STEs")
        stes = self.streams.stes(table - (index << split) * STE_SIZE, index << split, count)
        self.add_reads(stes.reads, (*origin, "L2 stream table fetches"))
        self.add_stes(stes.found, origin)

    def add_cds(
        self, stream: StreamConfig, found: tuple[tuple[int, int, int], ...], origin: tuple[str, ...]
    ) -> None:
        for index, value, address in found:
            ctx = self.streams.decode_cd(stream.sid, index, value, address, stream.world)
            self.add_result(self.streams.context(stream, ctx, origin), stream.sid)


__all__ = ["EMPTY", "Group", "SmmuReach", "Snapshot"]
