"""KVM hooks of the arm-smmu-v3 driver for ``pv-identity`` (``impl-hooks``), in the style of
``arm_smmu_impl_ops``: one driver manages the SMMU, and where pKVM owns the hardware the hooks stand
in for it. The driver calls them only when ``ArmSmmuEnv.impl`` is set; natively nothing changes.

- ``kvm_arm_smmu_v3_init`` (``core_initcall``): hand every SMMU of the device tree to pKVM.
- ``device_probe``: -EPROBE_DEFER until pKVM is initialised (the deferral Mostafa proposed on v4
  15/28), then no register access at all: the hyp probed and enabled the SMMU.
- ``iommu_ops``: identity and blocked domains only, each attach one hypercall per StreamID
  ("attach identity" / "attach blocking"); masters start blocked; no paging domains, so the DMA
  API runs in identity mode.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import Any

from pkvm_smmu.arch.pv_iommu_abi import HVC_ATTACH_BLOCKING, HVC_ATTACH_IDENTITY
from pkvm_smmu.host.arm_smmu_v3.device import ArmSmmuDevice
from pkvm_smmu.host.arm_smmu_v3.domain import ArmSmmuIommuOps, Master
from pkvm_smmu.host.driver_core import EPROBE_DEFER, Kernel
from pkvm_smmu.host.hw import Hvc
from pkvm_smmu.host.iommu.ops import DomainType, IommuDomain, IommuFwspec, IommuResvRegion
from pkvm_smmu.host.pv_iommu.pkvm_smmu import PkvmBoot


class ArmSmmuKvmImpl:
    """The hooks object (``ArmSmmuEnv.impl``)."""

    def __init__(self, kernel: Kernel, boot: PkvmBoot, hvc: Hvc) -> None:
        self.kernel = kernel
        self.boot = boot
        self.hvc = hvc
        self.index: dict[int, int] = {}  # MMIO base -> the hyp's IOMMU index

    def kvm_arm_smmu_v3_init(self, smmus: Iterable[tuple[str, int, int, bool]]) -> int:
        """``(name, base, size, coherent)`` of each SMMU node, handed to pKVM before it initialises."""
        for name, base, size, coherent in smmus:
            index = self.boot.register_smmu(name, base, size, coherent)
            if index < 0:
                return index
            self.index[base] = index
        return 0

    def device_probe(self, pdev: Any, smmu: ArmSmmuDevice) -> int:
        if not self.boot.protected_mode_initialized():
            return self.kernel.dev_err_probe(pdev, -EPROBE_DEFER, "pKVM is not initialised yet")
        if smmu.ioaddr not in self.index:
            return -errno.ENODEV
        smmu.probed = True
        smmu.emit("probe.kvm", index=self.index[smmu.ioaddr])
        return 0

    def iommu_ops(self, smmu: ArmSmmuDevice) -> ArmSmmuIommuOps:
        return ArmSmmuKvmIommuOps(smmu, self)


class ArmSmmuKvmDomain(IommuDomain):
    """Identity or blocked, by hypercall for each StreamID of the master."""

    def __init__(self, ops: ArmSmmuKvmIommuOps, domain_type: DomainType) -> None:
        super().__init__(domain_type)
        self.ops = ops

    def attach_dev(self, dev: Any) -> int:
        master = self.ops.master_of(dev)
        if master is None:
            return -errno.ENODEV
        name = HVC_ATTACH_IDENTITY if self.type is DomainType.IDENTITY else HVC_ATTACH_BLOCKING
        for sid in master.unique_sids():
            ret = self.ops.impl.hvc.hvc(name, self.ops.iommu_index, sid)
            if ret:
                return ret
        master.domain = self
        return 0


class ArmSmmuKvmIommuOps(ArmSmmuIommuOps):
    """``arm_smmu_ops`` with the KVM hooks: no stream table of the host's, no paging domains."""

    def __init__(self, smmu: ArmSmmuDevice, impl: ArmSmmuKvmImpl) -> None:
        super().__init__(smmu)
        self.impl = impl
        self.iommu_index = impl.index[smmu.ioaddr]
        self.identity_domain = ArmSmmuKvmDomain(self, DomainType.IDENTITY)
        self.blocked_domain = ArmSmmuKvmDomain(self, DomainType.BLOCKED)

    def probe_device(self, dev: Any) -> Any:
        fwspec = getattr(dev, "iommu_fwspec", None)
        if not isinstance(fwspec, IommuFwspec) or not fwspec.ids:
            return -errno.ENODEV
        if id(dev) in self._masters:
            return -errno.EBUSY
        master = Master(self.smmu, dev, fwspec.ids)
        self._masters[id(dev)] = master
        assert self.blocked_domain is not None
        ret = self.blocked_domain.attach_dev(dev)  # devices start in ABORT
        self.smmu.emit("probe_device", dev=master.dev_name, sids=list(fwspec.ids), result=ret)
        if ret:
            del self._masters[id(dev)]
            return ret
        return self.smmu

    def release_device(self, dev: Any) -> None:
        if id(dev) in self._masters:
            assert self.blocked_domain is not None
            self.blocked_domain.attach_dev(dev)
            del self._masters[id(dev)]

    def domain_alloc_paging_flags(self, dev: Any, *, nest_parent: bool = False) -> IommuDomain | int:
        return -errno.EOPNOTSUPP

    def domain_alloc_nested(self, parent: IommuDomain, vste: int) -> IommuDomain | int:
        return -errno.EOPNOTSUPP

    def def_domain_type(self, dev: Any) -> DomainType | None:
        return DomainType.IDENTITY

    def get_resv_regions(self, dev: Any) -> list[IommuResvRegion]:
        return []


__all__ = ["ArmSmmuKvmDomain", "ArmSmmuKvmImpl", "ArmSmmuKvmIommuOps"]
