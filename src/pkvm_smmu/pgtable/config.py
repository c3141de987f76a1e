"""A page table's static configuration and the register fields software programs for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from pkvm_smmu.arch.vmsa import (
    GRANULES,
    Cacheability,
    Granule,
    Shareability,
    ps_encoding,
    tg0_encoding,
)
from pkvm_smmu.pgtable.prot import MAIR, Prot

__all__ = ["MAX_IAS", "PageTableConfig", "Prot", "S2Concat"]

MAX_IAS = 48  # no 52-bit input (FEAT_LVA) modelled


class S2Concat(StrEnum):
    """When a stage-2 table concatenates its start level (removing one level of walk)."""

    # Current Linux: only where the Arm ARM requires it (R_DXBSH, R_SRKBC): 4K starting at L0
    # with a 40/42-bit PA, 16K starting at L0 with 48-bit IA or PA, 16K at L1 with a 40-bit PA.
    REQUIRED = "required"
    # Linux before v6.14: whenever a level-0 start has at most 16 entries.
    WHEN_POSSIBLE = "when-possible"
    NEVER = "never"


def _concat_required(granule: Granule, start_level: int, ias: int, oas: int) -> bool:
    if granule.shift == 14 and start_level == 0:
        return ias == 48 or oas == 48
    if granule.shift == 12 and start_level == 0:
        return oas in (40, 42)
    return granule.shift == 14 and start_level == 1 and oas == 40


@dataclass(frozen=True)
class PageTableConfig:
    """``stage`` 1 or 2; ``ias``/``oas`` in bits; ``pgsize_bitmap`` 0 means every leaf size the
    granule permits for ``oas`` that the start level can reach and that fits in ``ias``.

    ``split_blocks``: unmapping part of a block splits it (Linux before v6.12) instead of
    unmapping nothing. ``free_empty_tables``: unmap frees table pages it leaves empty (Linux
    does not). Invalid configurations raise ``ValueError`` (they are programming errors).
    """

    stage: int
    granule: Granule
    ias: int
    oas: int
    pgsize_bitmap: int = 0
    coherent_walk: bool = True
    s2_concat: S2Concat = S2Concat.REQUIRED
    split_blocks: bool = False
    free_empty_tables: bool = False
    start_level: int = field(init=False)
    start_tables: int = field(init=False)  # concatenated start-level tables (1 without)
    pgd_entries: int = field(init=False)

    def __post_init__(self) -> None:
        g = self.granule
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, not {self.stage}")
        if GRANULES.get(g.size) != g:
            raise ValueError(f"unsupported granule {g!r}")
        if ps_encoding(self.oas) is None or (self.oas == 52 and g.shift != 16):
            raise ValueError(f"oas={self.oas} has no PS encoding for {g!r}")
        start = g.s1_start_level(self.ias)
        if start is None or self.ias > MAX_IAS:
            raise ValueError(f"ias={self.ias} is not a supported input size for {g!r}")
        tables = 1
        if self.stage == 2:
            entries = 1 << g.start_level_index_bits(self.ias, start)
            if self.s2_concat is S2Concat.REQUIRED:
                concat = _concat_required(g, start, self.ias, self.oas)
            else:
                concat = self.s2_concat is S2Concat.WHEN_POSSIBLE and start == 0 and entries <= 16
            if concat:
                if entries > 16:
                    raise ValueError(f"stage 2 ias={self.ias} would need {entries} concatenated tables")
                start, tables = start + 1, entries
            if g.s2_sl0(start) is None or g.s2_concatenated_tables(self.ias, start) != tables:
                raise ValueError(f"stage 2 ias={self.ias} cannot start at level {start} with {g!r}")
        object.__setattr__(self, "start_level", start)
        object.__setattr__(self, "start_tables", tables)
        object.__setattr__(self, "pgd_entries", 1 << g.start_level_index_bits(self.ias, start))

        reachable = 0
        for level in g.leaf_levels(self.oas):
            if level >= start and g.level_shift(level) < self.ias:
                reachable |= g.block_size(level)
        if self.pgsize_bitmap == 0:
            object.__setattr__(self, "pgsize_bitmap", reachable)
        elif self.pgsize_bitmap & ~reachable or not self.pgsize_bitmap & g.size:
            raise ValueError(
                f"pgsize_bitmap {self.pgsize_bitmap:#x} must include the granule and only sizes in "
                f"{reachable:#x}"
            )

    # -- derived geometry -----------------------------------------------------------------------
    @property
    def pgd_size(self) -> int:
        """Bytes of the start-level table(s)."""
        return self.pgd_entries * 8

    @property
    def pgd_pages(self) -> int:
        """Granule pages the pgd occupies (a smaller pgd still gets a whole page)."""
        return max(1, self.pgd_size >> self.granule.shift)

    @property
    def min_pgsize(self) -> int:
        return self.pgsize_bitmap & -self.pgsize_bitmap

    def leaf_levels(self) -> tuple[int, ...]:
        g = self.granule
        return tuple(lvl for lvl in range(4) if self.pgsize_bitmap & g.block_size(lvl))

    # -- register fields ------------------------------------------------------------------------
    def _walk_attrs(self) -> tuple[int, int, int]:
        if self.coherent_walk:
            return Cacheability.WBWA, Cacheability.WBWA, Shareability.ISH
        return Cacheability.NC, Cacheability.NC, Shareability.OSH

    def mair(self) -> int:
        return MAIR

    def cd_fields(self) -> dict[str, int]:
        """CD fields describing a stage-1 table (the driver adds ASID, TTB0, R/A/S, V)."""
        if self.stage != 1:
            raise ValueError("cd_fields() describes a stage-1 table")
        ir, orgn, sh = self._walk_attrs()
        ips = ps_encoding(self.oas)
        assert ips is not None
        return {
            "T0SZ": 64 - self.ias,
            "TG0": tg0_encoding(self.granule),
            "IR0": int(ir),
            "OR0": int(orgn),
            "SH0": int(sh),
            "EPD0": 0,
            "EPD1": 1,
            "IPS": ips,
            "AA64": 1,
            "MAIR0": MAIR & 0xFFFF_FFFF,
            "MAIR1": MAIR >> 32,
        }

    def vtcr_fields(self) -> dict[str, int]:
        """STE stage-2 fields describing a stage-2 table (the driver adds S2TTB, VMID, ...)."""
        if self.stage != 2:
            raise ValueError("vtcr_fields() describes a stage-2 table")
        ir, orgn, sh = self._walk_attrs()
        ps = ps_encoding(self.oas)
        sl0 = self.granule.s2_sl0(self.start_level)
        assert ps is not None and sl0 is not None
        return {
            "S2T0SZ": 64 - self.ias,
            "S2SL0": sl0,
            "S2TG": tg0_encoding(self.granule),
            "S2PS": ps,
            "S2IR0": int(ir),
            "S2OR0": int(orgn),
            "S2SH0": int(sh),
            "S2AA64": 1,
        }
