"""``arm-smmu-v3-kvm.c``: the KVM half of the host's SMMUv3 driver (v4 patches 14-17), and the pKVM
platform driver the ``aux-device`` and ``child-platform`` boot variants add.

At ``core_initcall``, in protected mode only, the device tree's ``arm,smmu-v3`` nodes become the array
the hyp takes over (``hyp_arm_smmu_v3_device[]``: MMIO base and size, at least 128 KiB, coherency,
plus the zeroed 64 KiB command queue and 1 MiB stream table the kernel sets aside for the hyp's
shadows), written to a page of host memory and handed over with the hyp driver before any driver has
touched the hardware.

The variants' pieces: ``defer`` gates arm-smmu-v3's probe on ``kvm_protected_mode_initialized``;
``aux-device`` and ``child-platform`` register a pKVM platform driver that binds the SMMU platform
devices, and once ``finalize_pkvm`` is done (set up or failed, so the SMMU can still probe natively)
create the device arm-smmu-v3 is to bind: an auxiliary device, or a child platform device with the
SMMU's fwnode (``device_set_node``).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pkvm_smmu.host.driver_core import (
    EPROBE_DEFER,
    PLATFORM_DEVID_AUTO,
    AuxiliaryDevice,
    Device,
    PlatformDevice,
    PlatformDriver,
    auxiliary_device_add,
    auxiliary_device_init,
    device_set_node,
    platform_device_register,
    platform_driver_register,
)
from pkvm_smmu.host.firmware import smmu_descs
from pkvm_smmu.host.kvm.kvm_pkvm import host_s2_pgtable_pages
from pkvm_smmu.host.kvm.variants import BootVariant
from pkvm_smmu.host.mm import PAGE_SIZE

if TYPE_CHECKING:
    from pkvm_smmu.host.kernel import HostKernel
    from pkvm_smmu.host.kvm.pkvm import KvmArm

SZ_128K = 0x20000
SMMU_KVM_CMDQ_SIZE = 64 << 10  # 4096 commands: the hyp drains everything on each PROD write
SMMU_KVM_STRTAB_SIZE = 1 << 20  # the largest 2-level L1 table
SMMUV3_L2_STE_PAGES = 500  # patch 14: pool pages for L2 stream tables, on top of the identity map
KVM_ARM_SMMU_DRIVER = "kvm-arm-smmu-v3"
KVM_ARM_SMMU_MODNAME = "arm_smmu_v3_kvm"
KVM_ARM_SMMU_AUX_NAME = "smmu"
KVM_ARM_SMMU_AUX_ID = f"{KVM_ARM_SMMU_MODNAME}.{KVM_ARM_SMMU_AUX_NAME}"
CHILD_PLATFORM_NAME = "arm-smmu-v3-kvm"
HYP_SMMU_COHERENT = 1 << 0


@dataclass(frozen=True)
class HypSmmuEntry:
    """One ``struct hyp_arm_smmu_v3_device`` as the host fills it: seven little-endian u64s."""

    mmio_addr: int
    mmio_size: int
    coherent: bool
    cmdq_pa: int
    cmdq_size: int
    strtab_pa: int
    strtab_size: int

    SIZE = 7 * 8

    def pack(self) -> bytes:
        words = (
            self.mmio_addr,
            self.mmio_size,
            HYP_SMMU_COHERENT if self.coherent else 0,
            self.cmdq_pa,
            self.cmdq_size,
            self.strtab_pa,
            self.strtab_size,
        )
        return b"".join(word.to_bytes(8, "little") for word in words)

    @classmethod
    def unpack(cls, data: bytes) -> HypSmmuEntry:
        w = [int.from_bytes(data[i : i + 8], "little") for i in range(0, cls.SIZE, 8)]
        return cls(w[0], w[1], bool(w[2] & HYP_SMMU_COHERENT), w[3], w[4], w[5], w[6])


@dataclass
class KvmSmmu:
    """The pKVM driver's data for one SMMU platform device it bound."""

    pdev: PlatformDevice
    index: int
    spawned: Device | None = None


class KvmArmSmmuV3:
    """The KVM half of arm-smmu-v3 for one kernel; owned by ``KvmArm``."""

    def __init__(self, kvm: KvmArm) -> None:
        self.kvm = kvm
        self.entries: list[HypSmmuEntry] = []
        self.array_pa: int | None = None
        self.registered = 0  # what handing the driver to the hyp returned
        self.bound: list[KvmSmmu] = []
        self._spawned: set[int] = set()
        self.pkvm_driver = PlatformDriver(
            KVM_ARM_SMMU_DRIVER,
            self.pkvm_probe,
            of_match_table=("arm,smmu-v3",),
            suppress_bind_attrs=True,
        )

    @property
    def variant(self) -> BootVariant:
        return self.kvm.variant

    def setup(self, host: HostKernel) -> None:
        """Wire the variant's hooks into arm-smmu-v3 (compiled in, whatever the KVM mode)."""
        drv = host.smmu_driver
        if self.variant is BootVariant.DEFER:
            drv.probe_gate = self.probe_gate
        elif self.variant is BootVariant.AUX_DEVICE:
            drv.enable_aux([KVM_ARM_SMMU_AUX_ID])
            drv.find_by_driver = True  # the platform device with the fwnode is pKVM's
        if self.variant in (BootVariant.AUX_DEVICE, BootVariant.CHILD_PLATFORM):
            self.kvm.on_finalize(self.spawn_devices)

    # -- setup_arch: the pool (patches 11, 14) -----------------------------------------------------------
    def kvm_iommu_pages(self, ram_pages: list[int]) -> int:
        """Pages of the IOMMU pool: the identity map's tables plus L2 stream tables, if the device
        tree has an SMMUv3 at all."""
        if not smmu_descs(self.kvm.host.fw):
            return 0
        return host_s2_pgtable_pages(ram_pages) + SMMUV3_L2_STE_PAGES

    # -- core_initcall (patches 14, 16) ---------------------------------------------------------------------
    def kvm_arm_smmu_v3_register(self) -> int:
        """Build the SMMU array and hand it, with the hyp driver, to the hyp (protected mode only)."""
        kvm = self.kvm
        if not kvm.is_protected_kvm_enabled():
            return 0
        host = kvm.host
        entries: list[HypSmmuEntry] = []
        for desc in smmu_descs(host.fw):
            if desc.size < SZ_128K:
                kvm.emit("smmu_array", node=desc.fwnode.path, error="MMIO region smaller than 128 KiB")
                return -errno.EINVAL
            cmdq = host.mm.alloc_zeroed_pages(
                SMMU_KVM_CMDQ_SIZE // PAGE_SIZE, SMMU_KVM_CMDQ_SIZE // PAGE_SIZE
            )
            strtab = host.mm.alloc_zeroed_pages(
                SMMU_KVM_STRTAB_SIZE // PAGE_SIZE, SMMU_KVM_STRTAB_SIZE // PAGE_SIZE
            )
            if cmdq is None or strtab is None:
                return -errno.ENOMEM
            entries.append(
                HypSmmuEntry(
                    desc.base,
                    desc.size,
                    desc.dma_coherent,
                    cmdq,
                    SMMU_KVM_CMDQ_SIZE,
                    strtab,
                    SMMU_KVM_STRTAB_SIZE,
                )
            )
        if not entries:
            return 0
        pages = -(-len(entries) * HypSmmuEntry.SIZE // PAGE_SIZE)
        array = host.mm.alloc_zeroed_pages(pages)
        if array is None:
            return -errno.ENOMEM
        if host.cpu.write_bytes(array, b"".join(entry.pack() for entry in entries)) is not None:
            return -errno.EFAULT
        self.entries, self.array_pa = entries, array
        kvm.emit("smmu_array", pa=array, smmus=[f"{e.mmio_addr:#x}+{e.mmio_size:#x}" for e in entries])
        self.registered = kvm.hvc.hvc("kvm_iommu_register_driver", array, len(entries))
        kvm.emit("kvm_iommu_register_driver", driver="smmu_ops", result=self.registered)
        if self.registered:
            return self.registered
        if self.variant in (BootVariant.AUX_DEVICE, BootVariant.CHILD_PLATFORM):
            return platform_driver_register(host.kernel, self.pkvm_driver)
        return 0

    # -- defer --------------------------------------------------------------------------------------------
    def probe_gate(self, dev: Device) -> int:
        """The seed's check at the top of ``arm_smmu_device_probe``."""
        kvm = self.kvm
        if kvm.is_protected_kvm_enabled() and not kvm.kvm_protected_mode_initialized:
            return kvm.host.kernel.dev_err_probe(dev, -EPROBE_DEFER, "protected KVM not initialised")
        return 0

    # -- the pKVM platform driver (aux-device, child-platform) -----------------------------------------------
    def pkvm_probe(self, pdev: PlatformDevice) -> int:
        if id(pdev) in self._spawned:
            return -errno.ENODEV  # a child it created: for arm-smmu-v3, not for pKVM
        data = KvmSmmu(pdev, len(self.bound))
        pdev.driver_data = data
        self.bound.append(data)
        return 0

    def spawn_devices(self) -> None:
        """Once pKVM is up (or has failed), give arm-smmu-v3 a device per SMMU pKVM bound."""
        host = self.kvm.host
        for data in self.bound:
            if data.spawned is not None:
                continue
            parent = data.pdev
            if self.variant is BootVariant.AUX_DEVICE:
                auxdev = AuxiliaryDevice(KVM_ARM_SMMU_AUX_NAME, data.index, parent)
                device_set_node(auxdev, parent.fwnode)
                ret = auxiliary_device_init(auxdev) or auxiliary_device_add(
                    host.kernel, auxdev, KVM_ARM_SMMU_MODNAME
                )
                data.spawned = auxdev
            else:
                child = PlatformDevice(
                    CHILD_PLATFORM_NAME, PLATFORM_DEVID_AUTO, parent=parent, resources=parent.resources
                )
                child.dma_coherent = getattr(parent, "dma_coherent", False)  # type: ignore[attr-defined]
                device_set_node(child, parent.fwnode)
                self._spawned.add(id(child))
                data.spawned = child
                ret = platform_device_register(host.kernel, child)
            self.kvm.emit(
                "spawn", how=self.variant.value, parent=parent.name, device=data.spawned.name, result=ret
            )


__all__ = [
    "CHILD_PLATFORM_NAME",
    "KVM_ARM_SMMU_AUX_ID",
    "KVM_ARM_SMMU_DRIVER",
    "KVM_ARM_SMMU_MODNAME",
    "SMMU_KVM_CMDQ_SIZE",
    "SMMU_KVM_STRTAB_SIZE",
    "HypSmmuEntry",
    "KvmArmSmmuV3",
    "KvmSmmu",
]
