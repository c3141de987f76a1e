"""VMSAv8-64 translation-table encodings and granule geometry (Arm ARM D8; SMMUv3 uses them unchanged).

Descriptor layouts are 64-bit, fields in the Arm ARM's bit numbering. ``Granule`` answers the
geometry questions a walker or a table builder asks: level shifts, indices, block sizes, start
levels, stage-2 SL0 and concatenation.

Supported output sizes: up to 48 bits with every granule, and 52 bits with the 64 KiB granule
(FEAT_LPA: OA[51:48] in descriptor bits [15:12]). The 4 KiB/16 KiB 52-bit forms (FEAT_LPA2, DS=1)
and level -1 are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from pkvm_smmu.arch._bitfield import Field, Layout

# -- enums --------------------------------------------------------------------------------------


class S1Ap(IntEnum):
    """Stage-1 AP[2:1] (descriptor bits [7:6]): bit 7 = read-only, bit 6 = EL0 access."""

    PRIV_RW = 0
    RW = 1
    PRIV_RO = 2
    RO = 3


class S2Ap(IntEnum):
    """Stage-2 S2AP (bits [7:6]): bit 6 = read allowed, bit 7 = write allowed."""

    NONE = 0
    RO = 1
    WO = 2
    RW = 3


class Shareability(IntEnum):
    """SH[1:0] of descriptors and of TCR/CD/STE walk attributes (0b01 is reserved)."""

    NSH = 0
    OSH = 2
    ISH = 3


class Cacheability(IntEnum):
    """IRGN/ORGN walk cacheability of TCR, CD and STE."""

    NC = 0
    WBWA = 1
    WT = 2
    WB = 3


class S2MemAttr(IntEnum):
    """Common stage-2 MemAttr[3:0] values: [3:2] outer (00 = Device), [1:0] inner / device type."""

    DEVICE_nGnRnE = 0x0
    DEVICE_nGnRE = 0x1
    DEVICE_nGRE = 0x2
    DEVICE_GRE = 0x3
    NORMAL_NC = 0x5
    NORMAL_WT = 0xA
    NORMAL_WB = 0xF


class MairAttr(IntEnum):
    """Common MAIR attribute bytes (what a stage-1 AttrIndx selects)."""

    DEVICE_nGnRnE = 0x00
    DEVICE_nGnRE = 0x04
    NORMAL_NC = 0x44
    NORMAL_INC_OWB_RWA = 0xF4
    NORMAL_WB_RWA = 0xFF


class DescKind(IntEnum):
    """What a descriptor is at a given level (``classify``)."""

    INVALID = 0
    TABLE = 1
    BLOCK = 2
    PAGE = 3
    RESERVED = 4  # 0b01 at level 3, or a block at a level that has no blocks: a translation fault


# bits[1:0]
DESC_VALID = 0b01
DESC_BLOCK = 0b01
DESC_TABLE = 0b11
DESC_PAGE = 0b11
DESC_TYPE_MASK = 0b11

# -- descriptor layouts -------------------------------------------------------------------------


class TABLE_DESC(Layout):
    """Table descriptor (levels 0-2). NLTA holds next-level table address bits [47:12]."""

    VALID = Field(0)
    TYPE = Field(1)
    NLTA = Field(47, 12, addr_lo=12)
    PXNTABLE = Field(59)
    XNTABLE = Field(60)  # UXNTable at EL1&0
    APTABLE = Field(62, 61)  # bit 61: no EL0 below, bit 62: no write below
    NSTABLE = Field(63)


class S1_LEAF(Layout):
    """Stage-1 block/page descriptor.

    OA is the page view (address bits [47:12]); a block's OA starts at its level shift, and the
    bits below it are RES0 except nT (bit 16) and, with a 64 KiB granule and 52-bit OA, OA[51:48]
    (bits [15:12], ``OA_HI``). Use ``desc_output_address`` rather than OA for the address.
    """

    ALLOW_OVERLAP = True

    VALID = Field(0)
    TYPE = Field(1)
    ATTRINDX = Field(4, 2)
    NS = Field(5)
    AP = Field(7, 6, S1Ap)
    SH = Field(9, 8, Shareability)
    AF = Field(10)
    NG = Field(11)
    OA = Field(47, 12, addr_lo=12)
    OA_HI = Field(15, 12)  # OA[51:48], 64 KiB granule with 52-bit OA only (aliases OA)
    NT = Field(16)  # block descriptors with FEAT_BBM only (aliases OA)
    DBM = Field(51)
    CONTIG = Field(52)
    PXN = Field(53)
    UXN = Field(54)
    SW = Field(58, 55)
    PBHA = Field(62, 59)


class S2_LEAF(Layout):
    """Stage-2 block/page descriptor (same OA aliasing as ``S1_LEAF``). XN[54:53] is FEAT_XNX's form."""

    ALLOW_OVERLAP = True

    VALID = Field(0)
    TYPE = Field(1)
    MEMATTR = Field(5, 2, S2MemAttr)
    S2AP = Field(7, 6, S2Ap)
    SH = Field(9, 8, Shareability)
    AF = Field(10)
    OA = Field(47, 12, addr_lo=12)
    OA_HI = Field(15, 12)
    NT = Field(16)
    DBM = Field(51)
    CONTIG = Field(52)
    XN = Field(54, 53)
    SW = Field(58, 55)
    PBHA = Field(62, 59)


# -- granule geometry ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Granule:
    """A translation granule: 4 KiB, 16 KiB or 64 KiB pages, 8-byte descriptors."""

    shift: int

    @property
    def size(self) -> int:
        return 1 << self.shift

    @property
    def bits_per_level(self) -> int:
        return self.shift - 3

    @property
    def table_entries(self) -> int:
        return 1 << (self.shift - 3)

    def level_shift(self, level: int) -> int:
        """Lowest input-address bit the level's index resolves."""
        return self.shift + (3 - level) * (self.shift - 3)

    def block_size(self, level: int) -> int:
        """Bytes one entry at ``level`` maps (a page at level 3)."""
        return 1 << self.level_shift(level)

    def index(self, addr: int, level: int) -> int:
        """The level's table index of ``addr`` (a start-level table may use fewer of these bits)."""
        return (addr >> self.level_shift(level)) & ((1 << (self.shift - 3)) - 1)

    def leaf_levels(self, oas_bits: int = 48) -> tuple[int, ...]:
        """Levels where a block or page descriptor is permitted, highest level first."""
        if self.shift == 12:
            return (1, 2, 3)
        if self.shift == 16 and oas_bits > 48:
            return (1, 2, 3)
        return (2, 3)

    def leaf_sizes(self, oas_bits: int = 48) -> tuple[int, ...]:
        return tuple(self.block_size(level) for level in self.leaf_levels(oas_bits))

    def s1_start_level(self, ia_bits: int) -> int | None:
        """Stage-1 start level for an input size of ``ia_bits`` (64 - TxSZ); None outside levels 0-3."""
        if ia_bits <= self.shift:
            return None
        level = 4 - (ia_bits - 4) // (self.shift - 3)
        return level if 0 <= level <= 3 else None

    def start_level_index_bits(self, ia_bits: int, start_level: int) -> int:
        """Index bits the start-level table (all concatenated tables together) resolves."""
        return ia_bits - self.level_shift(start_level)

    def s2_start_level(self, sl0: int) -> int | None:
        """Start level encoded by S2SL0 (VTCR_EL2.SL0); None for the reserved value."""
        table = (2, 1, 0) if self.shift == 12 else (3, 2, 1)
        return table[sl0] if 0 <= sl0 < 3 else None

    def s2_sl0(self, start_level: int) -> int | None:
        """S2SL0 encoding of a start level; None if SL0 cannot express it for this granule."""
        for sl0 in range(3):
            if self.s2_start_level(sl0) == start_level:
                return sl0
        return None

    def s2_concatenated_tables(self, ia_bits: int, start_level: int) -> int | None:
        """Concatenated start-level tables a stage 2 with this input size and start level needs.

        The start level must resolve at least one input bit and at most one full level plus four
        bits (up to 16 tables); otherwise the combination is inconsistent (None).
        """
        if not 0 <= start_level <= 3:
            return None
        low = self.level_shift(start_level)
        extra = ia_bits - (low + self.shift - 3)
        if ia_bits <= low or extra > 4:
            return None
        return 1 << max(extra, 0)

    def __repr__(self) -> str:
        return f"Granule({self.size // 1024}K)"


GRANULE_4K = Granule(12)
GRANULE_16K = Granule(14)
GRANULE_64K = Granule(16)
GRANULES: dict[int, Granule] = {g.size: g for g in (GRANULE_4K, GRANULE_16K, GRANULE_64K)}


def granule_from_size(size: int) -> Granule | None:
    return GRANULES.get(size)


# TCR/CD TG0 and STE S2TG share one encoding; TCR/CD TG1 has another.
_TG0 = {12: 0, 16: 1, 14: 2}
_TG1 = {14: 1, 12: 2, 16: 3}


def tg0_encoding(granule: Granule) -> int:
    return _TG0[granule.shift]


def granule_from_tg0(code: int) -> Granule | None:
    for shift, value in _TG0.items():
        if value == code:
            return GRANULES[1 << shift]
    return None


def tg1_encoding(granule: Granule) -> int:
    return _TG1[granule.shift]


def granule_from_tg1(code: int) -> Granule | None:
    for shift, value in _TG1.items():
        if value == code:
            return GRANULES[1 << shift]
    return None


# TCR.IPS / CD.IPS / STE.S2PS / IDR5.OAS physical address size encoding.
_PA_BITS = (32, 36, 40, 42, 44, 48, 52)


def ps_encoding(pa_bits: int) -> int | None:
    """The PS/IPS code for an address size in bits; None for a size with no encoding."""
    return _PA_BITS.index(pa_bits) if pa_bits in _PA_BITS else None


def pa_bits_from_ps(code: int) -> int | None:
    return _PA_BITS[code] if 0 <= code < len(_PA_BITS) else None


def contig_entries(granule: Granule, level: int) -> int | None:
    """Entries in a contiguous-hint group; None where the hint is not defined."""
    if granule.shift == 12:
        return 16 if 1 <= level <= 3 else None
    if granule.shift == 14:
        return {2: 32, 3: 128}.get(level)
    return 32 if level in (2, 3) else None


# -- descriptor helpers (pure) ------------------------------------------------------------------

_OA_BITS_47_0 = (1 << 48) - 1


def _oa_mask(granule: Granule, level: int) -> int:
    return _OA_BITS_47_0 & ~(granule.block_size(level) - 1)


def desc_output_address(desc: int, granule: Granule, level: int, oa52: bool = False) -> int:
    """Output address of a block/page descriptor at ``level`` (bits [47:shift(level)], plus
    OA[51:48] from bits [15:12] when ``oa52`` with the 64 KiB granule)."""
    oa = desc & _oa_mask(granule, level)
    if oa52 and granule.shift == 16:
        oa |= ((desc >> 12) & 0xF) << 48
    return oa


def make_desc_output_address(oa: int, granule: Granule, level: int, oa52: bool = False) -> int:
    """Descriptor bits holding ``oa`` for a block/page at ``level`` (bits below the block are dropped)."""
    bits = oa & _oa_mask(granule, level)
    if oa52 and granule.shift == 16:
        bits |= ((oa >> 48) & 0xF) << 12
    return bits


def desc_table_address(desc: int, granule: Granule, oa52: bool = False) -> int:
    """Next-level table address of a table descriptor (bits [47:G], + [51:48] as for pages)."""
    return desc_output_address(desc, granule, 3, oa52)


def make_desc_table_address(pa: int, granule: Granule, oa52: bool = False) -> int:
    return make_desc_output_address(pa, granule, 3, oa52)


def classify(desc: int, granule: Granule, level: int, oa52: bool = False) -> DescKind:
    """Descriptor kind at ``level``: bits[1:0] x0 invalid, 11 table (L0-2) or page (L3), 01 block
    where the granule permits blocks, else reserved."""
    if not desc & DESC_VALID:
        return DescKind.INVALID
    if desc & 0b10:
        return DescKind.PAGE if level == 3 else DescKind.TABLE
    if level != 3 and level in granule.leaf_levels(52 if oa52 else 48):
        return DescKind.BLOCK
    return DescKind.RESERVED
