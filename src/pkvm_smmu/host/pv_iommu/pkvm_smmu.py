"""The pKVM SMMU driver's untrusted host half (``three-drivers``).

It binds the SMMU's platform device early (``core_initcall``), reads the MMIO resource and the
``dma-coherent`` property, and hands each SMMU to pKVM before pKVM initialises (the array v4 builds
at ``core_initcall``). It never touches the SMMU: the hyp takes it over at ``finalize_pkvm``. Once
pKVM is up it creates, per SMMU, the device the generic paravirtual IOMMU driver binds ("never delay
binding, delay creating the device"): an auxiliary device by default, a faux device on request.
Consumers of the SMMU meanwhile defer in ``of_dma_configure`` because no IOMMU is registered for its
firmware node yet.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pkvm_smmu.host.driver_core import (
    IORESOURCE_MEM,
    InitcallLevel,
    Kernel,
    PlatformDevice,
    PlatformDriver,
    auxiliary_device_add,
    auxiliary_device_init,
    faux_device_create,
    platform_driver_register,
    platform_get_resource,
)
from pkvm_smmu.host.pv_iommu.driver import PKVM_SMMU_MODNAME, PvIommuDriver, ViommuDevice
from pkvm_smmu.host.pv_iommu.ops import ViommuInfo
from pkvm_smmu.trace import TraceBus

COMPONENT = "host.pkvm_smmu"
PKVM_SMMU_DRIVER_NAME = "arm-smmu-v3-pkvm"
ARM_SMMU_COMPATIBLE = "arm,smmu-v3"

Spawn = Literal["auxiliary", "faux"]


class PkvmBoot(Protocol):
    """What the host kernel's KVM code can do with pKVM while the host is still trusted (in Linux,
    calls into the nVHE object and ``kvm_nvhe_sym`` writes before deprivilege)."""

    def register_smmu(self, name: str, base: int, size: int, coherent: bool) -> int:
        """Add an SMMU to the array pKVM takes over: its IOMMU index, or a negative errno."""
        ...

    def kvm_arm_init(self) -> int:
        """``__pkvm_init``: the carveout becomes the hyp's."""
        ...

    def finalize_pkvm(self) -> int:
        """``__pkvm_init_finalise``: the hyp takes the IOMMUs over and deprivileges the host."""
        ...

    def protected_mode_initialized(self) -> bool: ...


@dataclass
class PkvmSmmu:
    pdev: PlatformDevice
    index: int
    base: int
    coherent: bool
    viommu: Any = None


class PkvmSmmuDriver:
    """``arm_smmu_v3_kvm``'s platform driver."""

    def __init__(
        self,
        kernel: Kernel,
        boot: PkvmBoot,
        pv_driver: PvIommuDriver,
        trace: TraceBus,
        *,
        coherent: Callable[[Hashable | None], bool] | None = None,
        spawn: Spawn = "auxiliary",
    ) -> None:
        self.kernel = kernel
        self.boot = boot
        self.pv_driver = pv_driver
        self.trace = trace
        self.coherent = coherent
        self.spawn = spawn
        self.smmus: list[PkvmSmmu] = []
        self.driver = PlatformDriver(
            PKVM_SMMU_DRIVER_NAME, self.probe, of_match_table=(ARM_SMMU_COMPATIBLE,), suppress_bind_attrs=True
        )

    def register(self) -> None:
        """The platform driver at ``core_initcall`` (bound as soon as the SMMU nodes are populated),
        and the step that creates the virtual IOMMU devices right after ``finalize_pkvm``."""
        k = self.kernel
        k.register_initcall(
            InitcallLevel.CORE, lambda: platform_driver_register(k, self.driver), "kvm_arm_smmu_v3_register"
        )
        k.register_initcall(InitcallLevel.DEVICE_SYNC, self.spawn_viommus, "kvm_arm_smmu_v3_spawn")

    def emit(self, kind: str, **fields: Any) -> None:
        if self.trace.enabled:
            self.trace.emit(COMPONENT, kind, **fields)

    def probe(self, pdev: PlatformDevice) -> int:
        res = platform_get_resource(pdev, IORESOURCE_MEM, 0)
        if res is None:
            return -errno.EINVAL
        coherent = self.coherent(pdev.fwnode) if self.coherent is not None else True
        index = self.boot.register_smmu(pdev.name, res.start, res.size, coherent)
        self.emit("probe", dev=pdev.name, base=res.start, size=res.size, index=index)
        if index < 0:
            return index
        smmu = PkvmSmmu(pdev, index, res.start, coherent)
        self.smmus.append(smmu)
        pdev.driver_data = smmu
        if self.boot.protected_mode_initialized():
            self._spawn(smmu)  # bound after pKVM came up (a module loaded late)
        return 0

    def spawn_viommus(self) -> int:
        if not self.boot.protected_mode_initialized():
            # The SMMUs stay without a driver; their consumers stay deferred (a known gap).
            self.emit("warn", message="pKVM is not initialised: no virtual IOMMU devices")
            return 0
        for smmu in self.smmus:
            if smmu.viommu is None:
                self._spawn(smmu)
        return 0

    def _spawn(self, smmu: PkvmSmmu) -> int:
        info = ViommuInfo(smmu.index, f"pviommu.{smmu.base:#x}", smmu.pdev.fwnode, smmu.coherent)
        if self.spawn == "faux":
            pv = self.pv_driver
            fdev = faux_device_create(
                self.kernel,
                f"{PKVM_SMMU_MODNAME}.viommu.{smmu.index}",
                smmu.pdev,
                lambda dev: pv.probe_viommu(dev, info),
                pv.remove_viommu,
            )
            ret = 0 if fdev is not None else -errno.ENODEV
            smmu.viommu = fdev
        else:
            adev = ViommuDevice(info, smmu.pdev)
            ret = auxiliary_device_init(adev) or auxiliary_device_add(self.kernel, adev, PKVM_SMMU_MODNAME)
            smmu.viommu = adev if not ret else None
        self.emit("spawn", dev=smmu.pdev.name, index=smmu.index, bus=self.spawn, result=ret)
        return ret


__all__ = ["ARM_SMMU_COMPATIBLE", "PKVM_SMMU_DRIVER_NAME", "PkvmBoot", "PkvmSmmu", "PkvmSmmuDriver", "Spawn"]
