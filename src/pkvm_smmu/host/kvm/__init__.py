"""The host's KVM half of pKVM and of the SMMUv3 driver (v4 patches 11, 14-17), and the boot variants
that arrange the host's SMMU drivers against pKVM's initialisation.

``KvmArm`` is what the host kernel is given as its arch code (``HostKernel(arch=KvmArm(hvc, variant))``);
it talks to the hypervisor only through ``hvc``.
"""

from pkvm_smmu.host.kvm.arm_smmu_v3 import (
    KVM_ARM_SMMU_AUX_ID,
    KVM_ARM_SMMU_DRIVER,
    SMMU_KVM_CMDQ_SIZE,
    SMMU_KVM_STRTAB_SIZE,
    HypSmmuEntry,
    KvmArmSmmuV3,
)
from pkvm_smmu.host.kvm.pkvm import KVM_ARM_MODE, KvmArm, kvm_mode_from_cmdline
from pkvm_smmu.host.kvm.variants import BOOT_VARIANTS, DEFAULT_BOOT_VARIANT, BootVariant, boot_variant

__all__ = [
    "BOOT_VARIANTS",
    "DEFAULT_BOOT_VARIANT",
    "KVM_ARM_MODE",
    "KVM_ARM_SMMU_AUX_ID",
    "KVM_ARM_SMMU_DRIVER",
    "SMMU_KVM_CMDQ_SIZE",
    "SMMU_KVM_STRTAB_SIZE",
    "BootVariant",
    "HypSmmuEntry",
    "KvmArm",
    "KvmArmSmmuV3",
    "boot_variant",
    "kvm_mode_from_cmdline",
]
