"""The platform driver (``arm_smmu_driver``): ``compatible = "arm,smmu-v3"``, registered from an
initcall, probing each matching platform device and registering it with the IOMMU core.

Natively the driver registers at ``device_initcall``; under pKVM (v4 patch 15) the same driver
registers at ``device_initcall_sync``, once the hypervisor has taken the SMMU over, so the level is
a parameter.

Hooks the KVM half (``host.kvm``) sets for the boot arrangements argued about on patch 15, each off
by default so the native driver is unchanged:

- ``probe_gate``: called first in ``arm_smmu_device_probe``; a non-zero result (-EPROBE_DEFER while
  pKVM is not initialised) is returned before the hardware is touched;
- ``enable_aux``: also bind auxiliary devices (resources and fwnode from the parent platform device
  pKVM bound), as v5+ "Support probing KVM emulated devices";
- ``find_by_driver``: ``arm_smmu_get_by_fwnode`` looks among the devices bound to this driver
  (``driver_find_device_by_fwnode``) rather than the first platform device with the fwnode
  (``bus_find_device_by_fwnode``, Linux's), which is wrong once two devices share the fwnode.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pkvm_smmu.host.arm_smmu_v3.device import ArmSmmuDevice, ArmSmmuParams, DmaMemory, MsiAlloc
from pkvm_smmu.host.arm_smmu_v3.domain import ArmSmmuIommuOps
from pkvm_smmu.host.arm_smmu_v3.features import Opt
from pkvm_smmu.host.driver_core import (
    AuxiliaryDevice,
    AuxiliaryDeviceId,
    AuxiliaryDriver,
    Device,
    InitcallLevel,
    Kernel,
    auxiliary_driver_register,
    auxiliary_driver_unregister,
    bus_find_device_by_fwnode,
    dev_get_drvdata,
    driver_find_device_by_fwnode,
)
from pkvm_smmu.host.driver_core.platform import (
    IORESOURCE_IRQ,
    IORESOURCE_MEM,
    PlatformDevice,
    PlatformDriver,
    platform_driver_register,
    platform_driver_unregister,
    platform_get_resource,
    resource_type,
)
from pkvm_smmu.host.hw import Cpu
from pkvm_smmu.host.mm import HostTableMemory
from pkvm_smmu.pgtable.allocator import PageAllocator
from pkvm_smmu.trace.bus import TraceBus

ARM_SMMU_DRIVER_NAME = "arm-smmu-v3"
ARM_SMMU_COMPATIBLE = "arm,smmu-v3"
ARM_SMMU_MODNAME = "arm_smmu_v3"  # KBUILD_MODNAME: the auxiliary driver is "arm_smmu_v3.<name>"
# DT quirk properties -> options (parse_driver_options).
DT_OPTIONS = {
    "hisilicon,broken-prefetch-cmd": Opt.SKIP_PREFETCH,
    "cavium,cn9900-broken-page1-regspace": Opt.PAGE0_REGS_ONLY,
}

IrqHandler = Callable[[], bool]


class IommuRegistry(Protocol):
    """The IOMMU core calls the driver needs (``iommu_device_register``)."""

    def iommu_device_register(self, iommu: Any, ops: Any, fwnode: Any, name: str | None = None) -> int: ...

    def iommu_device_unregister(self, iommu: Any) -> int: ...


@dataclass(frozen=True)
class SmmuFirmware:
    """What ``arm_smmu_device_dt_probe`` reads from the SMMU's node besides its resources."""

    dma_coherent: bool = True
    iommu_cells: int = 1
    options: frozenset[str] = frozenset()


@dataclass
class ArmSmmuEnv:
    """The kernel services the driver uses, handed over by whoever assembles the host kernel."""

    cpu: Cpu
    mm: DmaMemory
    iommu: IommuRegistry
    trace: TraceBus = field(default_factory=TraceBus)
    pgtable_allocator: PageAllocator | None = None
    # The node's properties by fwnode (None: defaults: coherent, one cell, no quirks).
    firmware: Callable[[Hashable | None], SmmuFirmware | None] | None = None
    # request_irq(pdev, irq, name, handler) -> 0 or -errno; None: no interrupt plumbing.
    request_irq: Callable[[PlatformDevice, int, str, IrqHandler], int] | None = None
    msi_alloc: Callable[[PlatformDevice], MsiAlloc | None] | None = None
    # msi_get_virq(pdev, source): the IRQ platform MSI gave a source; it replaces the wired line.
    msi_irq: Callable[[PlatformDevice, str], int | None] | None = None
    disable_bypass: bool = True
    disable_msipolling: bool = False
    # KVM hooks (``kvm.ArmSmmuKvmImpl``, in the style of ``arm_smmu_impl_ops``); None: native.
    impl: Any = None


class ArmSmmuV3Driver:
    """``arm_smmu_driver`` bound to one kernel."""

    def __init__(
        self, kernel: Kernel, env: ArmSmmuEnv, level: InitcallLevel | str = InitcallLevel.DEVICE
    ) -> None:
        self.kernel = kernel
        self.env = env
        self.level = InitcallLevel.parse(level)
        self.smmus: dict[int, ArmSmmuDevice] = {}  # id(pdev) -> device
        self.driver = PlatformDriver(
            ARM_SMMU_DRIVER_NAME,
            self.probe,
            self.remove,
            of_match_table=(ARM_SMMU_COMPATIBLE,),
            suppress_bind_attrs=True,
        )
        # KVM-mode hooks (see the module docstring); all off natively.
        self.probe_gate: Callable[[Device], int] | None = None
        self.find_by_driver = False
        self.aux_driver: AuxiliaryDriver | None = None

    def register(self) -> None:
        """``module_driver(arm_smmu_driver, platform_driver_register, ...)`` at ``self.level``."""
        self.kernel.register_initcall(self.level, self._driver_init, "arm_smmu_driver_init")

    def _driver_init(self) -> int:
        ret = platform_driver_register(self.kernel, self.driver)
        if not ret and self.aux_driver is not None:
            ret = auxiliary_driver_register(self.kernel, self.aux_driver, ARM_SMMU_MODNAME)
        return ret

    def enable_aux(self, id_table: Sequence[str]) -> None:
        """Also bind the auxiliary devices ``id_table`` names (registered with the platform driver)."""
        self.aux_driver = AuxiliaryDriver(
            "smmu", self.probe_aux, tuple(id_table), self.remove_aux, suppress_bind_attrs=True
        )

    def unregister(self) -> None:
        if self.aux_driver is not None:
            auxiliary_driver_unregister(self.kernel, self.aux_driver)
        platform_driver_unregister(self.kernel, self.driver)

    def arm_smmu_get_by_fwnode(self, fwnode: Hashable | None) -> ArmSmmuDevice | None:
        """The SMMU registered for ``fwnode``: the driver data of the device the lookup finds."""
        if fwnode is None:
            return None
        if self.find_by_driver:
            dev = driver_find_device_by_fwnode(self.driver, fwnode)
            if dev is None and self.aux_driver is not None:
                dev = driver_find_device_by_fwnode(self.aux_driver, fwnode)
        else:
            dev = bus_find_device_by_fwnode(self.kernel.platform_bus, fwnode)
        data = dev_get_drvdata(dev) if dev is not None else None
        return data if isinstance(data, ArmSmmuDevice) else None

    # -- probe ----------------------------------------------------------------------------------
    def probe(self, pdev: PlatformDevice) -> int:
        """``arm_smmu_device_probe``."""
        return self._device_probe(pdev, pdev)

    def probe_aux(self, auxdev: AuxiliaryDevice, entry: AuxiliaryDeviceId) -> int:
        """An emulated SMMU pKVM exposes as an auxiliary device of the platform device it bound."""
        parent = auxdev.parent
        if not isinstance(parent, PlatformDevice):
            return -errno.ENODEV
        return self._device_probe(auxdev, parent)

    def _device_probe(self, dev: Device, pdev: PlatformDevice) -> int:
        """Probe the SMMU ``pdev`` describes (resources, firmware node) for the device ``dev`` the
        driver binds (``pdev`` itself, or an auxiliary device of it)."""
        if self.probe_gate is not None:
            ret = self.probe_gate(dev)
            if ret:
                return ret
        env = self.env
        fw = env.firmware(pdev.fwnode) if env.firmware is not None else None
        fw = fw if fw is not None else SmmuFirmware()
        if fw.iommu_cells != 1:
            self._emit(pdev, "err", message=f"invalid #iommu-cells value ({fw.iommu_cells})")
            return -errno.EINVAL
        options = Opt.NONE
        for prop, opt in DT_OPTIONS.items():
            if prop in fw.options:
                options |= opt
        res = platform_get_resource(pdev, IORESOURCE_MEM, 0)
        if res is None:
            return -errno.EINVAL
        irqs = {r.name: r.start for r in pdev.resources if resource_type(r) == IORESOURCE_IRQ and r.name}
        if "combined" in irqs:
            irqs = {"combined": irqs["combined"]}
        params = ArmSmmuParams(
            disable_bypass=env.disable_bypass,
            disable_msipolling=env.disable_msipolling,
            coherent=fw.dma_coherent,
            options=options,
        )
        smmu = ArmSmmuDevice(
            env.cpu,
            env.mm,
            res.start,
            res.size,
            name=pdev.name or "smmu",
            params=params,
            pgtable_memory=HostTableMemory(env.cpu),
            pgtable_allocator=env.pgtable_allocator,
            trace=env.trace,
            irqs=tuple(irqs),
            msi_alloc=env.msi_alloc(pdev) if env.msi_alloc is not None else None,
        )
        impl = env.impl
        ret = impl.device_probe(dev, smmu) if impl is not None else smmu.probe()
        if ret:
            return ret
        if impl is None:  # under pKVM the hyp owns the SMMU and its interrupts
            self._request_irqs(pdev, smmu, irqs)
        ops = impl.iommu_ops(smmu) if impl is not None else ArmSmmuV3Ops(self, smmu)
        dev.driver_data = smmu
        self.smmus[id(dev)] = smmu
        ret = env.iommu.iommu_device_register(smmu, ops, dev.fwnode, f"smmu3.{res.start:#x}")
        if ret:
            smmu.dev_err("Failed to register iommu", error=ret)
            if impl is None:
                smmu.device_disable()
            del self.smmus[id(dev)]
            dev.driver_data = None
            return ret
        return 0

    def _request_irqs(self, pdev: PlatformDevice, smmu: ArmSmmuDevice, irqs: dict[str, int]) -> None:
        request = self.env.request_irq
        if request is None:
            return
        handlers = smmu.irq_handlers()
        sources = dict(irqs)
        msi_irq = self.env.msi_irq
        if msi_irq is not None:
            for name in sorted(smmu.irqs_with_msi):
                virq = msi_irq(pdev, name)
                if virq:
                    sources[name] = virq  # Linux: evtq.q.irq = msi_get_virq(...)
        for name, irq in sources.items():
            handler = handlers.get(name)
            if handler is None:
                continue  # e.g. cmdq-sync: Linux never requests it
            if request(pdev, irq, f"arm-smmu-v3-{name}", handler):
                smmu.dev_warn(f"failed to enable {name} irq")

    def remove(self, pdev: Device) -> None:
        """``arm_smmu_device_remove``."""
        smmu = self.smmus.pop(id(pdev), None)
        if smmu is None:
            return
        self.env.iommu.iommu_device_unregister(smmu)
        if self.env.impl is None:
            smmu.device_disable()
        pdev.driver_data = None

    def remove_aux(self, auxdev: AuxiliaryDevice) -> None:
        self.remove(auxdev)

    def shutdown(self, pdev: PlatformDevice) -> None:
        smmu = self.smmus.get(id(pdev))
        if smmu is not None and self.env.impl is None:
            smmu.device_disable()

    def _emit(self, pdev: PlatformDevice, kind: str, **fields: Any) -> None:
        if self.env.trace.enabled:
            self.env.trace.emit(f"arm-smmu-v3.{pdev.name}", kind, **fields)


class ArmSmmuV3Ops(ArmSmmuIommuOps):
    """``arm_smmu_ops`` with Linux's lookup in ``arm_smmu_probe_device``: the SMMU comes from the
    fwspec's fwnode through ``arm_smmu_get_by_fwnode``, so a lookup that finds another device with
    the same fwnode fails the probe (-ENODEV) as it does in Linux."""

    def __init__(self, driver: ArmSmmuV3Driver, smmu: ArmSmmuDevice) -> None:
        super().__init__(smmu)
        self.driver = driver

    def probe_device(self, dev: Any) -> Any:
        fwspec = getattr(dev, "iommu_fwspec", None)
        found = self.driver.arm_smmu_get_by_fwnode(getattr(fwspec, "iommu_fwnode", None))
        if found is not self.smmu:
            self.smmu.emit("probe_device", dev=getattr(dev, "name", "?"), result=-errno.ENODEV,
                           why="arm_smmu_get_by_fwnode found no arm-smmu-v3 device")  # fmt: skip
            return -errno.ENODEV
        return super().probe_device(dev)


def smmu_firmware_from_descs(descs: Sequence[Any]) -> Callable[[Hashable | None], SmmuFirmware | None]:
    """A ``firmware`` lookup over ``host.firmware.smmu_descs(fw)``."""
    by_node = {id(d.fwnode): d for d in descs}

    def lookup(fwnode: Hashable | None) -> SmmuFirmware | None:
        desc = by_node.get(id(fwnode))
        if desc is None:
            return None
        return SmmuFirmware(dma_coherent=bool(desc.dma_coherent), options=frozenset(desc.options))

    return lookup


__all__ = [
    "ARM_SMMU_COMPATIBLE",
    "ARM_SMMU_DRIVER_NAME",
    "ARM_SMMU_MODNAME",
    "ArmSmmuEnv",
    "ArmSmmuV3Driver",
    "ArmSmmuV3Ops",
    "IommuRegistry",
    "SmmuFirmware",
    "smmu_firmware_from_descs",
]
