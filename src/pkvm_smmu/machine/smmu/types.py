"""Values that cross the SMMU model's internal boundaries: transactions, their outcomes, walk
parameters and results, and walk faults. Plain data; no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from pkvm_smmu.arch.events import EventType, FaultClass
from pkvm_smmu.arch.vmsa import Granule


@dataclass(frozen=True, slots=True)
class Transaction:
    """One upstream transaction as a device presents it to the SMMU."""

    stream_id: int
    address: int
    size: int
    is_write: bool
    substream_id: int | None = None
    privileged: bool = False  # PnU
    instruction: bool = False  # InD (reads only)
    ats_translated: bool = False  # address is a PA obtained earlier through ATS


class Outcome(Enum):
    OK = "ok"
    ABORT = "abort"  # the device sees an abort
    RAZ_WI = "raz-wi"  # terminated: reads return zero, writes are ignored, the device sees success


@dataclass(frozen=True, slots=True, init=False)
class TranslationResult:
    outcome: Outcome
    output_address: int = 0
    # The event record (EVENT layout value) the SMMU produced for this transaction, if any; whether
    # it reached the event queue depends on the queue's state.
    event: int | None = None

    def __init__(self, outcome: Outcome, output_address: int = 0, event: int | None = None) -> None:
        # Every translation builds one: writing the slots directly costs a third less than the
        # generated frozen __init__ (same object, equality and hash).
        _set_outcome(self, outcome)
        _set_output_address(self, output_address)
        _set_event(self, event)


_set_outcome, _set_output_address, _set_event = (
    vars(TranslationResult)[name].__set__ for name in ("outcome", "output_address", "event")
)


class TranslationKind(Enum):
    """What a TLB entry translates."""

    S1 = "s1"  # stage 1 only: VA -> PA
    S2 = "s2"  # stage 2 only: IPA -> PA (stage-2-only streams, and nested table/CD fetches)
    NESTED = "s12"  # combined stage 1 + stage 2: VA -> PA


@dataclass(frozen=True, slots=True)
class WalkConfig:
    """Everything a VMSAv8-64 walk of one translation regime needs, decoded from an STE or a CD."""

    stage: int  # 1 or 2
    granule: Granule
    ttb: int  # table base: a PA, or an IPA for a nested stage-1 walk
    start_level: int
    concatenated: int  # number of concatenated start-level tables (stage 2), 1 otherwise
    input_bits: int  # the walk accepts inputs below 2**input_bits (64 - TxSZ)
    output_bits: int  # effective output size (min(IPS/S2PS, OAS))
    affd: bool = False  # access flag faults disabled
    hierarchical_attrs: bool = True  # stage 1 table attributes (APTable, XNTable, PXNTable) apply
    # Stage 1 regime with one privilege level (StreamWorld EL2, E2H=0): AP[1], APTable[0], PXN and
    # PXNTable are ignored, bit 54 is XN for every access, every entry is global.
    single_privilege: bool = False
    wxn: bool = False  # stage 1 CD.WXN: writable regions are never executable
    # Derived by the walker on its first walk (start table, masks, shifts): a cache, not part of
    # the configuration (not compared, not hashed).
    geometry: tuple[int, ...] | None = field(default=None, init=False, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class WalkLeaf:
    """A successful walk: the leaf descriptor and the permissions it grants."""

    input_base: int  # input address of the block/page start
    output_base: int  # output address of the block/page start
    level: int
    size: int  # bytes translated by this leaf
    descriptor: int
    descriptor_address: int  # PA of the leaf descriptor
    path: tuple[int, ...]  # PAs of every descriptor read, start level first
    # Stage 1: effective after table attributes. Stage 2: from S2AP/XN.
    readable: bool
    writable: bool
    unpriv: bool  # stage 1: EL0 access permitted (AP[1]); stage 2: always True
    executable: bool
    priv_executable: bool
    global_entry: bool  # stage 1 nG == 0
    attr: int  # stage 1 AttrIndx, stage 2 MemAttr


@dataclass(frozen=True, slots=True)
class WalkFault:
    """A walk that could not produce a leaf; it becomes an event record if recording is enabled."""

    event_type: EventType  # F_TRANSLATION, F_ADDR_SIZE, F_ACCESS, F_PERMISSION or F_WALK_EABT
    stage: int
    level: int
    fault_class: FaultClass
    ipa: int = 0  # stage-2 faults: the IPA being translated
    fetch_address: int = 0  # F_WALK_EABT: the descriptor PA whose read aborted
    table_write: bool = False  # TTRnW for permission faults on table walks (HTTU only)
