"""Mapping permissions (the IOMMU_* flags) and the leaf attributes they become.

Stage-1 memory types go through the MAIR; the indices are Linux io-pgtable-arm's:
0 = Normal non-cacheable, 1 = Normal write-back (the IOMMU_CACHE type), 2 = Device-nGnRE,
3 = inner non-cacheable / outer write-back (unused here, kept so the MAIR matches Linux's).
"""

from __future__ import annotations

from enum import IntFlag
from functools import cache

from pkvm_smmu.arch.vmsa import S1_LEAF, S2_LEAF, MairAttr, S1Ap, S2Ap, S2MemAttr, Shareability


class Prot(IntFlag):
    """IOMMU_READ, IOMMU_WRITE, IOMMU_CACHE, IOMMU_NOEXEC, IOMMU_MMIO, IOMMU_PRIV, same values."""

    NONE = 0
    READ = 1 << 0
    WRITE = 1 << 1
    CACHE = 1 << 2
    NOEXEC = 1 << 3
    MMIO = 1 << 4
    PRIV = 1 << 5


MAIR_IDX_NC = 0
MAIR_IDX_CACHE = 1
MAIR_IDX_DEV = 2
MAIR_IDX_INC_OCACHE = 3

MAIR = (
    MairAttr.NORMAL_NC << (8 * MAIR_IDX_NC)
    | MairAttr.NORMAL_WB_RWA << (8 * MAIR_IDX_CACHE)
    | MairAttr.DEVICE_nGnRE << (8 * MAIR_IDX_DEV)
    | MairAttr.NORMAL_INC_OWB_RWA << (8 * MAIR_IDX_INC_OCACHE)
)


@cache
def leaf_attributes(stage: int, prot: Prot) -> int:
    """Leaf descriptor bits for ``prot``, without the type bits and the output address.

    Follows Linux: stage-1 leaves are non-global and read-only unless WRITE; EL0-accessible
    unless PRIV; device for MMIO, write-back for CACHE, else non-cacheable; inner shareable when
    cacheable, else outer shareable; AF set; XN (both bits) for NOEXEC.
    """
    cacheable = bool(prot & Prot.CACHE) and not prot & Prot.MMIO
    sh = Shareability.ISH if prot & Prot.CACHE else Shareability.OSH
    if stage == 1:
        read_only = bool(prot & Prot.READ) and not prot & Prot.WRITE
        el0 = not prot & Prot.PRIV
        ap = S1Ap((2 if read_only else 0) | (1 if el0 else 0))
        if prot & Prot.MMIO:
            attrindx = MAIR_IDX_DEV
        elif cacheable:
            attrindx = MAIR_IDX_CACHE
        else:
            attrindx = MAIR_IDX_NC
        noexec = 1 if prot & Prot.NOEXEC else 0
        return S1_LEAF.encode(ATTRINDX=attrindx, AP=ap, SH=sh, AF=1, NG=1, PXN=noexec, UXN=noexec)
    s2ap = S2Ap((1 if prot & Prot.READ else 0) | (2 if prot & Prot.WRITE else 0))
    if prot & Prot.MMIO:
        memattr = S2MemAttr.DEVICE_nGnRE
    elif cacheable:
        memattr = S2MemAttr.NORMAL_WB
    else:
        memattr = S2MemAttr.NORMAL_NC
    return S2_LEAF.encode(MEMATTR=memattr, S2AP=s2ap, SH=sh, AF=1, XN=0b11 if prot & Prot.NOEXEC else 0)
