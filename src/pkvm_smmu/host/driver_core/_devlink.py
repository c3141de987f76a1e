"""Device-link vocabulary (``include/linux/device.h``): flags, link states, per-device link state."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import Enum, IntFlag
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pkvm_smmu.host.driver_core.device import Device


class DeviceLinkFlags(IntFlag):
    STATELESS = 1 << 0
    AUTOREMOVE_CONSUMER = 1 << 1
    PM_RUNTIME = 1 << 2
    RPM_ACTIVE = 1 << 3
    AUTOREMOVE_SUPPLIER = 1 << 4
    AUTOPROBE_CONSUMER = 1 << 5
    MANAGED = 1 << 6
    SYNC_STATE_ONLY = 1 << 7
    INFERRED = 1 << 8
    CYCLE = 1 << 9


DL_FLAG_STATELESS = DeviceLinkFlags.STATELESS
DL_FLAG_AUTOREMOVE_CONSUMER = DeviceLinkFlags.AUTOREMOVE_CONSUMER
DL_FLAG_PM_RUNTIME = DeviceLinkFlags.PM_RUNTIME
DL_FLAG_RPM_ACTIVE = DeviceLinkFlags.RPM_ACTIVE
DL_FLAG_AUTOREMOVE_SUPPLIER = DeviceLinkFlags.AUTOREMOVE_SUPPLIER
DL_FLAG_AUTOPROBE_CONSUMER = DeviceLinkFlags.AUTOPROBE_CONSUMER
DL_FLAG_MANAGED = DeviceLinkFlags.MANAGED
DL_FLAG_SYNC_STATE_ONLY = DeviceLinkFlags.SYNC_STATE_ONLY
DL_FLAG_INFERRED = DeviceLinkFlags.INFERRED
DL_FLAG_CYCLE = DeviceLinkFlags.CYCLE

# What device_link_add() accepts from callers; MANAGED, INFERRED and CYCLE are the core's own markers
# (fw_devlink passes INFERRED through the internal path).
DL_MANAGED_LINK_FLAGS = (
    DL_FLAG_AUTOREMOVE_CONSUMER
    | DL_FLAG_AUTOREMOVE_SUPPLIER
    | DL_FLAG_AUTOPROBE_CONSUMER
    | DL_FLAG_SYNC_STATE_ONLY
)
DL_ADD_VALID_FLAGS = DL_MANAGED_LINK_FLAGS | DL_FLAG_STATELESS | DL_FLAG_PM_RUNTIME | DL_FLAG_RPM_ACTIVE
DL_MARKER_FLAGS = DL_FLAG_INFERRED | DL_FLAG_CYCLE | DL_FLAG_MANAGED


def device_link_flag_is_sync_state_only(flags: DeviceLinkFlags) -> bool:
    return (flags & ~DL_MARKER_FLAGS) == DL_FLAG_SYNC_STATE_ONLY


class DeviceLinkState(Enum):
    """``enum device_link_state``."""

    NONE = -1
    DORMANT = 0
    AVAILABLE = 1
    CONSUMER_PROBE = 2
    ACTIVE = 3
    SUPPLIER_UNBIND = 4


DL_STATE_NONE = DeviceLinkState.NONE
DL_STATE_DORMANT = DeviceLinkState.DORMANT
DL_STATE_AVAILABLE = DeviceLinkState.AVAILABLE
DL_STATE_CONSUMER_PROBE = DeviceLinkState.CONSUMER_PROBE
DL_STATE_ACTIVE = DeviceLinkState.ACTIVE
DL_STATE_SUPPLIER_UNBIND = DeviceLinkState.SUPPLIER_UNBIND


class DlDevState(Enum):
    """``enum dl_dev_state``: where a device is in its driver's life, as links see it."""

    NO_DRIVER = 0
    PROBING = 1
    DRIVER_BOUND = 2
    UNBINDING = 3


DL_DEV_NO_DRIVER = DlDevState.NO_DRIVER
DL_DEV_PROBING = DlDevState.PROBING
DL_DEV_DRIVER_BOUND = DlDevState.DRIVER_BOUND
DL_DEV_UNBINDING = DlDevState.UNBINDING


@dataclass(eq=False)
class DeviceLink:
    consumer: Device
    supplier: Device
    flags: DeviceLinkFlags
    status: DeviceLinkState
    refcount: int = 1  # stateless links are dropped when every device_link_add() is undone

    @property
    def managed(self) -> bool:
        return bool(self.flags & DL_FLAG_MANAGED)

    def __repr__(self) -> str:
        return (
            f"DeviceLink({self.consumer.name} -> {self.supplier.name}, "
            f"flags={self.flags!s}, status={self.status.name})"
        )


@dataclass
class DevLinksInfo:
    """``struct dev_links_info``."""

    suppliers: list[DeviceLink] = field(default_factory=list)
    consumers: list[DeviceLink] = field(default_factory=list)
    status: DlDevState = DlDevState.NO_DRIVER


class FwnodeLinkFlags(IntFlag):
    CYCLE = 1 << 0
    IGNORE = 1 << 1


FWLINK_FLAG_CYCLE = FwnodeLinkFlags.CYCLE
FWLINK_FLAG_IGNORE = FwnodeLinkFlags.IGNORE
FWLINK_FLAGS_NONE = FwnodeLinkFlags(0)


@dataclass(eq=False)
class FwnodeLink:
    """A dependency firmware describes (``iommus``, ``interrupts``, ``clocks``...) before either end
    has a device: ``consumer`` needs ``supplier``."""

    consumer: Hashable
    supplier: Hashable
    flags: FwnodeLinkFlags = FWLINK_FLAGS_NONE
