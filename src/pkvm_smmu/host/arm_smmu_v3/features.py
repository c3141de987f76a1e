"""What the driver learned about an SMMU (``ARM_SMMU_FEAT_*``) and its quirk options
(``ARM_SMMU_OPT_*``), plus the driver's constants from ``arm-smmu-v3.h``."""

from __future__ import annotations

from enum import IntFlag


class Feat(IntFlag):
    """``smmu->features``."""

    NONE = 0
    TWO_LVL_STRTAB = 1 << 0
    TWO_LVL_CDTAB = 1 << 1
    TT_LE = 1 << 2
    TT_BE = 1 << 3
    PRI = 1 << 4
    ATS = 1 << 5
    SEV = 1 << 6
    MSI = 1 << 7
    COHERENCY = 1 << 8
    TRANS_S1 = 1 << 9
    TRANS_S2 = 1 << 10
    STALLS = 1 << 11
    HYP = 1 << 12
    STALL_FORCE = 1 << 13
    VAX = 1 << 14
    RANGE_INV = 1 << 15
    BTM = 1 << 16
    SVA = 1 << 17
    E2H = 1 << 18
    NESTING = 1 << 19
    ATTR_TYPES_OVR = 1 << 20
    HA = 1 << 21
    HD = 1 << 22
    S2FWB = 1 << 23


def feat_names(features: Feat) -> str:
    """``TRANS_S1|TRANS_S2|...`` for traces."""
    return "|".join(f.name for f in Feat if f and f in features and f.name) or "NONE"


class Opt(IntFlag):
    """``smmu->options``."""

    NONE = 0
    SKIP_PREFETCH = 1 << 0
    PAGE0_REGS_ONLY = 1 << 1
    MSIPOLL = 1 << 2
    CMDQ_FORCE_SYNC = 1 << 3


ARM_SMMU_POLL_TIMEOUT_US = 1_000_000  # 1 s of modeled time
ARM_SMMU_POLL_SPIN_COUNT = 10
CMDQ_BATCH_ENTRIES = 64  # BITS_PER_LONG
CMDQ_TLBI_RANGE_NUM_MAX = 31
ATC_INV_SIZE_ALL = 52

# Queue sizes are capped so allocations stay naturally aligned (Q_MAX_SZ_SHIFT with 4 KiB pages and
# MAX_PAGE_ORDER 10); the event and PRI queues at one page, as Linux does.
PAGE_SHIFT = 12
Q_MAX_SZ_SHIFT = PAGE_SHIFT + 10
CMDQ_ENT_SZ_SHIFT = 4
EVTQ_ENT_SZ_SHIFT = 5
PRIQ_ENT_SZ_SHIFT = 4
CMDQ_MAX_SZ_SHIFT = Q_MAX_SZ_SHIFT - CMDQ_ENT_SZ_SHIFT
EVTQ_MAX_SZ_SHIFT = PAGE_SHIFT - EVTQ_ENT_SZ_SHIFT
PRIQ_MAX_SZ_SHIFT = PAGE_SHIFT - PRIQ_ENT_SZ_SHIFT

# Stream table: two-level with 256-STE leaves covering up to 2^20 bytes of L1 descriptors.
STRTAB_L1_SZ_SHIFT = 20
STRTAB_SPLIT = 8
# CD tables: 64 KiB leaves of 1024 CDs; linear tables capped at 64 KiB without CD2L.
CTXDESC_SPLIT = 10
CTXDESC_L2_ENTRIES = 1 << CTXDESC_SPLIT
CTXDESC_LINEAR_CDMAX = 10

IOMMU_NO_PASID = 0

__all__ = [
    "ARM_SMMU_POLL_SPIN_COUNT",
    "ARM_SMMU_POLL_TIMEOUT_US",
    "ATC_INV_SIZE_ALL",
    "CMDQ_BATCH_ENTRIES",
    "CMDQ_ENT_SZ_SHIFT",
    "CMDQ_MAX_SZ_SHIFT",
    "CMDQ_TLBI_RANGE_NUM_MAX",
    "CTXDESC_L2_ENTRIES",
    "CTXDESC_LINEAR_CDMAX",
    "CTXDESC_SPLIT",
    "EVTQ_ENT_SZ_SHIFT",
    "EVTQ_MAX_SZ_SHIFT",
    "IOMMU_NO_PASID",
    "PRIQ_ENT_SZ_SHIFT",
    "PRIQ_MAX_SZ_SHIFT",
    "STRTAB_L1_SZ_SHIFT",
    "STRTAB_SPLIT",
    "Feat",
    "Opt",
    "feat_names",
]
