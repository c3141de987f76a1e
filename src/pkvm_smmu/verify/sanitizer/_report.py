"""What the sanitizer reports: which contract was broken, by which access, seen where."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Check(Enum):
    """The architecture contracts the sanitizer checks software against."""

    # A translation or configuration used from a cache entry whose memory changed without the
    # invalidation (and CMD_SYNC) the architecture requires.
    STALE_USE = "stale-use"
    # A live STE/CD passed, between two points where the SMMU may fetch it, through a state that is
    # neither the previous nor the next synced state on the bits the SMMU uses.
    NOT_HITLESS = "not-hitless"
    # ... or through a state that is ILLEGAL.
    ILLEGAL_INTERMEDIATE = "illegal-intermediate"
    # A write to a register field that its enable (or the enable's ACK, or a pending update) guards.
    GUARDED_WRITE = "guarded-write"
    # Software relied on an enable or update before the SMMU acknowledged it.
    BEFORE_ACK = "before-ack"
    # A queue index moved backwards, past full or past PROD, or with bits above the index set.
    QUEUE_INDEX = "queue-index"
    # A hyp handler read the same host-controlled memory twice while handling one trap.
    DOUBLE_FETCH = "double-fetch"


@dataclass(frozen=True, slots=True)
class Location:
    """A point of the run. ``seq`` is the trace event it is (for commands, traps, register updates)
    or, for a memory or register access, the last trace event delivered before the access."""

    seq: int
    time_ns: int
    initiator: str
    address: int
    what: str = ""
    trap: int | None = None  # seq of the hyp trap the access was made in, if any

    def __str__(self) -> str:
        text = f"seq {self.seq} @{self.time_ns}ns {self.initiator} {self.address:#x}"
        return f"{text} ({self.what})" if self.what else text


@dataclass(frozen=True, slots=True)
class SanitizerReport:
    """One reliance on something the architecture does not guarantee.

    ``writer`` is the access that broke the contract (the store, the register write, the second
    read); ``at`` is where the reliance showed (the DMA that used the stale entry, the CFGI that
    settled the update, the read that fetched twice); ``structure`` names what was touched;
    ``missing`` says what the architecture required and software did not do, when that is one thing.
    """

    check: Check
    smmu: str
    structure: str
    message: str
    writer: Location
    at: Location
    missing: str = ""

    def __str__(self) -> str:
        text = f"[{self.check.value}] {self.smmu}: {self.structure}: {self.message}; writer {self.writer}"
        text += f"; at {self.at}"
        return f"{text}; missing {self.missing}" if self.missing else text


@dataclass(slots=True)
class Coverage:
    """What the sanitizer has judged so far, so that zero reports can be told from zero checks."""

    translations: int = 0  # translations whose cached STE, CD and TLB entry were checked
    invalidations: int = 0  # consumed CFGI/TLBI commands (entries dropped, updates settled)
    updates: int = 0  # STE/CD windows settled (stores judged between two sync points)
    register_writes: int = 0  # software writes to SMMU registers
    traps: int = 0  # hyp traps whose reads of host memory were watched


__all__ = ["Check", "Coverage", "Location", "SanitizerReport"]
