"""The generic paravirtual IOMMU driver: binds the auxiliary (or faux) devices the pKVM SMMU driver
spawns, one per virtualized IOMMU, and registers each with the IOMMU core under the physical
IOMMU's firmware node, so that consumers whose ``iommus`` name that node (and which deferred until
now) probe behind it. Nothing here knows the IOMMU is an SMMUv3.
"""

from __future__ import annotations

import errno
from typing import Any, Protocol

from pkvm_smmu.host.driver_core import (
    AuxiliaryDevice,
    AuxiliaryDeviceId,
    AuxiliaryDriver,
    InitcallLevel,
    Kernel,
    auxiliary_driver_register,
)
from pkvm_smmu.host.pv_iommu.ops import COMPONENT, PvIommuEnv, PvIommuOps, ViommuInfo

PKVM_SMMU_MODNAME = "pkvm_smmu"  # the pKVM SMMU driver, which creates the devices
VIOMMU_DEVNAME = "viommu"
PV_IOMMU_MODNAME = "pkvm_pviommu"


class IommuRegistry(Protocol):
    def iommu_device_register(self, iommu: Any, ops: Any, fwnode: Any, name: str | None = None) -> int: ...

    def iommu_device_unregister(self, iommu: Any) -> int: ...


class ViommuDevice(AuxiliaryDevice):
    """``pkvm_smmu.viommu.<n>``: an auxiliary device carrying what the PV driver needs."""

    def __init__(self, info: ViommuInfo, parent: Any) -> None:
        super().__init__(VIOMMU_DEVNAME, info.index, parent)
        self.info = info


class PvIommu:
    """One bound virtualized IOMMU (the ``struct iommu_device`` the core holds)."""

    def __init__(self, dev: Any, info: ViommuInfo, ops: PvIommuOps) -> None:
        self.dev = dev
        self.info = info
        self.ops = ops

    @property
    def name(self) -> str:
        return self.info.name


class PvIommuDriver:
    """``pkvm_pviommu``: the auxiliary driver, and ``probe_viommu`` for faux devices."""

    def __init__(self, kernel: Kernel, iommu: IommuRegistry, env: PvIommuEnv) -> None:
        self.kernel = kernel
        self.iommu = iommu
        self.env = env
        self.viommus: dict[int, PvIommu] = {}  # id(dev) -> bound IOMMU
        self.driver = AuxiliaryDriver(
            "",
            self._aux_probe,
            (f"{PKVM_SMMU_MODNAME}.{VIOMMU_DEVNAME}",),
            self._aux_remove,
            suppress_bind_attrs=True,
        )

    def register(self, level: InitcallLevel = InitcallLevel.DEVICE) -> None:
        """``module_auxiliary_driver`` (drivers/iommu: after the endpoint drivers in link order)."""
        self.kernel.register_initcall(
            level,
            lambda: auxiliary_driver_register(self.kernel, self.driver, PV_IOMMU_MODNAME),
            "pviommu_init",
        )

    def emit(self, kind: str, **fields: Any) -> None:
        if self.env.trace.enabled:
            self.env.trace.emit(COMPONENT, kind, **fields)

    def _aux_probe(self, adev: AuxiliaryDevice, _id: AuxiliaryDeviceId) -> int:
        info = getattr(adev, "info", None)
        if not isinstance(info, ViommuInfo):
            return -errno.EINVAL
        return self.probe_viommu(adev, info)

    def _aux_remove(self, adev: AuxiliaryDevice) -> None:
        self.remove_viommu(adev)

    def probe_viommu(self, dev: Any, info: ViommuInfo) -> int:
        """Ask the hyp what the IOMMU offers, then register it with the IOMMU core."""
        ops = PvIommuOps(info, self.env)
        if ops.error or not ops.caps:
            self.emit("probe", iommu=info.name, index=info.index, result=ops.error or -errno.ENODEV)
            return ops.error or -errno.ENODEV
        viommu = PvIommu(dev, info, ops)
        self.emit(
            "probe",
            iommu=info.name,
            index=info.index,
            caps=str(ops.caps),
            pgsize_bitmap=ops.pgsize_bitmap,
            result=0,
        )
        self.viommus[id(dev)] = viommu
        ret = self.iommu.iommu_device_register(viommu, ops, info.fwnode, info.name)
        if ret:
            del self.viommus[id(dev)]
        return ret

    def remove_viommu(self, dev: Any) -> None:
        viommu = self.viommus.pop(id(dev), None)
        if viommu is not None:
            self.iommu.iommu_device_unregister(viommu)


__all__ = [
    "PKVM_SMMU_MODNAME",
    "PV_IOMMU_MODNAME",
    "VIOMMU_DEVNAME",
    "PvIommu",
    "PvIommuDriver",
    "ViommuDevice",
]
