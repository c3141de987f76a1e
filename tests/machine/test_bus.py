"""SystemBus: the address map, RAM and MMIO routing, aborts as results, and observers."""

from __future__ import annotations

import pytest

from pkvm_smmu.machine.bus import (
    HOST_CPU,
    HYP_CPU,
    Access,
    ExternalAbort,
    Initiator,
    InitiatorKind,
    RegionKind,
    SystemBus,
)

RAM_BASE, RAM_SIZE = 0x4000_0000, 0x10_0000
MMIO_BASE, MMIO_SIZE = 0x0900_0000, 0x2_0000
DMA0 = Initiator(InitiatorKind.DEVICE, "dma0", stream_id=0x10)
SMMU_WALK = Initiator(InitiatorKind.SMMU, "smmu0", stream_id=0x10, purpose="walk")


class FakeDevice:
    """Registers as a dict; offsets at or above ``refuse_from`` answer with an abort."""

    def __init__(self, refuse_from: int = 0x1_0000) -> None:
        self.registers: dict[int, int] = {}
        self.calls: list[tuple[str, int, int, Initiator]] = []
        self.refuse_from = refuse_from

    def mmio_read(self, offset: int, size: int, initiator: Initiator) -> int | ExternalAbort:
        self.calls.append(("read", offset, size, initiator))
        if offset >= self.refuse_from:
            return ExternalAbort(offset, "refused")
        return self.registers.get(offset, 0)

    def mmio_write(self, offset: int, size: int, value: int, initiator: Initiator) -> ExternalAbort | None:
        self.calls.append(("write", offset, size, initiator))
        if offset >= self.refuse_from:
            return ExternalAbort(offset, "refused")
        self.registers[offset] = value
        return None


@pytest.fixture
def device() -> FakeDevice:
    return FakeDevice()


@pytest.fixture
def bus(device: FakeDevice) -> SystemBus:
    bus = SystemBus()
    bus.add_ram(RAM_BASE, RAM_SIZE)
    bus.add_mmio(MMIO_BASE, MMIO_SIZE, device, "fake")
    return bus


def record(bus: SystemBus) -> list[Access]:
    seen: list[Access] = []
    bus.observers.append(seen.append)
    return seen


# -- address map --------------------------------------------------------------------------------------


def test_regions_are_kept_in_address_order(bus: SystemBus) -> None:
    bus.add_ram(0x1000, 0x1000, "low")
    assert [r.base for r in bus.regions] == [0x1000, MMIO_BASE, RAM_BASE]
    assert [r.kind for r in bus.regions] == [RegionKind.RAM, RegionKind.MMIO, RegionKind.RAM]
    assert [r.name for r in bus.ram_regions()] == ["low", "ram"]


@pytest.mark.parametrize(
    ("base", "size"),
    [
        (RAM_BASE, 0x1000),  # same base
        (RAM_BASE - 0x1000, 0x2000),  # overlaps the start
        (RAM_BASE + RAM_SIZE - 1, 0x1000),  # overlaps the last byte
        (RAM_BASE + 0x1000, 0x1000),  # inside
        (RAM_BASE - 0x1000, RAM_SIZE + 0x2000),  # encloses
    ],
)
def test_overlapping_regions_are_rejected(bus: SystemBus, base: int, size: int) -> None:
    with pytest.raises(ValueError, match="overlaps"):
        bus.add_ram(base, size, "clash")
    assert len(bus.regions) == 2


def test_adjacent_regions_are_accepted(bus: SystemBus) -> None:
    bus.add_ram(RAM_BASE + RAM_SIZE, 0x1000, "after")
    bus.add_ram(RAM_BASE - 0x1000, 0x1000, "before")
    assert len(bus.regions) == 4


@pytest.mark.parametrize(("base", "size"), [(0x1000, 0), (0x1000, -1), (-0x1000, 0x1000)])
def test_empty_or_negative_regions_are_rejected(bus: SystemBus, base: int, size: int) -> None:
    with pytest.raises(ValueError, match="bad base/size"):
        bus.add_ram(base, size, "bad")


def test_region_at_and_is_ram_respect_bounds(bus: SystemBus) -> None:
    assert bus.region_at(RAM_BASE - 1) is None
    region = bus.region_at(RAM_BASE + RAM_SIZE - 1)
    assert region is not None and region.name == "ram"
    assert bus.region_at(RAM_BASE + RAM_SIZE) is None
    assert bus.is_ram(RAM_BASE, RAM_SIZE)
    assert not bus.is_ram(RAM_BASE, RAM_SIZE + 1)
    assert not bus.is_ram(MMIO_BASE)


# -- RAM accesses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_ram_accesses_are_little_endian(bus: SystemBus, size: int) -> None:
    value = int.from_bytes(bytes(range(1, size + 1)), "little")
    assert bus.write(HOST_CPU, RAM_BASE + 8, size, value) is None
    assert bus.read_bytes(HOST_CPU, RAM_BASE + 8, size) == bytes(range(1, size + 1))
    assert bus.read(HYP_CPU, RAM_BASE + 8, size) == value


def test_ram_access_crossing_a_page_inside_the_region(bus: SystemBus) -> None:
    assert bus.write(HOST_CPU, RAM_BASE + 0xFFC, 8, 0x8877_6655_4433_2211) is None
    assert bus.read(HOST_CPU, RAM_BASE + 0x1000, 4) == 0x8877_6655


def test_reading_untouched_ram_through_the_bus_backs_no_page(bus: SystemBus) -> None:
    assert bus.read(HOST_CPU, RAM_BASE, 8) == 0
    assert bus.read_bytes(DMA0, RAM_BASE, 3 * 4096) == bytes(3 * 4096)
    assert bus.ram.pages_backed == 0


def test_bulk_write_then_read(bus: SystemBus) -> None:
    assert bus.write_bytes(DMA0, RAM_BASE + 0x10, b"\x01\x02\x03") is None
    assert bus.read_bytes(DMA0, RAM_BASE + 0x10, 3) == b"\x01\x02\x03"


# -- aborts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "size"),
    [
        (0x0, 4),  # nothing decodes
        (RAM_BASE - 4, 8),  # starts before the region
        (RAM_BASE + RAM_SIZE - 4, 8),  # runs off the end of RAM
        (MMIO_BASE + MMIO_SIZE - 4, 8),  # runs off the end of MMIO
        (-8, 8),
    ],
)
def test_access_outside_a_region_is_an_abort_result(bus: SystemBus, addr: int, size: int) -> None:
    read = bus.read(HOST_CPU, addr, size)
    assert isinstance(read, ExternalAbort) and read.address == addr
    assert isinstance(bus.write(HOST_CPU, addr, size, 0), ExternalAbort)
    assert bus.ram.pages_backed == 0


def test_access_straddling_two_adjacent_ram_regions_aborts(bus: SystemBus) -> None:
    bus.add_ram(RAM_BASE + RAM_SIZE, 0x1000, "next")
    assert isinstance(bus.read(HOST_CPU, RAM_BASE + RAM_SIZE - 4, 8), ExternalAbort)
    assert isinstance(bus.write_bytes(HOST_CPU, RAM_BASE + RAM_SIZE - 1, b"ab"), ExternalAbort)
    assert bus.ram.pages_backed == 0


@pytest.mark.parametrize(
    ("addr", "length"), [(MMIO_BASE, 4), (0x0, 4), (RAM_BASE + RAM_SIZE - 2, 4), (RAM_BASE - 1, 2)]
)
def test_bulk_access_outside_ram_aborts(bus: SystemBus, device: FakeDevice, addr: int, length: int) -> None:
    assert isinstance(bus.read_bytes(DMA0, addr, length), ExternalAbort)
    assert isinstance(bus.write_bytes(DMA0, addr, b"\xff" * length), ExternalAbort)
    assert device.calls == []
    assert bus.ram.pages_backed == 0


@pytest.mark.parametrize(("offset", "size"), [(0, 3), (0, 16), (0, 0), (2, 4), (4, 8), (1, 2)])
def test_bad_mmio_size_or_alignment_aborts_without_reaching_the_device(
    bus: SystemBus, device: FakeDevice, offset: int, size: int
) -> None:
    assert isinstance(bus.read(HOST_CPU, MMIO_BASE + offset, size), ExternalAbort)
    assert isinstance(bus.write(HOST_CPU, MMIO_BASE + offset, size, 1), ExternalAbort)
    assert device.calls == []


def test_abort_is_truthy_so_it_is_never_taken_for_success() -> None:
    assert ExternalAbort(0, "x")


# -- MMIO dispatch ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_mmio_dispatch_uses_offsets_from_the_region_base(
    bus: SystemBus, device: FakeDevice, size: int
) -> None:
    assert bus.write(HOST_CPU, MMIO_BASE + 0x98, size, 0x5A) is None
    assert bus.read(DMA0, MMIO_BASE + 0x98, size) == 0x5A
    assert device.calls == [("write", 0x98, size, HOST_CPU), ("read", 0x98, size, DMA0)]
    assert device.registers == {0x98: 0x5A}
    assert bus.ram.pages_backed == 0


def test_device_refusal_is_returned_as_the_abort(bus: SystemBus) -> None:
    offset = 0x1_0000
    read = bus.read(HOST_CPU, MMIO_BASE + offset, 4)
    assert read == ExternalAbort(offset, "refused")
    assert bus.write(HOST_CPU, MMIO_BASE + offset, 4, 1) == ExternalAbort(offset, "refused")


# -- observers ----------------------------------------------------------------------------------------


def test_observers_see_every_access_with_initiator_and_outcome(bus: SystemBus) -> None:
    seen = record(bus)
    bus.write(DMA0, RAM_BASE, 4, 0xAABB_CCDD)
    bus.read(SMMU_WALK, RAM_BASE, 2)
    bus.read(HOST_CPU, 0x0, 8)
    bus.write(HOST_CPU, MMIO_BASE + 0x1_0000, 4, 7)
    bus.write_bytes(DMA0, RAM_BASE + 0x100, b"\x01\x02")
    bus.read_bytes(DMA0, RAM_BASE + 0x100, 2)
    bus.read_bytes(DMA0, MMIO_BASE, 2)
    assert seen == [
        Access(DMA0, RAM_BASE, 4, True, 0xAABB_CCDD, False),
        Access(SMMU_WALK, RAM_BASE, 2, False, 0xCCDD, False),
        Access(HOST_CPU, 0x0, 8, False, None, True),
        Access(HOST_CPU, MMIO_BASE + 0x1_0000, 4, True, 7, True),
        Access(DMA0, RAM_BASE + 0x100, 2, True, b"\x01\x02", False),
        Access(DMA0, RAM_BASE + 0x100, 2, False, b"\x01\x02", False),
        Access(DMA0, MMIO_BASE, 2, False, None, True),
    ]


def test_every_observer_is_notified_in_order(bus: SystemBus) -> None:
    order: list[str] = []
    bus.observers.append(lambda access: order.append("oracle"))
    bus.observers.append(lambda access: order.append("sanitizer"))
    bus.read(HOST_CPU, RAM_BASE, 8)
    assert order == ["oracle", "sanitizer"]


def test_initiator_prints_who_and_why() -> None:
    assert str(SMMU_WALK) == "smmu0 sid=0x10 walk"
    assert str(Initiator(InitiatorKind.CPU_EL2)) == "cpu-el2"
    assert str(Initiator(InitiatorKind.DEVICE, stream_id=1, substream_id=2)) == "device sid=0x1 ssid=0x2"
