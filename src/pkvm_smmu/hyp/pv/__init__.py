"""The paravirtual designs' hyp side: the hyp owns each SMMU outright and the host asks for
configuration by hypercall. ``pv-identity`` (v3): StreamIDs switch between blocked and identity.
``pv-paging`` (RFC v2 / Android): domains, attach/detach and map/unmap with DMA refcounts."""

from pkvm_smmu.arch.pv_iommu_abi import Caps, CapsQuery, DomainType
from pkvm_smmu.hyp.pv.driver import PvIommu, PvSmmuDriver
from pkvm_smmu.hyp.pv.identity import PvIdentityIommu
from pkvm_smmu.hyp.pv.paging import PvDomain, PvPagingIommu, TopUpPool
from pkvm_smmu.hyp.pv.smmu import PvSmmuV3, ste_label

PV_DESIGNS: dict[str, type[PvIommu]] = {
    PvIdentityIommu.design: PvIdentityIommu,
    PvPagingIommu.design: PvPagingIommu,
}

__all__ = [
    "PV_DESIGNS",
    "Caps",
    "CapsQuery",
    "DomainType",
    "PvDomain",
    "PvIdentityIommu",
    "PvIommu",
    "PvPagingIommu",
    "PvSmmuDriver",
    "PvSmmuV3",
    "TopUpPool",
    "ste_label",
]
