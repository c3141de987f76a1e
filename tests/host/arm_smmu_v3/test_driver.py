"""The platform driver in a kernel: registration at its initcall level, probe from a platform device,
registration with the IOMMU core, and DMA through the DMA API on a default domain."""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from pkvm_smmu.arch.registers import Reg
from pkvm_smmu.arch.strtab import STE, SteConfig
from pkvm_smmu.host.arm_smmu_v3.device import ArmSmmuDevice
from pkvm_smmu.host.arm_smmu_v3.domain import ArmSmmuDomain, ArmSmmuIommuOps
from pkvm_smmu.host.arm_smmu_v3.driver import ArmSmmuEnv, ArmSmmuV3Driver, SmmuFirmware
from pkvm_smmu.host.driver_core import InitcallLevel, Kernel
from pkvm_smmu.host.driver_core.device import Device
from pkvm_smmu.host.driver_core.platform import (
    DEFINE_RES_IRQ,
    DEFINE_RES_MEM,
    PlatformDevice,
    platform_device_register,
)
from pkvm_smmu.host.firmware.fwnode import FwNode
from pkvm_smmu.host.iommu import (
    DmaDirection,
    IommuCap,
    IommuCore,
    IommuSpec,
    dma_map_single,
    dma_unmap_single,
)
from pkvm_smmu.host.iommu.ops import DomainType, ResvType
from pkvm_smmu.host.mm import HostMemory, HostPageAllocator
from pkvm_smmu.machine.devices import DmaEndpoint

sys.path.insert(0, os.path.dirname(__file__))
from armsmmu_rig import DMA_POOL, RAM_BASE, SMMU_BASE, Rig, make_rig

SMMU_NODE = FwNode("/iommu@9000000", "iommu@9000000", ("arm,smmu-v3",))
SID = 0x20
BUF = RAM_BASE + 0x0300_0000


class Specs:
    """Firmware's ``iommus`` for the test devices."""

    def __init__(self) -> None:
        self.by_name: dict[str, list[IommuSpec]] = {}

    def iommu_specs(self, dev: Any) -> list[IommuSpec] | int:
        return self.by_name.get(getattr(dev, "name", ""), [])


class Booted:
    def __init__(self, level: InitcallLevel = InitcallLevel.DEVICE, *, irqs: bool = True) -> None:
        self.rig: Rig = make_rig(probe=False, wire_irqs=False)
        r = self.rig
        self.kernel = Kernel(r.trace, now_ns=lambda: r.clock.now_ns)
        self.specs = Specs()
        self.mm = HostMemory(r.cpu, [(DMA_POOL, 0x1000_0000)], trace=r.trace)
        self.core = IommuCore(r.trace, firmware=self.specs, kernel=None, mm=self.mm)
        lines = {1: r.smmu.interrupts.line("eventq"), 2: r.smmu.interrupts.line("gerror")}
        self.requested: list[str] = []

        def request_irq(pdev: PlatformDevice, irq: int, name: str, handler: Any) -> int:
            self.requested.append(name)
            r.irq.connect(lines[irq], lambda _line: handler())
            return 0

        env = ArmSmmuEnv(
            r.cpu,
            self.mm,
            self.core,
            r.trace,
            pgtable_allocator=HostPageAllocator(self.mm),
            firmware=lambda node: SmmuFirmware(dma_coherent=True) if node == SMMU_NODE else None,
            request_irq=request_irq if irqs else None,
        )
        self.driver = ArmSmmuV3Driver(self.kernel, env, level)
        self.driver.register()
        self.pdev = PlatformDevice(
            dev_name="9000000.iommu",
            fwnode=SMMU_NODE,
            resources=[
                DEFINE_RES_MEM(SMMU_BASE, 0x20000),
                DEFINE_RES_IRQ(1, "eventq"),
                DEFINE_RES_IRQ(2, "gerror"),
                DEFINE_RES_IRQ(3, "cmdq-sync"),
            ],
        )
        assert platform_device_register(self.kernel, self.pdev) == 0

    @property
    def smmu(self) -> ArmSmmuDevice:
        dev = self.pdev.driver_data
        assert isinstance(dev, ArmSmmuDevice)
        return dev

    def endpoint_device(self, name: str, sid: int) -> Device:
        dev = Device(name)
        self.specs.by_name[name] = [IommuSpec(SMMU_NODE, (sid,))]
        assert self.core.of_iommu_configure(dev) == 0
        return dev


def test_probe_at_device_initcall_registers_with_the_iommu_core() -> None:
    b = Booted()
    b.kernel.run_initcalls(until=InitcallLevel.DEVICE_SYNC)
    assert b.pdev.bound and b.smmu.probed
    entry = b.core.iommu_from_fwnode(SMMU_NODE)
    assert entry is not None and entry.iommu is b.smmu and isinstance(entry.ops, ArmSmmuIommuOps)
    assert b.requested == ["arm-smmu-v3-eventq", "arm-smmu-v3-gerror"]  # not cmdq-sync
    assert b.rig.reg(Reg.CR0ACK) & 1


def test_registration_level_is_a_parameter() -> None:
    b = Booted(InitcallLevel.DEVICE_SYNC)
    b.kernel.run_initcalls(until=InitcallLevel.DEVICE)
    assert not b.pdev.bound  # not yet registered
    b.kernel.run_initcalls(until=InitcallLevel.DEVICE_SYNC)
    assert b.pdev.bound


def test_probe_failure_leaves_the_device_unbound() -> None:
    b = Booted()
    b.mm.reserve(DMA_POOL, 0x1000_0000)  # no memory for queues
    b.kernel.run_initcalls()
    assert not b.pdev.bound and b.core.iommu_from_fwnode(SMMU_NODE) is None


def test_dma_api_through_the_default_domain() -> None:
    b = Booted()
    b.kernel.run_initcalls()
    b.rig.dev = b.smmu
    dev = b.endpoint_device("dma0", SID)
    domain = b.core.iommu_get_dma_domain(dev)
    assert isinstance(domain, ArmSmmuDomain) and domain.type is DomainType.DMA
    assert STE.CONFIG.get(b.rig.ste(SID)) == SteConfig.S1_TRANS

    iova = dma_map_single(dev, BUF, 0x2000, DmaDirection.BIDIRECTIONAL)
    ep = DmaEndpoint("dma0", b.rig.smmu, SID)
    assert ep.write(iova + 0x100, b"through the DMA API").ok
    assert b.rig.bus.read_bytes(0, BUF + 0x100, 19) == b"through the DMA API"  # type: ignore[arg-type]

    dma_unmap_single(dev, iova, 0x2000, DmaDirection.BIDIRECTIONAL)
    assert not ep.write(iova + 0x100, b"late").ok  # strict: invalidated before unmap returned
    events = b.rig.events("evtq.event")
    assert events and events[-1].fields["sid"] == SID and events[-1].fields["client"] == "dma0"


def test_ops_capabilities_and_reserved_regions() -> None:
    b = Booted()
    b.kernel.run_initcalls()
    dev = b.endpoint_device("dma1", SID + 1)
    ops = b.core.dev_iommu_ops(dev)
    assert isinstance(ops, ArmSmmuIommuOps)
    assert ops.capable(dev, IommuCap.CACHE_COHERENCY) and ops.capable(dev, IommuCap.DEFERRED_FLUSH)
    regions = ops.get_resv_regions(dev)
    assert [r.type for r in regions] == [ResvType.SW_MSI] and regions[0].start == 0x0800_0000


def test_remove_disables_the_smmu_and_unregisters() -> None:
    b = Booted()
    b.kernel.run_initcalls()
    smmu = b.smmu
    b.driver.remove(b.pdev)
    assert b.core.iommu_from_fwnode(SMMU_NODE) is None
    assert b.rig.reg(Reg.CR0ACK) == 0
    assert smmu.probed


def test_bad_iommu_cells_refuses_probe() -> None:
    b = Booted()
    b.driver.env.firmware = lambda node: SmmuFirmware(iommu_cells=2)
    assert b.driver.probe(b.pdev) == -errno.EINVAL
