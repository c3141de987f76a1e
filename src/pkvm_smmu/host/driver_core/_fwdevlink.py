"""fw_devlink: dependencies firmware describes (fwnode links) turned into managed device links.

A fwnode link ``consumer -> supplier`` becomes a device link once both fwnodes have a device. The
device that stands for a fwnode is the *first* one registered with it (Linux's ``fwnode->dev``), so a
later device sharing the fwnode (``device_set_node()`` on a child) is invisible to fw_devlink: its
consumers are released when that first device binds, whatever driver binds it.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

from pkvm_smmu.host.driver_core._devlink import (
    DL_FLAG_AUTOPROBE_CONSUMER,
    DL_FLAG_INFERRED,
    DL_FLAG_MANAGED,
    DL_FLAG_SYNC_STATE_ONLY,
    FWLINK_FLAG_CYCLE,
    FWLINK_FLAG_IGNORE,
    FWLINK_FLAGS_NONE,
    DeviceLinkFlags,
    DlDevState,
    FwnodeLink,
    FwnodeLinkFlags,
    device_link_flag_is_sync_state_only,
)
from pkvm_smmu.host.driver_core.device import Device, fwnode_name

if TYPE_CHECKING:
    from pkvm_smmu.host.driver_core._kernel import Kernel

FW_DEVLINK_MODES = ("off", "permissive", "on", "rpm")
FW_DEVLINK_FLAGS_PERMISSIVE = DL_FLAG_INFERRED | DL_FLAG_SYNC_STATE_ONLY
FW_DEVLINK_FLAGS_ON = DL_FLAG_INFERRED | DL_FLAG_AUTOPROBE_CONSUMER

EINVAL_DROP = -1  # the fwnode link can never become a device link: forget it
EAGAIN_KEEP = -2  # the supplier has no device yet: keep waiting


def fw_devlink_flags(k: Kernel) -> DeviceLinkFlags:
    return FW_DEVLINK_FLAGS_PERMISSIVE if k.fw_devlink == "permissive" else FW_DEVLINK_FLAGS_ON


def fwnode_link_add(
    k: Kernel, con: Hashable, sup: Hashable, flags: FwnodeLinkFlags = FWLINK_FLAGS_NONE
) -> int:
    """Record that ``con`` depends on ``sup`` (what ``of_fwnode_add_links()`` does per property)."""
    if k.fw_devlink == "off":
        return 0
    for link in k.fwnode_links:
        if link.consumer == con and link.supplier == sup:
            link.flags |= flags
            return 0
    k.fwnode_links.append(FwnodeLink(con, sup, flags))
    k._emit("fwnode_link.add", consumer=fwnode_name(con), supplier=fwnode_name(sup))
    return 0


def _link_del(k: Kernel, link: FwnodeLink, why: str) -> None:
    if link in k.fwnode_links:
        k.fwnode_links.remove(link)
        k._emit(
            "fwnode_link.del",
            consumer=fwnode_name(link.consumer),
            supplier=fwnode_name(link.supplier),
            why=why,
        )


def fwnode_links_check_suppliers(k: Kernel, fwnode: Hashable | None) -> Hashable | None:
    """A supplier fwnode ``fwnode`` still waits for (no device for it yet), or None."""
    if fwnode is None or k.fw_devlink in ("off", "permissive"):
        return None
    for link in k.fwnode_links:
        if link.consumer == fwnode and not link.flags & (FWLINK_FLAG_CYCLE | FWLINK_FLAG_IGNORE):
            return link.supplier
    return None


def fwnode_links_purge_suppliers(k: Kernel, fwnode: Hashable) -> None:
    for link in [link for link in k.fwnode_links if link.consumer == fwnode]:
        _link_del(k, link, "consumer bound")


def _parse(k: Kernel, fwnode: Hashable) -> None:
    if fwnode in k.fwnode_links_added:
        return
    k.fwnode_links_added.add(fwnode)
    if k.fwnode_add_links is not None:
        k.fwnode_add_links(fwnode)


def fw_devlink_create_devlink(k: Kernel, con: Device, sup_fw: Hashable, link: FwnodeLink) -> int:
    """0 when a device link now stands for ``link``; EINVAL_DROP or EAGAIN_KEEP otherwise."""
    from pkvm_smmu.host.driver_core._links import device_link_add

    if link.flags & FWLINK_FLAG_IGNORE:
        return EINVAL_DROP
    flags = fw_devlink_flags(k) if con.fwnode == link.consumer else FW_DEVLINK_FLAGS_PERMISSIVE
    sup_dev = k.fwnode_dev.get(sup_fw)
    if sup_dev is not None:
        # A supplier set up without a driver (an early irqchip, say) is never worth waiting for.
        if sup_dev.links.status is DlDevState.NO_DRIVER and sup_fw in k.fwnode_initialized:
            return EINVAL_DROP
        if con is not sup_dev and device_link_add(k, con, sup_dev, flags, internal=True) is None:
            return EINVAL_DROP
        return 0
    if sup_fw in k.fwnode_initialized:
        return EINVAL_DROP
    return EAGAIN_KEEP


def link_to_consumers(k: Kernel, dev: Device) -> None:
    fwnode = dev.fwnode
    for link in [link for link in k.fwnode_links if link.supplier == fwnode]:
        con_dev = k.fwnode_dev.get(link.consumer)
        if con_dev is None:
            continue
        if fw_devlink_create_devlink(k, con_dev, fwnode, link) != EAGAIN_KEEP:
            _link_del(k, link, "device link created" if con_dev is not dev else "self")


def link_to_suppliers(k: Kernel, dev: Device) -> None:
    for link in [link for link in k.fwnode_links if link.consumer == dev.fwnode]:
        ret = fw_devlink_create_devlink(k, dev, link.supplier, link)
        if ret != EAGAIN_KEEP:
            _link_del(k, link, "device link created" if ret == 0 else "supplier will never probe")


def fw_devlink_link_device(k: Kernel, dev: Device) -> None:
    """``device_add()`` of the device that stands for ``dev.fwnode``."""
    if k.fw_devlink == "off" or dev.fwnode is None:
        return
    _parse(k, dev.fwnode)
    link_to_consumers(k, dev)
    link_to_suppliers(k, dev)


def fw_devlink_drivers_done(k: Kernel) -> None:
    """No more drivers are coming: links to suppliers no driver ever matched stop blocking."""
    k.fw_devlink_drv_reg_done = True
    for dev in list(k.devices):
        for link in dev.links.suppliers:
            if link.supplier.can_match or not link.flags & DL_FLAG_INFERRED:
                continue
            if device_link_flag_is_sync_state_only(link.flags):
                continue
            link.flags = DL_FLAG_MANAGED | FW_DEVLINK_FLAGS_PERMISSIVE
            k._emit("link.relax", consumer=dev.name, supplier=link.supplier.name)
