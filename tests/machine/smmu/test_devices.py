"""DMA devices: the DmaEngine's register interface driven over the bus, copies and fills through a
stage-1 translation, completion status and interrupts, aborts reported in STATUS, and register
values that must never make the model raise; DmaEndpoint basics."""

from __future__ import annotations

import os
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from pkvm_smmu.arch.events import EventType
from pkvm_smmu.machine.bus import HOST_CPU, ExternalAbort
from pkvm_smmu.machine.devices import (
    DMA_ENGINE_ID,
    MAX_LEN,
    MMIO_SIZE,
    DmaEndpoint,
    DmaEngine,
    DmaFailure,
    DmaMode,
    DmaReg,
    DmaState,
    ErrorCode,
    ctrl_value,
    status_fields,
)
from pkvm_smmu.pgtable import IoPageTable, Prot

sys.path.insert(0, os.path.dirname(__file__))
from harness import RW, SmmuHarness, harness, map_pages

K4 = 4096
ENGINE_BASE = 0x0A00_0000
SID = 0x30
SRC_VA = 0x10_0000_0000
DST_VA = 0x20_0000_0000


class Rig:
    """A DMA engine behind the SMMU with SRC_VA (readable) and DST_VA (writable) mapped at stage 1."""

    def __init__(self, pages: int = 4, *, latency_ns: int = 0, dst_prot: int = RW) -> None:
        h = harness()
        self.h = h
        self.pt: IoPageTable = h.s1_table()
        self.src = h.buffer(pages * K4)
        self.dst = h.buffer(pages * K4)
        map_pages(self.pt, SRC_VA, self.src, pages * K4, Prot.READ)
        map_pages(self.pt, DST_VA, self.dst, pages * K4, dst_prot)
        cds = h.cd_table()
        h.write_cd(cds, 0, h.cd(self.pt, asid=3))
        h.write_ste(SID, h.ste_s1(cds))
        self.endpoint = DmaEndpoint("dma0", h.smmu, SID)
        self.irq = h.machine.irq
        self.engine = DmaEngine(
            "dma0",
            self.endpoint,
            irq=self.irq,
            clock=h.clock,
            latency_ns=latency_ns,
            ns_per_byte=1 if latency_ns else 0,
        )
        h.bus.add_mmio(ENGINE_BASE, MMIO_SIZE, self.engine, "dma0")

    def write(self, reg: DmaReg, value: int, size: int = 4) -> None:
        assert self.h.bus.write(HOST_CPU, ENGINE_BASE + int(reg), size, value) is None

    def read(self, reg: DmaReg, size: int = 4) -> int:
        value = self.h.bus.read(HOST_CPU, ENGINE_BASE + int(reg), size)
        assert not isinstance(value, ExternalAbort)
        return value

    def start(
        self, src: int, dst: int, length: int, mode: DmaMode = DmaMode.COPY, *, irq: bool = True
    ) -> None:
        self.write(DmaReg.SRC, src, 8)
        self.write(DmaReg.DST, dst & 0xFFFF_FFFF)  # 64-bit registers also take two 32-bit halves
        self.write(DmaReg.DST + 4, dst >> 32)  # type: ignore[operator]
        self.write(DmaReg.LEN, length)
        self.write(DmaReg.CTRL, ctrl_value(mode, irq=irq))


def _pattern(n: int) -> bytes:
    return bytes((i * 13 + 5) & 0xFF for i in range(n))


def test_id_and_reset_state() -> None:
    rig = Rig()
    assert rig.read(DmaReg.ID) == DMA_ENGINE_ID
    assert status_fields(rig.read(DmaReg.STATUS))[0] is DmaState.IDLE
    assert rig.read(DmaReg.SRC, 8) == 0 and rig.read(DmaReg.LEN) == 0


def test_copy_through_stage1() -> None:
    rig = Rig()
    data = _pattern(3 * K4 - 100)
    rig.h.write_mem(rig.src + 50, data)
    rig.start(SRC_VA + 50, DST_VA + 30, len(data))
    state, error, _, _ = status_fields(rig.read(DmaReg.STATUS))
    assert state is DmaState.DONE and error is ErrorCode.NONE
    assert rig.h.read_mem(rig.dst + 30, len(data)) == data
    assert rig.h.read_mem(rig.dst, 30) == bytes(30)  # nothing outside the destination range
    assert rig.h.read_mem(rig.dst + 30 + len(data), 16) == bytes(16)
    assert rig.read(DmaReg.DONE_LEN, 8) == len(data)
    assert rig.irq.count("dma0.done") == 1
    assert rig.h.decoded_events() == []


def test_fill_pattern() -> None:
    rig = Rig()
    rig.write(DmaReg.PATTERN, 0xA1B2C3D4)
    rig.start(0, DST_VA + 6, 4097, DmaMode.FILL)
    assert status_fields(rig.read(DmaReg.STATUS))[0] is DmaState.DONE
    expected = (bytes.fromhex("d4c3b2a1") * 1100)[:4097]
    assert rig.h.read_mem(rig.dst + 6, 4097) == expected


def test_no_irq_when_disabled() -> None:
    rig = Rig()
    rig.start(SRC_VA, DST_VA, 16, irq=False)
    assert status_fields(rig.read(DmaReg.STATUS))[0] is DmaState.DONE
    assert rig.irq.count("dma0.done") == 0


def test_read_abort_reported_in_status() -> None:
    rig = Rig(pages=1)
    rig.h.write_mem(rig.src, _pattern(K4))
    # The source runs past its single mapped page: the second page faults.
    rig.start(SRC_VA + K4 - 64, DST_VA, 256)
    state, error, write_side, event = status_fields(rig.read(DmaReg.STATUS))
    assert state is DmaState.ERROR and error is ErrorCode.READ_ABORT and not write_side
    assert event == EventType.F_TRANSLATION
    assert rig.read(DmaReg.ERR_ADDR, 8) == SRC_VA + K4
    assert rig.read(DmaReg.DONE_LEN, 8) == 64  # the first chunk was copied
    assert rig.h.read_mem(rig.dst, 64) == _pattern(K4)[K4 - 64 :]
    assert rig.irq.count("dma0.done") == 1  # completion is signalled for errors too
    etype, f = rig.h.one_event()
    assert etype is EventType.F_TRANSLATION and f["INPUTADDR"] == SRC_VA + K4 and f["RNW"] == 1


def test_write_to_read_only_destination() -> None:
    rig = Rig(dst_prot=Prot.READ)
    rig.start(SRC_VA, DST_VA, 32)
    state, error, write_side, event = status_fields(rig.read(DmaReg.STATUS))
    assert state is DmaState.ERROR and error is ErrorCode.WRITE_ABORT and write_side
    assert event == EventType.F_PERMISSION
    assert rig.engine.last_result is not None and rig.engine.last_result.failure is DmaFailure.ABORT
    assert rig.h.read_mem(rig.dst, 32) == bytes(32)


def test_status_write_clears_to_idle() -> None:
    rig = Rig()
    rig.start(SRC_VA, DST_VA, 8)
    rig.write(DmaReg.STATUS, 0)
    assert rig.read(DmaReg.STATUS) == 0


def test_delayed_completion_on_the_clock() -> None:
    rig = Rig(latency_ns=1000)
    rig.h.write_mem(rig.src, b"later!")
    rig.start(SRC_VA, DST_VA, 6)
    assert status_fields(rig.read(DmaReg.STATUS))[0] is DmaState.BUSY
    assert rig.h.read_mem(rig.dst, 6) == bytes(6)  # nothing has moved yet
    rig.start(SRC_VA, DST_VA + 100, 6)  # a doorbell while busy is ignored
    assert rig.h.clock.poll(lambda: status_fields(rig.read(DmaReg.STATUS))[0] is DmaState.DONE, 10.0)
    assert rig.h.read_mem(rig.dst, 6) == b"later!"
    assert rig.h.read_mem(rig.dst + 100, 6) == bytes(6)
    assert rig.irq.count("dma0.done") == 1


def test_bad_length_and_mode() -> None:
    rig = Rig()
    rig.start(SRC_VA, DST_VA, MAX_LEN + 1)
    assert status_fields(rig.read(DmaReg.STATUS))[:2] == (DmaState.ERROR, ErrorCode.BAD_LENGTH)
    rig.write(DmaReg.CTRL, 0b111)  # START with MODE = 3
    assert status_fields(rig.read(DmaReg.STATUS))[:2] == (DmaState.ERROR, ErrorCode.BAD_MODE)
    rig.start((1 << 64) - 8, DST_VA, 16)
    assert status_fields(rig.read(DmaReg.STATUS))[:2] == (DmaState.ERROR, ErrorCode.BAD_ADDRESS)


def test_zero_length_completes() -> None:
    rig = Rig()
    rig.start(SRC_VA, DST_VA, 0)
    assert status_fields(rig.read(DmaReg.STATUS))[0] is DmaState.DONE
    assert rig.read(DmaReg.DONE_LEN, 8) == 0


def test_unknown_offsets_are_raz_wi() -> None:
    rig = Rig()
    for offset in (0x04, 0x40, 0x800, 0xFFC):
        assert rig.h.bus.write(HOST_CPU, ENGINE_BASE + offset, 4, 0xFFFF_FFFF) is None
        assert rig.h.bus.read(HOST_CPU, ENGINE_BASE + offset, 4) == 0
    # Byte and halfword accesses are RAZ/WI too.
    assert rig.h.bus.write(HOST_CPU, ENGINE_BASE + DmaReg.LEN, 1, 0xFF) is None
    assert rig.read(DmaReg.LEN) == 0
    # Read-only registers ignore writes.
    rig.write(DmaReg.ID, 0)
    rig.write(DmaReg.DONE_LEN, 5)
    assert rig.read(DmaReg.ID) == DMA_ENGINE_ID and rig.read(DmaReg.DONE_LEN) == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, MMIO_SIZE - 1),
            st.sampled_from([1, 2, 4, 8]),
            st.integers(0, (1 << 64) - 1),
            st.booleans(),
        ),
        max_size=30,
    )
)
def test_any_register_values_never_raise(accesses: list[tuple[int, int, int, bool]]) -> None:
    rig = Rig(pages=1)
    for offset, size, value, is_write in accesses:
        offset &= ~(size - 1)
        if is_write:
            assert (
                rig.h.bus.write(HOST_CPU, ENGINE_BASE + offset, size, value & ((1 << (8 * size)) - 1)) is None
            )
        else:
            got = rig.h.bus.read(HOST_CPU, ENGINE_BASE + offset, size)
            assert isinstance(got, int) and 0 <= got < 1 << (8 * size)
    state = status_fields(rig.engine.status)[0]
    assert state in tuple(DmaState)


# ---- DmaEndpoint -------------------------------------------------------------------------------------


def test_endpoint_reports_the_smmu_event() -> None:
    h = harness()
    ep = DmaEndpoint("dev", h.smmu, 0x31)
    h.write_ste(0x31, h.ste_abort() & ~1)  # V = 0
    result = ep.write(0x1000, b"x")
    assert not result.ok and result.failure is DmaFailure.ABORT and result.event is not None
    from pkvm_smmu.arch.events import decode_event

    assert decode_event(result.event)[0] is EventType.C_BAD_STE


def test_endpoint_rejects_impossible_requests_without_raising() -> None:
    h = harness()
    ep = DmaEndpoint("dev", h.smmu, 1)
    assert ep.read((1 << 64) - 4, 8).failure is DmaFailure.BAD_REQUEST
    assert ep.read(0, -1).failure is DmaFailure.BAD_REQUEST
    assert ep.ats_read(0, 4).failure is DmaFailure.NOT_ATS_CAPABLE


def test_endpoint_without_ats_does_not_register() -> None:
    h = harness()
    DmaEndpoint("plain", h.smmu, 2)
    ats = DmaEndpoint("ats", h.smmu, 3, ats_capable=True)
    assert 2 not in h.smmu.ats_endpoints and h.smmu.ats_endpoints[3] is ats


def test_endpoint_atc_invalidate_protocol() -> None:
    h: SmmuHarness = harness()
    ep = DmaEndpoint("ats", h.smmu, 4, ats_capable=True)
    ep._atc[(None, 1)] = ep._atc[(7, 1)] = ep._atc[(7, 3)] = None  # type: ignore[assignment]
    assert ep.atc_invalidate(7, 0x3000, 0x1000) is True
    assert sorted(ep.atc_entries, key=str) == sorted([(None, 1), (7, 1)], key=str)
    assert ep.atc_invalidate(None, 0, 1 << 64)
    assert ep.atc_entries == {}
