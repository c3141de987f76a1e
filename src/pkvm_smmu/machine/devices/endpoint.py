"""A DMA-capable endpoint: issues reads and writes upstream through an SMMU, optionally with PCIe ATS.

The endpoint holds no translation logic of its own. Untranslated traffic is presented to the
SMMU's upstream interface (``dma_read`` / ``dma_write``) exactly as given. An ATS-capable endpoint
also keeps an Address Translation Cache (ATC): a Translation Request (``ats_translate``) asks the
SMMU for the translation of one page and caches the completion; a DMA through ``ats_read`` /
``ats_write`` then sends ATS *Translated* transactions carrying the cached output address, asking
first on an ATC miss. The SMMU's command executor reaches the ATC through ``atc_invalidate`` for
CMD_ATC_INV (the endpoint registers itself in ``smmu.ats_endpoints``).

Model choices (PCIe leaves them to the device):
- ATC entries are 4 KiB, keyed by (SubstreamID or None, page). Only completions that grant at
  least read or write permission are cached; an R == W == 0 completion is returned but not kept.
- A cached entry lacking the permission an access needs (a write to a read-only entry) triggers a
  fresh Translation Request for that page; if the new completion still lacks it, the access is
  not sent and the DMA fails with ``DmaFailure.ATS_DENIED``.
- An invalidation without a SubstreamID drops matching entries of every PASID (a PCIe Invalidate
  Request without a PASID prefix covers the whole address range), with one it drops only that
  PASID's entries.

``issue_translated`` is the malicious-device knob: it sends a Translated transaction with any
address, bypassing the ATC, which is what a non-compliant or hostile ATS device can do.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from pkvm_smmu.machine.smmu.translate import AtsResponse, AtsStatus
from pkvm_smmu.machine.smmu.types import Outcome, Transaction, TranslationResult

if TYPE_CHECKING:
    from pkvm_smmu.machine.smmu.device import SmmuV3

ATC_PAGE_SHIFT = 12
ATC_PAGE_SIZE = 1 << ATC_PAGE_SHIFT
_ATC_PAGE_MASK = ATC_PAGE_SIZE - 1
_ADDRESS_LIMIT = 1 << 64


class DmaFailure(Enum):
    """Why a DMA did not complete."""

    ABORT = "abort"  # the SMMU (or the memory system behind it) aborted the transaction
    ATS_UNSUPPORTED = "ats-ur"  # Translation Request completed with Unsupported Request
    ATS_ABORT = "ats-ca"  # Translation Request completed with Completer Abort
    ATS_DENIED = "ats-denied"  # the translation grants no permission for the access
    NOT_ATS_CAPABLE = "not-ats-capable"  # an ATS operation on an endpoint without ATS
    BAD_REQUEST = "bad-request"  # negative size or an address range beyond 64 bits


@dataclass(frozen=True, slots=True)
class DmaResult:
    """The outcome of one DMA as the device sees it.

    ``ok``: every byte was transferred (RAZ/WI termination also looks like success to a device:
    reads return zeros and writes vanish). ``data``: the bytes read (empty for writes and failed
    reads). ``event``: the SMMU's event record for the failing transaction, when the SMMU made
    one (a read that the SMMU terminated with RAZ/WI carries none: the upstream read interface
    returns only the zeros). ``address``: the address of the failing part (device-side).
    """

    ok: bool
    data: bytes = b""
    event: int | None = None
    failure: DmaFailure | None = None
    address: int = 0
    outcome: Outcome = Outcome.OK

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True, slots=True)
class AtcEntry:
    """One cached Translation Completion for a 4 KiB page."""

    output_page: int  # output address of the page (PA, or IPA with split-stage ATS)
    readable: bool
    writable: bool


class DmaEndpoint:
    """A device that masters DMA through ``smmu`` with StreamID ``stream_id``."""

    def __init__(
        self,
        name: str,
        smmu: SmmuV3,
        stream_id: int,
        *,
        ats_capable: bool = False,
        bus_initiator_name: str | None = None,
    ) -> None:
        self.name = name
        self.smmu = smmu
        self.stream_id = stream_id
        self.ats_capable = ats_capable
        self.bus_initiator_name = bus_initiator_name if bus_initiator_name is not None else name
        self._atc: dict[tuple[int | None, int], AtcEntry] = {}
        self.translation_requests = 0  # Translation Requests sent (for tests and reports)
        self.invalidations = 0  # ATS Invalidate Requests received
        if ats_capable:
            smmu.ats_endpoints[stream_id] = self

    # -- untranslated DMA ------------------------------------------------------------------------
    def _transaction(
        self, address: int, size: int, is_write: bool, ssid: int | None, privileged: bool, instruction: bool,
        ats_translated: bool = False,
    ) -> Transaction:  # fmt: skip
        instruction = instruction and not is_write  # writes are always data
        sid = self.stream_id
        return Transaction(sid, address, size, is_write, ssid, privileged, instruction, ats_translated)

    def read(
        self, address: int, size: int, *, ssid: int | None = None, privileged: bool = False,
        instruction: bool = False,
    ) -> DmaResult:  # fmt: skip
        """An untranslated read of ``size`` bytes at ``address`` (an IOVA)."""
        bad = _check_range(address, size)
        if bad is not None:
            return bad
        txn = self._transaction(address, size, False, ssid, privileged, instruction)
        return _read_result(self.smmu.dma_read(txn), address)

    def write(
        self, address: int, data: bytes, *, ssid: int | None = None, privileged: bool = False
    ) -> DmaResult:
        """An untranslated write of ``data`` at ``address`` (an IOVA)."""
        data = bytes(data)
        bad = _check_range(address, len(data))
        if bad is not None:
            return bad
        txn = self._transaction(address, len(data), True, ssid, privileged, False)
        return _write_result(self.smmu.dma_write(txn, data), address)

    # -- ATS -------------------------------------------------------------------------------------
    def atc_lookup(self, address: int, ssid: int | None = None) -> AtcEntry | None:
        return self._atc.get((ssid, address >> ATC_PAGE_SHIFT))

    @property
    def atc_entries(self) -> dict[tuple[int | None, int], AtcEntry]:
        """A copy of the ATC: (SubstreamID, page number) -> entry."""
        return dict(self._atc)

    def ats_translate(
        self, address: int, ssid: int | None = None, write: bool = False, *, privileged: bool = False
    ) -> AtsResponse:
        """Send a Translation Request for the page holding ``address`` and cache a granting answer."""
        if not self.ats_capable:
            return AtsResponse(AtsStatus.UNSUPPORTED_REQUEST)
        page = (address & (_ADDRESS_LIMIT - 1)) >> ATC_PAGE_SHIFT
        self.translation_requests += 1
        response = self.smmu.ats_request(self.stream_id, ssid, page << ATC_PAGE_SHIFT, write, privileged)
        key = (ssid, page)
        if response.status is AtsStatus.SUCCESS and (response.readable or response.writable):
            output_page = response.output_address & ~_ATC_PAGE_MASK
            self._atc[key] = AtcEntry(output_page, response.readable, response.writable)
        else:
            self._atc.pop(key, None)
        return response

    def _translated_page(
        self, address: int, ssid: int | None, is_write: bool, privileged: bool
    ) -> AtcEntry | DmaResult:
        """The ATC entry for ``address`` permitting the access, requesting one if needed."""
        entry = self._atc.get((ssid, address >> ATC_PAGE_SHIFT))
        if entry is not None and (entry.writable if is_write else entry.readable):
            return entry
        response = self.ats_translate(address, ssid, is_write, privileged=privileged)
        if response.status is AtsStatus.UNSUPPORTED_REQUEST:
            return _failed(DmaFailure.ATS_UNSUPPORTED, address)
        if response.status is AtsStatus.COMPLETER_ABORT:
            return _failed(DmaFailure.ATS_ABORT, address)
        entry = self._atc.get((ssid, address >> ATC_PAGE_SHIFT))
        if entry is None or not (entry.writable if is_write else entry.readable):
            return _failed(DmaFailure.ATS_DENIED, address)
        return entry

    def ats_read(
        self, address: int, size: int, *, ssid: int | None = None, privileged: bool = False
    ) -> DmaResult:
        """A read through the ATC: Translated reads of the cached output addresses, page by page."""
        if not self.ats_capable:
            return _failed(DmaFailure.NOT_ATS_CAPABLE, address)
        bad = _check_range(address, size)
        if bad is not None:
            return bad
        out = bytearray()
        for part_address, part_size in _pages(address, size):
            entry = self._translated_page(part_address, ssid, False, privileged)
            if isinstance(entry, DmaResult):
                return entry
            pa = entry.output_page | (part_address & _ATC_PAGE_MASK)
            txn = self._transaction(pa, part_size, False, ssid, privileged, False, ats_translated=True)
            result = _read_result(self.smmu.dma_read(txn), part_address)
            if not result.ok:
                return result
            out += result.data
        return DmaResult(True, bytes(out))

    def ats_write(
        self, address: int, data: bytes, *, ssid: int | None = None, privileged: bool = False
    ) -> DmaResult:
        """A write through the ATC: Translated writes to the cached output addresses, page by page."""
        if not self.ats_capable:
            return _failed(DmaFailure.NOT_ATS_CAPABLE, address)
        data = bytes(data)
        bad = _check_range(address, len(data))
        if bad is not None:
            return bad
        done = 0
        for part_address, part_size in _pages(address, len(data)):
            entry = self._translated_page(part_address, ssid, True, privileged)
            if isinstance(entry, DmaResult):
                return entry
            pa = entry.output_page | (part_address & _ATC_PAGE_MASK)
            txn = self._transaction(pa, part_size, True, ssid, privileged, False, ats_translated=True)
            result = _write_result(self.smmu.dma_write(txn, data[done : done + part_size]), part_address)
            if not result.ok:
                return result
            done += part_size
        return DmaResult(True)

    def issue_translated(
        self, pa: int, size: int = 8, *, data: bytes | None = None, ssid: int | None = None,
        privileged: bool = False,
    ) -> DmaResult:  # fmt: skip
        """Send a Translated transaction to ``pa`` whatever the ATC holds: a read of ``size`` bytes,
        or a write of ``data`` when given. This is the attack that ATS makes possible."""
        if data is not None:
            data = bytes(data)
            bad = _check_range(pa, len(data))
            if bad is not None:
                return bad
            txn = self._transaction(pa, len(data), True, ssid, privileged, False, ats_translated=True)
            return _write_result(self.smmu.dma_write(txn, data), pa)
        bad = _check_range(pa, size)
        if bad is not None:
            return bad
        txn = self._transaction(pa, size, False, ssid, privileged, False, ats_translated=True)
        return _read_result(self.smmu.dma_read(txn), pa)

    # -- AtcClient -------------------------------------------------------------------------------
    def atc_invalidate(self, ssid: int | None, address: int, size: int) -> bool:
        """An ATS Invalidate Request: drop cached pages overlapping [address, address + size)."""
        self.invalidations += 1
        if size <= 0:
            return True
        first = max(address, 0) >> ATC_PAGE_SHIFT
        last = (min(address + size, _ADDRESS_LIMIT) - 1) >> ATC_PAGE_SHIFT
        doomed = [key for key in self._atc if first <= key[1] <= last and (ssid is None or key[0] == ssid)]
        for key in doomed:
            del self._atc[key]
        return True

    def atc_flush(self) -> None:
        """Drop every entry (the device was reset, or ATS was disabled in its capability)."""
        self._atc.clear()

    def __repr__(self) -> str:
        ats = " ats" if self.ats_capable else ""
        return f"DmaEndpoint({self.name} sid={self.stream_id:#x}{ats})"


def _failed(failure: DmaFailure, address: int) -> DmaResult:
    return DmaResult(False, failure=failure, address=address, outcome=Outcome.ABORT)


def _check_range(address: int, size: int) -> DmaResult | None:
    if size < 0 or address < 0 or address + size > _ADDRESS_LIMIT:
        return _failed(DmaFailure.BAD_REQUEST, address)
    return None


def _pages(address: int, size: int) -> list[tuple[int, int]]:
    parts = []
    while size > 0:
        chunk = min(size, ATC_PAGE_SIZE - (address & _ATC_PAGE_MASK))
        parts.append((address, chunk))
        address += chunk
        size -= chunk
    return parts


def _read_result(result: bytes | TranslationResult, address: int) -> DmaResult:
    if isinstance(result, TranslationResult):
        if result.outcome is Outcome.ABORT:
            return DmaResult(
                False, event=result.event, failure=DmaFailure.ABORT, address=address, outcome=Outcome.ABORT
            )
        return DmaResult(True, event=result.event, outcome=result.outcome)
    return DmaResult(True, bytes(result))


def _write_result(result: TranslationResult, address: int) -> DmaResult:
    if result.outcome is Outcome.ABORT:
        return DmaResult(
            False, event=result.event, failure=DmaFailure.ABORT, address=address, outcome=Outcome.ABORT
        )
    return DmaResult(True, event=result.event, outcome=result.outcome)
