"""The hyp SMMUv3 driver (v4 patches 16-25, 28): take-over, MMIO emulation, shadow command queue,
shadow stream table with nesting, GBPA emulation; the emulation rules are a policy object."""

from pkvm_smmu.hyp.smmuv3.cmdq import ARM_SMMU_POLL_TIMEOUT_US, HypCmdq, tlbi_s2_ipa_commands
from pkvm_smmu.hyp.smmuv3.device import HypSmmuV3, SmmuDescription, SmmuStructures
from pkvm_smmu.hyp.smmuv3.driver import SmmuV3HypDriver
from pkvm_smmu.hyp.smmuv3.hardened import HardenedPolicy
from pkvm_smmu.hyp.smmuv3.policy import (
    POLICIES,
    CmdAction,
    CommandVerdict,
    IdentityS2,
    RegAccess,
    RegisterRule,
    ShadowHow,
    SmmuContext,
    V4Policy,
    make_policy,
)

__all__ = [
    "ARM_SMMU_POLL_TIMEOUT_US",
    "POLICIES",
    "CmdAction",
    "CommandVerdict",
    "HardenedPolicy",
    "HypCmdq",
    "HypSmmuV3",
    "IdentityS2",
    "RegAccess",
    "RegisterRule",
    "ShadowHow",
    "SmmuContext",
    "SmmuDescription",
    "SmmuStructures",
    "SmmuV3HypDriver",
    "V4Policy",
    "make_policy",
    "tlbi_s2_ipa_commands",
]
