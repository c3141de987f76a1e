"""The hyp IOMMU core: driver registration and init, the IOMMU pool, and the identity stage-2
that mirrors host ownership for every SMMU (v4 patches 09-12, 26-27)."""

from pkvm_smmu.hyp.iommu.core import KvmIommu, KvmIommuOps
from pkvm_smmu.hyp.iommu.idmap import (
    IdentityPageTable,
    IdentityStage2,
    IommuCaps,
    host_accessible_runs,
    identity_config,
)
from pkvm_smmu.hyp.iommu.pool import IommuPool, PageSource

__all__ = [
    "IdentityPageTable",
    "IdentityStage2",
    "IommuCaps",
    "IommuPool",
    "KvmIommu",
    "KvmIommuOps",
    "PageSource",
    "host_accessible_runs",
    "identity_config",
]
