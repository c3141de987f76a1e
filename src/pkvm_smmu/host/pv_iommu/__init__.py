"""The paravirtual IOMMU on the host side (``pv-identity``, ``pv-paging``): the pKVM SMMU driver's
untrusted half (binds the SMMU, hands it to pKVM, spawns a device per virtualized IOMMU), the generic
paravirtual IOMMU driver that binds those devices, its ``iommu_ops`` (every change a hypercall), and
the host kernel arranged for it."""

from pkvm_smmu.host.pv_iommu.driver import PvIommu, PvIommuDriver, ViommuDevice
from pkvm_smmu.host.pv_iommu.kernel import ARRANGEMENTS, PkvmSetup, PvHostKernel
from pkvm_smmu.host.pv_iommu.ops import (
    DomainIds,
    PvIommuEnv,
    PvIommuOps,
    PvPagingDomain,
    PvStaticDomain,
    ViommuInfo,
)
from pkvm_smmu.host.pv_iommu.pkvm_smmu import PkvmBoot, PkvmSmmuDriver

__all__ = [
    "ARRANGEMENTS",
    "DomainIds",
    "PkvmBoot",
    "PkvmSetup",
    "PkvmSmmuDriver",
    "PvHostKernel",
    "PvIommu",
    "PvIommuDriver",
    "PvIommuEnv",
    "PvIommuOps",
    "PvPagingDomain",
    "PvStaticDomain",
    "ViommuDevice",
    "ViommuInfo",
]
