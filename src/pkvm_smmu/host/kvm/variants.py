"""The boot variants: how the host's SMMU drivers are arranged against pKVM's initialisation
(DESIGN.md rule 6, the *boot variant* axis). Each is a named arrangement of the same kernel; what
happens follows from the driver core's rules, nothing here decides an outcome.

- ``late-register`` (v4 patch 15): arm-smmu-v3 registers at ``device_initcall_sync`` in KVM mode, after
  ``finalize_pkvm`` has deprivileged the host.
- ``defer``: arm-smmu-v3 registers as usual; its probe returns -EPROBE_DEFER while protected mode is
  enabled but not yet initialised (Will Deacon's suggestion, the code in the seed thread).
- ``aux-device``: a pKVM driver binds the SMMU platform device; once pKVM is up it creates an
  auxiliary device that arm-smmu-v3 binds (Jason Gunthorpe: "never delay binding, delay creating the
  device").
- ``child-platform``: the pKVM driver binds the SMMU and creates child platform devices sharing its
  fwnode (``device_set_node``) for arm-smmu-v3 to bind (the attempt reported on patch 15).
- ``naive``: no ordering: arm-smmu-v3 keeps ``device_initcall`` and runs before pKVM's init, so the
  hyp takes over an SMMU the host already enabled.
"""

from __future__ import annotations

from enum import StrEnum

from pkvm_smmu.host.driver_core import InitcallLevel


class BootVariant(StrEnum):
    LATE_REGISTER = "late-register"
    DEFER = "defer"
    AUX_DEVICE = "aux-device"
    CHILD_PLATFORM = "child-platform"
    NAIVE = "naive"

    @property
    def smmu_level(self) -> InitcallLevel:
        """Where ``arm_smmu_driver_init`` registers the platform driver."""
        return InitcallLevel.DEVICE_SYNC if self is BootVariant.LATE_REGISTER else InitcallLevel.DEVICE

    @property
    def description(self) -> str:
        return BOOT_VARIANTS[self.value]


DEFAULT_BOOT_VARIANT = BootVariant.LATE_REGISTER

BOOT_VARIANTS: dict[str, str] = {
    "late-register": "arm-smmu-v3 registers at device_initcall_sync in KVM mode (v4 patch 15)",
    "defer": "arm-smmu-v3 probe returns -EPROBE_DEFER until protected mode is initialised",
    "aux-device": "pKVM binds the SMMU and, once up, creates an auxiliary device arm-smmu-v3 binds",
    "child-platform": "pKVM binds the SMMU and creates child platform devices sharing its fwnode",
    "naive": "no ordering: arm-smmu-v3 probes and enables the SMMU before pKVM takes it over",
}


def boot_variant(name: str | BootVariant) -> BootVariant:
    """The variant called ``name``; ValueError naming the known ones otherwise."""
    try:
        return BootVariant(name)
    except ValueError:
        raise ValueError(f"unknown boot variant '{name}' (have: {', '.join(BOOT_VARIANTS)})") from None


__all__ = ["BOOT_VARIANTS", "DEFAULT_BOOT_VARIANT", "BootVariant", "boot_variant"]
