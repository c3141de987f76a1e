"""The STE/CD update algorithm, KUnit-style (Linux ``arm-smmu-v3-test.c``): for each pair of
entries the driver can write, the final entry is the target, the number of sync rounds is the one
the used-bit rules call for (counted by hand below), and every synced intermediate state is legal
and, on the bits the SMMU uses, equal to the old or the new entry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from pkvm_smmu.arch.strtab import CD, STE, S1Dss, S1Fmt
from pkvm_smmu.arch.vmsa import GRANULES
from pkvm_smmu.host.arm_smmu_v3.cd import make_s1_cd
from pkvm_smmu.host.arm_smmu_v3.features import Feat
from pkvm_smmu.host.arm_smmu_v3.ste import (
    CdTableCfg,
    make_abort_ste,
    make_bypass_ste,
    make_cdtable_ste,
    make_nested_domain_ste,
    make_s2_domain_ste,
)
from pkvm_smmu.machine.smmu.decode import WORLD_EL1, decode_cd, decode_ste
from pkvm_smmu.machine.smmu.features import SmmuFeatures
from pkvm_smmu.pgtable.config import PageTableConfig
from pkvm_smmu.smmu_lib.entry import (
    NUM_ENTRY_QWORDS,
    CdWriterOps,
    EntryMaskError,
    SteWriterOps,
    cd_used,
    from_words,
    ste_update_safe,
    ste_used,
    to_words,
    write_entry,
)

G4K = GRANULES[4096]
S1_CFG = PageTableConfig(stage=1, granule=G4K, ias=48, oas=48)
S2_CFG = PageTableConfig(stage=2, granule=G4K, ias=48, oas=48)
CDTAB_A = CdTableCfg(cdtab_dma=0x8020_0000, s1fmt=S1Fmt.LINEAR, s1cdmax=0)
CDTAB_B = CdTableCfg(cdtab_dma=0x8030_0000, s1fmt=S1Fmt.LINEAR, s1cdmax=0)
CDTAB_SSID = CdTableCfg(cdtab_dma=0x8040_0000, s1fmt=S1Fmt.TWO_LEVEL_64K, s1cdmax=16)
GUEST_CDTAB = CdTableCfg(cdtab_dma=0x4000_0000, s1fmt=S1Fmt.LINEAR, s1cdmax=0)  # an IPA
S2TTB = 0x8010_0000
S2TTB_2 = 0x8011_0000

# The machine's default SMMU: terminate-only stalls, no ATTR_TYPES_OVR.
MODEL = Feat.NONE
MODEL_HW = SmmuFeatures()
# Linux's KUnit SMMU: STALLS | ATTR_TYPES_OVR (so S1STALLD and SHCFG appear).
KUNIT = Feat.STALLS | Feat.ATTR_TYPES_OVR
KUNIT_HW = SmmuFeatures(stall_model=0)


# -- entries ------------------------------------------------------------------------------------


def abort() -> int:
    return make_abort_ste()


def bypass(f: Feat) -> int:
    return make_bypass_ste(f)


def cdtable(f: Feat, dss: S1Dss = S1Dss.SSID0, ats: bool = False, table: CdTableCfg = CDTAB_A) -> int:
    return make_cdtable_ste(table, f, ats, dss)


def s2(f: Feat, vmid: int = 1, ats: bool = False, ttb: int = S2TTB) -> int:
    return make_s2_domain_ste(vmid, S2_CFG, ttb, f, ats)


def vste(dss: S1Dss, table: CdTableCfg = GUEST_CDTAB, valid: bool = True, cfg: int = 5) -> int:
    return (
        STE.encode(V=int(valid), CONFIG=cfg, S1FMT=table.s1fmt, S1CDMAX=table.s1cdmax, S1DSS=dss)
        | STE.S1CONTEXTPTR.insert_address(table.cdtab_dma)
        | STE.encode(S1CIR=1, S1COR=1, S1CSH=3)
    )


def nested(f: Feat, dss: S1Dss = S1Dss.SSID0, ats: bool = False) -> int:
    return make_nested_domain_ste(vste(dss), s2(f, ats=ats))


def cd(asid: int = 1, ttb: int = 0x8050_0000) -> int:
    return make_s1_cd(asid, S1_CFG, ttb)


# -- the recording writer -------------------------------------------------------------------------


@dataclass
class Recorder:
    """A writer over plain words that records what the SMMU could see at each sync."""

    kind: str  # "ste" or "cd"
    init: list[int]
    target: list[int]
    hw: SmmuFeatures
    mem: list[int] = field(default_factory=list)
    syncs: list[list[int]] = field(default_factory=list)
    stores: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mem = list(self.init)
        self._ops = SteWriterOps() if self.kind == "ste" else CdWriterOps()

    def get_used(self, entry: Sequence[int]) -> list[int]:
        return self._ops.get_used(entry)

    def get_update_safe(self, cur: Sequence[int], target: Sequence[int]) -> list[int]:
        return self._ops.get_update_safe(cur, target)

    def write_qword(self, index: int, value: int) -> None:
        self.mem[index] = value
        self.stores.append(index)

    def sync(self) -> None:
        self.syncs.append(list(self.mem))


def _valid(kind: str, value: int) -> bool:
    return bool(STE.V.get(value) if kind == "ste" else CD.V.get(value))


def _used(kind: str, value: int) -> int:
    return ste_used(value) if kind == "ste" else cd_used(value)


def _safe(kind: str, a: int, b: int) -> int:
    return ste_update_safe(a, b) if kind == "ste" else 0


def _legal(kind: str, value: int, hw: SmmuFeatures) -> str | None:
    if kind == "ste":
        return decode_ste(0, value, 0, (), hw).illegal
    return decode_cd(0, 0, value, 0, (), hw, WORLD_EL1).illegal


def seen_problems(kind: str, init: int, target: int, states: list[list[int]], hw: SmmuFeatures) -> list[str]:
    """What is wrong with the synced states: an ILLEGAL valid entry, or one that matches neither
    the old nor the new entry on the bits it makes the SMMU read (update-safe bits excepted)."""
    problems = []
    for n, words in enumerate(states):
        value = from_words(words)
        if not _valid(kind, value):
            continue  # V=0: disruptive, but never a mixed configuration
        reason = _legal(kind, value, hw)
        if reason is not None:
            problems.append(f"sync {n}: ILLEGAL ({reason})")
        used = _used(kind, value)
        like_old = (value ^ init) & used & ~_safe(kind, value, init) == 0
        like_new = (value ^ target) & used & ~_safe(kind, value, target) == 0
        if not (like_old or like_new):
            problems.append(f"sync {n}: neither old nor new on used bits")
    return problems


def run(kind: str, init: int, target: int, hw: SmmuFeatures) -> Recorder:
    rec = Recorder(kind, to_words(init), to_words(target), hw)
    entry = to_words(init)
    write_entry(rec, entry, to_words(target))
    assert entry == to_words(target)
    assert rec.mem == to_words(target), "final entry in memory is not the target"
    assert seen_problems(kind, init, target, rec.syncs, hw) == []
    return rec


def through_invalid(kind: str, rec: Recorder) -> bool:
    return any(not _valid(kind, from_words(words)) for words in rec.syncs)


# -- hand-counted transitions ----------------------------------------------------------------------
# Notation: wN = 64-bit word N. A hitless update costs one sync per non-empty step: (1) unused bits
# of the non-critical words, (2) the critical word, (3) clean-up of bits the target no longer uses.
# Break-before-make costs 3: w0 := 0, w1..w7, w0.

Case = tuple[str, Callable[[], int], Callable[[], int], int, bool, SmmuFeatures]

STE_CASES: list[Case] = [
    # Model SMMU (no SHCFG override, no stalls): abort and bypass differ only in w0.CONFIG.
    ("abort->bypass", abort, lambda: bypass(MODEL), 1, False, MODEL_HW),
    ("bypass->abort", lambda: bypass(MODEL), abort, 1, False, MODEL_HW),
    # abort ignores w1: fill it (1), then w0 (2).
    ("abort->cdtable", abort, lambda: cdtable(MODEL), 2, False, MODEL_HW),
    # w0 first (1), then clear the w1/w2 the abort STE ignores (2).
    ("cdtable->abort", lambda: cdtable(MODEL), abort, 2, False, MODEL_HW),
    # bypass uses only SHCFG in w1, which the CD-table STE leaves 0: fill w1 (1), w0 (2).
    ("bypass->cdtable", lambda: bypass(MODEL), lambda: cdtable(MODEL), 2, False, MODEL_HW),
    # w0 (1); then w1's S1 attributes, now unused, are cleared (2).
    ("cdtable->bypass", lambda: cdtable(MODEL), lambda: bypass(MODEL), 2, False, MODEL_HW),
    # S1DSS lives in w1 alone: one store, one sync, in every direction.
    ("s1dss ssid0->bypass", lambda: cdtable(MODEL), lambda: cdtable(MODEL, S1Dss.BYPASS), 1, False, MODEL_HW),
    ("s1dss bypass->ssid0", lambda: cdtable(MODEL, S1Dss.BYPASS), lambda: cdtable(MODEL), 1, False, MODEL_HW),
    (
        "s1dss terminate->ssid0",
        lambda: cdtable(MODEL, S1Dss.TERMINATE),
        lambda: cdtable(MODEL),
        1,
        False,
        MODEL_HW,
    ),
    (
        "s1dss bypass->terminate",
        lambda: cdtable(MODEL, S1Dss.BYPASS),
        lambda: cdtable(MODEL, S1Dss.TERMINATE),
        1,
        False,
        MODEL_HW,
    ),
    # S1DSS=bypass makes w1.SHCFG used (0 here), still only w0 changes its used bits: 2 as above.
    ("s1dss-bypass->bypass", lambda: cdtable(MODEL, S1Dss.BYPASS), lambda: bypass(MODEL), 2, False, MODEL_HW),
    ("bypass->s1dss-bypass", lambda: bypass(MODEL), lambda: cdtable(MODEL, S1Dss.BYPASS), 2, False, MODEL_HW),
    # A new CD table pointer: w0 only.
    ("cdtable A->B", lambda: cdtable(MODEL), lambda: cdtable(MODEL, table=CDTAB_B), 1, False, MODEL_HW),
    # Stage 2: w2/w3 are ignored by abort and bypass.
    ("abort->s2", abort, lambda: s2(MODEL), 2, False, MODEL_HW),
    ("s2->abort", lambda: s2(MODEL), abort, 2, False, MODEL_HW),
    ("bypass->s2", lambda: bypass(MODEL), lambda: s2(MODEL), 2, False, MODEL_HW),
    ("s2->bypass", lambda: s2(MODEL), lambda: bypass(MODEL), 2, False, MODEL_HW),
    # S1 uses w2.S2VMID (0); the S2 domain has VMID 1: w0 and w2 both change -> V=0 (3).
    ("cdtable->s2", lambda: cdtable(MODEL), lambda: s2(MODEL), 3, True, MODEL_HW),
    ("s2->cdtable", lambda: s2(MODEL), lambda: cdtable(MODEL), 3, True, MODEL_HW),
    # Replacing one S2 domain by another: VMID (w2) and S2TTB (w3) -> V=0.
    ("s2->s2'", lambda: s2(MODEL), lambda: s2(MODEL, vmid=2, ttb=S2TTB_2), 3, True, MODEL_HW),
    # CD table pointer (w0) and S1DSS (w1) together: Linux's "non hitless" case.
    (
        "cdtable A ssid0->B bypass",
        lambda: cdtable(MODEL),
        lambda: cdtable(MODEL, S1Dss.BYPASS, table=CDTAB_B),
        3,
        True,
        MODEL_HW,
    ),
    # ATS toggled on a live CD-table STE: EATS is update-safe, so no word is critical and all
    # changed words go in one step (1).
    ("cdtable ats->no ats", lambda: cdtable(MODEL, ats=True), lambda: cdtable(MODEL), 1, False, MODEL_HW),
    ("s2 no ats->ats", lambda: s2(MODEL), lambda: s2(MODEL, ats=True), 1, False, MODEL_HW),
    # Nested: w2/w3 are the parent's S2 in both.
    # nested->S2 (vSTE bypass): w1 loses MEV (safe) (1), w0 (2), S1 attributes of w1 cleared (3).
    ("nested->s2", lambda: nested(MODEL), lambda: s2(MODEL), 3, False, MODEL_HW),
    # S2->nested: w1 gains S1 attributes and MEV, ignored by S2 or safe (1), then w0 (2).
    ("s2->nested", lambda: s2(MODEL), lambda: nested(MODEL), 2, False, MODEL_HW),
    ("nested->abort", lambda: nested(MODEL), abort, 2, False, MODEL_HW),
    ("abort->nested", abort, lambda: nested(MODEL), 2, False, MODEL_HW),
    (
        "nested s1dss ssid0->bypass",
        lambda: nested(MODEL),
        lambda: nested(MODEL, S1Dss.BYPASS),
        1,
        False,
        MODEL_HW,
    ),
    # The host's S1 (VMID 0) to a nested guest (VMID 1): w0 and w2 -> V=0.
    ("cdtable->nested", lambda: cdtable(MODEL), lambda: nested(MODEL), 3, True, MODEL_HW),
    # KUnit's SMMU (SHCFG and S1STALLD present), ATS on as in the KUnit test.
    # bypass now uses w1.SHCFG=incoming: fill w1 (1), w0 (2) / w0 (1), clear w1 (2).
    ("kunit bypass->abort", lambda: bypass(KUNIT), abort, 2, False, KUNIT_HW),
    ("kunit abort->bypass", abort, lambda: bypass(KUNIT), 2, False, KUNIT_HW),
    ("kunit cdtable->abort", lambda: cdtable(KUNIT, ats=True), abort, 2, False, KUNIT_HW),
    ("kunit abort->cdtable", abort, lambda: cdtable(KUNIT, ats=True), 2, False, KUNIT_HW),
    # w1 gets SHCFG while keeping the S1 bits (1), w0 (2), S1 bits cleared (3); and back.
    ("kunit cdtable->bypass", lambda: cdtable(KUNIT, ats=True), lambda: bypass(KUNIT), 3, False, KUNIT_HW),
    ("kunit bypass->cdtable", lambda: bypass(KUNIT), lambda: cdtable(KUNIT, ats=True), 3, False, KUNIT_HW),
    # S1DSS and SHCFG both in w1: one store.
    (
        "kunit s1dss change",
        lambda: cdtable(KUNIT, ats=True),
        lambda: cdtable(KUNIT, S1Dss.BYPASS, ats=True),
        1,
        False,
        KUNIT_HW,
    ),
    (
        "kunit s1dss-bypass->bypass",
        lambda: cdtable(KUNIT, S1Dss.BYPASS, ats=True),
        lambda: bypass(KUNIT),
        2,
        False,
        KUNIT_HW,
    ),
    (
        "kunit bypass->s1dss-bypass",
        lambda: bypass(KUNIT),
        lambda: cdtable(KUNIT, S1Dss.BYPASS, ats=True),
        2,
        False,
        KUNIT_HW,
    ),
    ("kunit s2->abort", lambda: s2(KUNIT, ats=True), abort, 2, False, KUNIT_HW),
    ("kunit abort->s2", abort, lambda: s2(KUNIT, ats=True), 2, False, KUNIT_HW),
    # SHCFG is used and equal on both sides; w1.EATS is ignored by bypass.
    ("kunit s2->bypass", lambda: s2(KUNIT, ats=True), lambda: bypass(KUNIT), 2, False, KUNIT_HW),
    ("kunit bypass->s2", lambda: bypass(KUNIT), lambda: s2(KUNIT, ats=True), 2, False, KUNIT_HW),
    # With Linux's KUnit VMID 0 the S2 would share w2.S2VMID with S1 and go hitless (3); a real
    # S2 domain has VMID >= 1, so w0 and w2 both change: V=0 (3).
    (
        "kunit cdtable->s2 vmid0",
        lambda: cdtable(KUNIT, ats=True),
        lambda: s2(KUNIT, vmid=0, ats=True),
        3,
        False,
        KUNIT_HW,
    ),
    (
        "kunit s2 vmid0->cdtable",
        lambda: s2(KUNIT, vmid=0, ats=True),
        lambda: cdtable(KUNIT, ats=True),
        3,
        False,
        KUNIT_HW,
    ),
    ("kunit cdtable->s2", lambda: cdtable(KUNIT, ats=True), lambda: s2(KUNIT, ats=True), 3, True, KUNIT_HW),
    (
        "kunit non-hitless",
        lambda: cdtable(KUNIT, ats=True),
        lambda: cdtable(KUNIT, S1Dss.BYPASS, ats=True, table=CDTAB_B),
        3,
        True,
        KUNIT_HW,
    ),
    # Nested with ATS to a plain S2 without: EATS and MEV go in step 1 (safe), w0, then the S1
    # attributes (3); the reverse needs only w1 then w0 (2).
    (
        "kunit nested s1dss-bypass->s2",
        lambda: nested(KUNIT, S1Dss.BYPASS, ats=True),
        lambda: s2(KUNIT),
        3,
        False,
        KUNIT_HW,
    ),
    (
        "kunit s2->nested s1dss-bypass",
        lambda: s2(KUNIT),
        lambda: nested(KUNIT, S1Dss.BYPASS, ats=True),
        2,
        False,
        KUNIT_HW,
    ),
]


@pytest.mark.parametrize(
    ("init", "target", "syncs", "breaking", "hw"),
    [case[1:] for case in STE_CASES],
    ids=[case[0] for case in STE_CASES],
)
def test_ste_transition(
    init: Callable[[], int], target: Callable[[], int], syncs: int, breaking: bool, hw: SmmuFeatures
) -> None:
    rec = run("ste", init(), target(), hw)
    assert len(rec.syncs) == syncs
    assert through_invalid("ste", rec) is breaking


CD_CASES: list[tuple[str, Callable[[], int], Callable[[], int], int, bool]] = [
    # From nothing: words 1..7 while V=0 (1), then w0 with V=1 (2). Only V=0 states before.
    ("clear->s1", lambda: 0, cd, 2, True),
    # w0 := 0 (1), then the rest cleared (2).
    ("s1->clear", cd, lambda: 0, 2, True),
    # The ASID is in w0 alone: hitless, one sync (Linux's ASID change).
    ("asid change", lambda: cd(778), lambda: cd(1997), 1, False),
    # TTB0 is in w1 alone.
    ("ttb change", lambda: cd(1), lambda: cd(1, ttb=0x8060_0000), 1, False),
    # ASID (w0) and TTB0 (w1): V=0 (3).
    ("asid and ttb change", lambda: cd(1), lambda: cd(2, ttb=0x8060_0000), 3, True),
]


@pytest.mark.parametrize(
    ("init", "target", "syncs", "breaking"),
    [case[1:] for case in CD_CASES],
    ids=[case[0] for case in CD_CASES],
)
def test_cd_transition(
    init: Callable[[], int], target: Callable[[], int], syncs: int, breaking: bool
) -> None:
    rec = run("cd", init(), target(), MODEL_HW)
    assert len(rec.syncs) == syncs
    assert through_invalid("cd", rec) is breaking


# -- every pair ----------------------------------------------------------------------------------

MATRIX: dict[str, Callable[[Feat], int]] = {
    "abort": lambda f: abort(),
    "bypass": bypass,
    "cd-bypass": lambda f: cdtable(f, S1Dss.BYPASS),
    "cd-ssid0": lambda f: cdtable(f),
    "cd-terminate": lambda f: cdtable(f, S1Dss.TERMINATE),
    "cd-ssid0-ats": lambda f: cdtable(f, ats=True),
    "cd-ssids": lambda f: cdtable(f, S1Dss.SSID0, table=CDTAB_SSID),
    "s2": s2,
    "s2-ats": lambda f: s2(f, ats=True),
    "s2-vmid2": lambda f: s2(f, vmid=2, ttb=S2TTB_2),
    "nested-ssid0": nested,
    "nested-bypass": lambda f: nested(f, S1Dss.BYPASS, ats=True),
    "nested-abort": lambda f: make_nested_domain_ste(vste(S1Dss.SSID0, cfg=0), s2(f)),
    "nested-invalid": lambda f: make_nested_domain_ste(vste(S1Dss.SSID0, valid=False), s2(f)),
}


@pytest.mark.parametrize("features", [MODEL, KUNIT], ids=["model", "kunit"])
@pytest.mark.parametrize("old", sorted(MATRIX))
def test_every_ste_pair_is_safe(features: Feat, old: str) -> None:
    hw = MODEL_HW if features == MODEL else KUNIT_HW
    for new in sorted(MATRIX):
        a, b = MATRIX[old](features), MATRIX[new](features)
        rec = run("ste", a, b, hw)
        assert len(rec.syncs) <= 3
        assert (len(rec.syncs) == 0) == (a == b), (old, new)


def test_nested_vste_forms() -> None:
    assert make_nested_domain_ste(vste(S1Dss.SSID0, valid=False), s2(MODEL)) == make_abort_ste()
    assert make_nested_domain_ste(vste(S1Dss.SSID0, cfg=0), s2(MODEL)) == make_abort_ste()
    assert make_nested_domain_ste(vste(S1Dss.SSID0, cfg=4), s2(MODEL)) == s2(MODEL)
    n = nested(MODEL)
    assert STE.CONFIG.get(n) == 7 and STE.S1CONTEXTPTR.get_address(n) == GUEST_CDTAB.cdtab_dma
    assert STE.S2VMID.get(n) == 1 and STE.S2TTB.get_address(n) == S2TTB and STE.MEV.get(n) == 1


# -- the checks can fail -----------------------------------------------------------------------------


def test_checker_flags_a_naive_word_by_word_update() -> None:
    """Writing S2 over a CD-table STE word by word, syncing each, shows a mixed STE."""
    old, new = cdtable(MODEL), s2(MODEL)
    words, states = to_words(old), []
    for i, w in enumerate(to_words(new)):
        words[i] = w
        states.append(list(words))
    assert seen_problems("ste", old, new, states, MODEL_HW)


def test_checker_flags_an_illegal_intermediate() -> None:
    old, new = abort(), s2(MODEL)
    bad = to_words(new)
    bad[2] = STE.S2TG.insert(3) >> 128  # reserved granule: ILLEGAL
    problems = seen_problems("ste", old, new, [bad], MODEL_HW)
    assert any("ILLEGAL" in p for p in problems)


def test_builders_set_only_used_bits() -> None:
    for f in (MODEL, KUNIT, Feat.E2H):
        for build in MATRIX.values():
            value = build(f)
            assert value & ~ste_used(value) == 0
    for value in (cd(), make_s1_cd(5, S1_CFG, 0x1000, stall_enabled=True, hw_dirty=True)):
        assert value & ~cd_used(value) == 0


def test_target_with_unused_bits_is_refused() -> None:
    rec = Recorder("ste", to_words(abort()), to_words(abort()), MODEL_HW)
    bad = to_words(abort() | STE.S2TTB.insert_address(S2TTB))
    with pytest.raises(EntryMaskError):
        write_entry(rec, to_words(abort()), bad)


def test_unchanged_entry_costs_nothing() -> None:
    rec = run("ste", s2(MODEL), s2(MODEL), MODEL_HW)
    assert rec.syncs == [] and rec.stores == []


def test_hitless_critical_word_is_one_store() -> None:
    """The change of configuration happens in one 64-bit store of the critical word."""
    rec = run("ste", cdtable(MODEL), bypass(MODEL), MODEL_HW)
    assert rec.stores[0] == 0  # w0 flips the configuration first
    assert rec.stores.count(0) == 1
    assert len(to_words(0)) == NUM_ENTRY_QWORDS
