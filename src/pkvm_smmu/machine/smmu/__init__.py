"""The SMMUv3 device model: programming interface, queues, commands, configuration and translation."""

from pkvm_smmu.machine.smmu.device import SmmuV3
from pkvm_smmu.machine.smmu.executor import AtcClient
from pkvm_smmu.machine.smmu.features import SmmuFeatures
from pkvm_smmu.machine.smmu.options import GBPA_RESET_ABORT, GBPA_RESET_BYPASS, SmmuOptions

__all__ = [
    "GBPA_RESET_ABORT",
    "GBPA_RESET_BYPASS",
    "AtcClient",
    "SmmuFeatures",
    "SmmuOptions",
    "SmmuV3",
]
