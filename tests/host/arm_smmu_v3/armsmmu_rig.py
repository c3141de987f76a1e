"""A machine (RAM + SmmuV3 + interrupt controller) with the driver on an EL1 CPU port.

Tests may touch the machine; the driver only ever sees the ``CpuPort``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pkvm_smmu.arch.strtab import STE
from pkvm_smmu.host.arm_smmu_v3.device import ArmSmmuDevice, ArmSmmuParams
from pkvm_smmu.host.arm_smmu_v3.domain import ArmSmmuIommuOps
from pkvm_smmu.host.iommu.ops import IommuFwspec
from pkvm_smmu.machine.bus import HOST_CPU, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.cpu import CpuPort
from pkvm_smmu.machine.irq import InterruptController
from pkvm_smmu.machine.smmu import SmmuFeatures, SmmuOptions, SmmuV3
from pkvm_smmu.pgtable.memory import Buffer
from pkvm_smmu.trace import RecordingSink, TraceBus

SMMU_BASE = 0x0900_0000
RAM_BASE = 0x8000_0000
RAM_SIZE = 0x4000_0000
DMA_POOL = RAM_BASE + 0x1000_0000  # the driver's allocations; data buffers live below


class BumpDma:
    """``dma_alloc_coherent`` for tests: zeroed, naturally aligned, from a bump pointer, through
    the CPU port."""

    def __init__(self, cpu: CpuPort, base: int = DMA_POOL, size: int = 0x1000_0000) -> None:
        self.cpu = cpu
        self.next = base
        self.end = base + size
        self.live: dict[int, int] = {}
        self.fail_after: int | None = None  # allocations left before failing (None: never)

    def dma_alloc_coherent(self, size: int) -> int | None:
        if self.fail_after is not None:
            if self.fail_after <= 0:
                return None
            self.fail_after -= 1
        pages = -(-size // 4096)
        align = 4096 << max(0, (pages - 1).bit_length())
        base = -(-self.next // align) * align
        if base + pages * 4096 > self.end:
            return None
        self.next = base + pages * 4096
        assert self.cpu.write_bytes(base, bytes(pages * 4096)) is None
        self.live[base] = size
        return base

    def dma_free_coherent(self, pa: int, size: int) -> int:
        assert self.live.pop(pa) == size, f"bad free of {pa:#x}"
        return 0


class PortTableMemory:
    """io-pgtable memory over the CPU port (what host.mm's HostTableMemory is)."""

    def __init__(self, cpu: CpuPort) -> None:
        self.cpu = cpu

    def read_u64(self, pa: int) -> int:
        value = self.cpu.read(pa, 8)
        assert isinstance(value, int)
        return value

    def write_u64(self, pa: int, value: int) -> None:
        assert self.cpu.write(pa, 8, value) is None

    def read_table(self, pa: int, length: int) -> bytes:
        data = self.cpu.read_bytes(pa, length)
        assert isinstance(data, bytes)
        return data

    def write_table(self, pa: int, data: Buffer) -> None:
        assert self.cpu.write_bytes(pa, bytes(memoryview(data).cast("B"))) is None

    def zero_page(self, pa: int, size: int = 4096) -> None:
        assert self.cpu.write_bytes(pa, bytes(size)) is None


@dataclass
class FakeDev:
    """A device as the IOMMU core hands it to the driver."""

    name: str
    sids: list[int]
    ats_supported: bool = False
    pasid_num_bits: int = 0
    iommu_fwspec: IommuFwspec | None = None
    ats_calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.iommu_fwspec = IommuFwspec("smmu-fwnode", list(self.sids))

    def pci_enable_ats(self, stu: int) -> int:
        self.ats_calls.append(f"enable:{stu}")
        return 0

    def pci_disable_ats(self) -> None:
        self.ats_calls.append("disable")


@dataclass
class Rig:
    bus: SystemBus
    clock: Clock
    smmu: SmmuV3
    irq: InterruptController
    cpu: CpuPort
    mm: BumpDma
    trace: TraceBus
    sink: RecordingSink
    dev: ArmSmmuDevice
    ops: ArmSmmuIommuOps | None = None

    def events(self, kind: str) -> list[Any]:
        return [e for e in self.sink.events if e.component == self.dev.component and e.kind == kind]

    def machine_events(self, kind: str) -> list[Any]:
        return [e for e in self.sink.events if e.component == self.smmu.name and e.kind == kind]

    def reg(self, off: int, size: int = 4) -> int:
        value = self.bus.read(HOST_CPU, SMMU_BASE + off, size)
        assert isinstance(value, int)
        return value

    def ste(self, sid: int) -> int:
        return STE.from_bytes(self.bus.read_bytes(HOST_CPU, self.dev.ste_addr(sid), 64))  # type: ignore[arg-type]

    def add_master(self, name: str, sids: list[int], **kw: Any) -> FakeDev:
        assert self.ops is not None
        d = FakeDev(name, sids, **kw)
        assert self.ops.probe_device(d) is self.dev
        return d


def make_rig(
    features: SmmuFeatures | None = None,
    options: SmmuOptions | None = None,
    params: ArmSmmuParams | None = None,
    *,
    probe: bool = True,
    wire_irqs: bool = True,
    irqs: tuple[str, ...] = ("eventq", "gerror", "priq"),
    msi_alloc: Any = None,
) -> Rig:
    bus = SystemBus()
    clock = Clock()
    bus.add_ram(RAM_BASE, RAM_SIZE)
    trace = TraceBus(lambda: clock.now_ns)
    sink = trace.attach(RecordingSink())
    irq = InterruptController(trace)
    features = features or SmmuFeatures(cmdq_log2_max=8, eventq_log2_max=7)
    smmu = SmmuV3("smmu0", bus, clock, features, SMMU_BASE, trace=trace, irq=irq, options=options)
    cpu = CpuPort(bus, clock, HOST_CPU)
    mm = BumpDma(cpu)
    dev = ArmSmmuDevice(
        cpu,
        mm,
        SMMU_BASE,
        0x20000,
        name="smmu0",
        params=params,
        pgtable_memory=PortTableMemory(cpu),
        trace=trace,
        irqs=irqs,
        msi_alloc=msi_alloc,
    )
    rig = Rig(bus, clock, smmu, irq, cpu, mm, trace, sink, dev)
    if wire_irqs:
        # The kernel's interrupt plumbing: wired SMMU lines to the driver's handlers.
        irq.connect(smmu.interrupts.line("gerror"), lambda _line: dev.handle_gerror_irq())
        irq.connect(smmu.interrupts.line("eventq"), lambda _line: dev.handle_evtq_irq())
        irq.connect(smmu.interrupts.line("priq"), lambda _line: dev.handle_priq_irq())
    if probe:
        assert dev.probe() == 0
        rig.ops = ArmSmmuIommuOps(dev)
    return rig
