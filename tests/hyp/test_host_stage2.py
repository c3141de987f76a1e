"""The host stage-2 seen from the host's EL1 CPU port, after pKVM has finalised."""

from __future__ import annotations

from errno import EIO

from pkvm_smmu.hyp.pkvm import Pkvm
from pkvm_smmu.machine.bus import HOST_CPU, HYP_CPU, ExternalAbort, Initiator, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.cpu import CpuFault, CpuPort
from pkvm_smmu.trace import RecordingSink, TraceBus

RAM_BASE = 0x4000_0000
RAM_SIZE = 64 << 20
DEV_BASE = 0x0900_0000  # emulated by the fake IOMMU driver, page 0 only
OTHER_BASE = 0x0A00_0000  # a second device the hyp takes but nobody emulates


class Device:
    """An MMIO device that records who reached it."""

    def __init__(self) -> None:
        self.accesses: list[tuple[str, int, int, int | None]] = []

    def mmio_read(self, offset: int, size: int, initiator: Initiator) -> int | ExternalAbort:
        self.accesses.append((initiator.name, offset, size, None))
        return 0xD0D0

    def mmio_write(self, offset: int, size: int, value: int, initiator: Initiator) -> ExternalAbort | None:
        self.accesses.append((initiator.name, offset, size, value))
        return None


class FakeIommuDriver:
    """Takes the device's MMIO page at init and emulates a register file for it."""

    def __init__(self, pkvm: Pkvm, init_result: int = 0) -> None:
        self.pkvm = pkvm
        self.init_result = init_result
        self.regs: dict[int, int] = {0x0: 0x1234_5678}
        self.dabts: list[tuple[int, int, bool, int]] = []

    def kvm_iommu_pages(self) -> int:
        return 16

    def init(self) -> int:
        if self.init_result:
            return self.init_result
        mp = self.pkvm.mem_protect
        assert mp.host_donate_hyp_mmio(DEV_BASE >> 12) == 0
        assert mp.host_donate_hyp_mmio(OTHER_BASE >> 12) == 0
        return 0

    def handle_host_dabt(self, address: int, size: int, is_write: bool, value: int) -> int | None:
        if address >> 12 != DEV_BASE >> 12:
            return None
        self.dabts.append((address, size, is_write, value))
        offset = address - DEV_BASE
        if is_write:
            self.regs[offset] = value
            return 0
        return self.regs.get(offset, 0)


class Rig:
    def __init__(self, *, driver_result: int = 0) -> None:
        self.bus = SystemBus()
        self.bus.add_ram(RAM_BASE, RAM_SIZE)
        self.dev = Device()
        self.other = Device()
        self.bus.add_mmio(DEV_BASE, 0x2_0000, self.dev, "smmu")
        self.bus.add_mmio(OTHER_BASE, 0x1000, self.other, "other")
        self.clock = Clock()
        self.trace = TraceBus(lambda: self.clock.now_ns)
        self.events = self.trace.attach(RecordingSink()).events
        self.host = CpuPort(self.bus, self.clock, HOST_CPU)
        self.pkvm = Pkvm(self.bus, self.clock, self.trace, CpuPort(self.bus, self.clock, HYP_CPU))
        self.driver = FakeIommuDriver(self.pkvm, driver_result)
        assert self.pkvm.kvm_iommu_register_driver(self.driver) == 0
        self.pkvm.attach_host_cpu(self.host)

    def boot(self) -> int:
        assert self.pkvm.init() == 0
        return self.pkvm.finalise()

    def kinds(self, kind: str) -> list[dict[str, object]]:
        return [e.fields for e in self.events if e.kind == kind]


def test_store_to_hyp_donated_ram_faults_and_names_the_owner() -> None:
    rig = Rig()
    page = RAM_BASE + 0x10_0000
    assert rig.host.write(page, 8, 0xAA) is None
    assert rig.pkvm.mem_protect.host_donate_hyp(page >> 12, 1) == 0
    # Not deprivileged yet: no stage-2 on the host's port, the store goes through.
    assert rig.host.write(page, 8, 0xBB) is None
    assert rig.boot() == 0
    fault = rig.host.write(page + 8, 4, 0xCC)
    assert isinstance(fault, CpuFault) and fault.is_write and fault.address == page + 8
    assert "hyp" in fault.reason
    assert isinstance(rig.host.read(page, 8), CpuFault)
    assert rig.bus.ram.read_int(page, 8) == 0xBB
    assert rig.bus.ram.read_int(page + 8, 4) == 0
    assert rig.kinds("stage2-fault")[0] == {
        "address": page + 8,
        "size": 4,
        "direction": "write",
        "owner": "hyp",
    }


def test_carveout_is_out_of_reach_after_finalise() -> None:
    rig = Rig()
    assert rig.boot() == 0
    carveout = rig.pkvm.carveout
    assert carveout is not None
    assert isinstance(rig.host.read(carveout.base, 8), CpuFault)
    assert isinstance(rig.host.read(carveout.base + carveout.size - 8, 8), CpuFault)
    assert rig.host.read(carveout.base - 8, 8) == 0


def test_donated_mmio_access_reaches_the_dabt_handler_and_returns_its_value() -> None:
    rig = Rig()
    assert rig.boot() == 0
    assert rig.host.read(DEV_BASE, 4) == 0x1234_5678
    assert rig.host.write(DEV_BASE + 0x20, 4, 0xCAFE) is None
    assert rig.host.read(DEV_BASE + 0x20, 4) == 0xCAFE
    assert rig.driver.dabts == [
        (DEV_BASE, 4, False, 0),
        (DEV_BASE + 0x20, 4, True, 0xCAFE),
        (DEV_BASE + 0x20, 4, False, 0),
    ]
    assert rig.dev.accesses == []  # the host never reached the hardware
    assert rig.kinds("trap") == [
        {"address": DEV_BASE, "size": 4, "direction": "read", "value": 0x1234_5678},
        {"address": DEV_BASE + 0x20, "size": 4, "direction": "write", "value": 0xCAFE},
        {"address": DEV_BASE + 0x20, "size": 4, "direction": "read", "value": 0xCAFE},
    ]
    # The hyp's own EL2 accesses are not subject to the host stage-2.
    assert rig.pkvm.hyp_cpu.read(DEV_BASE + 8, 4) == 0xD0D0
    assert rig.dev.accesses == [("hyp", 8, 4, None)]


def test_unhandled_abort_on_donated_mmio_faults() -> None:
    rig = Rig()
    assert rig.boot() == 0
    fault = rig.host.write(OTHER_BASE, 4, 1)
    assert isinstance(fault, CpuFault) and "not handled" in fault.reason
    assert rig.other.accesses == []
    # A page of the SMMU region the hyp did not take stays the host's.
    assert rig.host.read(DEV_BASE + 0x1_0000, 4) == 0xD0D0


def test_handlers_are_asked_in_order_and_the_first_answer_wins() -> None:
    rig = Rig()
    assert rig.boot() == 0
    seen: list[str] = []

    class Late:
        def handle_host_dabt(self, address: int, size: int, is_write: bool, value: int) -> int | None:
            seen.append("late")
            return 0x77

    rig.pkvm.add_data_abort_handler(Late())
    assert rig.host.read(DEV_BASE, 4) == 0x1234_5678  # the IOMMU driver answers first
    assert seen == []
    assert rig.host.read(OTHER_BASE, 4) == 0x77  # the driver declines, the next handler answers
    assert seen == ["late"]


def test_shared_pages_stay_accessible() -> None:
    rig = Rig()
    assert rig.boot() == 0
    page = RAM_BASE + 0x20_0000
    assert rig.pkvm.hvc("__pkvm_host_share_hyp", page >> 12) == 0
    assert rig.pkvm.mem_protect.hyp_pin_shared_mem(page, page + 4096) == 0
    assert rig.host.write(page, 8, 0x55) is None
    assert rig.host.read(page, 8) == 0x55
    assert rig.host.write_bytes(page, b"x" * 4096) is None
    assert rig.kinds("stage2-fault") == []


def test_access_straddling_into_a_blocked_page_faults() -> None:
    rig = Rig()
    assert rig.boot() == 0
    page = RAM_BASE + 0x30_0000
    assert rig.pkvm.mem_protect.host_donate_hyp(page >> 12, 1) == 0
    assert isinstance(rig.host.read(page - 4, 8), CpuFault)


def test_bulk_accesses_are_refused_when_any_page_is_not_the_hosts() -> None:
    rig = Rig()
    assert rig.boot() == 0
    page = RAM_BASE + 0x40_0000
    assert rig.pkvm.mem_protect.host_donate_hyp((page >> 12) + 2, 1) == 0
    assert rig.host.write_bytes(page, bytes(2 * 4096)) is None
    assert isinstance(rig.host.write_bytes(page, bytes(3 * 4096)), CpuFault)
    assert isinstance(rig.host.read_bytes(page + 3 * 4096 - 1, 2), CpuFault)
    assert rig.pkvm.host_stage2.allows_bulk(page, 2 * 4096, False)
    # A range wider than the number of blocked pages takes the other branch of the check.
    assert not rig.pkvm.host_stage2.allows_bulk(RAM_BASE, RAM_SIZE, True)
    assert rig.pkvm.host_stage2.allows_bulk(RAM_BASE, 0x40_0000, True)
    assert rig.kinds("stage2-fault")[-1]["bulk"] is True


def test_iommu_init_failure_leaves_the_host_privileged() -> None:
    rig = Rig(driver_result=-EIO)
    assert rig.boot() == -EIO
    assert rig.pkvm.state == "failed" and rig.pkvm.failure == -EIO
    assert rig.host.stage2 is None
    assert rig.host.read(DEV_BASE, 4) == 0xD0D0  # the host drives the hardware itself


def test_uninstall_and_reinstall() -> None:
    rig = Rig()
    assert rig.boot() == 0
    assert rig.host.stage2 is rig.pkvm.host_stage2
    rig.pkvm.uninstall_host_stage2()
    assert rig.host.stage2 is None
    assert rig.host.read(DEV_BASE, 4) == 0xD0D0
    rig.pkvm.install_host_stage2()
    assert rig.host.read(DEV_BASE, 4) == 0x1234_5678
