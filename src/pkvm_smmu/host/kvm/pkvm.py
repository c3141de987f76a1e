"""``arch/arm64/kvm`` as the host runs pKVM's boot, and the host's side of pKVM's VM hypercalls.

The host kernel reaches the hypervisor only through ``Hvc`` (and its CPU port). Boot, as in Linux:

1. ``setup_arch``: ``kvm-arm.mode=protected`` is read and ``kvm_hyp_reserve`` takes the hyp's carveout
   out of host memory before the page allocator hands anything out (``bootmem_init``);
2. ``core_initcall``: the SMMUv3 KVM half hands the hyp its driver and the SMMU array (``KvmArmSmmuV3``);
3. ``module_init(kvm_arm_init)``: ``__pkvm_init`` makes the carveout the hyp's and, at EL2,
   ``__pkvm_init_finalise`` runs ``kvm_iommu_init``: the hyp takes the SMMUs over;
4. ``device_initcall_sync(finalize_pkvm)``: ``__pkvm_prot_finalize`` turns the host stage-2 on (the
   host is deprivileged) and ``kvm_protected_mode_initialized`` is set.

Between 3 and 4 the host stage-2 is built but not enabled: host accesses still reach the hardware.
A failure leaves protected mode enabled (a CPU capability, fixed early) but not initialised, and the
host runs natively.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pkvm_smmu.host.driver_core import InitcallLevel
from pkvm_smmu.host.hw import Hvc
from pkvm_smmu.host.kvm.arm_smmu_v3 import KvmArmSmmuV3
from pkvm_smmu.host.kvm.kvm_pkvm import (
    host_s2_pgtable_pages,
    hyp_s1_pgtable_pages,
    hyp_vm_table_pages,
    hyp_vmemmap_pages,
)
from pkvm_smmu.host.kvm.variants import DEFAULT_BOOT_VARIANT, BootVariant, boot_variant
from pkvm_smmu.host.mm import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from pkvm_smmu.host.kernel import HostKernel

COMPONENT = "host.kvm"
KVM_ARM_MODE = "kvm-arm.mode"
KVM_MODES = ("none", "nvhe", "protected")
PMD_SIZE = 2 << 20


def kvm_mode_from_cmdline(cmdline: str) -> str:
    """``kvm-arm.mode=``: the last one wins; absent means nVHE (the model has no VHE)."""
    mode = "nvhe"
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key == KVM_ARM_MODE and value in KVM_MODES:
            mode = value
    return mode


class KvmArm:
    """KVM/arm64 of one host kernel, with pKVM's boot (an ``ArchInit`` for ``HostKernel``)."""

    def __init__(self, hvc: Hvc, variant: BootVariant | str = DEFAULT_BOOT_VARIANT) -> None:
        self.hvc = hvc
        self.variant = boot_variant(variant)
        self.smmu = KvmArmSmmuV3(self)
        self._host: HostKernel | None = None
        self.mode = "nvhe"
        self.hyp_mem_base = 0
        self.hyp_mem_size = 0
        self.kvm_arm_initialised = False
        self.kvm_protected_mode_initialized = False  # the static key of finalize_pkvm
        self.init_error = 0  # what pKVM's initialisation returned, when it failed
        self._on_finalize: list[Callable[[], None]] = []

    @property
    def host(self) -> HostKernel:
        if self._host is None:
            raise RuntimeError("KvmArm is not attached to a kernel (pass it as HostKernel(arch=...))")
        return self._host

    def is_protected_kvm_enabled(self) -> bool:
        return self.mode == "protected"

    def emit(self, kind: str, **fields: Any) -> None:
        trace = self.host.trace
        if trace.enabled:
            trace.emit(COMPONENT, kind, **fields)

    def on_finalize(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when ``finalize_pkvm`` is done with protected mode (set up or failed)."""
        self._on_finalize.append(fn)

    # -- ArchInit ---------------------------------------------------------------------------------
    def setup_arch(self, host: HostKernel) -> None:
        self._host = host
        self.mode = kvm_mode_from_cmdline(host.params.cmdline)
        self.emit("mode", mode=self.mode, variant=self.variant.value)
        self.smmu.setup(host)
        if self.is_protected_kvm_enabled():
            self.kvm_hyp_reserve()

    def arch_initcalls(self, host: HostKernel) -> None:
        k = host.kernel
        k.register_initcall(
            InitcallLevel.CORE, self.smmu.kvm_arm_smmu_v3_register, "kvm_arm_smmu_v3_register"
        )
        if self.variant is not BootVariant.NAIVE:
            k.module_init(self.kvm_arm_init, "kvm_arm_init")
        k.register_initcall(InitcallLevel.DEVICE_SYNC, self.finalize_pkvm, "finalize_pkvm")

    def late_linked_initcalls(self, host: HostKernel) -> None:
        if self.variant is BootVariant.NAIVE:
            host.kernel.module_init(self.kvm_arm_init, "kvm_arm_init")  # after arm_smmu_driver_init

    # -- setup_arch: the carveout -----------------------------------------------------------------------
    def kvm_hyp_reserve(self) -> int:
        """``kvm_hyp_reserve``: size the hyp's memory (its tables, page metadata and VM table, plus
        what the IOMMU driver asks for) and take it from the top of RAM, 2 MiB aligned and rounded
        if it fits (``memblock_phys_alloc``), else page aligned."""
        host = self.host
        ram = [(region.base, region.size) for region in host.fw.memory()]
        ram_pages = [size >> PAGE_SHIFT for _, size in ram]
        iommu_pages = self.smmu.kvm_iommu_pages(ram_pages)
        hyp_pages = (
            hyp_s1_pgtable_pages(ram_pages)
            + host_s2_pgtable_pages(ram_pages)
            + hyp_vm_table_pages()
            + hyp_vmemmap_pages(ram_pages)
        )
        size = (hyp_pages + iommu_pages) << PAGE_SHIFT
        pmd_size = -(-size // PMD_SIZE) * PMD_SIZE
        base = _top_down(ram, pmd_size, PMD_SIZE)
        if base is not None:
            size = pmd_size
        else:
            base = _top_down(ram, size, PAGE_SIZE)
        ret = -errno.ENOMEM if base is None else host.mm.reserve(base, size)
        if not ret and base is not None:
            self.hyp_mem_base, self.hyp_mem_size = base, size
        self.emit("kvm_hyp_reserve", base=base, pages=size >> PAGE_SHIFT, iommu_pages=iommu_pages, result=ret)
        return ret

    # -- module_init / device_initcall_sync ------------------------------------------------------------
    def kvm_arm_init(self) -> int:
        """``kvm_arm_init``: in protected mode, ``__pkvm_init`` (the hyp initialises, takes the
        SMMUs over and builds the host stage-2)."""
        if not self.is_protected_kvm_enabled():
            self.emit("kvm_arm_init", mode=self.mode, result=0)
            return 0
        if not self.hyp_mem_size:
            ret = -errno.ENOMEM
        else:
            ret = self.hvc.hvc(
                "__pkvm_init", self.hyp_mem_base >> PAGE_SHIFT, self.hyp_mem_size >> PAGE_SHIFT
            )
        if ret:
            self.init_error = ret
        else:
            self.kvm_arm_initialised = True
        self.emit("kvm_arm_init", mode=self.mode, result=ret)
        return ret

    def finalize_pkvm(self) -> int:
        """``finalize_pkvm``: deprivilege the host, then enable ``kvm_protected_mode_initialized``."""
        if not self.is_protected_kvm_enabled():
            return 0
        ret = 0
        if self.kvm_arm_initialised:
            ret = self.hvc.hvc("__pkvm_prot_finalize")
            if ret:
                self.init_error = ret
            else:
                self.kvm_protected_mode_initialized = True
        self.emit(
            "finalize_pkvm",
            result=ret,
            protected=self.kvm_protected_mode_initialized,
            init_error=self.init_error,
        )
        for fn in self._on_finalize:
            fn()
        return ret

    # -- pKVM VM hypercalls (arch/arm64/kvm/pkvm.c) ------------------------------------------------------
    def pkvm_init_vm(self, pgd_pa: int | None = None) -> int:
        """``__pkvm_init_vm``: donate one page (``pgd_pa``, or a fresh one) for a protected VM's hyp
        state. The VM's handle, or a negative errno."""
        if pgd_pa is None:
            pgd_pa = self.host.mm.alloc_zeroed_pages(1)
            if pgd_pa is None:
                return -errno.ENOMEM
        return self.hvc.hvc("__pkvm_init_vm", pgd_pa >> PAGE_SHIFT, 1)

    def pkvm_host_donate_guest(self, pfn: int, gfn: int, handle: int) -> int:
        return self.hvc.hvc("__pkvm_host_donate_guest", pfn, gfn, handle)

    def pkvm_teardown_vm(self, handle: int) -> int:
        return self.hvc.hvc("__pkvm_teardown_vm", handle)

    def pkvm_host_reclaim_page(self, pfn: int) -> int:
        return self.hvc.hvc("__pkvm_host_reclaim_page", pfn)


def _top_down(ram: list[tuple[int, int]], size: int, align: int) -> int | None:
    for base, length in sorted(ram, reverse=True):
        start = (base + length - size) & ~(align - 1)
        if start >= base:
            return start
    return None


__all__ = [
    "COMPONENT",
    "KVM_ARM_MODE",
    "KvmArm",
    "kvm_mode_from_cmdline",
]
