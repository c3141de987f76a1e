"""The action vocabulary of a malicious host: small frozen dataclasses, each serialisable to JSON.

Every action is plain data (ints, bools, strings): it says what the host does, never how the model
carries it out, so a list of actions is a replayable script. ``apply`` (``_apply``) turns one into
host CPU accesses, hypercalls, driver calls or device transactions on a ``System``.

JSON form: ``{"kind": "reg-write", "smmu": 0, "offset": "0x44", "size": 4, "value": "0x0"}``; int
fields are written as hex strings where an address or raw value reads better that way, and read
back from either an int or a ``0x`` string. ``action_from_json`` raises ``ActionFormatError`` naming
the field at fault; it never accepts a value of the wrong type.

Memory is named by a *target* and an *index* (see ``TARGETS``): ``("ste", 0x10)`` is the host
driver's STE of StreamID 0x10, found in the host kernel's state when the action runs; ``("raw", 0)``
plus ``offset`` is a physical address. Targets keep scripts meaningful when earlier actions change
where the host's structures are, and let the shrinker drop actions without breaking later ones.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

U64_MAX = (1 << 64) - 1

# target -> what ``index`` selects (the target's address is resolved when the action runs)
TARGETS: dict[str, str] = {
    "raw": "a physical address: the address is the offset (index ignored)",
    "cmdq": "the host driver's command queue of SMMU #index",
    "evtq": "the host driver's event queue of SMMU #index",
    "priq": "the host driver's PRI queue of SMMU #index",
    "strtab": "the host driver's stream table (L1 table or linear) of SMMU #index",
    "l2": "the host driver's L2 stream table #index (every SMMU's, in L1 order)",
    "ste": "the host driver's STE of StreamID index (first SMMU that has it)",
    "cd": "the CD table of the host driver's master #index",
    "pgtable": "the root table of the host's paging domain #index",
    "buffer": "the adversary's host page #index (allocated at boot)",
    "foreign": "the first page of non-host memory run #index (hyp, guests)",
    "shadow-strtab": "the hyp's shadow stream table of SMMU #index",
    "shadow-cmdq": "the hyp's shadow command queue of SMMU #index",
    "smmu-mmio": "the registers of SMMU #index",
    "msi": "MSI doorbell #index",
    "mapping": "the physical page under the adversary's DMA mapping #index",
}

# How a page changes hands (``Donate.how``), all through the design's hypercalls.
DONATIONS: dict[str, str] = {
    "share-hyp": "__pkvm_host_share_hyp(pfn)",
    "unshare-hyp": "__pkvm_host_unshare_hyp(pfn)",
    "vm-state": "__pkvm_init_vm(pfn, protected=1): the page becomes the VM's hyp state",
    "donate-guest": "__pkvm_host_donate_guest(pfn, gfn, vm) to the adversary's protected VM",
    "share-guest": "__pkvm_host_share_guest(pfn, gfn, vm, RW) with the adversary's unprotected VM",
    "unshare-guest": "__pkvm_host_unshare_guest(gfn of the page, vm)",
    "teardown": "__pkvm_teardown_vm of the adversary's VMs (the page is ignored)",
    "reclaim": "__pkvm_host_reclaim_page(pfn)",
}

DMA_MODES: dict[str, str] = {
    "untranslated": "an ordinary read or write at an IOVA",
    "ats-request": "an ATS Translation Request for the page (the ATC caches a grant)",
    "ats": "a read or write through the device's ATC (Translated transactions)",
    "translated": "an ATS Translated transaction to any address, whatever the ATC holds",
}

DOMAIN_KINDS: dict[str, str] = {
    "default": "the group's default (DMA) domain",
    "identity": "the driver's identity domain",
    "blocked": "the driver's blocked domain",
    "paging": "a new unmanaged paging domain",
}

DIRECTIONS = ("bidirectional", "to-device", "from-device")
ACCESS_SIZES = (1, 2, 4, 8)  # what one CPU load or store can be


class ActionFormatError(ValueError):
    """An action's JSON is not one of the vocabulary's; ``field`` names what is wrong."""

    def __init__(self, message: str, field: str = "") -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


@dataclass(frozen=True)
class Action:
    """One thing the host does. Subclasses set ``KIND`` and declare their fields."""

    KIND: ClassVar[str] = ""
    HEX: ClassVar[frozenset[str]] = frozenset()  # int fields written as hex strings

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.KIND}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = _dump(value, f.name in self.HEX)
        return out

    def describe(self) -> str:
        """One line for people: what the host does."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            parts.append(f"{f.name}={_text(value, f.name in self.HEX)}")
        return f"{self.KIND} {' '.join(parts)}"

    def simpler(self) -> Iterator[Action]:
        """Simpler variants of this action, simplest first (the shrinker tries them in turn)."""
        return iter(())


def _dump(value: object, as_hex: bool) -> object:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return hex(value) if as_hex and value >= 10 else value
    if isinstance(value, tuple):
        return [_dump(v, as_hex) for v in value]
    return value


def _text(value: object, as_hex: bool) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return hex(value) if as_hex else str(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(_text(v, as_hex) for v in value) + ")"
    return str(value)


def _fewer_bits(value: int) -> Iterator[int]:
    """Candidates with fewer bits set than ``value``: 0, then its lowest set bit alone."""
    if value:
        yield 0
        low = value & -value
        if low != value:
            yield low


# -- registers ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegRead(Action):
    """A host CPU load of ``size`` bytes from SMMU #smmu's registers at ``offset``."""

    KIND: ClassVar[str] = "reg-read"
    HEX: ClassVar[frozenset[str]] = frozenset({"offset"})
    smmu: int = 0
    offset: int = 0
    size: int = 4


@dataclass(frozen=True)
class RegWrite(Action):
    """A host CPU store of ``value`` (``size`` bytes) to SMMU #smmu's registers at ``offset``."""

    KIND: ClassVar[str] = "reg-write"
    HEX: ClassVar[frozenset[str]] = frozenset({"offset", "value"})
    smmu: int = 0
    offset: int = 0
    size: int = 4
    value: int = 0

    def simpler(self) -> Iterator[Action]:
        for value in _fewer_bits(self.value):
            yield dataclasses.replace(self, value=value)


# -- memory the host owns -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemWrite(Action):
    """A host CPU store of ``value`` (``size`` bytes, little-endian; 1, 2, 4 and 8 are single
    stores, up to 64 one bulk write) at ``target``/``index`` + ``offset``."""

    KIND: ClassVar[str] = "mem-write"
    HEX: ClassVar[frozenset[str]] = frozenset({"offset", "value"})
    target: str = "raw"
    index: int = 0
    offset: int = 0
    size: int = 8
    value: int = 0

    def simpler(self) -> Iterator[Action]:
        for value in _fewer_bits(self.value):
            yield dataclasses.replace(self, value=value)


@dataclass(frozen=True)
class Command(Action):
    """The host driver issues ``command`` (a raw 128-bit queue entry) on SMMU #smmu's command
    queue, followed by a CMD_SYNC it waits for when ``sync``: written into its queue memory, then
    CMDQ_PROD, through the CPU port."""

    KIND: ClassVar[str] = "command"
    HEX: ClassVar[frozenset[str]] = frozenset({"command"})
    smmu: int = 0
    command: int = 0
    sync: bool = True

    def simpler(self) -> Iterator[Action]:
        if self.sync:
            yield dataclasses.replace(self, sync=False)


# -- hypercalls and ownership -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hypercall(Action):
    """``hvc(name, *args)``: any name (registered or not), any number of any register values."""

    KIND: ClassVar[str] = "hypercall"
    HEX: ClassVar[frozenset[str]] = frozenset({"args"})
    name: str = ""
    args: tuple[int, ...] = ()


@dataclass(frozen=True)
class Donate(Action):
    """Give the page at ``target``/``index`` + ``offset`` away or back (``DONATIONS``)."""

    KIND: ClassVar[str] = "donate"
    HEX: ClassVar[frozenset[str]] = frozenset({"offset"})
    how: str = "share-hyp"
    target: str = "buffer"
    index: int = 0
    offset: int = 0


# -- devices ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dma(Action):
    """A device behind SMMU #smmu issues a transaction with StreamID ``sid`` (the platform's device
    with that StreamID, or the scenario's generic endpoint for any other StreamID)."""

    KIND: ClassVar[str] = "dma"
    HEX: ClassVar[frozenset[str]] = frozenset({"sid", "ssid", "address"})
    smmu: int = 0
    sid: int = 0
    ssid: int | None = None
    address: int = 0
    size: int = 8
    write: bool = False
    mode: str = "untranslated"

    def simpler(self) -> Iterator[Action]:
        if self.ssid is not None:
            yield dataclasses.replace(self, ssid=None)
        if self.size > 8:
            yield dataclasses.replace(self, size=8)


# -- the host's driver operations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Attach(Action):
    """Attach the host's DMA device #device to a domain (``DOMAIN_KINDS``) through the IOMMU core."""

    KIND: ClassVar[str] = "attach"
    device: int = 0
    domain: str = "default"


@dataclass(frozen=True)
class DmaMap(Action):
    """``dma_map_single`` of ``size`` bytes at ``target``/``index`` + ``offset`` for device
    #device; the IOVA is kept as the adversary's next mapping."""

    KIND: ClassVar[str] = "dma-map"
    HEX: ClassVar[frozenset[str]] = frozenset({"offset", "size"})
    device: int = 0
    target: str = "buffer"
    index: int = 0
    offset: int = 0
    size: int = 4096
    direction: str = "bidirectional"


@dataclass(frozen=True)
class DmaUnmap(Action):
    """``dma_unmap_single`` of the adversary's mapping #slot (modulo the live ones)."""

    KIND: ClassVar[str] = "dma-unmap"
    slot: int = 0


@dataclass(frozen=True)
class IommuMap(Action):
    """``iommu_map`` into the domain device #device is attached to: ``[iova, iova + size)`` to
    ``target``/``index`` + ``offset`` with ``prot`` (IOMMU_READ=1, WRITE=2, CACHE=4...)."""

    KIND: ClassVar[str] = "iommu-map"
    HEX: ClassVar[frozenset[str]] = frozenset({"iova", "offset", "size"})
    device: int = 0
    iova: int = 0
    target: str = "buffer"
    index: int = 0
    offset: int = 0
    size: int = 4096
    prot: int = 3


@dataclass(frozen=True)
class IommuUnmap(Action):
    """``iommu_unmap`` of ``[iova, iova + size)`` from the domain device #device is attached to."""

    KIND: ClassVar[str] = "iommu-unmap"
    HEX: ClassVar[frozenset[str]] = frozenset({"iova", "size"})
    device: int = 0
    iova: int = 0
    size: int = 4096


@dataclass(frozen=True)
class Advance(Action):
    """Let ``ns`` nanoseconds of modeled time pass (at most 10 ms), then run the host's due timers."""

    KIND: ClassVar[str] = "advance"
    ns: int = 1000

    def simpler(self) -> Iterator[Action]:
        if self.ns > 1000:
            yield dataclasses.replace(self, ns=1000)


ACTIONS: dict[str, type[Action]] = {
    cls.KIND: cls
    for cls in (
        RegRead,
        RegWrite,
        MemWrite,
        Command,
        Hypercall,
        Donate,
        Dma,
        Attach,
        DmaMap,
        DmaUnmap,
        IommuMap,
        IommuUnmap,
        Advance,
    )
}

# -- JSON ---------------------------------------------------------------------------------------------------

_HINTS: dict[type[Action], dict[str, Any]] = {}


def _hints(cls: type[Action]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


def _int(value: object, field: str) -> int:
    if isinstance(value, bool):
        raise ActionFormatError(f"expected an integer, got {value!r}", field)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip().lower().replace("_", "")
        negative = text.startswith("-")
        digits = text[1:] if negative else text
        try:
            number = int(digits, 16) if digits.startswith("0x") else int(digits, 10)
        except ValueError:
            raise ActionFormatError(f"expected an integer, got {value!r}", field) from None
        return -number if negative else number
    raise ActionFormatError(f"expected an integer, got {type(value).__name__}", field)


def _convert(hint: Any, value: object, field: str) -> object:
    if hint is int:
        return _int(value, field)
    if hint is bool:
        if not isinstance(value, bool):
            raise ActionFormatError(f"expected true or false, got {value!r}", field)
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ActionFormatError(f"expected a string, got {value!r}", field)
        return value
    if hint == int | None:
        return None if value is None else _int(value, field)
    if hint == tuple[int, ...]:
        if not isinstance(value, list | tuple):
            raise ActionFormatError(f"expected a list of integers, got {value!r}", field)
        return tuple(_int(v, f"{field}[{i}]") for i, v in enumerate(value))
    raise ActionFormatError(f"unsupported field type {hint!r}", field)  # pragma: no cover


def action_from_json(data: object) -> Action:
    """The action ``data`` (a JSON object) describes; ``ActionFormatError`` if it is not one."""
    if not isinstance(data, Mapping):
        raise ActionFormatError(f"an action is a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    cls = ACTIONS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ActionFormatError(f"unknown action {kind!r} (known: {', '.join(ACTIONS)})", "kind")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names - {"kind"})
    if unknown:
        raise ActionFormatError(f"{kind} has no field {unknown[0]!r} (fields: {', '.join(sorted(names))})")
    values = {name: _convert(hints[name], data[name], name) for name in names if name in data}
    return cls(**values)


def actions_to_json(actions: typing.Iterable[Action]) -> list[dict[str, Any]]:
    return [action.to_json() for action in actions]


__all__ = [
    "ACCESS_SIZES",
    "ACTIONS",
    "DIRECTIONS",
    "DMA_MODES",
    "DOMAIN_KINDS",
    "DONATIONS",
    "TARGETS",
    "U64_MAX",
    "Action",
    "ActionFormatError",
    "Advance",
    "Attach",
    "Command",
    "Dma",
    "DmaMap",
    "DmaUnmap",
    "Donate",
    "Hypercall",
    "IommuMap",
    "IommuUnmap",
    "MemWrite",
    "RegRead",
    "RegWrite",
    "action_from_json",
    "actions_to_json",
]
