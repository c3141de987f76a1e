"""The arm-smmu-v3 driver of the host kernel (Linux ``drivers/iommu/arm/arm-smmu-v3``).

It reaches the SMMU only through the host's CPU port (MMIO and memory), so the same driver runs
natively and, unmodified, against the SMMU pKVM emulates.

- ``entry``: the STE/CD update algorithm (used bits, update-safe bits, ``write_entry``).
- ``ste``/``cd``: entry builders. ``queue``: command submission, CMD_SYNC, TLBI/ATC_INV builders.
- ``device``: probe, reset, stream table, interrupts. ``events``: event queue and GERROR.
- ``domain``: masters, CD tables, domains, attach, invalidation (the ``iommu_ops``).
- ``driver``: the platform driver.
"""

from pkvm_smmu.host.arm_smmu_v3.device import ArmSmmuDevice, ArmSmmuParams, DmaMemory
from pkvm_smmu.host.arm_smmu_v3.domain import (
    ArmSmmuDomain,
    ArmSmmuIommuOps,
    ArmSmmuNestedDomain,
    ArmSmmuStaticDomain,
    Master,
)
from pkvm_smmu.host.arm_smmu_v3.driver import ArmSmmuEnv, ArmSmmuV3Driver, SmmuFirmware
from pkvm_smmu.host.arm_smmu_v3.features import ARM_SMMU_POLL_TIMEOUT_US, Feat, Opt
from pkvm_smmu.smmu_lib.entry import EntryWriter, write_entry

__all__ = [
    "ARM_SMMU_POLL_TIMEOUT_US",
    "ArmSmmuDevice",
    "ArmSmmuDomain",
    "ArmSmmuEnv",
    "ArmSmmuIommuOps",
    "ArmSmmuNestedDomain",
    "ArmSmmuParams",
    "ArmSmmuStaticDomain",
    "ArmSmmuV3Driver",
    "DmaMemory",
    "EntryWriter",
    "Feat",
    "Master",
    "Opt",
    "SmmuFirmware",
    "write_entry",
]
