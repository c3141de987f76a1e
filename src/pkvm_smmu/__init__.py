"""pkvm-smmu: an executable model of the pKVM SMMUv3 isolation design."""

__version__ = "0.1.0"
