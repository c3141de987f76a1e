"""A machine (RAM + SmmuV3) under pKVM with the hyp IOMMU core and SMMUv3 driver, and optionally the
host's arm-smmu-v3 driver on the host's EL1 CPU port (whose stage-2 hook is pKVM's HostStage2).

Tests may touch everything; the host driver only ever sees its ``CpuPort``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pkvm_smmu.arch.commands import CMD_SIZE, Opcode, build_command
from pkvm_smmu.arch.queues import q_inc
from pkvm_smmu.arch.registers import CR0, STRTAB_BASE, STRTAB_BASE_CFG, Reg, StrtabFmt
from pkvm_smmu.arch.strtab import L1STD, STE, STE_SIZE
from pkvm_smmu.host.arm_smmu_v3.device import ArmSmmuDevice, ArmSmmuParams
from pkvm_smmu.host.arm_smmu_v3.domain import ArmSmmuIommuOps
from pkvm_smmu.host.iommu.ops import IommuFwspec
from pkvm_smmu.hyp.iommu import KvmIommu
from pkvm_smmu.hyp.pkvm import Pkvm
from pkvm_smmu.hyp.smmuv3 import HypSmmuV3, SmmuDescription, SmmuV3HypDriver, V4Policy
from pkvm_smmu.machine.bus import HOST_CPU, HYP_CPU, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.cpu import CpuPort
from pkvm_smmu.machine.irq import InterruptController
from pkvm_smmu.machine.smmu import SmmuFeatures, SmmuOptions, SmmuV3
from pkvm_smmu.pgtable.memory import Buffer
from pkvm_smmu.trace import Counters, RecordingSink, TraceBus

SMMU_BASE = 0x0900_0000
SMMU_SIZE = 0x20000
RAM_BASE = 0x8000_0000
RAM_SIZE = 0x4000_0000  # 1 GiB
SHADOW_STRTAB = RAM_BASE + 0x0100_0000  # what the host kernel sets aside for the hyp (1 MiB)
SHADOW_CMDQ = RAM_BASE + 0x0120_0000  # 64 KiB
BUF = RAM_BASE + 0x0200_0000  # data buffers
DMA_POOL = RAM_BASE + 0x1000_0000  # the host driver's coherent allocations
HOSTQ = RAM_BASE + 0x0300_0000  # hand-programmed host command queue
HOST_STRTAB = RAM_BASE + 0x0400_0000  # hand-programmed host stream table (L1)
HOST_L2 = RAM_BASE + 0x0480_0000  # and its L2 tables


class BumpDma:
    """``dma_alloc_coherent``: zeroed, naturally aligned, written through the host's CPU port."""

    def __init__(self, cpu: CpuPort, base: int = DMA_POOL, size: int = 0x1000_0000) -> None:
        self.cpu = cpu
        self.next = base
        self.end = base + size

    def dma_alloc_coherent(self, size: int) -> int | None:
        pages = -(-size // 4096)
        align = 4096 << max(0, (pages - 1).bit_length())
        base = -(-self.next // align) * align
        if base + pages * 4096 > self.end:
            return None
        self.next = base + pages * 4096
        assert self.cpu.write_bytes(base, bytes(pages * 4096)) is None
        return base

    def dma_free_coherent(self, pa: int, size: int) -> int:
        return 0


class PortTableMemory:
    """io-pgtable memory over the host's CPU port."""

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
    pasid_num_bits: int = 0
    iommu_fwspec: IommuFwspec | None = None

    def __post_init__(self) -> None:
        self.iommu_fwspec = IommuFwspec("smmu-fwnode", list(self.sids))


@dataclass
class PkvmRig:
    bus: SystemBus
    clock: Clock
    trace: TraceBus
    sink: RecordingSink
    counters: Counters
    irq: InterruptController
    smmu: SmmuV3
    pkvm: Pkvm
    driver: SmmuV3HypDriver
    iommu: KvmIommu
    host_cpu: CpuPort
    mm: BumpDma
    init_result: int = 0
    dev: ArmSmmuDevice | None = None
    ops: ArmSmmuIommuOps | None = None
    masters: list[FakeDev] = field(default_factory=list)

    @property
    def hyp(self) -> HypSmmuV3:
        return self.driver.smmus[0]

    # -- what happened ----------------------------------------------------------------------------
    def events(self, component: str, kind: str) -> list[Any]:
        return [e for e in self.sink.events if e.component == component and e.kind == kind]

    def warnings(self) -> list[str]:
        return [e.fields["message"] for e in self.sink.events if e.kind == "warn"]

    def consumed(self) -> list[str]:
        """Commands the real SMMU executed, in order (its own trace)."""
        return [e.fields["command"] for e in self.events(self.smmu.name, "cmd")]

    # -- host-side accesses (through the host stage-2) ----------------------------------------------
    def host_read(self, reg: int, size: int = 4) -> Any:
        return self.host_cpu.read(SMMU_BASE + reg, size)

    def host_write(self, reg: int, value: int, size: int = 4) -> Any:
        return self.host_cpu.write(SMMU_BASE + reg, size, value)

    def hw_reg(self, reg: int, size: int = 4) -> int:
        """The real register, read at EL2."""
        value = self.bus.read(HYP_CPU, SMMU_BASE + reg, size)
        assert isinstance(value, int)
        return value

    def ram(self, pa: int, n: int) -> bytes:
        data = self.bus.read_bytes(HYP_CPU, pa, n)
        assert isinstance(data, bytes)
        return data

    def shadow_ste(self, sid: int) -> int:
        hyp = self.hyp
        ptr = hyp._ste_ptr(sid, hyp.strtab_base)
        assert ptr is not None
        return STE.from_bytes(self.ram(ptr, STE_SIZE))

    # -- the host driver ----------------------------------------------------------------------------
    def probe_host(self, params: ArmSmmuParams | None = None) -> int:
        dev = ArmSmmuDevice(
            self.host_cpu,
            self.mm,
            SMMU_BASE,
            SMMU_SIZE,
            name="smmu0",
            params=params,
            pgtable_memory=PortTableMemory(self.host_cpu),
            trace=self.trace,
            irqs=("eventq", "gerror"),
        )
        self.dev = dev
        self.irq.connect(self.smmu.interrupts.line("gerror"), lambda _line: dev.handle_gerror_irq())
        self.irq.connect(self.smmu.interrupts.line("eventq"), lambda _line: dev.handle_evtq_irq())
        ret = dev.probe()
        if not ret:
            self.ops = ArmSmmuIommuOps(dev)
        return ret

    def add_master(self, name: str, sids: list[int]) -> FakeDev:
        assert self.ops is not None
        d = FakeDev(name, sids)
        assert self.ops.probe_device(d) is self.dev
        self.masters.append(d)
        return d


class HostQueue:
    """The host's side of the command queue, programmed the way the host driver does it."""

    def __init__(self, r: PkvmRig, log2size: int = 6, base: int = HOSTQ) -> None:
        self.r = r
        self.base = base
        self.log2size = log2size
        self.prod = 0
        r.host_write(Reg.CMDQ_BASE, base | log2size, 8)
        r.host_write(Reg.CMDQ_PROD, 0)
        r.host_write(Reg.CMDQ_CONS, 0)
        r.host_write(Reg.CR0, r.hyp.cr0 | CR0.CMDQEN.in_place_mask)

    def slot_address(self, index: int) -> int:
        return self.base + (index & ((1 << self.log2size) - 1)) * CMD_SIZE

    def write(self, *commands: int) -> None:
        for command in commands:
            data = command.to_bytes(CMD_SIZE, "little")
            assert self.r.host_cpu.write_bytes(self.slot_address(self.prod), data) is None
            self.prod = q_inc(self.prod, 1, self.log2size)

    def submit(self, *commands: int) -> None:
        self.write(*commands)
        assert self.r.host_write(Reg.CMDQ_PROD, self.prod) is None


class HostStreamTable:
    """A 2-level stream table the test writes by hand (as a host driver, or a malicious host):
    L1 at ``HOST_STRTAB``, L2 tables wherever the test puts them."""

    def __init__(self, r: PkvmRig, queue: HostQueue, *, log2size: int = 16, split: int = 8) -> None:
        self.r = r
        self.queue = queue
        self.split = split
        r.host_write(Reg.STRTAB_BASE, HOST_STRTAB | STRTAB_BASE.RA.in_place_mask, 8)
        r.host_write(
            Reg.STRTAB_BASE_CFG,
            STRTAB_BASE_CFG.encode(FMT=StrtabFmt.TWO_LEVEL, LOG2SIZE=log2size, SPLIT=split),
        )

    def enable(self) -> None:
        self.r.host_write(Reg.CR0, self.r.hyp.cr0 | CR0.SMMUEN.in_place_mask)

    def set_l2(self, index: int, l2: int) -> None:
        desc = L1STD.encode(SPAN=self.split + 1) | L1STD.L2PTR.insert_address(l2)
        assert self.r.host_cpu.write(HOST_STRTAB + 8 * index, 8, desc) is None

    def l2_of(self, sid: int) -> int:
        value = self.r.host_cpu.read(HOST_STRTAB + 8 * (sid >> self.split), 8)
        assert isinstance(value, int)
        return L1STD.L2PTR.get_address(value)

    def write_ste(self, sid: int, ste: int, *, cfgi: bool = True, leaf: bool = True) -> None:
        address = self.l2_of(sid) + (sid & ((1 << self.split) - 1)) * STE_SIZE
        assert self.r.host_cpu.write_bytes(address, STE.to_bytes(ste)) is None
        if cfgi:
            self.queue.submit(
                build_command(Opcode.CFGI_STE, SID=sid, LEAF=int(leaf)), build_command(Opcode.SYNC)
            )


def make_rig(
    features: SmmuFeatures | None = None,
    *,
    policy: V4Policy | str = "v4",
    options: SmmuOptions | None = None,
    desc: SmmuDescription | None = None,
    host_shadow_memory: bool = True,
    finalise: bool = True,
    probe_host: bool = False,
    ram_size: int = RAM_SIZE,
) -> PkvmRig:
    bus = SystemBus()
    bus.add_ram(RAM_BASE, ram_size)
    clock = Clock()
    trace = TraceBus(lambda: clock.now_ns)
    sink = trace.attach(RecordingSink())
    counters = trace.attach(Counters(by_fields=["opcode", "how", "reg", "access"]))
    irq = InterruptController(trace)
    smmu = SmmuV3(
        "smmu0", bus, clock, features or SmmuFeatures(), SMMU_BASE, trace=trace, irq=irq, options=options
    )
    pkvm = Pkvm(bus, clock, trace, CpuPort(bus, clock, HYP_CPU))
    host_cpu = CpuPort(bus, clock, HOST_CPU)
    pkvm.attach_host_cpu(host_cpu)
    if desc is None:
        shadow = {"cmdq_pa": SHADOW_CMDQ, "strtab_pa": SHADOW_STRTAB} if host_shadow_memory else {}
        desc = SmmuDescription("smmu0", SMMU_BASE, SMMU_SIZE, **shadow)
    driver = SmmuV3HypDriver([desc], policy)
    iommu = KvmIommu(pkvm, driver)
    assert pkvm.kvm_iommu_register_driver(iommu) == 0
    rig = PkvmRig(
        bus, clock, trace, sink, counters, irq, smmu, pkvm, driver, iommu, host_cpu, BumpDma(host_cpu)
    )
    if finalise:
        assert pkvm.init() == 0
        rig.init_result = pkvm.finalise()
        if probe_host:
            assert rig.init_result == 0
            assert rig.probe_host() == 0
    return rig


__all__ = [
    "BUF",
    "HOSTQ",
    "HOST_L2",
    "HOST_STRTAB",
    "RAM_BASE",
    "SMMU_BASE",
    "FakeDev",
    "HostQueue",
    "HostStreamTable",
    "PkvmRig",
    "make_rig",
]
