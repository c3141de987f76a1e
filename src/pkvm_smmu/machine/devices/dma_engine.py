"""A memory-to-memory DMA engine with an MMIO register interface, mastering through a ``DmaEndpoint``.

Register map (offsets from the region base; 32-bit registers, 64-bit ones as two 32-bit halves
or one aligned 64-bit access):

    0x00 ID        RO   0x444D4145 ("DMAE")
    0x08 SRC       RW   64-bit source IOVA (copy mode)
    0x10 DST       RW   64-bit destination IOVA
    0x18 LEN       RW   bytes to transfer (at most MAX_LEN)
    0x1C PATTERN   RW   32-bit fill pattern, repeated little-endian (fill mode)
    0x20 CTRL      RW   [0] START (write 1: doorbell; reads as 0), [2:1] MODE (0 copy, 1 fill,
                        others: error BAD_MODE), [3] IRQ_EN, [4] SSV, [5] PRIV
    0x24 SSID      RW   SubstreamID sent when CTRL.SSV (20 bits)
    0x28 STATUS    RW   [1:0] STATE (0 idle, 1 busy, 2 done, 3 error), [7:4] ERROR (ErrorCode),
                        [8] ERR_WRITE (the failing access was the write side), [23:16] ERR_EVENT
                        (event type of the SMMU's record for the abort, 0 if none: a model-only
                        diagnostic, real devices do not see SMMU events). Any write clears STATUS
                        to idle unless busy.
    0x30 ERR_ADDR  RO   64-bit IOVA of the access that failed
    0x38 DONE_LEN  RO   bytes completed by the last transfer

Timing: the doorbell latches CTRL, SRC, DST, LEN, PATTERN and SSID (later writes do not affect
the transfer). With no ``clock`` or ``latency_ns == 0`` the transfer runs synchronously inside the
doorbell write. Otherwise the doorbell sets STATE=busy and the whole transfer, its status and
its interrupt happen ``latency_ns + len * ns_per_byte`` of modeled time later (a clock timer), so
software must poll STATUS or wait for the IRQ. A doorbell while busy is ignored.

The transfer moves data in chunks of at most CHUNK bytes that never cross a 4 KiB boundary on
either side (copy: read a chunk, then write it), so a fault part-way leaves the earlier chunks
done, as on a real engine; DONE_LEN says how far it got.

Never raises for any register value: unknown offsets and sizes other than aligned 4/8-byte
accesses are RAZ/WI; LEN above MAX_LEN and ranges that wrap past 2^64 are reported as errors.
"""

from __future__ import annotations

from enum import IntEnum

from pkvm_smmu.arch.events import event_type
from pkvm_smmu.machine.bus import ExternalAbort, Initiator
from pkvm_smmu.machine.clock import Clock, _Timer
from pkvm_smmu.machine.devices.endpoint import DmaEndpoint, DmaResult
from pkvm_smmu.machine.irq import InterruptController

DMA_ENGINE_ID = 0x444D_4145
MAX_LEN = 1 << 20
CHUNK = 4096
_PAGE = 4096
_MASK32 = 0xFFFF_FFFF
_MASK64 = (1 << 64) - 1


class DmaReg(IntEnum):
    ID = 0x00
    SRC = 0x08
    DST = 0x10
    LEN = 0x18
    PATTERN = 0x1C
    CTRL = 0x20
    SSID = 0x24
    STATUS = 0x28
    ERR_ADDR = 0x30
    DONE_LEN = 0x38


class DmaState(IntEnum):
    IDLE = 0
    BUSY = 1
    DONE = 2
    ERROR = 3


class DmaMode(IntEnum):
    COPY = 0
    FILL = 1


class ErrorCode(IntEnum):
    NONE = 0
    READ_ABORT = 1  # a read was aborted (the SMMU or the memory system)
    WRITE_ABORT = 2
    BAD_LENGTH = 3  # LEN > MAX_LEN
    BAD_ADDRESS = 4  # SRC/DST + LEN beyond 2^64
    BAD_MODE = 5


CTRL_START = 1 << 0
CTRL_MODE_SHIFT = 1
CTRL_MODE_MASK = 0b11 << CTRL_MODE_SHIFT
CTRL_IRQ_EN = 1 << 3
CTRL_SSV = 1 << 4
CTRL_PRIV = 1 << 5
_CTRL_RW = CTRL_MODE_MASK | CTRL_IRQ_EN | CTRL_SSV | CTRL_PRIV

STATUS_STATE_MASK = 0b11
STATUS_ERROR_SHIFT = 4
STATUS_ERR_WRITE = 1 << 8
STATUS_EVENT_SHIFT = 16

_REG64 = frozenset({DmaReg.SRC, DmaReg.DST, DmaReg.ERR_ADDR, DmaReg.DONE_LEN})
_REG_AT: dict[int, tuple[DmaReg, int]] = {}
for _reg in DmaReg:
    _REG_AT[int(_reg)] = (_reg, 0)
    if _reg in _REG64:
        _REG_AT[int(_reg) + 4] = (_reg, 1)

MMIO_SIZE = 0x1000


def ctrl_value(
    mode: DmaMode = DmaMode.COPY,
    *,
    start: bool = True,
    irq: bool = False,
    ssv: bool = False,
    privileged: bool = False,
) -> int:
    """A CTRL value (a convenience for drivers and tests)."""
    return (
        (CTRL_START if start else 0)
        | (int(mode) << CTRL_MODE_SHIFT)
        | (CTRL_IRQ_EN if irq else 0)
        | (CTRL_SSV if ssv else 0)
        | (CTRL_PRIV if privileged else 0)
    )


def status_fields(status: int) -> tuple[DmaState, ErrorCode | int, bool, int]:
    """(state, error, error on the write side, SMMU event type) from a STATUS value."""
    error = (status >> STATUS_ERROR_SHIFT) & 0xF
    try:
        code: ErrorCode | int = ErrorCode(error)
    except ValueError:
        code = error
    return (
        DmaState(status & STATUS_STATE_MASK),
        code,
        bool(status & STATUS_ERR_WRITE),
        (status >> STATUS_EVENT_SHIFT) & 0xFF,
    )


class DmaEngine:
    """An MMIO-programmed copy/fill engine. Map it with ``bus.add_mmio(base, MMIO_SIZE, engine, name)``."""

    def __init__(
        self,
        name: str,
        endpoint: DmaEndpoint,
        *,
        irq: InterruptController | None = None,
        irq_line: str | None = None,
        clock: Clock | None = None,
        latency_ns: int = 0,
        ns_per_byte: int = 0,
    ) -> None:
        if latency_ns < 0 or ns_per_byte < 0:
            raise ValueError("latency_ns and ns_per_byte must not be negative")
        self.name = name
        self.endpoint = endpoint
        self.irq = irq
        self.irq_line = irq_line if irq_line is not None else f"{name}.done"
        self.clock = clock
        self.latency_ns = latency_ns
        self.ns_per_byte = ns_per_byte
        self._regs: dict[DmaReg, int] = dict.fromkeys(DmaReg, 0)
        self._regs[DmaReg.ID] = DMA_ENGINE_ID
        self._timer: _Timer | None = None
        self.last_result: DmaResult | None = None  # the failing DMA of the last transfer, if any
        self.transfers = 0

    # -- MmioDevice -----------------------------------------------------------------------------
    def _locate(self, offset: int, size: int) -> tuple[DmaReg, int] | None:
        if size == 4 and offset % 4 == 0:
            return _REG_AT.get(offset)
        if size == 8 and offset % 8 == 0:
            found = _REG_AT.get(offset)
            if found is not None and found[0] in _REG64 and found[1] == 0:
                return found
        return None

    def mmio_read(self, offset: int, size: int, initiator: Initiator) -> int | ExternalAbort:
        found = self._locate(offset, size)
        if found is None:
            return 0
        reg, half = found
        value = self._regs[reg]
        if reg is DmaReg.CTRL:
            value &= ~CTRL_START
        if size == 8:
            return value & _MASK64
        return (value >> (32 * half)) & _MASK32

    def mmio_write(self, offset: int, size: int, value: int, initiator: Initiator) -> ExternalAbort | None:
        found = self._locate(offset, size)
        if found is None:
            return None
        reg, half = found
        value &= _MASK64 if size == 8 else _MASK32
        if reg in (DmaReg.SRC, DmaReg.DST):
            if size == 8:
                self._regs[reg] = value
            else:
                shift = 32 * half
                self._regs[reg] = (self._regs[reg] & ~(_MASK32 << shift)) | (value << shift)
        elif reg in (DmaReg.LEN, DmaReg.PATTERN):
            self._regs[reg] = value
        elif reg is DmaReg.SSID:
            self._regs[reg] = value & 0xF_FFFF
        elif reg is DmaReg.CTRL:
            self._regs[reg] = value & _CTRL_RW
            if value & CTRL_START:
                self._doorbell()
        elif reg is DmaReg.STATUS and self.state is not DmaState.BUSY:
            self._regs[DmaReg.STATUS] = 0
        # ID, ERR_ADDR, DONE_LEN are read-only
        return None

    # -- state ----------------------------------------------------------------------------------
    @property
    def state(self) -> DmaState:
        return DmaState(self._regs[DmaReg.STATUS] & STATUS_STATE_MASK)

    @property
    def status(self) -> int:
        return self._regs[DmaReg.STATUS]

    def register(self, reg: DmaReg) -> int:
        return self._regs[reg]

    def _doorbell(self) -> None:
        if self.state is DmaState.BUSY:
            return  # ignored while a transfer is in flight
        self._regs[DmaReg.STATUS] = DmaState.BUSY
        self._regs[DmaReg.DONE_LEN] = 0
        self._regs[DmaReg.ERR_ADDR] = 0
        self.last_result = None
        regs = self._regs
        # The transfer's parameters are latched now: later register writes do not affect it.
        job = (regs[DmaReg.CTRL], regs[DmaReg.SRC], regs[DmaReg.DST], regs[DmaReg.LEN], regs[DmaReg.PATTERN],
               regs[DmaReg.SSID])  # fmt: skip
        delay = self.latency_ns + min(job[3], MAX_LEN) * self.ns_per_byte
        if self.clock is None or delay == 0:
            self._run(job)
        else:
            self._timer = self.clock.call_after(delay, lambda: self._run(job))

    def _finish(
        self, error: ErrorCode, irq: bool, *, address: int = 0, write_side: bool = False,
        result: DmaResult | None = None,
    ) -> None:  # fmt: skip
        status = int(DmaState.DONE if error is ErrorCode.NONE else DmaState.ERROR)
        if error is not ErrorCode.NONE:
            status |= int(error) << STATUS_ERROR_SHIFT
            if write_side:
                status |= STATUS_ERR_WRITE
            if result is not None and result.event is not None:
                status |= event_type(result.event) << STATUS_EVENT_SHIFT
            self._regs[DmaReg.ERR_ADDR] = address & _MASK64
        self.last_result = result
        self._regs[DmaReg.STATUS] = status
        self.transfers += 1
        if self.irq is not None and irq:
            self.irq.pulse(self.irq_line)

    def _run(self, job: tuple[int, int, int, int, int, int]) -> None:
        self._timer = None
        regs = self._regs
        ctrl, src, dst, length, pattern_value, ssid_value = job
        mode = (ctrl & CTRL_MODE_MASK) >> CTRL_MODE_SHIFT
        irq = bool(ctrl & CTRL_IRQ_EN)
        if mode not in (DmaMode.COPY, DmaMode.FILL):
            self._finish(ErrorCode.BAD_MODE, irq)
            return
        if length > MAX_LEN:
            self._finish(ErrorCode.BAD_LENGTH, irq)
            return
        if dst + length > 1 << 64 or (mode == DmaMode.COPY and src + length > 1 << 64):
            self._finish(ErrorCode.BAD_ADDRESS, irq, address=dst if dst + length > 1 << 64 else src)
            return
        ssid = ssid_value if ctrl & CTRL_SSV else None
        privileged = bool(ctrl & CTRL_PRIV)
        pattern = pattern_value.to_bytes(4, "little")
        done = 0
        endpoint = self.endpoint
        while done < length:
            s, d = src + done, dst + done
            chunk = min(CHUNK, length - done, _PAGE - (d % _PAGE))
            if mode == DmaMode.COPY:
                chunk = min(chunk, _PAGE - (s % _PAGE))
                got = endpoint.read(s, chunk, ssid=ssid, privileged=privileged)
                if not got.ok:
                    self._finish(ErrorCode.READ_ABORT, irq, address=s, result=got)
                    return
                data = got.data
            else:
                phase = done % 4
                data = (pattern * (chunk // 4 + 2))[phase : phase + chunk]
            put = endpoint.write(d, data, ssid=ssid, privileged=privileged)
            if not put.ok:
                self._finish(ErrorCode.WRITE_ABORT, irq, address=d, write_side=True, result=put)
                return
            done += chunk
            regs[DmaReg.DONE_LEN] = done
        self._finish(ErrorCode.NONE, irq)

    def reset(self) -> None:
        """Back to the reset state; a pending transfer is cancelled."""
        if self._timer is not None:
            Clock.cancel(self._timer)
            self._timer = None
        self._regs = dict.fromkeys(DmaReg, 0)
        self._regs[DmaReg.ID] = DMA_ENGINE_ID
        self.last_result = None

    def __repr__(self) -> str:
        return f"DmaEngine({self.name} {self.state.name.lower()})"
