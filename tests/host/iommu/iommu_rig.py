"""A test rig for the IOMMU core: machine RAM behind an EL1 CPU port, the host allocator, a real
driver core, and a fake IOMMU driver whose paging domains are real page tables in host memory."""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pkvm_smmu.arch.vmsa import GRANULES
from pkvm_smmu.host.driver_core import (
    Kernel,
    PciDevice,
    PciDeviceId,
    PciDriver,
    PlatformDevice,
    PlatformDriver,
    pci_device_add,
    pci_register_driver,
    platform_device_register,
    platform_driver_register,
)
from pkvm_smmu.host.iommu import (
    DomainType,
    IommuCap,
    IommuCore,
    IommuDomain,
    IommuPolicy,
    IommuResvRegion,
    IommuSpec,
    iommu_fwspec_add_ids,
)
from pkvm_smmu.host.mm import HostMemory, HostPageAllocator, HostTableMemory
from pkvm_smmu.machine.bus import HOST_CPU, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.cpu import CpuPort
from pkvm_smmu.pgtable import IoPageTable, IotlbGather, PageTableConfig, Prot
from pkvm_smmu.trace import RecordingSink, TraceBus, TraceEvent

SZ_4K = 1 << 12
SZ_2M = 1 << 21
SZ_1G = 1 << 30
RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 32  # 1 GiB .. 5 GiB: some RAM lies above the 32-bit DMA limit
PGSIZES = SZ_4K | SZ_2M | SZ_1G


@dataclass(frozen=True)
class Node:
    """A firmware node stand-in: hashable, named."""

    full_name: str

    def __str__(self) -> str:
        return self.full_name


class FakeFirmware:
    """``IommuFirmware``: the IOMMU specs of each device, by fwnode (PCI devices by name)."""

    def __init__(self) -> None:
        self.specs: dict[Any, list[IommuSpec]] = {}

    def iommu_specs(self, dev: Any) -> list[IommuSpec] | int:
        key = dev.name if isinstance(dev, PciDevice) else dev.fwnode
        return list(self.specs.get(key, []))


class StaticDomain(IommuDomain):
    """An identity or blocked domain: attach only, recorded."""

    def __init__(self, domain_type: DomainType, log: list[tuple[str, str]]) -> None:
        super().__init__(domain_type)
        self.log = log
        self.fail_attach: set[str] = set()

    def attach_dev(self, dev: Any) -> int:
        if dev.name in self.fail_attach:
            return -errno.EIO
        self.log.append((dev.name, self.type.value))
        return 0


class PagingDomain(IommuDomain):
    """A paging domain over a real stage-1 ``IoPageTable`` in host memory; records every call."""

    def __init__(self, rig: Rig, log: list[tuple[str, str]], pgsize_bitmap: int = PGSIZES) -> None:
        super().__init__(DomainType.UNMANAGED, pgsize_bitmap, aperture_bits=48)
        config = PageTableConfig(1, GRANULES[SZ_4K], ias=48, oas=48, pgsize_bitmap=pgsize_bitmap)
        self.table = IoPageTable(config, HostTableMemory(rig.cpu), HostPageAllocator(rig.mm))
        self.log = log
        self.map_calls: list[tuple[int, int, int, int]] = []
        self.unmap_calls: list[tuple[int, int, int]] = []
        self.syncs: list[tuple[int | None, int | None]] = []
        self.flushes = 0
        self.freed = False
        self.fail_map_call: int | None = None  # index of the map_pages call that fails
        self.fail_attach: set[str] = set()

    def attach_dev(self, dev: Any) -> int:
        if dev.name in self.fail_attach:
            return -errno.EIO
        self.log.append((dev.name, f"paging:{id(self):x}"))
        return 0

    def map_pages(self, iova: int, paddr: int, pgsize: int, pgcount: int, prot: Prot) -> tuple[int, int]:
        self.map_calls.append((iova, paddr, pgsize, pgcount))
        if self.fail_map_call is not None and len(self.map_calls) - 1 == self.fail_map_call:
            # Map half of the run, then fail, as a table allocation failure midway would.
            half = pgcount // 2
            if half:
                self.table.map(iova, paddr, pgsize * half, prot)
            return pgsize * half, -errno.ENOMEM
        mapped, error = self.table.map(iova, paddr, pgsize * pgcount, prot)
        return mapped, error

    def unmap_pages(self, iova: int, pgsize: int, pgcount: int, gather: IotlbGather) -> int:
        self.unmap_calls.append((iova, pgsize, pgcount))
        return self.table.unmap(iova, pgsize * pgcount, gather)

    def iotlb_sync(self, gather: IotlbGather) -> None:
        self.syncs.append((gather.start, gather.end))

    def flush_iotlb_all(self) -> None:
        self.flushes += 1

    def free_gathered_tables(self, gather: IotlbGather) -> None:
        self.table.release_freed_tables(gather)

    def iova_to_phys(self, iova: int) -> int:
        return self.table.iova_to_phys(iova) or 0

    def free(self) -> None:
        self.freed = True
        self.table.free_all()


class FakeIommuOps:
    """A tiny IOMMU driver: paging domains over ``IoPageTable``, static identity/blocked domains."""

    def __init__(
        self,
        rig: Rig,
        *,
        paging: bool = True,
        identity: bool = True,
        blocked: bool = True,
        deferred_flush: bool = True,
    ) -> None:
        self.rig = rig
        self.pgsize_bitmap = PGSIZES
        self.log: list[tuple[str, str]] = []  # (device, domain) for every successful attach
        self.identity_domain: IommuDomain | None = None
        self.blocked_domain: IommuDomain | None = None
        if identity:
            self.identity_domain = StaticDomain(DomainType.IDENTITY, self.log)
        if blocked:
            self.blocked_domain = StaticDomain(DomainType.BLOCKED, self.log)
        self.paging = paging
        self.deferred_flush = deferred_flush
        self.def_types: dict[str, DomainType] = {}
        self.probe_errors: dict[str, int] = {}
        self.resv: dict[str, list[IommuResvRegion]] = {}
        self.probed: list[str] = []
        self.released: list[str] = []
        self.domains: list[PagingDomain] = []

    def probe_device(self, dev: Any) -> Any:
        self.probed.append(dev.name)
        return self.probe_errors.get(dev.name, self)

    def release_device(self, dev: Any) -> None:
        self.released.append(dev.name)

    def of_xlate(self, dev: Any, args: list[int]) -> int:
        return iommu_fwspec_add_ids(dev, args)

    def domain_alloc_paging(self, dev: Any) -> IommuDomain | int:
        if not self.paging:
            return -errno.EOPNOTSUPP
        domain = PagingDomain(self.rig, self.log)
        self.domains.append(domain)
        return domain

    def def_domain_type(self, dev: Any) -> DomainType | None:
        return self.def_types.get(dev.name)

    def capable(self, dev: Any, cap: IommuCap) -> bool:
        return cap is IommuCap.DEFERRED_FLUSH and self.deferred_flush

    def get_resv_regions(self, dev: Any) -> list[IommuResvRegion]:
        return list(self.resv.get(dev.name, []))


class BindingDriver(PlatformDriver):
    """Binds every platform device it is offered (by name) and remembers which."""

    def __init__(self, name: str = "endpoint") -> None:
        super().__init__(name, self._probe)
        self.bound: list[str] = []
        self.hook: Callable[[PlatformDevice], int] | None = None

    def _probe(self, pdev: PlatformDevice) -> int:
        ret = self.hook(pdev) if self.hook is not None else 0
        if not ret:
            self.bound.append(pdev.name)
        return ret


@dataclass
class Rig:
    clock: Clock
    bus: SystemBus
    cpu: CpuPort
    trace: TraceBus
    sink: RecordingSink
    kernel: Kernel
    mm: HostMemory
    firmware: FakeFirmware
    core: IommuCore
    iommu_node: Node = field(default_factory=lambda: Node("/iommu@9050000"))

    def events(self, kind: str, component: str = "host.iommu") -> list[TraceEvent]:
        return self.sink.select(component, kind)

    def ops(self, **kwargs: Any) -> FakeIommuOps:
        return FakeIommuOps(self, **kwargs)

    def register_iommu(self, ops: FakeIommuOps) -> int:
        return self.core.iommu_device_register(ops, ops, self.iommu_node, "smmu0")

    def platform_device(self, name: str, sids: list[int] | None = None) -> PlatformDevice:
        node = Node(f"/{name}")
        if sids is not None:
            self.firmware.specs[node] = [IommuSpec(self.iommu_node, (sid,)) for sid in sids]
        pdev = PlatformDevice("endpoint", dev_name=name, fwnode=node)  # matches BindingDriver by name
        assert platform_device_register(self.kernel, pdev) == 0
        return pdev

    def pci_device(self, devfn: int, sid: int | None, aliases: tuple[int, ...] = ()) -> PciDevice:
        pdev = PciDevice(0x1AF4, 0x1000, devfn=devfn)
        if sid is not None:
            self.firmware.specs[pdev.name] = [IommuSpec(self.iommu_node, (sid,))]
        pdev.dma_aliases = aliases  # type: ignore[attr-defined]
        assert pci_device_add(self.kernel, pdev) == 0
        return pdev

    def bind_all_pci(self) -> PciDriver:
        drv = PciDriver("pci-endpoint", [PciDeviceId()], lambda pdev, ent: 0)
        assert pci_register_driver(self.kernel, drv) == 0
        return drv

    def driver(self, name: str = "endpoint") -> BindingDriver:
        drv = BindingDriver(name)
        assert platform_driver_register(self.kernel, drv) == 0
        return drv

    def late_boot(self) -> None:
        """Run every initcall (late_initcall turns deferred-probe retries on)."""
        self.kernel.run_initcalls()

    def advance_us(self, us: float) -> None:
        self.cpu.udelay(us)


def build_rig(policy: IommuPolicy | None = None, **kernel_args: Any) -> Rig:
    clock = Clock()
    bus = SystemBus()
    bus.add_ram(RAM_BASE, RAM_SIZE, "ram")
    cpu = CpuPort(bus, clock, HOST_CPU)
    trace = TraceBus(clock_ns=lambda: clock.now_ns)
    sink = trace.attach(RecordingSink())
    kernel = Kernel(trace, now_ns=lambda: clock.now_ns, **kernel_args)
    mm = HostMemory(cpu, [(RAM_BASE, RAM_SIZE)], trace=trace)
    firmware = FakeFirmware()
    core = IommuCore(trace, firmware=firmware, kernel=kernel, policy=policy, mm=mm)
    core.iommu_subsys_init()
    return Rig(clock, bus, cpu, trace, sink, kernel, mm, firmware, core)
