"""One Linux-like host kernel, assembled from a CPU port, a firmware tree and a command line.

What ``start_kernel`` would put together: the driver core, the page allocator over firmware's
RAM, the IRQ layer with its irqchips (``init_IRQ``), the IOMMU core, and the built-in drivers at
their initcall levels in link order (``drivers/pci`` before ``drivers/dma`` before
``drivers/iommu``). ``of_platform_default_populate_init`` creates the platform devices at
``arch_initcall_sync``; ``boot()`` runs the initcalls.

The arm-smmu-v3 driver registers at ``device_initcall`` natively; its level is a parameter because
under pKVM it registers at ``device_initcall_sync``, once the hypervisor has the SMMU.

``arch`` is the arch code that is not a driver (``host.kvm``): its ``setup_arch`` runs before any
initcall and before the page allocator hands anything out (memblock reservations such as
``kvm_hyp_reserve``), and its initcalls are linked before ``drivers/`` (``arch/arm64/kvm``), or
after them when it says so.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pkvm_smmu.devicetree import DeviceTree
from pkvm_smmu.host.arm_smmu_v3 import ArmSmmuDevice, ArmSmmuDomain
from pkvm_smmu.host.arm_smmu_v3.device import MsiAlloc
from pkvm_smmu.host.arm_smmu_v3.driver import ArmSmmuEnv, ArmSmmuV3Driver, smmu_firmware_from_descs
from pkvm_smmu.host.driver_core import (
    DEFINE_RES_IRQ,
    DEFINE_RES_MEM,
    Device,
    InitcallLevel,
    Kernel,
    PlatformDevice,
    Resource,
    platform_device_register,
)
from pkvm_smmu.host.drivers.dma_endpoint import COMPATIBLE as DMA_ENDPOINT_COMPATIBLE
from pkvm_smmu.host.drivers.dma_endpoint import DmaEndpointDev, DmaEndpointDriver
from pkvm_smmu.host.drivers.dma_engine import DmaEngineDev, DmaEngineDriver
from pkvm_smmu.host.firmware import (
    Firmware,
    FwNode,
    ResourceType,
    SmmuDesc,
    of_fwnode_links,
    of_platform_populate,
    smmu_descs,
)
from pkvm_smmu.host.hw import Cpu
from pkvm_smmu.host.iommu import DomainType, IommuCore, IommuDomain, IommuPolicy, OfIommuFirmware
from pkvm_smmu.host.irq import GITS_TRANSLATER, V2M_MSI_SETSPI_NS, HostIrq
from pkvm_smmu.host.mm import HostMemory, HostPageAllocator
from pkvm_smmu.host.pci import PciHostGenericDriver
from pkvm_smmu.trace import TraceBus

COMPONENT = "host.kernel"
GIC_V3_ITS = "arm,gic-v3-its"
GIC_V2M_FRAME = "arm,gic-v2m-frame"
# Nodes brought up before any device exists (IRQCHIP_DECLARE, CLK_OF_DECLARE): fw_devlink
# never waits for them.
EARLY_OF_COMPATIBLES = ("fixed-clock",)

_TRUE = frozenset({"1", "y", "yes", "on", "true"})
_FALSE = frozenset({"0", "n", "no", "off", "false"})


class CmdlineError(ValueError):
    """A kernel parameter with a value the kernel cannot use; ``option`` names it."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(message if message.startswith(option) else f"{option}={message}")


def _bool(option: str, value: str) -> bool:
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise CmdlineError(option, f"{value}: not a boolean (1/0, y/n, on/off)")


@dataclass(frozen=True)
class KernelParams:
    """What the command line sets. Unknown words are left alone, as Linux hands them to init."""

    cmdline: str = ""
    iommu: IommuPolicy = field(default_factory=IommuPolicy)
    disable_bypass: bool = True  # arm_smmu_v3.disable_bypass
    disable_msipolling: bool = False  # arm_smmu_v3.disable_msipolling
    deferred_probe_timeout: int | None = None  # seconds; None: the kernel's default
    fw_devlink: str = "on"

    @classmethod
    def parse(cls, cmdline: str) -> KernelParams:
        try:
            policy = IommuPolicy.from_cmdline(cmdline)
        except ValueError as error:
            text = str(error)
            raise CmdlineError(text.split("=", 1)[0], text) from None
        values: dict[str, Any] = {}
        for word in cmdline.split():
            key, sep, value = word.partition("=")
            module, dot, param = key.partition(".")
            if dot and module.replace("-", "_") == "arm_smmu_v3":
                name = param.replace("-", "_")
                if name in ("disable_bypass", "disable_msipolling"):
                    values[name] = _bool(key, value if sep else "1")
            elif key == "deferred_probe_timeout":
                try:
                    values["deferred_probe_timeout"] = int(value)
                except ValueError:
                    raise CmdlineError(key, f"{value}: not a number of seconds") from None
            elif key == "fw_devlink":
                if value not in ("off", "permissive", "on", "rpm"):
                    raise CmdlineError(key, f"{value}: expected off, permissive, on or rpm")
                values["fw_devlink"] = value
        return cls(cmdline=cmdline, iommu=policy, **values)


class ArchInit(Protocol):
    """Arch code the kernel runs besides drivers (see the module docstring)."""

    def setup_arch(self, host: HostKernel) -> None:
        """Before any initcall, with the page allocator not yet used."""
        ...

    def arch_initcalls(self, host: HostKernel) -> None:
        """Register the initcalls linked before ``drivers/``."""
        ...

    def late_linked_initcalls(self, host: HostKernel) -> None:
        """Register the initcalls linked after ``drivers/``."""
        ...


@dataclass(frozen=True)
class DeviceInfo:
    """A device as the kernel knows it, for reports."""

    name: str
    bus: str
    driver: str | None
    bound: bool
    stream_ids: tuple[int, ...]
    iommu: str | None  # the IOMMU it is behind (its registered name)
    group: int | None
    domain: str | None  # the domain's label ("dma#0"), None when not behind an IOMMU
    domain_type: str | None
    deferred_reason: str | None


@dataclass(frozen=True)
class DomainInfo:
    label: str
    type: str
    devices: tuple[str, ...]
    stage: int | None = None  # arm-smmu-v3 paging domains: 1 or 2
    asid: int | None = None
    vmid: int | None = None


class HostKernel:
    """The host kernel of one machine. See the module docstring."""

    def __init__(
        self,
        cpu: Cpu,
        tree: DeviceTree,
        cmdline: str = "",
        *,
        trace: TraceBus | None = None,
        now_ns: Callable[[], int] | None = None,
        smmu_level: InitcallLevel | str = InitcallLevel.DEVICE,
        modules: bool = True,
        arch: ArchInit | None = None,
    ) -> None:
        self.cpu = cpu
        self.params = KernelParams.parse(cmdline)
        self.trace = trace if trace is not None else TraceBus()
        self.fw = Firmware(tree)
        self.now_ns: Callable[[], int] = now_ns or (lambda: round(cpu.now_us() * 1000))
        self.kernel = Kernel(
            self.trace,
            now_ns=self.now_ns,
            modules=modules,
            deferred_probe_timeout_s=self.params.deferred_probe_timeout,
            fw_devlink=self.params.fw_devlink,
        )
        self.irq = HostIrq(self.trace)
        ram = [(region.base, region.size) for region in self.fw.memory()]
        self.mm = HostMemory(cpu, ram, self.fw.reserved_memory(), self.trace)
        self.iommu = IommuCore(
            self.trace,
            firmware=OfIommuFirmware(self.fw),
            kernel=self.kernel,
            policy=self.params.iommu,
            mm=self.mm,
        )
        self._smmu_descs: dict[Hashable, SmmuDesc] = {d.fwnode: d for d in smmu_descs(self.fw)}
        self._msi_irqs: dict[tuple[int, str], int] = {}
        env = ArmSmmuEnv(
            cpu,
            self.mm,
            self.iommu,
            self.trace,
            pgtable_allocator=HostPageAllocator(self.mm),
            firmware=smmu_firmware_from_descs(tuple(self._smmu_descs.values())),
            request_irq=self._smmu_request_irq,
            msi_alloc=self._smmu_msi_alloc,
            msi_irq=lambda pdev, source: self._msi_irqs.get((id(pdev), source)),
            disable_bypass=self.params.disable_bypass,
            disable_msipolling=self.params.disable_msipolling,
        )
        self.smmu_driver = ArmSmmuV3Driver(self.kernel, env, smmu_level)
        self.pci_host = PciHostGenericDriver(self.kernel, cpu, self.fw, self.irq)
        self.dma_engine = DmaEngineDriver(self.kernel, cpu, self.mm, self.iommu, self.irq)
        self.dma_endpoint = DmaEndpointDriver(self.kernel, self.mm, self.iommu)
        self.platform_devices: dict[Hashable, PlatformDevice] = {}
        self.booted = False
        self.arch = arch
        if arch is not None:
            arch.setup_arch(self)
        self.init_irq()
        self.kernel.fwnode_add_links = self._of_fwnode_add_links
        self._register_initcalls()

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.trace.enabled:
            self.trace.emit(COMPONENT, kind, **fields)

    # -- early boot -------------------------------------------------------------------------------
    def init_irq(self) -> None:
        """``init_IRQ``/``of_clk_init``: irqchips and early clocks come up without devices, and
        each MSI controller gets an MSI domain."""
        for node in self.fw.tree.nodes():
            if not node.available:
                continue
            early = node.has("interrupt-controller") or node.has("msi-controller")
            if early or node.is_compatible(*EARLY_OF_COMPATIBLES):
                self.kernel.fwnode_dev_initialized(self.fw.fwnode(node))
            if node.has("msi-controller") and node.is_compatible(GIC_V3_ITS, GIC_V2M_FRAME):
                regs = node.translated_reg()
                if not regs:
                    continue
                handle = self.fw.fwnode(node)
                if node.is_compatible(GIC_V3_ITS):
                    self.irq.add_msi_domain(handle, node.name, regs[0].address + GITS_TRANSLATER)
                else:  # a GICv2m frame: the payload is an SPI number
                    base = node.u32("arm,msi-base-spi", 0)
                    self.irq.add_msi_domain(handle, node.name, regs[0].address + V2M_MSI_SETSPI_NS, base)

    def _of_fwnode_add_links(self, fwnode: Hashable) -> None:
        if isinstance(fwnode, FwNode):
            for dep in of_fwnode_links(self.fw, fwnode):
                self.kernel.fwnode_link_add(dep.consumer, dep.supplier)

    def _register_initcalls(self) -> None:
        k = self.kernel
        populate = self.of_platform_default_populate_init
        k.register_initcall(InitcallLevel.ARCH_SYNC, populate, "of_platform_default_populate_init")
        k.register_initcall(InitcallLevel.SUBSYS, self._iommu_subsys_init, "iommu_subsys_init")
        if self.arch is not None:
            self.arch.arch_initcalls(self)  # arch/ links before drivers/
        # Built-in drivers at device_initcall run in link order: drivers/pci, drivers/dma, drivers/iommu.
        self.pci_host.register()
        self.dma_engine.register()
        if self.fw.tree.compatible_nodes(DMA_ENDPOINT_COMPATIBLE):
            # Only linked in for platforms that have such a device, so platforms without one
            # boot (initcall by initcall) exactly as before.
            self.dma_endpoint.register()
        self.smmu_driver.register()
        if self.arch is not None:
            self.arch.late_linked_initcalls(self)

    def _iommu_subsys_init(self) -> int:
        self.iommu.iommu_subsys_init()
        return 0

    def of_platform_default_populate_init(self) -> int:
        """Register a platform device for every node ``of_platform_populate`` describes. AMBA
        (``arm,primecell``) nodes are left out: this kernel has no AMBA bus."""
        for desc in of_platform_populate(self.fw):
            if desc.bus != "platform":
                self._emit("populate.skip", node=desc.fwnode.path, bus=desc.bus)
                continue
            resources: list[Resource] = []
            for res in desc.resources:
                if res.type is ResourceType.MEM:
                    resources.append(DEFINE_RES_MEM(res.start, res.size, res.name))
                else:
                    irq = self.irq.irq_create_of_mapping(res)
                    if irq:
                        resources.append(DEFINE_RES_IRQ(irq, res.name))
            parent = self.platform_devices.get(desc.parent) if desc.parent is not None else None
            pdev = PlatformDevice(dev_name=desc.name, fwnode=desc.fwnode, parent=parent, resources=resources)
            pdev.dma_coherent = desc.dma_coherent  # type: ignore[attr-defined]
            self.platform_devices[desc.fwnode] = pdev
            platform_device_register(self.kernel, pdev)
        return 0

    # -- arm-smmu-v3's kernel services ---------------------------------------------------------------
    def _smmu_request_irq(
        self, pdev: PlatformDevice, irq: int, name: str, handler: Callable[[], bool]
    ) -> int:
        return self.irq.request_irq(irq, handler, name, pdev)

    def _smmu_msi_alloc(self, pdev: PlatformDevice) -> MsiAlloc | None:
        """``platform_device_msi_init_and_alloc_irqs`` through the SMMU's ``msi-parent``."""
        desc = self._smmu_descs.get(pdev.fwnode) if pdev.fwnode is not None else None
        domain = self.irq.msi_domain(desc.msi_parent) if desc is not None and desc.msi_parent else None
        if domain is None:
            return None

        def alloc(source: str) -> tuple[int, int] | None:
            msg = domain.alloc(f"{pdev.name}:{source}")
            self._msi_irqs[(id(pdev), source)] = msg.irq
            return msg.address, msg.data

        return alloc

    # -- running --------------------------------------------------------------------------------------
    def boot(self) -> None:
        """Run every initcall level; deferred probes are retried at ``late_initcall`` as in Linux."""
        with self.trace.span(COMPONENT, "boot", cmdline=self.params.cmdline) as fields:
            self.kernel.run_initcalls()
            self.booted = True
            fields["devices"] = len(self.kernel.devices)
            fields["deferred"] = [dev.name for dev, _ in self.kernel.deferred_devices]

    def run_timers(self) -> None:
        """Fire the delayed work (flush-queue timer, deferred-probe timeout) that is due."""
        self.kernel.run_timers()

    # -- accessors ------------------------------------------------------------------------------------
    @property
    def smmus(self) -> list[ArmSmmuDevice]:
        return list(self.smmu_driver.smmus.values())

    @property
    def dma_engines(self) -> dict[str, DmaEngineDev]:
        """Bound DMA engines by device name, in bind order."""
        return dict(self.dma_engine.engines)

    @property
    def dma_endpoints(self) -> dict[str, DmaEndpointDev]:
        """Bound generic DMA endpoints by device name, in bind order."""
        return dict(self.dma_endpoint.endpoints)

    def device(self, name: str) -> Device | None:
        return next((dev for dev in self.kernel.devices if dev.name == name), None)

    def bus_devices(self) -> list[Device]:
        """Devices on a bus (platform, PCI...), in registration order."""
        return [dev for dev in self.kernel.devices if dev.bus is not None and dev.bus.name != "faux"]

    def stream_ids(self, dev: Device | str) -> tuple[int, ...]:
        found = self.device(dev) if isinstance(dev, str) else dev
        fwspec = getattr(found, "iommu_fwspec", None)
        return tuple(fwspec.ids) if fwspec is not None else ()

    def domain_of(self, dev: Device) -> IommuDomain | None:
        return self.iommu.iommu_get_domain_for_dev(dev)

    def device_info(self, dev: Device) -> DeviceInfo:
        domain = self.domain_of(dev)
        state = self.iommu.dev_iommu(dev)
        group = self.iommu.iommu_group_get(dev)
        return DeviceInfo(
            dev.name,
            dev.bus.name if dev.bus is not None else "-",
            dev.driver.name if dev.driver is not None else None,
            dev.bound,
            self.stream_ids(dev),
            state.iommu.name if state is not None else None,
            group.id if group is not None else None,
            self.iommu.domain_label(domain) if domain is not None else None,
            domain.type.value if domain is not None else None,
            dev.deferred_probe_reason,
        )

    def devices(self) -> list[DeviceInfo]:
        return [self.device_info(dev) for dev in self.bus_devices()]

    def domains(self) -> list[DomainInfo]:
        """Every domain a device is attached to, in device order."""
        seen: dict[int, tuple[IommuDomain, list[str]]] = {}
        for dev in self.bus_devices():
            domain = self.domain_of(dev)
            if domain is not None:
                seen.setdefault(id(domain), (domain, []))[1].append(dev.name)
        out = []
        for domain, names in seen.values():
            stage = asid = vmid = None
            if isinstance(domain, ArmSmmuDomain) and domain.type is not DomainType.IDENTITY:
                stage = domain.stage
                asid = domain.asid if domain.stage == ArmSmmuDomain.STAGE1 else None
                vmid = domain.vmid if domain.stage == ArmSmmuDomain.STAGE2 else None
            label = self.iommu.domain_label(domain)
            out.append(DomainInfo(label, domain.type.value, tuple(names), stage, asid, vmid))
        return out


__all__ = ["ArchInit", "CmdlineError", "DeviceInfo", "DomainInfo", "HostKernel", "KernelParams"]
