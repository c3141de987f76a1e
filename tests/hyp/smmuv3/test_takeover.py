"""Take-over of the SMMU at pKVM init (v4 patches 16-18, 20, 23, 25): MMIO donated, mini-probe,
shadow command queue and stream table programmed, GBPA forced to abort, the hyp's queue enabled and
invalidated; and every way the take-over can refuse an SMMU (pages handed back)."""

from __future__ import annotations

import errno
import os
import sys

import pytest

from pkvm_smmu.arch.registers import (
    CMDQ_BASE,
    CR0,
    GBPA,
    IDR1,
    STRTAB_BASE,
    STRTAB_BASE_CFG,
    Reg,
    StrtabFmt,
)
from pkvm_smmu.hyp.contracts import HOST, HYP, PageState
from pkvm_smmu.hyp.smmuv3 import SmmuDescription, V4Policy
from pkvm_smmu.machine.smmu import SmmuFeatures

sys.path.insert(0, os.path.dirname(__file__))
from hyp_smmu_rig import SHADOW_CMDQ, SHADOW_STRTAB, SMMU_BASE, SMMU_SIZE, make_rig

SMMU_PFNS = range(SMMU_BASE >> 12, (SMMU_BASE + SMMU_SIZE) >> 12)


def test_takeover_donates_mmio_and_programs_the_shadows() -> None:
    r = make_rig()
    assert r.init_result == 0 and r.hyp.taken_over
    mp = r.pkvm.mem_protect
    assert all(mp.owner_of(pfn) == HYP for pfn in SMMU_PFNS)
    # The host kernel's shadow allocations now belong to the hyp.
    assert mp.owner_of(SHADOW_CMDQ >> 12) == HYP and mp.owner_of(SHADOW_STRTAB >> 12) == HYP
    # 64 KiB shadow queue: 4096 entries, no RA (as posted); PROD = CONS = 0.
    cmdq_base = r.hw_reg(Reg.CMDQ_BASE, 8)
    assert CMDQ_BASE.ADDR.get_address(cmdq_base) == SHADOW_CMDQ
    assert CMDQ_BASE.LOG2SIZE.get(cmdq_base) == 12 and not CMDQ_BASE.RA.get(cmdq_base)
    # 2-level shadow stream table for 16 SID bits: 256 L1 descriptors, split 8, with RA.
    strtab = r.hw_reg(Reg.STRTAB_BASE, 8)
    assert STRTAB_BASE.ADDR.get_address(strtab) == SHADOW_STRTAB and STRTAB_BASE.RA.get(strtab)
    cfg = r.hw_reg(Reg.STRTAB_BASE_CFG)
    assert STRTAB_BASE_CFG.decode(cfg) == {"LOG2SIZE": 16, "SPLIT": 8, "FMT": StrtabFmt.TWO_LEVEL}
    # GBPA: abort, update completed; SMMUEN left to the host, CMDQEN on for the hyp's queue.
    assert r.hw_reg(Reg.GBPA) == GBPA.ABORT.in_place_mask
    cr0 = r.hw_reg(Reg.CR0ACK)
    assert CR0.CMDQEN.get(cr0) and not CR0.SMMUEN.get(cr0)
    assert [c.split("(")[0] for c in r.consumed()] == ["CMD_CFGI_STE_RANGE", "CMD_TLBI_NSNH_ALL", "CMD_SYNC"]
    assert "RANGE=0x1f" in r.consumed()[0]
    init = r.events("hyp.smmuv3", "init")[-1].fields
    assert init["result"] == 0 and init["sid_bits"] == 16 and init["two_level"]


def test_host_accesses_to_the_smmu_now_trap() -> None:
    r = make_rig()
    idr1 = r.host_read(Reg.IDR1)
    assert idr1 == r.hw_reg(Reg.IDR1)
    traps = r.events("hyp.smmuv3", "trap")
    assert traps and traps[-1].fields["reg"] == "IDR1" and traps[-1].fields["direction"] == "read"


def test_probe_values() -> None:
    r = make_rig(SmmuFeatures(oas_bits=44, granules=frozenset({4096, 65536}), ril=False))
    hyp = r.hyp
    assert hyp.oas == 44 and hyp.ias == 44 and not hyp.range_inv and hyp.sev
    assert hyp.pgsize_bitmap == (1 << 12) | (1 << 21) | (1 << 30) | (1 << 16) | (1 << 29)
    caps = hyp.caps()
    assert (caps.ias, caps.oas, caps.coherent) == (44, 44, True)


def test_shadow_queue_capped_by_cmdqs_and_linear_table_without_two_level() -> None:
    r = make_rig(SmmuFeatures(cmdq_log2_max=8, two_level_strtab=False, sid_bits=6))
    assert CMDQ_BASE.LOG2SIZE.get(r.hw_reg(Reg.CMDQ_BASE, 8)) == 8
    cfg = r.hw_reg(Reg.STRTAB_BASE_CFG)
    assert STRTAB_BASE_CFG.FMT.get(cfg) == StrtabFmt.LINEAR and STRTAB_BASE_CFG.LOG2SIZE.get(cfg) == 6
    assert r.hyp.num_ents == 64


def test_few_sid_bits_go_linear_even_with_two_level_support() -> None:
    r = make_rig(SmmuFeatures(sid_bits=8))
    assert not r.hyp.two_level
    assert STRTAB_BASE_CFG.FMT.get(r.hw_reg(Reg.STRTAB_BASE_CFG)) == StrtabFmt.LINEAR


def test_shadows_from_the_pool_without_host_memory() -> None:
    r = make_rig(host_shadow_memory=False)
    assert r.init_result == 0
    pool = r.pkvm.iommu_pool
    assert pool is not None
    assert pool.contains(CMDQ_BASE.ADDR.get_address(r.hw_reg(Reg.CMDQ_BASE, 8)))
    assert pool.contains(STRTAB_BASE.ADDR.get_address(r.hw_reg(Reg.STRTAB_BASE, 8)))
    # The host's would-be shadow memory is untouched.
    assert r.pkvm.mem_protect.owner_of(SHADOW_CMDQ >> 12) == HOST


def _failed(r: object) -> None:
    mp = r.pkvm.mem_protect  # type: ignore[attr-defined]
    assert all(mp.owner_of(pfn) == HOST and mp.host_state(pfn) is PageState.OWNED for pfn in SMMU_PFNS)
    assert r.pkvm.state == "failed"  # type: ignore[attr-defined]
    assert r.pkvm.host_cpu_port.stage2 is None  # type: ignore[attr-defined]  # host runs natively


def test_both_stages_required() -> None:
    for features in (SmmuFeatures(stage2=False), SmmuFeatures(stage1=False, hyp=False)):
        r = make_rig(features)
        assert r.init_result == -errno.ENXIO
        _failed(r)


@pytest.mark.parametrize("field", ["TABLES_PRESET", "QUEUES_PRESET", "REL", "ECMDQ"])
def test_presets_rejected(field: str) -> None:
    r = make_rig(finalise=False)
    r.smmu.regs._const[Reg.IDR1] |= IDR1.field(field).in_place_mask
    assert r.pkvm.init() == 0
    assert r.pkvm.finalise() == -errno.EINVAL
    _failed(r)


def test_mmio_resource_checks() -> None:
    small = SmmuDescription("smmu0", SMMU_BASE, 0x10000)
    assert make_rig(desc=small).init_result == -errno.EINVAL
    unaligned = SmmuDescription("smmu0", SMMU_BASE + 0x800, SMMU_SIZE)
    assert make_rig(desc=unaligned).init_result == -errno.EINVAL


def test_mmio_donation_failure_hands_back_what_was_taken() -> None:
    r = make_rig(finalise=False)
    mp = r.pkvm.mem_protect
    second = (SMMU_BASE >> 12) + 1
    assert mp.host_donate_hyp_mmio(second) == 0  # already somebody's: the take-over hits -EPERM
    assert r.pkvm.init() == 0
    assert r.pkvm.finalise() == -errno.EPERM
    assert mp.owner_of(SMMU_BASE >> 12) == HOST  # the first page went back
    assert "MMIO donation failed" in r.warnings()


def test_linear_table_too_big_for_the_memory_set_aside() -> None:
    r = make_rig(SmmuFeatures(two_level_strtab=False, sid_bits=16))  # 4 MiB of STEs > 1 MiB
    assert r.init_result == -errno.EINVAL
    _failed(r)


def test_posted_takeover_leaves_cmdqen_to_the_host() -> None:
    class Posted(V4Policy):
        takeover_enables_cmdq = False

    r = make_rig(policy=Posted())
    assert r.init_result == 0
    assert not CR0.CMDQEN.get(r.hw_reg(Reg.CR0ACK)) and r.consumed() == []
