"""Stream tables and CD tables in memory, and what one stream configuration can reach.

Configuration is fetched as ``machine/smmu/config.py`` fetches it (linear or two-level stream
table with exact Span semantics, linear or two-level CD tables, CD table addresses through stage 2
when nested) and decoded with its ``decode_ste``/``decode_cd``. Every StreamID with a valid STE is
considered (any device may present any StreamID) and every CD of a CD table (any SubstreamID).
STEs and CDs are bulk reads (RAM only: anything else aborts the fetch); L1 descriptors are
single-copy reads, so an L1 descriptor in MMIO is whatever the device returns: anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pkvm_smmu.arch.strtab import CD, CD_SIZE, L1CD, L1STD, STE_SIZE, Eats, S1Dss, SteConfig
from pkvm_smmu.machine.memory import PAGE_SIZE
from pkvm_smmu.machine.smmu.decode import WORLD_EL1, ContextConfig, StreamConfig, decode_cd, decode_ste
from pkvm_smmu.machine.smmu.features import SmmuFeatures
from pkvm_smmu.machine.smmu.types import TranslationKind, WalkConfig
from pkvm_smmu.verify.oracle._items import DEVICE, SMMU, Reach, WalkRef
from pkvm_smmu.verify.oracle._memo import DependencyMemo
from pkvm_smmu.verify.oracle._memory import Backing, MemoryView
from pkvm_smmu.verify.oracle._runs import EVERYTHING, READ, Runs
from pkvm_smmu.verify.oracle._tables import Tree, TreeWalker, compose

_STE_V_BYTE, _STE_V_MASK = 0, 1  # STE.V is bit 0
_CD_V_BYTE, _CD_V_MASK = CD.V.lo // 8, 1 << (CD.V.lo % 8)

# (kind, VM tag, ASID tag) of the TLB entries a stream configuration can hit; VM tag -1 is EL2.
TlbTag = tuple[TranslationKind, int, int | None]


@dataclass(frozen=True, eq=False, slots=True)
class Entries:
    """Valid 64-byte entries (STEs or CDs) of a table: (index, value, PA); the PA ranges read;
    whether the stage-2 walk to the table reads MMIO (then the entries could be anything)."""

    found: tuple[tuple[int, int, int], ...]
    reads: tuple[tuple[int, int], ...]
    device_defined: bool = False


@dataclass(frozen=True, eq=False, slots=True)
class Descriptors:
    """Non-zero 8-byte descriptors of an L1 table: (index, value, PA); ranges read; indices whose
    descriptor is in MMIO (device-defined)."""

    found: tuple[tuple[int, int, int], ...]
    reads: tuple[tuple[int, int], ...]
    device_defined: tuple[int, ...]


@dataclass(frozen=True, eq=False, slots=True)
class StreamResult:
    """What one stream configuration reaches, and the TLB tags it can use."""

    reaches: tuple[Reach, ...]
    tags: frozenset[TlbTag]


@dataclass(frozen=True, slots=True)
class AtsModes:
    """Which ATSCHK values may be in effect while the SMMU is enabled (both while CR0 updates)."""

    unchecked: bool
    checked: bool


def _page_windows(start: int, length: int) -> Iterator[tuple[int, int]]:
    """``[start, start + length)`` cut at page boundaries: (address, length)."""
    end = start + length
    while start < end:
        chunk = min(end, (start & ~(PAGE_SIZE - 1)) + PAGE_SIZE) - start
        yield start, chunk
        start += chunk


def describe_ste(cfg: StreamConfig) -> str:
    text = f"STE of StreamID {cfg.sid:#x} at {cfg.address:#x}: Config={cfg.config.name}"
    if cfg.s1:
        text += f", S1ContextPtr={cfg.s1_context_ptr:#x} S1CDMax={cfg.s1_cdmax} S1Fmt={cfg.s1_fmt}"
        if cfg.s1_cdmax:
            text += f" S1DSS={S1Dss(cfg.s1_dss).name}"
    if cfg.s2_walk is not None:
        text += f", S2TTB={cfg.s2_walk.ttb:#x} VMID={cfg.vmid}"
    if cfg.eats:
        text += f", EATS={Eats(cfg.eats).name}"
    return text


def describe_cd(ctx: ContextConfig) -> str:
    text = f"CD {ctx.index} at {ctx.address:#x}: ASID={ctx.asid}"
    for name, walk in (("TTB0", ctx.ttb0), ("TTB1", ctx.ttb1)):
        text += f", {name}={walk.ttb:#x}" if walk is not None else f", {name} disabled"
    return text


class StreamReacher:
    """Memoised stream-table, CD-table and per-stream reach computation for one SMMU."""

    def __init__(
        self, name: str, features: SmmuFeatures, walker: TreeWalker, memory: MemoryView, memo: DependencyMemo
    ) -> None:
        self.name = name
        self.features = features
        self.walker = walker
        self.memory = memory
        self.memo = memo
        # Decoding is a pure function of the raw entry; the same entries come back at every step.
        self._stes: dict[tuple[int, int, int], StreamConfig] = {}
        self._cds: dict[tuple[int, int, int, int, str], ContextConfig] = {}

    def decode_ste(self, sid: int, ste: int, address: int) -> StreamConfig:
        key = (sid, ste, address)
        found = self._stes.get(key)
        if found is None:
            if len(self._stes) > 65536:
                self._stes.clear()
            found = self._stes[key] = decode_ste(sid, ste, address, (address,), self.features)
        return found

    def decode_cd(self, sid: int, index: int, cd: int, address: int, world: str) -> ContextConfig:
        key = (sid, index, cd, address, world)
        found = self._cds.get(key)
        if found is None:
            if len(self._cds) > 65536:
                self._cds.clear()
            found = self._cds[key] = decode_cd(sid, index, cd, address, (address,), self.features, world)
        return found

    # -- tables of 64-byte entries and of 8-byte descriptors -----------------------------------------
    def entries(
        self, stage2: WalkConfig | None, table: int, first: int, count: int, v_byte: int, v_mask: int
    ) -> Entries:
        """Valid entries ``first .. first+count-1`` of a table at ``table`` (an IPA with ``stage2``),
        one memo value per page of the table."""
        found: list[tuple[int, int, int]] = []
        reads: list[tuple[int, int]] = []
        for address, length in _page_windows(table + first * 64, count * 64):
            index = first + (address - table - first * 64) // 64
            key = ("entries", self.walker.config_id(stage2), address, index, length, v_byte, v_mask)
            page = self.memo.get(key, self._entries_page, stage2, address, index, length, v_byte, v_mask)
            found.extend(page.found)
            reads.extend(page.reads)
        return Entries(tuple(found), tuple(reads))

    def _chunks(
        self, stage2: WalkConfig | None, address: int, length: int
    ) -> list[tuple[int, int, int]] | None:
        """(input address, PA, length) pieces of a structure fetch; through stage 2 (read
        permission needed) when ``stage2`` is given; None when that walk reads MMIO."""
        if stage2 is None:
            return [(address, address, length)]
        pieces = self.walker.translate(stage2, address, length)
        if isinstance(pieces, str):
            return None
        return [(ipa, pa, n) for ipa, pa, n, perms in pieces if perms & READ]

    def _entries_page(
        self, stage2: WalkConfig | None, address: int, first: int, length: int, v_byte: int, v_mask: int
    ) -> Entries:
        found: list[tuple[int, int, int]] = []
        reads: list[tuple[int, int]] = []
        chunks = self._chunks(stage2, address, length)
        if chunks is None:
            return Entries((), (), True)
        for ipa, pa, n in chunks:
            raw = self.memory.read(pa, n)
            if raw is None:
                continue  # a bulk fetch outside RAM aborts
            reads.append((pa, pa + n))
            skip = (-(ipa - address)) % 64  # entries split by a stage-2 hole are not fetchable
            flags = raw[skip + v_byte :: 64]
            if not any(flag & v_mask for flag in flags):
                continue
            for k, flag in enumerate(flags):
                offset = skip + 64 * k
                if flag & v_mask and offset + 64 <= n:
                    value = int.from_bytes(raw[offset : offset + 64], "little")
                    index = first + (ipa + offset - address) // 64
                    found.append((index, value, pa + offset))
        return Entries(tuple(found), tuple(reads))

    def descriptors(self, stage2: WalkConfig | None, table: int, count: int) -> Descriptors:
        """Non-zero 8-byte descriptors of an L1 table (IPA with ``stage2``), memoised per page."""
        found: list[tuple[int, int, int]] = []
        reads: list[tuple[int, int]] = []
        device: list[int] = []
        for address, length in _page_windows(table, count * 8):
            key = ("descriptors", self.walker.config_id(stage2), address, length)
            first = (address - table) // 8
            page = self.memo.get(key, self._descriptors_page, stage2, address, length)
            found.extend((first + i, value, pa) for i, value, pa in page.found)
            reads.extend(page.reads)
            device.extend(first + i for i in page.device_defined)
        return Descriptors(tuple(found), tuple(reads), tuple(device))

    def _descriptors_page(self, stage2: WalkConfig | None, address: int, length: int) -> Descriptors:
        found: list[tuple[int, int, int]] = []
        reads: list[tuple[int, int]] = []
        device: list[int] = []
        chunks = self._chunks(stage2, address, length)
        if chunks is None:
            return Descriptors((), (), tuple(range(length // 8)))
        for ipa, pa, n in chunks:
            reads.append((pa, pa + n))
            backing = self.memory.backing(pa, n)
            first = (ipa - address) // 8
            if backing is Backing.MMIO:
                device.extend(range(first, first + n // 8))
            elif backing is Backing.RAM:
                raw = self.memory.read(pa, n)
                assert raw is not None
                for k in range(n // 8):
                    value = int.from_bytes(raw[8 * k : 8 * k + 8], "little")
                    if value:
                        found.append((first + k, value, pa + 8 * k))
        return Descriptors(tuple(found), tuple(reads), tuple(device))

    def stes(self, table: int, first_sid: int, count: int) -> Entries:
        return self.entries(None, table, first_sid, count, _STE_V_BYTE, _STE_V_MASK)

    def l1std_l2(self, l1std: int, split: int) -> tuple[int, int] | None:
        """(L2 table PA, STE count) an L1 descriptor gives, or None when it is invalid."""
        span = L1STD.SPAN.get(l1std)
        if span == 0 or span > split + 1:
            return None
        count = 1 << (span - 1)
        return L1STD.L2PTR.get_address(l1std) & ~(count * STE_SIZE - 1), count

    # -- CDs ---------------------------------------------------------------------------------------------
    def cd_table(
        self, stream: StreamConfig
    ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]], bool]:
        """Valid CDs (index, value, PA) of the stream's CD table, the PA ranges fetched, and
        whether an L1CD is device-defined (so any CD is possible)."""
        stage2 = stream.s2_walk if stream.s2 else None
        table = stream.s1_context_ptr
        cdmax = stream.s1_cdmax
        if not (cdmax and stream.s1_fmt):
            table &= ~((1 << cdmax) * CD_SIZE - 1)
            linear = self.entries(stage2, table, 0, 1 << cdmax, _CD_V_BYTE, _CD_V_MASK)
            return list(linear.found), list(linear.reads), linear.device_defined
        leaf_bits = 6 if stream.s1_fmt == 1 else 10
        l1_count = max(1, 1 << max(0, cdmax - leaf_bits))
        l1_table = table & ~(l1_count * 8 - 1)
        l1 = self.descriptors(stage2, l1_table, l1_count)
        found: list[tuple[int, int, int]] = []
        reads = list(l1.reads)
        per_l2 = min(1 << leaf_bits, 1 << cdmax)
        device_defined = bool(l1.device_defined)
        for l1_index, desc, _pa in l1.found:
            if not L1CD.V.get(desc):
                continue
            l2 = self.l1cd_l2(stage2, desc, l1_index, leaf_bits, per_l2)
            found.extend(l2.found)
            reads.extend(l2.reads)
            device_defined = device_defined or l2.device_defined
        return found, reads, device_defined

    def l1cd_l2(
        self, stage2: WalkConfig | None, l1cd: int, l1_index: int, leaf_bits: int, count: int
    ) -> Entries:
        l2 = L1CD.L2PTR.get_address(l1cd) - (l1_index << leaf_bits) * CD_SIZE
        return self.entries(stage2, l2, l1_index << leaf_bits, count, _CD_V_BYTE, _CD_V_MASK)

    # -- what a configuration reaches -----------------------------------------------------------------
    def stream(self, cfg: StreamConfig, origin: tuple[str, ...], ats: AtsModes) -> StreamResult:
        key = ("stream", self.name, cfg, origin, ats)
        return self.memo.get(key, lambda: self._stream(cfg, origin, ats))

    def _stream(self, cfg: StreamConfig, origin: tuple[str, ...], ats: AtsModes) -> StreamResult:
        sid = cfg.sid
        path = (*origin, describe_ste(cfg))
        if cfg.illegal is not None or cfg.config == SteConfig.ABORT:
            return StreamResult((), frozenset())
        reaches: list[Reach] = []
        tags: set[TlbTag] = set()
        vm = cfg.vmid if cfg.world == WORLD_EL1 else -1
        s2_walk = cfg.s2_walk if cfg.s2 else None
        s2: Tree | None = None
        if s2_walk is not None:
            s2 = self.walker.tree(s2_walk)
            tags.add((TranslationKind.S2, vm, None))
            reaches.append(_reads(sid, None, s2.reads, (*path, "stage-2 table walks")))
        if cfg.config == SteConfig.BYPASS:
            reaches.append(Reach(DEVICE, sid, None, EVERYTHING, (*path, "bypass: addresses are physical")))
        if cfg.s2 and not cfg.s1 and s2 is not None:
            reaches.append(
                Reach(DEVICE, sid, None, s2.outputs(), (*path, "stage 2 only"), WalkRef(stage2=s2_walk))
            )
        if cfg.s1:
            unstaged = s2.outputs() if s2 is not None else EVERYTHING
            stage1_skipped = WalkRef(stage2=s2_walk) if s2_walk is not None else None
            if cfg.s1_cdmax and cfg.s1_dss == S1Dss.BYPASS:
                step = "S1DSS=BYPASS: transactions without a SubstreamID skip stage 1"
                reaches.append(Reach(DEVICE, sid, None, unstaged, (*path, step), stage1_skipped))
            found, reads, device_defined = self.cd_table(cfg)
            reaches.append(_reads(sid, None, tuple(reads), (*path, "CD fetches")))
            if device_defined:
                step = "CD table memory is MMIO: its CDs are whatever the device returns"
                reaches.append(Reach(DEVICE, sid, None, unstaged, (*path, step), stage1_skipped))
            for index, value, address in found:
                ctx = self.decode_cd(sid, index, value, address, cfg.world)
                result = self.context(cfg, ctx, tuple(path))
                reaches.extend(result.reaches)
                tags.update(result.tags)
        reaches.extend(self._ats(cfg, path, s2, ats))
        return StreamResult(tuple(reaches), frozenset(tags))

    def context(self, stream: StreamConfig, ctx: ContextConfig, path: tuple[str, ...]) -> StreamResult:
        """What one CD reaches for ``stream`` (stage 1, composed with its stage 2 when nested)."""
        key = ("context", self.name, stream, ctx, path)
        return self.memo.get(key, lambda: self._context(stream, ctx, path))

    def _context(self, stream: StreamConfig, ctx: ContextConfig, path: tuple[str, ...]) -> StreamResult:
        if ctx.illegal is not None:
            return StreamResult((), frozenset())
        sid = stream.sid
        ssid = ctx.index if stream.s1_cdmax else None
        s2_walk = stream.s2_walk if stream.s2 else None
        s2 = self.walker.tree(s2_walk) if s2_walk is not None else None
        kind = TranslationKind.NESTED if s2 is not None else TranslationKind.S1
        vm = stream.vmid if stream.world == WORLD_EL1 else -1
        cd_path = (*path, describe_cd(ctx))
        reaches: list[Reach] = []
        for name, walk in (("TTB0", ctx.ttb0), ("TTB1", ctx.ttb1)):
            if walk is None:
                continue
            s1 = self.walker.tree(walk, s2_walk)
            runs = compose(s1, s2) if s2 is not None else s1.outputs()
            reaches.append(
                Reach(DEVICE, sid, ssid, runs, (*cd_path, f"{name} translation"), WalkRef(walk, s2_walk))
            )
            reaches.append(_reads(sid, ssid, s1.reads, (*cd_path, f"{name} table walks")))
        return StreamResult(tuple(reaches), frozenset({(kind, vm, ctx.asid)}))

    def _ats(
        self, cfg: StreamConfig, path: list[str] | tuple[str, ...], s2: Tree | None, ats: AtsModes
    ) -> list[Reach]:
        if not self.features.ats or cfg.eats == Eats.ABT:
            return []
        out = []
        if ats.unchecked:
            eats = Eats(cfg.eats).name
            step = f"EATS={eats} with SMMU_CR0.ATSCHK=0: ATS Translated transactions are not checked"
            out.append(Reach(DEVICE, cfg.sid, None, EVERYTHING, (*path, step)))
        if ats.checked:
            if cfg.eats == Eats.TRANS:
                step = "EATS=TRANS with SMMU_CR0.ATSCHK=1: ATS Translated transactions pass"
                out.append(Reach(DEVICE, cfg.sid, None, EVERYTHING, (*path, step)))
            elif cfg.eats == Eats.S1CHK and s2 is not None:
                step = "EATS=S1CHK with SMMU_CR0.ATSCHK=1: ATS Translated addresses are IPAs for stage 2"
                out.append(
                    Reach(DEVICE, cfg.sid, None, s2.outputs(), (*path, step), WalkRef(stage2=cfg.s2_walk))
                )
        return out


def _reads(
    sid: int | None, ssid: int | None, ranges: tuple[tuple[int, int], ...], path: tuple[str, ...]
) -> Reach:
    return Reach(SMMU, sid, ssid, Runs.of((start, end, READ) for start, end in ranges), path)


__all__ = [
    "AtsModes",
    "Descriptors",
    "Entries",
    "StreamReacher",
    "StreamResult",
    "TlbTag",
    "describe_cd",
    "describe_ste",
]
