"""Stream table entry builders (``arm_smmu_make_*_ste``). Each returns the 512-bit STE value the
driver wants; ``entry.write_entry`` installs it."""

from __future__ import annotations

from dataclasses import dataclass

from pkvm_smmu.arch.registers import Shareability, Shcfg
from pkvm_smmu.arch.strtab import STE, Cacheability, Eats, S1Dss, SteConfig, Strw
from pkvm_smmu.host.arm_smmu_v3.features import Feat
from pkvm_smmu.pgtable.config import PageTableConfig


@dataclass(frozen=True)
class CdTableCfg:
    """What an STE says about a master's CD table (``arm_smmu_ctx_desc_cfg``)."""

    cdtab_dma: int
    s1fmt: int
    s1cdmax: int


def make_abort_ste() -> int:
    return STE.encode(V=1, CONFIG=SteConfig.ABORT)


def make_bypass_ste(features: Feat) -> int:
    ste = STE.encode(V=1, CONFIG=SteConfig.BYPASS)
    if features & Feat.ATTR_TYPES_OVR:
        ste |= STE.SHCFG.insert(Shcfg.INCOMING)
    return ste


def make_cdtable_ste(
    cd_table: CdTableCfg,
    features: Feat,
    ats_enabled: bool,
    s1dss: S1Dss,
    *,
    stall_enabled: bool = False,
) -> int:
    """Stage-1 translation through the master's CD table."""
    ste = (
        STE.encode(V=1, CONFIG=SteConfig.S1_TRANS, S1FMT=cd_table.s1fmt, S1CDMAX=cd_table.s1cdmax)
        | STE.S1CONTEXTPTR.insert_address(cd_table.cdtab_dma)
        | STE.encode(
            S1DSS=s1dss,
            S1CIR=Cacheability.WBRA,
            S1COR=Cacheability.WBRA,
            S1CSH=Shareability.ISH,
            S1STALLD=int(bool(features & Feat.STALLS) and not stall_enabled),
            EATS=Eats.TRANS if ats_enabled else Eats.ABT,
        )
    )
    if features & Feat.ATTR_TYPES_OVR and s1dss == S1Dss.BYPASS:
        ste |= STE.SHCFG.insert(Shcfg.INCOMING)
    if features & Feat.E2H:
        # BTM needs the StreamWorld to match the CPU's (EL2-E2H when the kernel runs at EL2).
        ste |= STE.STRW.insert(Strw.EL2)
    else:
        # VMID 0 is reserved for stage-2-bypass EL1 STEs.
        ste |= STE.STRW.insert(Strw.NSEL1) | STE.S2VMID.insert(0)
    return ste


def make_s2_domain_ste(
    vmid: int,
    pgtbl_cfg: PageTableConfig,
    s2ttb: int,
    features: Feat,
    ats_enabled: bool,
    *,
    stall_enabled: bool = False,
    s2fwb: bool = False,
) -> int:
    """Stage-2-only translation by a stage-2 io-pgtable rooted at ``s2ttb``."""
    ste = STE.encode(V=1, CONFIG=SteConfig.S2_TRANS, EATS=Eats.TRANS if ats_enabled else Eats.ABT)
    if s2fwb:
        ste |= STE.S2FWB.in_place_mask
    if features & Feat.ATTR_TYPES_OVR:
        ste |= STE.SHCFG.insert(Shcfg.INCOMING)
    ste |= STE.encode(
        S2VMID=vmid,
        **pgtbl_cfg.vtcr_fields(),  # S2T0SZ, S2SL0, S2IRx/ORx/SH0, S2TG, S2PS, S2AA64
        S2PTW=1,
        S2S=int(stall_enabled),
        S2R=1,
    )
    return ste | STE.S2TTB.insert_address(s2ttb)


# The vSTE fields a nested domain's owner controls (IOMMU_HWPT_DATA_ARM_SMMUV3).
VSTE_ALLOWED = (
    STE.V.in_place_mask
    | STE.CONFIG.in_place_mask
    | STE.S1FMT.in_place_mask
    | STE.S1CONTEXTPTR.in_place_mask
    | STE.S1CDMAX.in_place_mask
    | STE.S1DSS.in_place_mask
    | STE.S1CIR.in_place_mask
    | STE.S1COR.in_place_mask
    | STE.S1CSH.in_place_mask
    | STE.S1STALLD.in_place_mask
    | STE.EATS.in_place_mask
)


def make_nested_cd_table_ste(vste: int, s2_ste: int) -> int:
    """A guest CD table (S1 fields from the vSTE, an IPA) over an S2 domain STE: Config=NESTED."""
    word0 = (1 << 64) - 1
    ste = (s2_ste & ~word0) | STE.encode(V=1, CONFIG=SteConfig.NESTED)
    ste |= vste & word0 & ~(STE.V.in_place_mask | STE.CONFIG.in_place_mask)
    ste |= vste & (word0 << 64)  # the guest's S1 attributes join the S2 STE's word 1
    # Merge events: a guest can generate many faults (DoS mitigation).
    return ste | STE.MEV.in_place_mask


def make_nested_domain_ste(vste: int, s2_ste: int) -> int:
    """The physical STE for a vSTE: invalid or abort -> abort, bypass -> the S2 STE, S1 -> nested."""
    if not STE.V.get(vste):
        return make_abort_ste()
    cfg = STE.CONFIG.get(vste)
    if cfg == SteConfig.S1_TRANS:
        return make_nested_cd_table_ste(vste, s2_ste)
    if cfg == SteConfig.BYPASS:
        return s2_ste
    return make_abort_ste()


def ste_config(ste: int) -> int:
    return STE.CONFIG.get(ste) if STE.V.get(ste) else -1


__all__ = [
    "VSTE_ALLOWED",
    "CdTableCfg",
    "make_abort_ste",
    "make_bypass_ste",
    "make_cdtable_ste",
    "make_nested_cd_table_ste",
    "make_nested_domain_ste",
    "make_s2_domain_ste",
    "ste_config",
]
