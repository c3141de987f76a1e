"""Everything a translation table tree in memory maps, as runs, one memo value per table.

The walker in ``machine/smmu/walk.py`` answers "what does this address translate to"; the oracle
needs "what can any address translate to", so this enumerates the tree with the same descriptor
rules (valid/table/block/page by level, reserved encodings, AF unless AFFD, output and table
addresses beyond the output size, stage-1 APTable[1] and stage-2 S2AP/XN permissions, 52-bit OA
with the 64 KiB granule). A leaf table written in bulk is recognised as one linear run by
comparing it with the run it would be, so a gigabyte identity map costs a few thousand compares.

A nested stage 1's table addresses are IPAs: each table is read through the stream's stage-2
mapping (where stage 2 grants read) and depends only on the stage-2 translation of its own pages.
Table memory that is MMIO holds whatever the device returns, so a tree that reads one may map
anything (``device_defined``).
"""

from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass
from functools import lru_cache
from sys import byteorder
from typing import Any

from pkvm_smmu.arch.vmsa import S1_LEAF, S2_LEAF, TABLE_DESC
from pkvm_smmu.machine.memory import PAGE_SIZE
from pkvm_smmu.machine.smmu.types import WalkConfig
from pkvm_smmu.verify.oracle._memo import DependencyMemo
from pkvm_smmu.verify.oracle._memory import Backing, MemoryView
from pkvm_smmu.verify.oracle._runs import EVERYTHING, READ, READ_WRITE, WRITE, Runs

_VALID = TABLE_DESC.VALID.in_place_mask
_TYPE = TABLE_DESC.TYPE.in_place_mask
_OA_END = 1 << (TABLE_DESC.NLTA.hi + 1)
_OA_HI = S1_LEAF.OA_HI.in_place_mask
_OA_HI_SHIFT = 48 - S1_LEAF.OA_HI.lo
_AF = S1_LEAF.AF.in_place_mask
_AP_RO = 1 << S1_LEAF.AP.hi
_APTABLE_RO = 1 << TABLE_DESC.APTABLE.hi
_S2AP_R = 1 << S2_LEAF.S2AP.lo
_S2AP_W = 1 << S2_LEAF.S2AP.hi
_S2_XN = 1 << S2_LEAF.XN.hi
_SWAP = byteorder != "little"
_PER_ENTRY_BELOW = 8  # segments this short are decoded entry by entry
_GROUP = 32  # entries of a table joined as one memo value

MapRun = tuple[int, int, int, int]  # input, output, size, perms


@lru_cache(maxsize=64)
def _lanes(n: int) -> tuple[int, int]:
    ones = ((1 << (64 * n)) - 1) // ((1 << 64) - 1)
    ramp = int.from_bytes(b"".join(k.to_bytes(8, "little") for k in range(n)), "little")
    return ones, ramp


def _linear(first: int, step: int, n: int) -> bytes:
    """``n`` little-endian descriptors ``first + k * step`` (no lane carries into the next)."""
    ones, ramp = _lanes(n)
    return (first * ones + step * ramp).to_bytes(8 * n, "little")


def _any_valid(raw: bytes) -> bool:
    n = len(raw) >> 3
    return bool(int.from_bytes(raw[0::8], "little") & ((1 << (8 * n)) // 255))


class Tree:
    """What a table tree (or one table of it) maps: ``runs`` as (input, output, size, perms)
    sorted by input with linear pieces merged; ``reads``, the PA ranges of table memory read;
    ``device_defined``, PAs of table memory that is MMIO (any output is then possible)."""

    __slots__ = ("_outputs", "_starts", "device_defined", "reads", "runs")

    def __init__(
        self, runs: tuple[MapRun, ...], reads: tuple[tuple[int, int], ...], device_defined: tuple[int, ...]
    ) -> None:
        self.runs = runs
        self.reads = reads
        self.device_defined = device_defined
        self._starts: list[int] | None = None
        self._outputs: Runs | None = None

    def outputs(self) -> Runs:
        if self._outputs is None:
            if self.device_defined:
                self._outputs = EVERYTHING
            else:
                self._outputs = Runs.of((out, out + size, perms) for _, out, size, perms in self.runs)
        return self._outputs

    def pieces(self, start: int, end: int) -> list[MapRun]:
        """The mapped parts of inputs ``[start, end)``: (input, output, length, perms)."""
        if self._starts is None:
            self._starts = [run[0] for run in self.runs]
        runs = self.runs
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        out = []
        while i < len(runs):
            r_in, r_out, r_size, perms = runs[i]
            if r_in >= end:
                break
            r_end = r_in + r_size
            if r_end > start:
                lo = max(start, r_in)
                out.append((lo, r_out + (lo - r_in), min(end, r_end) - lo, perms))
            i += 1
        return out


def compose(stage1: Tree, stage2: Tree) -> Runs:
    """Physical memory reachable through stage 1 then stage 2 (both stages must permit)."""
    if stage2.device_defined:
        return EVERYTHING
    if stage1.device_defined:
        return stage2.outputs()  # stage 1 may output any IPA
    parts = []
    for _, ipa, size, perms1 in stage1.runs:
        for _, pa, length, perms2 in stage2.pieces(ipa, ipa + size):
            perms = perms1 & perms2
            if perms:
                parts.append((pa, pa + length, perms))
    return Runs.of(parts)


def _coalesce_runs(pieces: list[MapRun]) -> tuple[MapRun, ...]:
    """Input-ordered runs with linear neighbours joined."""
    out: list[MapRun] = []
    if not pieces:
        return ()
    cur_in, cur_out, cur_size, cur_perms = pieces[0]
    for r_in, r_out, r_size, perms in pieces[1:]:
        if perms == cur_perms and cur_in + cur_size == r_in and cur_out + cur_size == r_out:
            cur_size += r_size
        else:
            out.append((cur_in, cur_out, cur_size, cur_perms))
            cur_in, cur_out, cur_size, cur_perms = r_in, r_out, r_size, perms
    out.append((cur_in, cur_out, cur_size, cur_perms))
    return tuple(out)


def _coalesce_ranges(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Ranges with touching neighbours joined (order kept)."""
    out: list[tuple[int, int]] = []
    if not ranges:
        return ()
    cur_start, cur_end = ranges[0]
    for start, end in ranges[1:]:
        if start == cur_end:
            cur_end = end
        else:
            out.append((cur_start, cur_end))
            cur_start, cur_end = start, end
    out.append((cur_start, cur_end))
    return tuple(out)


def _append_range(ranges: list[tuple[int, int]], start: int, end: int) -> None:
    if ranges and ranges[-1][1] == start:
        ranges[-1] = (ranges[-1][0], end)
    else:
        ranges.append((start, end))


@dataclass(frozen=True, slots=True)
class _Next:
    base: int  # input address the next-level table starts at
    table: int  # its address (an IPA for a nested stage 1)
    read_only: bool  # stage-1 APTable[1] on the way


@dataclass(frozen=True, eq=False, slots=True)
class _Table:
    """One table's own descriptors: leaf runs and next-level tables, in input order."""

    items: tuple[MapRun | _Next, ...]
    reads: tuple[tuple[int, int], ...]
    device_defined: tuple[int, ...]
    starts: list[int]  # input address of each item, for lookups


# A piece of a stage-2 lookup: (input, output, length, perms); DEVICE_DEFINED when the walk met MMIO.
DEVICE_DEFINED = "device-defined"
Translation = tuple[MapRun, ...] | str


class TreeWalker:
    """Memoised enumeration of table trees in memory.

    Two memo values per table: its own descriptors (``_table``: depends on the table's memory and,
    nested, on the stage-2 translation of its pages) and everything below it (``_subtree``). A
    write to one leaf table then re-reads that table and re-joins its ancestors' results, while
    lookups through untouched tables (a nested stage 1's table addresses) stay valid.
    """

    def __init__(self, memory: MemoryView, memo: DependencyMemo) -> None:
        self.memory = memory
        self.memo = memo
        # Configurations by a small number: memo keys of plain ints hash and compare quickly.
        self._ids: dict[WalkConfig | None, int] = {None: 0}

    def config_id(self, cfg: WalkConfig | None) -> int:
        found = self._ids.get(cfg)
        if found is None:
            found = self._ids[cfg] = len(self._ids)
        return found

    @staticmethod
    def _root(cfg: WalkConfig) -> tuple[int, int, int]:
        """(table address, start level, entries) of the start-level table, as the walker finds it."""
        gshift = cfg.granule.shift
        stride = gshift - 3
        level = cfg.start_level
        shift = gshift + (3 - level) * stride
        entries = cfg.concatenated << stride
        if cfg.input_bits - shift < stride:
            entries = 1 << (cfg.input_bits - shift) if cfg.input_bits > shift else 1
        oa52 = gshift == 16 and cfg.output_bits > 48
        table = cfg.ttb & -(entries << 3 if not oa52 or entries >= 8 else 64)
        reachable = 1 << (cfg.input_bits - shift) if cfg.input_bits > shift else 1
        return table, level, min(entries, reachable)

    def tree(self, cfg: WalkConfig, stage2: WalkConfig | None = None) -> Tree:
        """Everything ``cfg``'s tables map; with ``stage2``, table addresses are IPAs."""
        table, level, entries = self._root(cfg)
        ids = (self.config_id(cfg), self.config_id(stage2))
        return self._subtree(cfg, stage2, ids, table, level, 0, entries, False)

    def translate_page(self, stage2: WalkConfig, page: int) -> Translation:
        """The stage-2 mapping of the page at ``page``: its pieces, or DEVICE_DEFINED. Depends only
        on the tables its walk reads."""
        ids = (self.config_id(stage2), 0)
        # Early cut-off: a table the walk read changed, but if this page still translates the
        # same, what was derived from the translation (a nested stage 1) stays valid.
        return self.memo.get(("s2-page", ids, page), self._translate_page, stage2, ids, page, cutoff=True)

    def translate(self, stage2: WalkConfig, start: int, length: int) -> Translation:
        """``translate_page`` over ``[start, start + length)``."""
        pieces: list[MapRun] = []
        address, end = start, start + length
        while address < end:
            page = address & ~(PAGE_SIZE - 1)
            found = self.translate_page(stage2, page)
            if isinstance(found, str):
                return found
            stop = min(end, page + PAGE_SIZE)
            for r_in, r_out, r_len, perms in found:
                lo, hi = max(r_in, address), min(r_in + r_len, stop)
                if lo < hi:
                    pieces.append((lo, r_out + lo - r_in, hi - lo, perms))
            address = stop
        return tuple(pieces)

    def _translate_page(self, stage2: WalkConfig, ids: tuple[int, int], page: int) -> Translation:
        table, level, entries = self._root(stage2)
        base = 0
        stride = stage2.granule.shift - 3
        while True:
            parsed = self._table(stage2, None, ids, table, level, base, entries, False)
            if parsed.device_defined:
                return DEVICE_DEFINED
            i = bisect.bisect_right(parsed.starts, page) - 1
            if i < 0:
                return ()
            item = parsed.items[i]
            if isinstance(item, _Next):
                shift = stage2.granule.shift + (3 - level) * stride
                if page >= item.base + (1 << shift):
                    return ()
                table, level, base, entries = item.table, level + 1, item.base, 1 << stride
                continue
            r_in, r_out, r_size, perms = item
            if page >= r_in + r_size:
                return ()
            lo, hi = page, min(page + PAGE_SIZE, r_in + r_size)
            return ((lo, r_out + lo - r_in, hi - lo, perms),)

    def _subtree(
        self,
        cfg: WalkConfig,
        stage2: WalkConfig | None,
        ids: tuple[int, int],
        table: int,
        level: int,
        base: int,
        entries: int,
        read_only: bool,
    ) -> Tree:
        key = ("subtree", ids, table, level, base, entries, read_only)
        return self.memo.get(
            key, lambda: self._join(cfg, stage2, ids, table, level, base, entries, read_only)
        )

    def _join(
        self,
        cfg: WalkConfig,
        stage2: WalkConfig | None,
        ids: tuple[int, int],
        table: int,
        level: int,
        base: int,
        entries: int,
        read_only: bool,
    ) -> Tree:
        parsed = self._table(cfg, stage2, ids, table, level, base, entries, read_only)
        items = parsed.items
        if len(items) <= _GROUP:
            return self._join_items(cfg, stage2, ids, level, items, parsed.reads, parsed.device_defined)
        # Joined in groups, each a memo value: a change below one entry re-joins its group and
        # the groups, not every entry of a table mapping a gigabyte.
        pieces: list[MapRun] = []
        reads = list(parsed.reads)
        device = list(parsed.device_defined)
        node = (ids, table, level, base, entries, read_only)
        for first in range(0, len(items), _GROUP):
            group = self.memo.get(("group", node, first), self._join_group, cfg, stage2, node, first)
            pieces.extend(group.runs)
            reads.extend(group.reads)
            device.extend(group.device_defined)
        return Tree(_coalesce_runs(pieces), _coalesce_ranges(reads), tuple(device))

    def _join_group(
        self, cfg: WalkConfig, stage2: WalkConfig | None, node: tuple[Any, ...], first: int
    ) -> Tree:
        ids, table, level, base, entries, read_only = node
        parsed = self._table(cfg, stage2, ids, table, level, base, entries, read_only)
        return self._join_items(cfg, stage2, ids, level, parsed.items[first : first + _GROUP], (), ())

    def _join_items(
        self,
        cfg: WalkConfig,
        stage2: WalkConfig | None,
        ids: tuple[int, int],
        level: int,
        items: tuple[MapRun | _Next, ...],
        own_reads: tuple[tuple[int, int], ...],
        own_device: tuple[int, ...],
    ) -> Tree:
        pieces: list[MapRun] = []
        reads = list(own_reads)
        device = list(own_device)
        child_entries = 1 << (cfg.granule.shift - 3)
        get = self.memo.get
        join = self._join
        child_level = level + 1
        for item in items:
            if isinstance(item, _Next):
                key = ("subtree", ids, item.table, child_level, item.base, child_entries, item.read_only)
                child = get(key, join, cfg, stage2, ids, item.table, child_level, item.base, child_entries,
                            item.read_only)  # fmt: skip
                pieces.extend(child.runs)
                reads.extend(child.reads)
                if child.device_defined:
                    device.extend(child.device_defined)
            else:
                pieces.append(item)
        return Tree(_coalesce_runs(pieces), _coalesce_ranges(reads), tuple(device))

    def _table(
        self,
        cfg: WalkConfig,
        stage2: WalkConfig | None,
        ids: tuple[int, int],
        table: int,
        level: int,
        base: int,
        entries: int,
        read_only: bool,
    ) -> _Table:
        key = ("table", ids, table, level, base, entries, read_only)
        return self.memo.get(
            key, lambda: self._scan(cfg, stage2, ids, table, level, base, entries, read_only)
        )

    def _scan(
        self,
        cfg: WalkConfig,
        stage2: WalkConfig | None,
        ids: tuple[int, int],
        table: int,
        level: int,
        base: int,
        entries: int,
        read_only: bool,
    ) -> _Table:
        length = entries << 3
        items: list[MapRun | _Next] = []
        reads: list[tuple[int, int]] = []
        device: list[int] = []
        if stage2 is None:
            chunks: list[tuple[int, int, int]] = [(0, table, length)]
        else:
            pieces = self.translate(stage2, table, length)
            if isinstance(pieces, str):  # the stage-2 walk reads MMIO: the table could be anywhere
                return _Table((), (), (table,), [])
            chunks = [(ipa - table, pa, n) for ipa, pa, n, perms in pieces if perms & READ]
        memory = self.memory
        for offset, pa, n in chunks:
            _append_range(reads, pa, pa + n)
            backing = memory.backing(pa, n)
            if backing is Backing.MMIO:
                device.append(pa)
            elif backing is Backing.RAM:
                raw = memory.read(pa, n)
                assert raw is not None
                self._decode(raw, offset >> 3, cfg, level, base, read_only, items)
        starts = [item.base if isinstance(item, _Next) else item[0] for item in items]
        return _Table(tuple(items), tuple(reads), tuple(device), starts)

    def _decode(
        self,
        raw: bytes,
        first_index: int,
        cfg: WalkConfig,
        level: int,
        base: int,
        read_only: bool,
        items: list[MapRun | _Next],
    ) -> None:
        gshift = cfg.granule.shift
        stride = gshift - 3
        shift = gshift + (3 - level) * stride
        size = 1 << shift
        output_bits = cfg.output_bits
        output_limit = 1 << output_bits
        oa52 = gshift == 16 and output_bits > 48
        first_block_level = 1 if gshift == 12 or oa52 else 2
        leaf_type = _TYPE if level == 3 else 0
        leaf_level = level == 3 or level >= first_block_level
        out_mask = _OA_END - size
        table_mask = _OA_END - (1 << gshift)
        stage = cfg.stage
        affd = cfg.affd
        hierarchical = cfg.hierarchical_attrs

        def leaf_perms(desc: int) -> int:
            if not desc & _AF and not affd:
                return 0
            if stage == 2:
                readable = desc & _S2AP_R or not desc & _S2_XN  # an instruction fetch reads too
                return (READ if readable else 0) | (WRITE if desc & _S2AP_W else 0)
            return READ if desc & _AP_RO or read_only else READ_WRITE

        def output_of(desc: int) -> int:
            out = desc & out_mask
            if oa52:
                out |= (desc & _OA_HI) << _OA_HI_SHIFT
            return out

        def one(index: int, desc: int) -> None:
            if not desc & _VALID:
                return
            address = base + (index << shift)
            if desc & _TYPE and level < 3:
                next_table = desc & table_mask
                if oa52:
                    next_table |= (desc & _OA_HI) << _OA_HI_SHIFT
                if next_table >> output_bits:
                    return  # address size fault
                child_ro = read_only or bool(hierarchical and desc & _APTABLE_RO)
                items.append(_Next(address, next_table, child_ro))
                return
            if not leaf_level or desc & _TYPE != leaf_type:
                return  # reserved encoding: translation fault
            out = output_of(desc)
            if out >> output_bits:
                return
            perms = leaf_perms(desc)
            if perms:
                _append_item(items, (address, out, size, perms))

        todo = [(0, len(raw) >> 3)]
        while todo:
            lo, hi = todo.pop()
            segment = raw[lo << 3 : hi << 3]
            if not _any_valid(segment):
                continue
            n = hi - lo
            head = int.from_bytes(segment[:8], "little")
            if (
                n > 1
                and leaf_level
                and head & _VALID
                and head & _TYPE == leaf_type
                and (head & out_mask) + n * size <= _OA_END
                and output_of(head) + n * size <= output_limit
                and segment == _linear(head, size, n)
            ):
                perms = leaf_perms(head)
                if perms:
                    address = base + ((first_index + lo) << shift)
                    _append_item(items, (address, output_of(head), n * size, perms))
                continue
            if n <= _PER_ENTRY_BELOW:
                values = array("Q")
                values.frombytes(segment)
                if _SWAP:
                    values.byteswap()
                for k, desc in enumerate(values):
                    one(first_index + lo + k, desc)
                continue
            mid = (lo + hi) >> 1
            todo.append((mid, hi))  # popped last: keeps the items in input order
            todo.append((lo, mid))


def _append_item(items: list[MapRun | _Next], run: MapRun) -> None:
    if items:
        last = items[-1]
        if not isinstance(last, _Next):
            last_in, last_out, last_size, last_perms = last
            if last_perms == run[3] and last_in + last_size == run[0] and last_out + last_size == run[1]:
                items[-1] = (last_in, last_out, last_size + run[2], last_perms)
                return
    items.append(run)


__all__ = ["DEVICE_DEFINED", "MapRun", "Translation", "Tree", "TreeWalker", "compose"]
