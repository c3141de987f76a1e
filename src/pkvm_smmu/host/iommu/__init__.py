"""The IOMMU core: IOMMU registration, fwspec, groups, domains, attach, and the DMA API."""
