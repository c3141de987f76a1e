"""What a command invalidates, decided by the SMMU model's own command executor running on a
scratch SMMU: the sanitizer and the model then agree on every field, mask and scope (VMID and ASID
widths, range encodings, TTL hints, CFGI_ALL as CFGI_STE_RANGE with Range=31)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, cast

from pkvm_smmu.arch.commands import Opcode
from pkvm_smmu.arch.registers import CmdqError
from pkvm_smmu.machine.smmu.executor import AtcClient, CommandExecutor
from pkvm_smmu.machine.smmu.features import SmmuFeatures
from pkvm_smmu.machine.smmu.tlb import Tlb, TlbEntry
from pkvm_smmu.trace import TraceBus

if TYPE_CHECKING:
    from pkvm_smmu.machine.smmu.device import SmmuV3

ALL_SIDS = (0, (1 << 32) - 1)
INVALIDATIONS = frozenset(
    {
        Opcode.CFGI_STE,
        Opcode.CFGI_STE_RANGE,
        Opcode.CFGI_CD,
        Opcode.CFGI_CD_ALL,
        Opcode.TLBI_NH_ALL,
        Opcode.TLBI_NH_ASID,
        Opcode.TLBI_NH_VA,
        Opcode.TLBI_NH_VAA,
        Opcode.TLBI_EL2_ALL,
        Opcode.TLBI_EL2_ASID,
        Opcode.TLBI_EL2_VA,
        Opcode.TLBI_EL2_VAA,
        Opcode.TLBI_S12_VMALL,
        Opcode.TLBI_S2_IPA,
        Opcode.TLBI_NSNH_ALL,
    }
)


@dataclass(frozen=True, slots=True)
class ConfigScope:
    """What one CFGI_* command removes from the configuration cache.

    ``stes``: the STEs of the SIDs (with every CD cached through them); otherwise CDs only, of
    ``cd_index`` or, when it is None, every CD of the SIDs. ``leaf`` False: the level-1 descriptors
    walked to them too.
    """

    first_sid: int
    last_sid: int
    stes: bool
    cd_index: int | None
    leaf: bool

    def covers_ste(self, sid: int, *, l1: bool = False) -> bool:
        return self.stes and self.first_sid <= sid <= self.last_sid and (not l1 or not self.leaf)

    def covers_cd(self, sid: int, index: int, *, l1: bool = False) -> bool:
        if not self.first_sid <= sid <= self.last_sid:
            return False
        if self.stes or self.cd_index is None:
            return True
        return self.cd_index == index and (not l1 or not self.leaf)


class _ScopeRecorder:
    """Stands in for the configuration cache: records what the executor asks it to invalidate."""

    def __init__(self) -> None:
        self.scope: ConfigScope | None = None

    def invalidate_ste(self, sid: int, leaf: bool) -> None:
        self.scope = ConfigScope(sid, sid, True, None, leaf)

    def invalidate_ste_range(self, sid: int, range_: int) -> None:
        if range_ >= 31:
            self.invalidate_all()
            return
        span = 1 << (range_ + 1)
        first = sid & ~(span - 1)
        self.scope = ConfigScope(first, first + span - 1, True, None, False)

    def invalidate_all(self) -> None:
        self.scope = ConfigScope(*ALL_SIDS, True, None, False)

    def invalidate_cd(self, sid: int, ssid: int, leaf: bool) -> None:
        self.scope = ConfigScope(sid, sid, False, ssid, leaf)

    def invalidate_cd_all(self, sid: int) -> None:
        self.scope = ConfigScope(sid, sid, False, None, False)

    def prefetch(self, sid: int, ssid: int | None) -> None:
        pass


class _ScratchSmmu:
    """The parts of an ``SmmuV3`` the command executor touches, with nothing behind them."""

    def __init__(self, name: str, features: SmmuFeatures) -> None:
        self.name = name
        self.features = features
        self.trace = TraceBus()  # no sink: the scratch executor traces nothing
        self.tlb = Tlb()
        self.config_cache = _ScopeRecorder()
        self.smmu_enabled = False  # prefetch and ATC_INV then do nothing
        self.ats_endpoints: dict[int, AtcClient] = {}


class CommandDecoder:
    """Scopes of commands for one SMMU's features."""

    def __init__(self, smmu: SmmuV3) -> None:
        self._scratch = _ScratchSmmu(smmu.name, smmu.features)
        self._executor = CommandExecutor(cast("SmmuV3", self._scratch))

    def config_scope(self, command: int) -> ConfigScope | None:
        """What a CFGI_* command invalidates; None for any other command or an ILLEGAL one."""
        if command & 0xFF not in (
            Opcode.CFGI_STE,
            Opcode.CFGI_STE_RANGE,
            Opcode.CFGI_CD,
            Opcode.CFGI_CD_ALL,
        ):
            return None
        recorder = self._scratch.config_cache
        recorder.scope = None
        if self._executor.execute(command) is not CmdqError.NONE:
            return None
        return recorder.scope

    def removes_tlb_entry(self, command: int, entry: TlbEntry) -> bool:
        """Whether ``command`` removes ``entry`` (a copy of it, in a TLB of its own)."""
        if command & 0xFF not in INVALIDATIONS:
            return False
        tlb = Tlb()
        tlb.insert(replace(entry))
        self._scratch.tlb = tlb
        self._executor.execute(command)
        return len(tlb) == 0


def is_invalidation(command: int) -> bool:
    return command & 0xFF in INVALIDATIONS


def is_sync(command: int) -> bool:
    return command & 0xFF == Opcode.SYNC


__all__ = ["CommandDecoder", "ConfigScope", "is_invalidation", "is_sync"]
