"""From reaches to violations, incrementally.

Per SMMU, the register, stream-table and cache groups are memo values (recomputed only when a page
they read was written or their signature changed); the TLB is followed entry by entry (new entries
are checked as they appear, a TLBI or an ownership change rescans). Violations are kept per group
and recomputed only when the group or the forbidden ranges changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pkvm_smmu.machine.bus import SystemBus
from pkvm_smmu.machine.smmu.device import SmmuV3
from pkvm_smmu.machine.smmu.tlb import WORLD_EL1, TlbEntry
from pkvm_smmu.machine.smmu.types import TranslationKind
from pkvm_smmu.verify.oracle._explain import Explainer
from pkvm_smmu.verify.oracle._items import DEVICE, Reach, Violation
from pkvm_smmu.verify.oracle._memo import DependencyMemo
from pkvm_smmu.verify.oracle._memory import MemoryView
from pkvm_smmu.verify.oracle._ownership import OwnershipView, StructuresSource, page_runs
from pkvm_smmu.verify.oracle._runs import READ, WRITE, Forbidden, Runs, merge_ranges, perms_text
from pkvm_smmu.verify.oracle._smmu import Group, SmmuReach, Snapshot
from pkvm_smmu.verify.oracle._streams import TlbTag
from pkvm_smmu.verify.oracle._tables import TreeWalker

_NONE: list[Violation] = []  # shared, never modified
_Structures = tuple[tuple[tuple[int, int, str], ...], tuple[tuple[int, int, str], ...]]  # reads, writes
_NO_STRUCTURES: _Structures = ((), ())


@dataclass(frozen=True, slots=True)
class _Forbidden:
    device: Forbidden  # what a device may not reach: everything the host may not access
    smmu_read: Forbidden  # ... minus what the hyp has the SMMU read (or write) for itself
    smmu_write: Forbidden  # ... minus what the hyp has the SMMU write for itself


@dataclass
class _TlbState:
    signature: tuple[int, int] = (-1, -1)
    generation: int = -1  # forbidden generation the hot entries were computed against
    hot: dict[int, TlbEntry] = field(default_factory=dict)  # seq -> entries reaching forbidden pages
    last_seq: int = 0
    changes: int = 0
    violations: list[Violation] = field(default_factory=list)
    violations_key: tuple[object, ...] = ()


class Evaluator:
    def __init__(
        self,
        bus: SystemBus,
        smmus: Sequence[SmmuV3],
        ownership: OwnershipView,
        declared: Mapping[str, StructuresSource],
    ) -> None:
        self.memo = DependencyMemo()
        memory = MemoryView(bus, self.memo)
        walker = TreeWalker(memory, self.memo)
        self.explainer = Explainer(walker, memory)
        self.scopes = [SmmuReach(smmu, walker, memory, self.memo) for smmu in smmus]
        self.ownership = ownership
        self.declared = declared
        self._forbidden_key: object = None
        self._forbidden: dict[str, _Forbidden] = {}
        self._generation = 0
        self._groups: dict[tuple[str, str], tuple[Group, int, list[Violation]]] = {}
        self._intersections: dict[tuple[Runs, str], list[tuple[int, int, str, int]]] = {}
        self._tlb: dict[str, _TlbState] = {}
        self._parts: list[list[Violation]] = []
        self._result: list[Violation] = []

    # -- forbidden ranges ------------------------------------------------------------------------------
    def _structures(self) -> tuple[_Structures, ...]:
        out: list[_Structures] = []
        for scope in self.scopes:
            source = self.declared.get(scope.name)
            if source is None:
                out.append(_NO_STRUCTURES)
            else:
                structures = source()
                out.append((tuple(structures.reads), tuple(structures.writes)))
        return tuple(out)

    def _update_forbidden(self) -> None:
        structures = self._structures()
        key = (self.ownership.version, structures)
        if key == self._forbidden_key:
            return
        self._forbidden_key = key
        self._generation += 1
        self._intersections.clear()
        device = Forbidden(page_runs(self.ownership.blocked_runs()))
        for scope, (reads, writes) in zip(self.scopes, structures, strict=True):
            writable = merge_ranges((pa, pa + size) for pa, size, _ in writes)
            readable = merge_ranges([*((pa, pa + size) for pa, size, _ in reads), *writable])
            self._forbidden[scope.name] = _Forbidden(device, device.minus(readable), device.minus(writable))

    # -- the check -------------------------------------------------------------------------------------
    def check(self) -> list[Violation]:
        self._update_forbidden()
        if not any(f.device or f.smmu_read or f.smmu_write for f in self._forbidden.values()):
            return []  # the host may access everything (``native``): nothing can be a violation
        parts: list[list[Violation]] = []
        for scope in self.scopes:
            snap = scope.snapshot()
            registers = scope.registers(snap)
            tables = scope.tables(snap)
            caches = scope.caches(snap, tables)
            parts.append(self._group_violations(scope, "registers", registers))
            parts.append(self._group_violations(scope, "tables", tables))
            parts.append(self._group_violations(scope, "caches", caches))
            parts.append(self._tlb_violations(scope, snap, tables, caches))
        if len(parts) != len(self._parts) or any(a is not b for a, b in zip(parts, self._parts, strict=True)):
            self._parts = parts
            self._result = _assemble(parts)
        self.memo.sweep(
            [(group, scope.name) for scope in self.scopes for group in ("registers", "tables", "caches")]
        )
        return list(self._result)

    def _group_violations(self, scope: SmmuReach, name: str, group: Group) -> list[Violation]:
        cached = self._groups.get((scope.name, name))
        if cached is not None and cached[0] is group and cached[1] == self._generation:
            return cached[2]
        forbidden = self._forbidden[scope.name]
        violations: list[Violation] = []
        for reach in group.reaches:
            violations.extend(self._reach_violations(scope.name, reach, forbidden))
        self._groups[(scope.name, name)] = (group, self._generation, violations)
        return violations

    def _intersect(
        self, runs: Runs, forbidden: Forbidden, which: str, only: int = 0
    ) -> list[tuple[int, int, str, int]]:
        """``forbidden.intersect(runs)``, remembered per Runs object; with ``only``, the runs
        that are exactly READ or carry WRITE (the SMMU's own reads and writes)."""
        key = (runs, which)
        found = self._intersections.get(key)
        if found is None:
            if len(self._intersections) > 65536:
                self._intersections.clear()
            if only:
                want_write = only == WRITE
                runs = Runs(tuple(run for run in runs.items if bool(run[2] & WRITE) == want_write))
            found = self._intersections[key] = forbidden.intersect(runs)
        return found

    def _reach_violations(self, smmu: str, reach: Reach, forbidden: _Forbidden) -> list[Violation]:
        if reach.actor == DEVICE:
            parts = self._intersect(reach.runs, forbidden.device, "device")
        else:
            parts = self._intersect(reach.runs, forbidden.smmu_read, "smmu-read", READ)
            parts = parts + self._intersect(reach.runs, forbidden.smmu_write, "smmu-write", WRITE)
        out = []
        for start, end, owner, perms in parts:
            path = reach.path
            if reach.walk is not None:
                path = (*path, *self.explainer.explain(reach.walk, start))
            out.append(
                Violation(
                    smmu,
                    reach.actor,
                    reach.sid,
                    reach.ssid,
                    perms_text(perms),
                    start,
                    end - start,
                    owner,
                    path,
                )
            )
        return out

    # -- the TLB ---------------------------------------------------------------------------------------
    def _tlb_violations(
        self, scope: SmmuReach, snap: Snapshot, tables: Group, caches: Group
    ) -> list[Violation]:
        state = self._tlb.setdefault(scope.name, _TlbState())
        tlb = scope.smmu.tlb
        signature = (tlb.generation, len(tlb))
        forbidden = self._forbidden[scope.name].device
        if state.generation != self._generation:
            entries = tuple(tlb.entries())
            state.hot = {entry.seq: entry for entry in entries if _reaches(entry, forbidden)}
            state.last_seq = entries[-1].seq if entries else 0
            state.changes += 1
        elif state.signature != signature:
            # Entries only come (with a higher seq) and go (no longer alive): a replaced or
            # re-filled translation is a new entry.
            if signature[0] != state.signature[0]:
                alive = {seq: entry for seq, entry in state.hot.items() if entry.alive}
                if len(alive) != len(state.hot):
                    state.hot = alive
                    state.changes += 1
            entries = tuple(tlb.entries())
            for entry in reversed(entries):
                if entry.seq <= state.last_seq:
                    break
                if _reaches(entry, forbidden):
                    state.hot[entry.seq] = entry
                    state.changes += 1
            if entries:
                state.last_seq = max(state.last_seq, entries[-1].seq)
        state.signature = signature
        state.generation = self._generation
        if not snap.maybe_enabled:
            return _NONE
        key = (state.changes, state.generation, tables, caches)
        if not _same(state.violations_key, key):
            state.violations_key = key
            state.violations = self._tlb_entry_violations(scope.name, state, forbidden, tables, caches)
        return state.violations

    def _tlb_entry_violations(
        self, smmu: str, state: _TlbState, forbidden: Forbidden, tables: Group, caches: Group
    ) -> list[Violation]:
        users = _tag_index(tables, caches)
        out = []
        for _, entry in sorted(state.hot.items()):
            vm = entry.vmid if entry.world == WORLD_EL1 else -1
            kind = entry.kind
            asid = None if kind is TranslationKind.S2 else entry.asid
            sids = sorted({
                sid for sid, tag_asid in users.get((kind, vm), ())
                if asid is None or tag_asid is None or tag_asid == asid
            })  # fmt: skip
            if not sids:
                continue
            perms = _entry_perms(entry)
            described = (
                f"TLB entry {kind.value} VMID {entry.vmid} ASID {asid}: input {entry.input_base:#x} -> "
                f"{entry.output_base:#x} ({entry.size:#x} bytes), filled from descriptors at "
                + ", ".join(f"{pa:#x}" for pa in entry.sources)
            )
            for sid in sids:
                step = (
                    f"StreamID {sid:#x} uses {kind.value} translations of VM tag {vm}: it can hit the entry"
                )
                for start, end, owner in forbidden.overlapping(
                    entry.output_base, entry.output_base + entry.size
                ):
                    size = end - start
                    violation = Violation(
                        smmu, DEVICE, sid, None, perms_text(perms), start, size, owner, (described, step)
                    )
                    out.append(violation)
        return out


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return len(a) == len(b) and all(x is y or x == y for x, y in zip(a, b, strict=True))


def _reaches(entry: TlbEntry, forbidden: Forbidden) -> bool:
    return bool(_entry_perms(entry)) and bool(
        forbidden.overlapping(entry.output_base, entry.output_base + entry.size)
    )


def _entry_perms(entry: TlbEntry) -> int:
    readable = (entry.readable or entry.executable or entry.priv_executable) and (
        entry.s2_readable or entry.s2_executable
    )
    return (READ if readable else 0) | (WRITE if entry.writable and entry.s2_writable else 0)


def _tag_index(*groups: Group) -> dict[tuple[TranslationKind, int], set[tuple[int, int | None]]]:
    index: dict[tuple[TranslationKind, int], set[tuple[int, int | None]]] = {}
    for group in groups:
        for sid, tags in group.tags.items():
            tag: TlbTag
            for tag in tags:
                index.setdefault((tag[0], tag[1]), set()).add((sid, tag[2]))
    return index


def _sort_key(v: Violation) -> tuple[object, ...]:
    sid = -1 if v.sid is None else v.sid
    ssid = -1 if v.ssid is None else v.ssid
    return (v.smmu, v.actor, sid, ssid, v.start, v.size, v.access, v.owner, v.path)


def _assemble(parts: list[list[Violation]]) -> list[Violation]:
    """Every violation once: for the same stream, range and owner, the path from the earliest
    source (registers, stream table, caches, TLB) wins, the smallest path among equals."""
    best: dict[tuple[object, ...], tuple[int, Violation]] = {}
    for rank, part in enumerate(parts):
        for v in part:
            key = (v.smmu, v.actor, v.sid, v.ssid, v.access, v.start, v.size, v.owner)
            found = best.get(key)
            if found is None or (rank, v.path) < (found[0], found[1].path):
                best[key] = (rank, v)
    return sorted((v for _, v in best.values()), key=_sort_key)


__all__ = ["Evaluator"]
