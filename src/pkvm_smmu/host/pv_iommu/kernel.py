"""The host kernel built for the paravirtual designs (``CONFIG_ARM_SMMU_V3_PKVM`` with a PV IOMMU).

Same kernel, same drivers, same DMA users as ``HostKernel``; what differs is who drives the SMMU and
when pKVM comes up, in link order:

- ``setup_arch``: ``kvm_hyp_reserve`` takes the hyp carveout out of the page allocator;
- ``arch/arm64/kvm``: ``kvm_arm_init`` (``__pkvm_init``) at ``device_initcall`` and
  ``finalize_pkvm`` at ``device_initcall_sync``, both linked before ``drivers/``;
- ``three-drivers``: the pKVM SMMU driver binds the SMMU platform devices at ``core_initcall`` and
  creates the virtual IOMMU devices after ``finalize_pkvm``; the generic PV IOMMU driver binds them;
- ``impl-hooks``: the arm-smmu-v3 driver itself, with the KVM hooks of ``arm_smmu_v3.kvm``; its
  probe defers until pKVM is initialised and the deferred probe at ``late_initcall`` binds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

from pkvm_smmu.devicetree import DeviceTree
from pkvm_smmu.host.driver_core import InitcallLevel
from pkvm_smmu.host.hw import Cpu, Hvc
from pkvm_smmu.host.kernel import HostKernel
from pkvm_smmu.host.pv_iommu.driver import PvIommuDriver
from pkvm_smmu.host.pv_iommu.ops import PvIommuEnv
from pkvm_smmu.host.pv_iommu.pkvm_smmu import PkvmBoot, PkvmSmmuDriver, Spawn
from pkvm_smmu.trace import TraceBus

COMPONENT = "host.kernel"
Arrangement = Literal["three-drivers", "impl-hooks"]
ARRANGEMENTS: tuple[str, ...] = ("three-drivers", "impl-hooks")


class PkvmSetup(PkvmBoot, Protocol):
    def kvm_hyp_reserve(self) -> tuple[int, int] | int:
        """``(base, size)`` of the hyp carveout, or a negative errno."""
        ...


class PvHostKernel(HostKernel):
    """``HostKernel`` with pKVM and a paravirtual IOMMU arrangement."""

    def __init__(
        self,
        cpu: Cpu,
        tree: DeviceTree,
        cmdline: str = "",
        *,
        pkvm: PkvmSetup,
        hvc: Hvc,
        arrangement: Arrangement = "three-drivers",
        spawn: Spawn = "auxiliary",
        trace: TraceBus | None = None,
        now_ns: Callable[[], int] | None = None,
    ) -> None:
        if arrangement not in ARRANGEMENTS:
            raise ValueError(f"unknown arrangement {arrangement!r}; known: {', '.join(ARRANGEMENTS)}")
        self.pkvm = pkvm
        self.hvc = hvc
        self.arrangement = arrangement
        self.spawn = spawn
        self.pkvm_smmu: PkvmSmmuDriver | None = None
        self.pv_iommu: PvIommuDriver | None = None
        self.kvm_impl: Any = None
        super().__init__(cpu, tree, cmdline, trace=trace, now_ns=now_ns)

    def _register_initcalls(self) -> None:
        k = self.kernel
        self._setup_arch()
        populate = self.of_platform_default_populate_init
        k.register_initcall(InitcallLevel.ARCH_SYNC, populate, "of_platform_default_populate_init")
        k.register_initcall(InitcallLevel.SUBSYS, self._iommu_subsys_init, "iommu_subsys_init")
        k.register_initcall(InitcallLevel.DEVICE, self._kvm_arm_init, "kvm_arm_init")
        k.register_initcall(InitcallLevel.DEVICE_SYNC, self._finalize_pkvm, "finalize_pkvm")
        env = PvIommuEnv(self.hvc, self.mm, self.trace)
        if self.arrangement == "three-drivers":
            self.pv_iommu = PvIommuDriver(k, self.iommu, env)
            self.pkvm_smmu = PkvmSmmuDriver(
                k, self.pkvm, self.pv_iommu, self.trace, coherent=self._smmu_coherent, spawn=self.spawn
            )
            self.pkvm_smmu.register()
        else:
            from pkvm_smmu.host.arm_smmu_v3.kvm import ArmSmmuKvmImpl

            impl = ArmSmmuKvmImpl(k, self.pkvm, self.hvc)
            self.kvm_impl = impl
            self.smmu_driver.env.impl = impl
            smmus = [(f"smmu.{d.base:#x}", d.base, d.size, d.dma_coherent) for d in self._smmu_descs.values()]
            init = lambda: impl.kvm_arm_smmu_v3_init(smmus)  # noqa: E731
            k.register_initcall(InitcallLevel.CORE, init, "kvm_arm_smmu_v3_init")
        # drivers/pci, drivers/dma, drivers/iommu
        self.pci_host.register()
        self.dma_engine.register()
        if self.pv_iommu is not None:
            self.pv_iommu.register()
        else:
            self.smmu_driver.register()

    def _setup_arch(self) -> None:
        """``kvm_hyp_reserve``: before the page allocator hands out anything."""
        carveout = self.pkvm.kvm_hyp_reserve()
        if isinstance(carveout, int):
            self._emit("kvm_hyp_reserve", result=carveout)
            return
        base, size = carveout
        self.mm.reserve(base, size)
        self._emit("kvm_hyp_reserve", base=base, size=size, result=0)

    def _smmu_coherent(self, fwnode: Any) -> bool:
        desc = self._smmu_descs.get(fwnode)
        return bool(desc.dma_coherent) if desc is not None else True

    def _kvm_arm_init(self) -> int:
        ret = self.pkvm.kvm_arm_init()
        self._emit("kvm_arm_init", result=ret)
        return ret

    def _finalize_pkvm(self) -> int:
        ret = self.pkvm.finalize_pkvm()
        self._emit("finalize_pkvm", result=ret, protected=self.pkvm.protected_mode_initialized())
        return ret


__all__ = ["ARRANGEMENTS", "Arrangement", "PkvmSetup", "PvHostKernel"]
