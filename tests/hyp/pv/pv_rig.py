"""A machine (1 GiB of RAM, one SMMUv3, interrupts) under pKVM with a paravirtual hyp IOMMU, and the
host's EL1 CPU port behind the host stage-2. Tests touch everything; hypercalls go through
``Pkvm.hvc`` exactly as a host's would."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any

from pkvm_smmu.hyp.pkvm import Pkvm
from pkvm_smmu.hyp.pv import PvIdentityIommu, PvIommu, PvPagingIommu, PvSmmuV3
from pkvm_smmu.machine.bus import HOST_CPU, HYP_CPU, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.cpu import CpuPort
from pkvm_smmu.machine.devices import DmaEndpoint
from pkvm_smmu.machine.irq import InterruptController
from pkvm_smmu.machine.smmu import SmmuFeatures, SmmuV3
from pkvm_smmu.trace import RecordingSink, TraceBus

SMMU_BASE = 0x0900_0000
SMMU_SIZE = 0x20000
RAM_BASE = 0x8000_0000
RAM_SIZE = 0x4000_0000
BUF = RAM_BASE + 0x0200_0000  # host data buffers
TOPUP = RAM_BASE + 0x0300_0000  # pages the host donates to the IOMMU pool
PAGE = 4096


@dataclass
class PvRig:
    bus: SystemBus
    clock: Clock
    trace: TraceBus
    sink: RecordingSink
    smmu: SmmuV3
    pkvm: Pkvm
    pv: PvIommu
    host_cpu: CpuPort
    init_result: int

    @property
    def hyp(self) -> PvSmmuV3:
        return self.pv.smmus[0]

    def hvc(self, name: str, *args: Any) -> int:
        """Enum members go in as the plain integers a register holds; anything else as given."""
        return self.pkvm.hvc(name, *(int(a) if isinstance(a, IntEnum | IntFlag) else a for a in args))

    def events(self, component: str, kind: str) -> list[Any]:
        return [e for e in self.sink.events if e.component == component and e.kind == kind]

    def endpoint(self, sid: int) -> DmaEndpoint:
        return DmaEndpoint(f"ep{sid:x}", self.smmu, sid)

    def ram(self, pa: int, n: int) -> bytes:
        data = self.bus.read_bytes(HYP_CPU, pa, n)
        assert isinstance(data, bytes)
        return data

    def host_write(self, pa: int, data: bytes) -> Any:
        return self.host_cpu.write_bytes(pa, data)


def make_pv_rig(cls: type[PvIommu], *, features: SmmuFeatures | None = None, finalise: bool = True) -> PvRig:
    bus = SystemBus()
    bus.add_ram(RAM_BASE, RAM_SIZE)
    clock = Clock()
    trace = TraceBus(lambda: clock.now_ns)
    sink = trace.attach(RecordingSink())
    irq = InterruptController(trace)
    smmu = SmmuV3("smmu0", bus, clock, features or SmmuFeatures(), SMMU_BASE, trace=trace, irq=irq)
    pkvm = Pkvm(bus, clock, trace, CpuPort(bus, clock, HYP_CPU))
    host_cpu = CpuPort(bus, clock, HOST_CPU)
    pkvm.attach_host_cpu(host_cpu)
    pv = cls(pkvm)
    assert pv.register() == 0
    assert pv.register_smmu("smmu0", SMMU_BASE, SMMU_SIZE) == 0
    irq.connect(smmu.interrupts.line("eventq"), lambda _line: pv.poll_events() and None)
    ret = 0
    if finalise:
        assert pkvm.init() == 0
        ret = pkvm.finalise()
    return PvRig(bus, clock, trace, sink, smmu, pkvm, pv, host_cpu, ret)


def identity_rig() -> PvRig:
    rig = make_pv_rig(PvIdentityIommu)
    assert rig.init_result == 0
    return rig


def paging_rig() -> PvRig:
    rig = make_pv_rig(PvPagingIommu)
    assert rig.init_result == 0
    return rig
