"""The paravirtual IOMMU hypercall ABI (Linux: the shared ``include/kvm/iommu.h``).

Shared by both halves, as the header is in Linux: the hyp (``hyp.pv``) and the host
(``host.pv_iommu``) import it from here, so the host needs nothing of the hyp. Every argument is a
64-bit register value.

pv-identity (v3, named as Jason Gunthorpe asked: no attach/detach vocabulary):

- ``__pkvm_host_iommu_attach_identity(iommu, sid)``: the StreamID gets a stage-2-only STE on the
  shared identity stage-2 (VMID 0);
- ``__pkvm_host_iommu_attach_blocking(iommu, sid)``: the StreamID gets an ABORT STE.

pv-paging (RFC v2 / ACK):

- ``alloc_domain(domain, type)``, ``free_domain(domain)``;
- ``attach_dev(domain, iommu, sid, pasid)``, ``detach_dev(domain, iommu, sid, pasid)``;
- ``map_pages(domain, iova, paddr, pgsize, pgcount, prot)``: bytes mapped (from ``iova``) or a
  negative errno when nothing was; ``unmap_pages(domain, iova, pgsize, pgcount)``: bytes unmapped;
- ``iova_to_phys(domain, iova)``: the physical address, 0 when unmapped;
- ``topup_pool(pfn, nr_pages)``: the host donates pages to the IOMMU pool after an -ENOMEM
  (RFC v2's memory requests).

Both designs: ``caps(iommu, what)`` answers what a virtualized IOMMU offers (``Caps`` flags, its
page sizes, its input address size), -ENODEV for no such IOMMU.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

HVC_CAPS = "__pkvm_host_iommu_caps"
HVC_ATTACH_IDENTITY = "__pkvm_host_iommu_attach_identity"
HVC_ATTACH_BLOCKING = "__pkvm_host_iommu_attach_blocking"
HVC_ALLOC_DOMAIN = "__pkvm_host_iommu_alloc_domain"
HVC_FREE_DOMAIN = "__pkvm_host_iommu_free_domain"
HVC_ATTACH_DEV = "__pkvm_host_iommu_attach_dev"
HVC_DETACH_DEV = "__pkvm_host_iommu_detach_dev"
HVC_MAP_PAGES = "__pkvm_host_iommu_map_pages"
HVC_UNMAP_PAGES = "__pkvm_host_iommu_unmap_pages"
HVC_IOVA_TO_PHYS = "__pkvm_host_iommu_iova_to_phys"
HVC_TOPUP_POOL = "__pkvm_host_iommu_topup_pool"


class CapsQuery(IntEnum):
    """``caps``' second argument."""

    FLAGS = 0
    PGSIZE_BITMAP = 1
    IAS = 2


class Caps(IntFlag):
    IDENTITY = 1 << 0  # identity (bypass through the identity stage-2) domains
    BLOCKING = 1 << 1  # blocked (ABORT) domains
    PAGING = 1 << 2  # paging domains filled by map/unmap hypercalls


class DomainType(IntEnum):
    """``alloc_domain``'s type (ACK: ANY becomes stage 1 where the SMMUs have it)."""

    ANY = 0
    S1 = 1
    S2 = 2


IDENTITY_DOMAIN_ID = 0  # KVM_IOMMU_DOMAIN_IDMAP_ID: preallocated, not mappable by the host
MAX_DOMAINS = 1 << 8  # domain ids are ASIDs/VMIDs: 8 bits work on every SMMU
IOMMU_NO_PASID = 0
# IOMMU_READ | WRITE | CACHE | NOEXEC | MMIO | PRIV: what map_pages accepts in ``prot``.
IOMMU_PROT_MASK = 0x3F
TOPUP_MAX_PAGES = 1 << 10  # one top-up donates at most this many pages

__all__ = [
    "HVC_ALLOC_DOMAIN",
    "HVC_ATTACH_BLOCKING",
    "HVC_ATTACH_DEV",
    "HVC_ATTACH_IDENTITY",
    "HVC_CAPS",
    "HVC_DETACH_DEV",
    "HVC_FREE_DOMAIN",
    "HVC_IOVA_TO_PHYS",
    "HVC_MAP_PAGES",
    "HVC_TOPUP_POOL",
    "HVC_UNMAP_PAGES",
    "IDENTITY_DOMAIN_ID",
    "IOMMU_NO_PASID",
    "IOMMU_PROT_MASK",
    "MAX_DOMAINS",
    "TOPUP_MAX_PAGES",
    "Caps",
    "CapsQuery",
    "DomainType",
]
