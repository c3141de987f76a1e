"""The TLB against a reference model of what each CMD_TLBI_* must remove (IHI 0070 §4.4, reference
card §4 and §6.5), and focused cases for the rules software most often gets wrong.

The reference encodes only the command scopes as the specification words them; the TLB must remove
exactly that set: more would hide software that forgets an invalidation, less would be wrong.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pkvm_smmu.machine.smmu.tlb import Tlb, TlbEntry
from pkvm_smmu.machine.smmu.types import TranslationKind

S1, S2, NESTED = TranslationKind.S1, TranslationKind.S2, TranslationKind.NESTED
KiB, MiB = 1 << 10, 1 << 20


def entry(
    kind: TranslationKind = S1,
    world: str = "el1",
    vmid: int = 1,
    asid: int | None = 1,
    base: int = 0x4000,
    size: int = 4 * KiB,
    level: int = 3,
    **kw: Any,
) -> TlbEntry:
    return TlbEntry(
        kind=kind, world=world, vmid=vmid, asid=None if kind is S2 else asid, input_base=base, size=size,
        output_base=0x8000_0000 + base, readable=True, writable=True, unpriv=True, executable=True,
        priv_executable=True, attr=0, level=level, sources=(0x1000,), **kw,
    )  # fmt: skip


def filled(*entries: TlbEntry) -> Tlb:
    tlb = Tlb()
    for e in entries:
        tlb.insert(e)
    return tlb


def remaining(tlb: Tlb) -> set[int]:
    return {id(e) for e in tlb.entries()}


def ids(*entries: TlbEntry) -> set[int]:
    return {id(e) for e in entries}


# -- reference model ------------------------------------------------------------------------------------
def _stage1(e: TlbEntry) -> bool:
    return e.kind in (S1, NESTED)


def _overlaps(e: TlbEntry, address: int, size: int) -> bool:
    # A TLBI by address names the cached leaf descriptor: for a NESTED fragment, the whole
    # stage-1 leaf it was cut from.
    leaf = max(e.size, e.leaf_size)
    leaf_base = e.input_base - e.input_base % leaf
    end = address + (size if size else 1)
    return leaf_base < end and address < leaf_base + leaf


def _level_ok(e: TlbEntry, ttl: int) -> bool:
    return ttl == 0 or e.level == ttl


def must_remove(command: str, args: dict[str, Any], e: TlbEntry) -> bool:
    el1, el2 = e.world == "el1", e.world == "el2"
    a = args
    if command == "nh_all":  # NS-EL1 stage-1 entries of the VMID, including global
        return el1 and _stage1(e) and e.vmid == a["vmid"]
    if command == "nh_asid":  # non-global stage-1 entries of VMID+ASID
        return el1 and _stage1(e) and e.vmid == a["vmid"] and e.asid == a["asid"]
    if command == "nh_va":  # stage-1 by VMID+ASID+VA, plus global entries by VMID+VA
        return (
            el1 and _stage1(e) and e.vmid == a["vmid"] and e.asid in (a["asid"], None)
            and _overlaps(e, a["address"], a["size"]) and _level_ok(e, a["ttl"])
        )  # fmt: skip
    if command == "nh_vaa":  # stage-1 by VMID+VA, all ASIDs
        return (
            el1 and _stage1(e) and e.vmid == a["vmid"] and _overlaps(e, a["address"], a["size"])
            and _level_ok(e, a["ttl"])
        )  # fmt: skip
    if command == "el2_all":  # all EL2 (and EL2-E2H) stage-1 entries
        return el2
    if command == "el2_asid":  # non-global EL2-E2H entries by ASID
        return el2 and e.asid == a["asid"]
    if command == "el2_va":
        return (
            el2
            and e.asid in (a["asid"], None)
            and _overlaps(e, a["address"], a["size"])
            and _level_ok(e, a["ttl"])
        )
    if command == "el2_vaa":
        return el2 and _overlaps(e, a["address"], a["size"]) and _level_ok(e, a["ttl"])
    if command == "s12_vmall":  # every EL1 stage-1, stage-2 and combined entry of the VMID
        return el1 and e.vmid == a["vmid"]
    if command == "s2_ipa":  # stage-2 entries by IPA; combined entries need not go
        return (
            el1 and e.kind is S2 and e.vmid == a["vmid"] and _overlaps(e, a["address"], a["size"])
            and _level_ok(e, a["ttl"])
        )  # fmt: skip
    if command == "nsnh_all":  # every NS non-EL2 entry
        return el1
    raise AssertionError(command)


def invalidate(tlb: Tlb, command: str, args: dict[str, Any]) -> None:
    getattr(tlb, f"invalidate_{command}")(**args)


def reference_matches(
    e: TlbEntry, kind: TranslationKind, world: str, vmid: int, asid: int | None, addr: int
) -> bool:
    if e.kind is not kind or e.world != world or (world == "el1" and e.vmid != vmid):
        return False
    if kind is not S2 and e.asid is not None and e.asid != asid:
        return False
    return e.input_base <= addr < e.input_base + e.size


# -- property: random fills and invalidations ----------------------------------------------------------
SIZES = (4 * KiB, 64 * KiB, 2 * MiB)
SPACE = 8 * MiB
VMIDS = st.sampled_from((0, 1, 2))
ASIDS = st.sampled_from((1, 2, 3))
ADDRESSES = st.integers(0, SPACE - 1)
RANGE_SIZES = st.one_of(st.just(0), st.integers(1, 1024).map(lambda n: n * 4 * KiB))
TTLS = st.integers(0, 3)


@st.composite
def entries(draw: st.DrawFn) -> TlbEntry:
    world = draw(st.sampled_from(("el1", "el1", "el2")))
    kind = S1 if world == "el2" else draw(st.sampled_from((S1, S2, NESTED)))
    size = draw(st.sampled_from(SIZES))
    base = draw(st.integers(0, SPACE // size - 1)) * size
    leaf_size = 0
    if kind is NESTED:
        leaf_size = draw(st.sampled_from([s for s in SIZES if s >= size]))
    asid = draw(st.one_of(st.none(), ASIDS))
    return entry(
        kind=kind, world=world, vmid=draw(VMIDS), asid=asid, base=base, size=size,
        level=draw(st.integers(1, 3)), leaf_size=leaf_size if leaf_size > size else 0,
    )  # fmt: skip


COMMANDS = {
    "nh_all": st.fixed_dictionaries({"vmid": VMIDS}),
    "nh_asid": st.fixed_dictionaries({"vmid": VMIDS, "asid": ASIDS}),
    "nh_va": st.fixed_dictionaries(
        {
            "vmid": VMIDS,
            "asid": ASIDS,
            "address": ADDRESSES,
            "size": RANGE_SIZES,
            "leaf": st.booleans(),
            "ttl": TTLS,
        }
    ),
    "nh_vaa": st.fixed_dictionaries(
        {"vmid": VMIDS, "address": ADDRESSES, "size": RANGE_SIZES, "leaf": st.booleans(), "ttl": TTLS}
    ),
    "el2_all": st.just({}),
    "el2_asid": st.fixed_dictionaries({"asid": ASIDS}),
    "el2_va": st.fixed_dictionaries(
        {"asid": ASIDS, "address": ADDRESSES, "size": RANGE_SIZES, "leaf": st.booleans(), "ttl": TTLS}
    ),
    "el2_vaa": st.fixed_dictionaries(
        {"address": ADDRESSES, "size": RANGE_SIZES, "leaf": st.booleans(), "ttl": TTLS}
    ),
    "s12_vmall": st.fixed_dictionaries({"vmid": VMIDS}),
    "s2_ipa": st.fixed_dictionaries(
        {"vmid": VMIDS, "address": ADDRESSES, "size": RANGE_SIZES, "leaf": st.booleans(), "ttl": TTLS}
    ),
    "nsnh_all": st.just({}),
}


def line_key(e: TlbEntry) -> tuple[object, ...]:
    """What makes two fills the same cache line: the later one replaces the earlier."""
    vmid = e.vmid if e.world == "el1" else None
    return (e.kind, e.world, vmid, e.asid, e.size, e.input_base)


class TlbMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.tlb = Tlb()
        self.model: list[TlbEntry] = []

    @rule(e=entries())
    def insert(self, e: TlbEntry) -> None:
        self.model = [m for m in self.model if line_key(m) != line_key(e)]
        self.model.append(e)
        self.tlb.insert(e)

    @rule(data=st.data(), command=st.sampled_from(sorted(COMMANDS)))
    def invalidate(self, data: st.DataObject, command: str) -> None:
        args = data.draw(COMMANDS[command])
        before = self.tlb.generation
        invalidate(self.tlb, command, args)
        self.model = [m for m in self.model if not must_remove(command, args, m)]
        assert self.tlb.generation > before

    @rule(
        kind=st.sampled_from((S1, S2, NESTED)),
        world=st.sampled_from(("el1", "el2")),
        vmid=VMIDS,
        asid=st.one_of(st.none(), ASIDS),
        address=ADDRESSES,
    )
    def lookup(self, kind: TranslationKind, world: str, vmid: int, asid: int | None, address: int) -> None:
        hit = self.tlb.lookup(kind, world, vmid, asid, address)
        candidates = [m for m in self.model if reference_matches(m, kind, world, vmid, asid, address)]
        if candidates:
            assert hit is not None
            assert any(hit is m for m in candidates)
        else:
            assert hit is None

    @invariant()
    def same_entries(self) -> None:
        assert remaining(self.tlb) == {id(m) for m in self.model}
        assert len(self.tlb) == len(self.model)


TlbMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_tlb_matches_reference_model = TlbMachine.TestCase


# -- focused cases -------------------------------------------------------------------------------------
def test_lookup_tags() -> None:
    s1 = entry(S1, vmid=1, asid=5, base=0x4000)
    glob = entry(S1, vmid=1, asid=None, base=0x20_0000, size=2 * MiB, level=2)
    s2 = entry(S2, vmid=1, base=0x4000)
    el2 = entry(S1, world="el2", vmid=7, asid=None, base=0x4000)
    tlb = filled(s1, glob, s2, el2)
    assert tlb.lookup(S1, "el1", 1, 5, 0x4FFF) is s1
    assert tlb.lookup(S1, "el1", 1, 6, 0x4000) is None  # other ASID
    assert tlb.lookup(S1, "el1", 2, 5, 0x4000) is None  # other VMID
    assert tlb.lookup(NESTED, "el1", 1, 5, 0x4000) is None  # other kind
    assert tlb.lookup(S1, "el1", 1, 9, 0x3F_FFFF) is glob  # global: any ASID
    assert tlb.lookup(S2, "el1", 1, None, 0x4123) is s2
    assert tlb.lookup(S1, "el2", 0, None, 0x4000) is el2  # EL2 ignores the VMID
    assert tlb.lookup(S1, "el1", 7, None, 0x4000) is None


def test_s2_ipa_leaves_nested_entries() -> None:
    s2 = entry(S2, vmid=1, base=0x4000)
    nested = entry(NESTED, vmid=1, asid=1, base=0x4000)
    tlb = filled(s2, nested)
    tlb.invalidate_s2_ipa(1, 0x4000, 0, leaf=True, ttl=0)
    assert remaining(tlb) == ids(nested)


def test_nh_all_leaves_stage2_and_other_vmids() -> None:
    s1 = entry(S1, vmid=1, asid=1)
    glob = entry(S1, vmid=1, asid=None, base=0x8000)
    nested = entry(NESTED, vmid=1, asid=2)
    s2 = entry(S2, vmid=1)
    other_vm = entry(S1, vmid=2, asid=1)
    tlb = filled(s1, glob, nested, s2, other_vm)
    tlb.invalidate_nh_all(1)
    assert remaining(tlb) == ids(s2, other_vm)


def test_global_entries_survive_nh_asid_but_not_nh_va() -> None:
    glob = entry(S1, vmid=1, asid=None, base=0x4000)
    mine = entry(S1, vmid=1, asid=3, base=0x8000)
    tlb = filled(glob, mine)
    tlb.invalidate_nh_asid(1, 3)
    assert remaining(tlb) == ids(glob)
    tlb.invalidate_nh_va(1, 9, 0x4000, 0, leaf=True, ttl=0)  # another ASID still reaches a global entry
    assert len(tlb) == 0


def test_nh_va_removes_only_the_asid_and_range() -> None:
    a = entry(S1, asid=1, base=0x4000)
    b = entry(S1, asid=1, base=0x5000)
    c = entry(S1, asid=1, base=0x6000)
    other = entry(S1, asid=2, base=0x5000)
    tlb = filled(a, b, c, other)
    tlb.invalidate_nh_va(1, 1, 0x5800, 0, leaf=False, ttl=0)  # a single address, low bits ignored
    assert remaining(tlb) == ids(a, c, other)
    tlb.invalidate_nh_va(1, 1, 0x3000, 0x2000, leaf=False, ttl=0)  # [0x3000, 0x5000) covers a only
    assert remaining(tlb) == ids(c, other)


def test_ttl_mismatch_leaves_the_entry() -> None:
    page = entry(S1, base=0x4000, level=3)
    block = entry(S1, base=0x20_0000, size=2 * MiB, level=2)
    tlb = filled(page, block)
    tlb.invalidate_nh_vaa(1, 0, 4 * MiB, leaf=True, ttl=2)
    assert remaining(tlb) == ids(page)
    tlb.invalidate_nh_vaa(1, 0x4000, 0, leaf=True, ttl=2)
    assert remaining(tlb) == ids(page)
    tlb.invalidate_nh_vaa(1, 0x4000, 0, leaf=True, ttl=3)
    assert len(tlb) == 0


def test_el1_and_el2_commands_do_not_cross() -> None:
    el1 = entry(S1, world="el1", vmid=0, asid=None)
    el2 = entry(S1, world="el2", vmid=0, asid=None)
    tlb = filled(el1, el2)
    tlb.invalidate_el2_all()
    tlb.invalidate_el2_vaa(0, 1 << 40, leaf=True, ttl=0)
    assert remaining(tlb) == ids(el1)
    tlb = filled(el1, el2)
    tlb.invalidate_nh_all(0)
    tlb.invalidate_nh_vaa(0, 0, 1 << 40, leaf=True, ttl=0)
    tlb.invalidate_s12_vmall(0)
    assert remaining(tlb) == ids(el2)


def test_nsnh_all_leaves_el2_entries() -> None:
    el2 = entry(S1, world="el2", asid=4)
    tlb = filled(entry(S1, vmid=1), entry(S2, vmid=2), entry(NESTED, vmid=3), el2)
    tlb.invalidate_nsnh_all()
    assert remaining(tlb) == ids(el2)


def test_el2_asid_leaves_global_el2_entries() -> None:
    glob = entry(S1, world="el2", asid=None, base=0x4000)
    tagged = entry(S1, world="el2", asid=4, base=0x8000)
    tlb = filled(glob, tagged)
    tlb.invalidate_el2_asid(4)
    assert remaining(tlb) == ids(glob)


def test_s12_vmall_removes_every_kind_of_the_vmid() -> None:
    keep = entry(S2, vmid=2)
    tlb = filled(entry(S1, vmid=1), entry(S2, vmid=1), entry(NESTED, vmid=1, asid=None), keep)
    tlb.invalidate_s12_vmall(1)
    assert remaining(tlb) == ids(keep)


def test_nh_va_anywhere_in_a_stage1_block_removes_its_nested_fragments() -> None:
    # A 2 MiB stage-1 block translated through 4 KiB stage-2 pages: the TLB holds 4 KiB pieces.
    pieces = [entry(NESTED, base=0x20_0000 + i * 4 * KiB, level=2, leaf_size=2 * MiB) for i in range(3)]
    outside = entry(NESTED, base=0x40_0000, level=2, leaf_size=2 * MiB)
    tlb = filled(*pieces, outside)
    tlb.invalidate_nh_va(1, 1, 0x3F_F000, 0, leaf=True, ttl=0)  # the block's last page, not cached
    assert remaining(tlb) == ids(outside)


def test_leaf_and_non_leaf_invalidations_remove_the_same_entries() -> None:
    for leaf in (True, False):
        keep = entry(S1, base=0x8000)
        tlb = filled(entry(S1, base=0x4000), keep)
        tlb.invalidate_nh_va(1, 1, 0x4000, 0, leaf=leaf, ttl=0)
        assert remaining(tlb) == ids(keep)


def test_insert_replaces_the_same_line_and_capacity_evicts_oldest_first() -> None:
    tlb = Tlb(capacity=2)
    first, second, third = entry(base=0x1000), entry(base=0x2000), entry(base=0x3000)
    tlb.insert(first)
    tlb.insert(second)
    tlb.insert(third)
    assert remaining(tlb) == ids(second, third)
    assert [e.seq for e in tlb.entries()] == sorted(e.seq for e in (second, third))
    again = entry(base=0x2000)
    tlb.insert(again)
    assert remaining(tlb) == ids(third, again)
    assert tlb.lookup(S1, "el1", 1, 1, 0x2000) is again


def test_generation_moves_on_invalidation_and_eviction() -> None:
    tlb = Tlb(capacity=1)
    start = tlb.generation
    tlb.insert(entry(base=0x1000))
    assert tlb.generation == start
    tlb.insert(entry(base=0x2000))  # evicts
    assert tlb.generation > start
    before = tlb.generation
    tlb.invalidate_nh_asid(5, 5)
    assert tlb.generation > before


def test_negative_capacity_is_rejected() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Tlb(capacity=-1)
