"""The STE/CD update algorithm (Linux ``arm_smmu_write_entry``), pure and testable.

An entry (STE or CD) is eight little-endian 64-bit words. The SMMU reads each word single-copy
atomically but the entry as a whole in any order, so a live entry may only be changed in ways
where every state it can observe is either the old or the new configuration:

- *used bits*: given an entry's value, the bits the SMMU actually reads (``get_ste_used`` /
  ``get_cd_used``). Bits outside them are IGNORED and may change at any time.
- *update-safe bits*: bits both configurations use but whose sequencing does not matter
  (``get_ste_update_safe``: STE.MEV always, STE.EATS=TRANS in most cases).

``write_entry`` fills the bits the current entry ignores, then changes the one "critical" word
whose used bits differ with one 64-bit store, then clears what the target no longer uses
(hitless); when more than one word's used bits must change it goes through V=0
(break-before-make). After every step that changed memory the writer's ``sync`` runs (CFGI +
CMD_SYNC on hardware). The writer is an interface, so the same code drives real memory and a
test recorder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pkvm_smmu.arch._bitfield import Field
from pkvm_smmu.arch.strtab import CD, STE, Eats, S1Dss, SteConfig

NUM_ENTRY_QWORDS = 8
_ALL = (1 << 512) - 1


def _mask(*fields: Field) -> int:
    out = 0
    for f in fields:
        out |= f.in_place_mask
    return out


def to_words(value: int) -> list[int]:
    """A 512-bit entry as eight u64 words, word 0 first."""
    return [(value >> (64 * i)) & 0xFFFF_FFFF_FFFF_FFFF for i in range(NUM_ENTRY_QWORDS)]


def from_words(words: Sequence[int]) -> int:
    out = 0
    for i, word in enumerate(words):
        out |= (word & 0xFFFF_FFFF_FFFF_FFFF) << (64 * i)
    return out


# -- used bits ----------------------------------------------------------------------------------

_STE_S1_USED = _mask(
    STE.S1FMT, STE.S1CONTEXTPTR, STE.S1CDMAX,
    STE.S1DSS, STE.S1CIR, STE.S1COR, STE.S1CSH, STE.S1STALLD, STE.STRW, STE.EATS, STE.MEV,
    STE.S2VMID,
)  # fmt: skip
# The VTCR block S2T0SZ..S2PS, as Linux's STRTAB_STE_2_VTCR.
_STE_VTCR = _mask(STE.S2T0SZ, STE.S2SL0, STE.S2IR0, STE.S2OR0, STE.S2SH0, STE.S2TG, STE.S2PS)
_STE_S2_USED = (
    _mask(STE.S2FWB, STE.EATS, STE.SHCFG, STE.MEV, STE.S2VMID)
    | _STE_VTCR
    | _mask(STE.S2AA64, STE.S2ENDI, STE.S2PTW, STE.S2S, STE.S2R, STE.S2TTB)
)
_CD_EPD0_IGNORED = _mask(CD.T0SZ, CD.TG0, CD.IR0, CD.OR0, CD.SH0, CD.TTB0)


def ste_used(ste: int) -> int:
    """The STE bits the SMMU reads for ``ste`` (at least every bit the driver sets)."""
    used = STE.V.in_place_mask
    if not STE.V.get(ste):
        return used
    used |= STE.CONFIG.in_place_mask
    cfg = STE.CONFIG.get(ste)
    if cfg & 0b001:  # stage 1 translates
        used |= _STE_S1_USED
        # Non-substream traffic bypassing stage 1 takes its shareability from SHCFG.
        if STE.S1DSS.get(ste) == S1Dss.BYPASS:
            used |= STE.SHCFG.in_place_mask
    if cfg & 0b010:  # stage 2 translates
        used |= _STE_S2_USED
    if cfg == SteConfig.BYPASS:
        used |= STE.SHCFG.in_place_mask
    return used


def ste_update_safe(cur: int, target: int) -> int:
    """STE bits whose change may be sequenced freely between ``cur`` and ``target``."""
    safe = 0
    s1chk = STE.EATS.insert(Eats.S1CHK)
    # ATS is disabled at the device while EATS changes, so its order is irrelevant; but not when
    # S2S is involved (S2S=1 with EATS=1 is ILLEGAL) nor with S1CHK (0b11 would be reserved).
    if not (cur | target) & s1chk and not (cur | target) & STE.S2S.in_place_mask:
        safe |= STE.EATS.insert(Eats.TRANS)
    # MEV only changes how many fault records are merged; software must cope with merging anyway.
    safe |= STE.MEV.in_place_mask
    return safe


def cd_used(cd: int) -> int:
    """The CD bits the SMMU reads: V alone when invalid, else everything but what EPD0 ignores."""
    if not CD.V.get(cd):
        return CD.V.in_place_mask
    if CD.EPD0.get(cd):
        return _ALL & ~_CD_EPD0_IGNORED
    return _ALL


def get_ste_used(entry: Sequence[int]) -> list[int]:
    return to_words(ste_used(from_words(entry)))


def get_ste_update_safe(cur: Sequence[int], target: Sequence[int]) -> list[int]:
    return to_words(ste_update_safe(from_words(cur), from_words(target)))


def get_cd_used(entry: Sequence[int]) -> list[int]:
    return to_words(cd_used(from_words(entry)))


def no_update_safe(cur: Sequence[int], target: Sequence[int]) -> list[int]:
    return [0] * NUM_ENTRY_QWORDS


# -- the algorithm ------------------------------------------------------------------------------


class EntryWriter(Protocol):
    """Where an entry lives and how to make a change visible (``arm_smmu_entry_writer``)."""

    def get_used(self, entry: Sequence[int]) -> list[int]: ...

    def get_update_safe(self, cur: Sequence[int], target: Sequence[int]) -> list[int]: ...

    def write_qword(self, index: int, value: int) -> None:
        """One single-copy-atomic 64-bit store of word ``index`` of the entry."""
        ...

    def sync(self) -> None:
        """Make the stores so far visible to the SMMU and wait (CFGI_STE/CD + CMD_SYNC)."""
        ...


class SteWriterOps:
    """``get_used``/``get_update_safe`` of STE writers (mix into a class that writes and syncs)."""

    def get_used(self, entry: Sequence[int]) -> list[int]:
        return get_ste_used(entry)

    def get_update_safe(self, cur: Sequence[int], target: Sequence[int]) -> list[int]:
        return get_ste_update_safe(cur, target)


class CdWriterOps:
    """CD writers: no update-safe bits (as Linux's CD writer has no get_update_safe)."""

    def get_used(self, entry: Sequence[int]) -> list[int]:
        return get_cd_used(entry)

    def get_update_safe(self, cur: Sequence[int], target: Sequence[int]) -> list[int]:
        return no_update_safe(cur, target)


class EntryMaskError(ValueError):
    """A target sets bits its own configuration does not use: a builder out of step with the
    used-bits rules (such a bit would never be cleaned up)."""


def entry_qword_diff(
    writer: EntryWriter, entry: Sequence[int], target: Sequence[int]
) -> tuple[int, list[int]]:
    """(bitmask of words whose used bits must change, ``entry`` with every unused bit set to
    its target value) -- ``arm_smmu_entry_qword_diff``."""
    cur_used = writer.get_used(entry)
    target_used = writer.get_used(target)
    safe = writer.get_update_safe(entry, target)
    unused_update = [0] * NUM_ENTRY_QWORDS
    diff = 0
    for i in range(NUM_ENTRY_QWORDS):
        # Safe bits only matter where both sides use them; elsewhere the unused side sequences.
        safe_i = safe[i] & target_used[i] & cur_used[i]
        if target[i] & ~target_used[i]:
            raise EntryMaskError(f"target word {i} sets unused bits {target[i] & ~target_used[i]:#x}")
        used_i = cur_used[i] & ~safe_i
        unused_update[i] = (entry[i] & used_i) | (target[i] & ~used_i)
        if (unused_update[i] & target_used[i]) != target[i]:
            diff |= 1 << i
    return diff, unused_update


def _entry_set(writer: EntryWriter, entry: list[int], target: Sequence[int], start: int, length: int) -> bool:
    changed = False
    for i in range(start, start + length):
        if entry[i] != target[i]:
            entry[i] = target[i]
            writer.write_qword(i, target[i])
            changed = True
    if changed:
        writer.sync()
    return changed


def write_entry(writer: EntryWriter, entry: list[int], target: Sequence[int]) -> None:
    """Move ``entry`` (the words currently in memory, updated in place) to ``target``."""
    if len(entry) != NUM_ENTRY_QWORDS or len(target) != NUM_ENTRY_QWORDS:
        raise ValueError("entries are eight 64-bit words")
    diff, unused_update = entry_qword_diff(writer, entry, target)
    if diff and not diff & (diff - 1):
        # Hitless: one critical word. Leave it alone in the first step (it is written whole in
        # the second), which saves a sync when it is the only word that changes.
        critical = diff.bit_length() - 1
        unused_update[critical] = entry[critical]
        _entry_set(writer, entry, unused_update, 0, NUM_ENTRY_QWORDS)
        _entry_set(writer, entry, target, critical, 1)
        _entry_set(writer, entry, target, 0, NUM_ENTRY_QWORDS)
    elif diff:
        # Break-before-make: V=0 (word 0 cleared), fill words 1..7, then word 0 with V=1.
        unused_update[0] = 0
        _entry_set(writer, entry, unused_update, 0, 1)
        _entry_set(writer, entry, target, 1, NUM_ENTRY_QWORDS - 1)
        _entry_set(writer, entry, target, 0, 1)
    else:
        # No used bit changes (update-safe bits may): any order is fine.
        _entry_set(writer, entry, target, 0, NUM_ENTRY_QWORDS)


__all__ = [
    "NUM_ENTRY_QWORDS",
    "CdWriterOps",
    "EntryMaskError",
    "EntryWriter",
    "SteWriterOps",
    "cd_used",
    "entry_qword_diff",
    "from_words",
    "get_cd_used",
    "get_ste_update_safe",
    "get_ste_used",
    "no_update_safe",
    "ste_update_safe",
    "ste_used",
    "to_words",
    "write_entry",
]
