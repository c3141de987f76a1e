"""The arm-smmu-v3 driver of the host kernel (Linux ``drivers/iommu/arm/arm-smmu-v3``).

It reaches the SMMU only through the host's CPU port (MMIO and memory), so the same driver runs
natively and, unmodified, against the SMMU pKVM emulates.
"""
