"""Context descriptor builders (``arm_smmu_make_s1_cd``)."""

from __future__ import annotations

from pkvm_smmu.arch.strtab import CD
from pkvm_smmu.pgtable.config import PageTableConfig


def make_s1_cd(
    asid: int,
    pgtbl_cfg: PageTableConfig,
    ttbr: int,
    *,
    stall_enabled: bool = False,
    hw_dirty: bool = False,
) -> int:
    """A valid CD for a stage-1 io-pgtable: TTB0 only (EPD1), AArch64, faults recorded (R) and
    aborted (A), ASET (the ASID is not shared with CPUs: invalidation goes through the queue)."""
    fields = pgtbl_cfg.cd_fields()  # T0SZ, TG0, IR0/OR0/SH0, EPD0/EPD1, IPS, AA64, MAIR0/1
    cd = CD.encode(
        **fields,
        V=1,
        S=int(stall_enabled),
        R=1,
        A=1,
        ASET=1,
        ASID=asid,
    )
    if hw_dirty:
        cd |= CD.HA.in_place_mask | CD.HD.in_place_mask
    return cd | CD.TTB0.insert_address(ttbr)


def cd_asid(cd: int) -> int:
    return CD.ASID.get(cd)


__all__ = ["cd_asid", "make_s1_cd"]
