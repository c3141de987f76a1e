"""Prot -> leaf attribute bits, by hand from the descriptor bit positions (Arm ARM D8.3)."""

from __future__ import annotations

import pytest

from pkvm_smmu.arch.vmsa import GRANULE_4K
from pkvm_smmu.pgtable import PageTableConfig, Prot, leaf_attributes

R, W, C, X, M, P = Prot.READ, Prot.WRITE, Prot.CACHE, Prot.NOEXEC, Prot.MMIO, Prot.PRIV
AF, NG = 1 << 10, 1 << 11
SH_OS, SH_IS = 0b10 << 8, 0b11 << 8


def ap(value: int) -> int:
    return value << 6


def attrindx(value: int) -> int:
    return value << 2


def memattr(value: int) -> int:
    return value << 2


S1_CASES = [
    (R, ap(0b11) | attrindx(0) | SH_OS | AF | NG),  # RO at EL1 and EL0, MAIR[0] = NC
    (R | W, ap(0b01) | attrindx(0) | SH_OS | AF | NG),
    (W, ap(0b01) | attrindx(0) | SH_OS | AF | NG),  # write-only is not expressible: RW
    (R | W | C, ap(0b01) | attrindx(1) | SH_IS | AF | NG),
    (R | W | P, ap(0b00) | attrindx(0) | SH_OS | AF | NG),
    (R | P, ap(0b10) | attrindx(0) | SH_OS | AF | NG),
    (R | W | M, ap(0b01) | attrindx(2) | SH_OS | AF | NG),
    (R | X, ap(0b11) | SH_OS | AF | NG | (1 << 53) | (1 << 54)),
]
S2_CASES = [
    (R, ap(0b01) | memattr(0b0101) | SH_OS | AF),
    (W, ap(0b10) | memattr(0b0101) | SH_OS | AF),
    (R | W | C, ap(0b11) | memattr(0b1111) | SH_IS | AF),
    (R | M, ap(0b01) | memattr(0b0001) | SH_OS | AF),
    (R | W | X, ap(0b11) | memattr(0b0101) | SH_OS | AF | (0b11 << 53)),
    (R | W | P, ap(0b11) | memattr(0b0101) | SH_OS | AF),  # no privilege notion at stage 2
]


@pytest.mark.parametrize(
    ("stage", "prot", "expected"),
    [(1, p, e) for p, e in S1_CASES] + [(2, p, e) for p, e in S2_CASES],
    ids=lambda v: repr(v) if isinstance(v, Prot) else None,
)
def test_prot_to_attributes(make_rig, stage: int, prot: Prot, expected: int) -> None:
    assert leaf_attributes(stage, prot) == expected
    rig = make_rig(PageTableConfig(stage=stage, granule=GRANULE_4K, ias=40, oas=40))
    assert rig.table.map(0x5000, 0x7000, 0x1000, prot) == (0x1000, 0)
    (leaf,) = rig.table.walk_leaves()
    assert leaf.desc == 0x7000 | 0b11 | expected


def test_mair_matches_linux_indices() -> None:
    # Attr0 = Normal NC (0x44), Attr1 = Normal WB RW-allocate (0xff), Attr2 = Device-nGnRE (0x04),
    # Attr3 = inner NC / outer WB (0xf4)
    config = PageTableConfig(stage=1, granule=GRANULE_4K, ias=48, oas=48)
    assert config.mair() == 0xF404FF44
