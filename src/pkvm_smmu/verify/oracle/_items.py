"""What the oracle reports: reachable memory with the path that makes it reachable, and the
violations found in it."""

from __future__ import annotations

from dataclasses import dataclass, field

from pkvm_smmu.machine.memory import PAGE_SHIFT
from pkvm_smmu.machine.smmu.types import WalkConfig
from pkvm_smmu.verify.oracle._runs import Runs

DEVICE = "device"  # a DMA of the stream
SMMU = "smmu"  # an access the SMMU makes by itself


@dataclass(frozen=True, slots=True)
class WalkRef:
    """The translation behind a reach, so a violation can be explained descriptor by descriptor:
    ``stage1`` (tables at IPAs when ``stage2`` is set too) and/or ``stage2``."""

    stage1: WalkConfig | None = None
    stage2: WalkConfig | None = None


@dataclass(frozen=True, eq=False, slots=True)
class Reach:
    """Memory ``actor`` can reach for stream ``sid``/``ssid`` (None: every StreamID for a device,
    the SMMU on its own account for the SMMU), and how. SMMU reaches are reads or writes
    (``runs`` perms); device reaches carry the permissions the translation grants."""

    actor: str
    sid: int | None
    ssid: int | None
    runs: Runs
    path: tuple[str, ...]
    walk: WalkRef | None = None


@dataclass(frozen=True, slots=True)
class Violation:
    """A page range ``owner`` keeps from the stream's owner (the host) that ``actor`` can reach.

    ``sid``/``ssid`` name the stream (``sid`` None: every StreamID, or the SMMU itself when
    ``actor`` is ``"smmu"``); ``path`` says step by step what makes the range reachable: the
    register, STE, CD, descriptors or cache entry."""

    smmu: str
    actor: str
    sid: int | None
    ssid: int | None
    access: str  # "read", "write" or "read/write"
    start: int
    size: int
    owner: str
    path: tuple[str, ...] = field(compare=True)

    @property
    def stream(self) -> str:
        if self.sid is None:
            return "the SMMU itself" if self.actor == SMMU else "every StreamID"
        text = f"StreamID {self.sid:#x}"
        if self.ssid is not None:
            text += f" SubstreamID {self.ssid:#x}"
        return text + (" (SMMU fetch)" if self.actor == SMMU else "")

    @property
    def pfns(self) -> range:
        return range(self.start >> PAGE_SHIFT, (self.start + self.size + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT)

    def __str__(self) -> str:
        end = self.start + self.size
        head = (
            f"{self.smmu}: {self.stream} can {self.access} [{self.start:#x}, {end:#x}) owned by {self.owner}"
        )
        return head + "".join(f"\n  {step}" for step in self.path)


__all__ = ["DEVICE", "SMMU", "Reach", "Violation", "WalkRef"]
