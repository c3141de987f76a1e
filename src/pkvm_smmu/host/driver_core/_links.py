"""Device links (``drivers/base/core.c``): a consumer may only probe once its managed suppliers are
bound, and a supplier's unbind first unbinds its active consumers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pkvm_smmu.host.driver_core._devlink import (
    DL_ADD_VALID_FLAGS,
    DL_FLAG_AUTOPROBE_CONSUMER,
    DL_FLAG_AUTOREMOVE_CONSUMER,
    DL_FLAG_AUTOREMOVE_SUPPLIER,
    DL_FLAG_INFERRED,
    DL_FLAG_MANAGED,
    DL_FLAG_STATELESS,
    DL_FLAG_SYNC_STATE_ONLY,
    DL_MANAGED_LINK_FLAGS,
    DeviceLink,
    DeviceLinkFlags,
    DeviceLinkState,
    DlDevState,
    device_link_flag_is_sync_state_only,
)
from pkvm_smmu.host.driver_core._errno import EPROBE_DEFER
from pkvm_smmu.host.driver_core._fwdevlink import fwnode_links_check_suppliers
from pkvm_smmu.host.driver_core.device import Device, fwnode_name

if TYPE_CHECKING:
    from pkvm_smmu.host.driver_core._kernel import Kernel


def device_is_ancestor(dev: Device, target: Device) -> bool:
    parent = target.parent
    while parent is not None:
        if parent is dev:
            return True
        parent = parent.parent
    return False


def device_is_dependent(dev: Device, target: Device) -> bool:
    """Whether ``target`` is ``dev``, below it, or (transitively) one of its consumers: linking
    ``dev`` as a consumer of ``target`` would then close a loop."""
    if dev is target or device_is_ancestor(dev, target):
        return True
    if any(device_is_dependent(child, target) for child in dev.children):
        return True
    for link in dev.links.consumers:
        if device_link_flag_is_sync_state_only(link.flags):
            continue
        if link.consumer is target or device_is_dependent(link.consumer, target):
            return True
    return False


def _init_status(consumer: Device, supplier: Device) -> DeviceLinkState:
    """``device_link_init_status()``: a new managed link's state from both ends' driver state."""
    sup, con = supplier.links.status, consumer.links.status
    if sup is DlDevState.PROBING:
        # A probing consumer may link to a supplier it knows is already functional.
        return DeviceLinkState.CONSUMER_PROBE if con is DlDevState.PROBING else DeviceLinkState.DORMANT
    if sup is DlDevState.DRIVER_BOUND:
        if con is DlDevState.PROBING:
            return DeviceLinkState.CONSUMER_PROBE
        if con is DlDevState.DRIVER_BOUND:
            return DeviceLinkState.ACTIVE
        return DeviceLinkState.AVAILABLE
    if sup is DlDevState.UNBINDING:
        return DeviceLinkState.SUPPLIER_UNBIND
    return DeviceLinkState.DORMANT


def _flags_invalid(flags: DeviceLinkFlags, internal: bool) -> bool:
    allowed = DL_ADD_VALID_FLAGS | (DL_FLAG_INFERRED if internal else DeviceLinkFlags(0))
    if flags & ~allowed:
        return True
    if flags & DL_FLAG_STATELESS and flags & DL_MANAGED_LINK_FLAGS:
        return True
    if flags & DL_FLAG_SYNC_STATE_ONLY and (flags & ~DL_FLAG_INFERRED) != DL_FLAG_SYNC_STATE_ONLY:
        return True
    autoremove = DL_FLAG_AUTOREMOVE_CONSUMER | DL_FLAG_AUTOREMOVE_SUPPLIER
    return bool(flags & DL_FLAG_AUTOPROBE_CONSUMER and flags & autoremove)


def device_link_add(
    k: Kernel, consumer: Device, supplier: Device, flags: DeviceLinkFlags, *, internal: bool = False
) -> DeviceLink | None:
    """``device_link_add()``: None for invalid flags, an unregistered supplier, or a link that would
    make a dependency loop; an existing link between the pair is returned (and its flags merged)."""
    flags = DeviceLinkFlags(flags)
    if consumer is supplier or _flags_invalid(flags, internal):
        k._emit("link.refused", consumer=consumer.name, supplier=supplier.name, flags=str(flags), why="flags")
        return None
    if not flags & DL_FLAG_STATELESS:
        flags |= DL_FLAG_MANAGED
    if not supplier.registered or (
        not flags & DL_FLAG_SYNC_STATE_ONLY and device_is_dependent(consumer, supplier)
    ):
        why = "supplier not registered" if not supplier.registered else "dependency loop"
        k._emit("link.refused", consumer=consumer.name, supplier=supplier.name, flags=str(flags), why=why)
        return None
    if flags & DL_FLAG_AUTOREMOVE_SUPPLIER:
        flags &= ~DL_FLAG_AUTOREMOVE_CONSUMER

    for link in supplier.links.consumers:
        if link.consumer is consumer:
            _merge_existing(link, flags, consumer, supplier)
            k._emit(
                "link.add",
                consumer=consumer.name,
                supplier=supplier.name,
                flags=str(link.flags),
                status=link.status.name,
                existing=True,
            )
            return link

    status = DeviceLinkState.NONE if flags & DL_FLAG_STATELESS else _init_status(consumer, supplier)
    link = DeviceLink(consumer, supplier, flags, status)
    supplier.links.consumers.append(link)
    consumer.links.suppliers.append(link)
    k._emit(
        "link.add",
        consumer=consumer.name,
        supplier=supplier.name,
        flags=str(flags),
        status=status.name,
        existing=False,
    )
    return link


def _merge_existing(link: DeviceLink, flags: DeviceLinkFlags, consumer: Device, supplier: Device) -> None:
    if not flags & DL_FLAG_INFERRED:
        link.flags &= ~DL_FLAG_INFERRED
    if flags & DL_FLAG_STATELESS:
        link.refcount += 1
        link.flags |= DL_FLAG_STATELESS
        return
    # Keep the link for the longer of the two lifetimes the callers asked for.
    if flags & DL_FLAG_AUTOREMOVE_SUPPLIER:
        if link.flags & DL_FLAG_AUTOREMOVE_CONSUMER:
            link.flags &= ~DL_FLAG_AUTOREMOVE_CONSUMER
            link.flags |= DL_FLAG_AUTOREMOVE_SUPPLIER
    elif not flags & DL_FLAG_AUTOREMOVE_CONSUMER:
        link.flags &= ~(DL_FLAG_AUTOREMOVE_CONSUMER | DL_FLAG_AUTOREMOVE_SUPPLIER)
    if not link.flags & DL_FLAG_MANAGED:
        link.refcount += 1
        link.flags |= DL_FLAG_MANAGED
        link.status = _init_status(consumer, supplier)
    if link.flags & DL_FLAG_SYNC_STATE_ONLY and not flags & DL_FLAG_SYNC_STATE_ONLY:
        link.flags &= ~DL_FLAG_SYNC_STATE_ONLY
    link.flags |= flags & DL_FLAG_AUTOPROBE_CONSUMER


def _link_put(k: Kernel, link: DeviceLink, why: str) -> None:
    link.refcount -= 1
    if link.refcount > 0:
        return
    if link in link.supplier.links.consumers:
        link.supplier.links.consumers.remove(link)
    if link in link.consumer.links.suppliers:
        link.consumer.links.suppliers.remove(link)
    k._emit("link.del", consumer=link.consumer.name, supplier=link.supplier.name, why=why)


def _drop_managed(k: Kernel, link: DeviceLink, why: str) -> None:
    link.flags &= ~DL_FLAG_MANAGED
    link.status = DeviceLinkState.NONE
    _link_put(k, link, why)


def device_link_del(k: Kernel, link: DeviceLink) -> None:
    """Drop one reference a ``DL_FLAG_STATELESS`` caller holds; managed links are the core's."""
    if not link.flags & DL_FLAG_STATELESS:
        k._emit(
            "link.warn",
            consumer=link.consumer.name,
            supplier=link.supplier.name,
            why="device_link_del() of a managed link",
        )
        return
    _link_put(k, link, "device_link_del")


def device_link_remove(k: Kernel, consumer: Device, supplier: Device) -> None:
    for link in supplier.links.consumers:
        if link.consumer is consumer:
            device_link_del(k, link)
            return


def _missing_supplier(dev: Device) -> None:
    for link in dev.links.suppliers:
        if link.status is DeviceLinkState.CONSUMER_PROBE:
            link.status = DeviceLinkState.AVAILABLE


def device_links_check_suppliers(k: Kernel, dev: Device) -> int:
    """Before probe: ``-EPROBE_DEFER`` while firmware says a supplier is still missing, or while a
    managed link's supplier has no driver bound; otherwise mark the links CONSUMER_PROBE."""
    sup_fw = fwnode_links_check_suppliers(k, dev.fwnode)
    if sup_fw is not None:
        dev.deferred_probe_reason = f"wait for supplier {fwnode_name(sup_fw)}"
        return -EPROBE_DEFER
    for link in dev.links.suppliers:
        if not link.flags & DL_FLAG_MANAGED or link.flags & DL_FLAG_SYNC_STATE_ONLY:
            continue
        if link.status is not DeviceLinkState.AVAILABLE:
            _missing_supplier(dev)
            dev.deferred_probe_reason = f"supplier {link.supplier.name} not ready"
            return -EPROBE_DEFER
        link.status = DeviceLinkState.CONSUMER_PROBE
    dev.links.status = DlDevState.PROBING
    return 0


def device_links_driver_bound(k: Kernel, dev: Device) -> None:
    """After a successful probe: consumers may now probe (AUTOPROBE ones are queued for a retry),
    and the links to this device's suppliers become ACTIVE."""
    from pkvm_smmu.host.driver_core import _fwdevlink

    if dev.fwnode is not None and k.fwnode_dev.get(dev.fwnode) is dev:
        # It probed, so whatever firmware dependencies it still had were not needed.
        _fwdevlink.fwnode_links_purge_suppliers(k, dev.fwnode)
        _fwdevlink.link_to_consumers(k, dev)
    for link in dev.links.consumers:
        if not link.flags & DL_FLAG_MANAGED:
            continue
        if link.status in (DeviceLinkState.CONSUMER_PROBE, DeviceLinkState.ACTIVE):
            continue
        link.status = DeviceLinkState.AVAILABLE
        if link.flags & DL_FLAG_AUTOPROBE_CONSUMER:
            k.driver_deferred_probe_add(link.consumer)
    for link in dev.links.suppliers:
        if not link.flags & DL_FLAG_MANAGED or link.flags & DL_FLAG_SYNC_STATE_ONLY:
            continue
        link.status = DeviceLinkState.ACTIVE
    dev.links.status = DlDevState.DRIVER_BOUND


def _no_driver(k: Kernel, dev: Device) -> None:
    for link in list(reversed(dev.links.suppliers)):
        if not link.flags & DL_FLAG_MANAGED:
            continue
        if link.flags & DL_FLAG_AUTOREMOVE_CONSUMER:
            _drop_managed(k, link, "consumer unbound (AUTOREMOVE_CONSUMER)")
        elif link.status in (DeviceLinkState.CONSUMER_PROBE, DeviceLinkState.ACTIVE):
            link.status = DeviceLinkState.AVAILABLE
    dev.links.status = DlDevState.NO_DRIVER


def device_links_no_driver(k: Kernel, dev: Device) -> None:
    """After a failed probe."""
    for link in dev.links.consumers:
        if link.flags & DL_FLAG_MANAGED and link.status in (
            DeviceLinkState.CONSUMER_PROBE,
            DeviceLinkState.ACTIVE,
        ):
            link.status = DeviceLinkState.DORMANT
    _no_driver(k, dev)


def device_links_driver_cleanup(k: Kernel, dev: Device) -> None:
    """After the driver's remove."""
    for link in list(dev.links.consumers):
        if not link.flags & DL_FLAG_MANAGED:
            continue
        if link.status is DeviceLinkState.SUPPLIER_UNBIND and link.flags & DL_FLAG_AUTOREMOVE_SUPPLIER:
            _drop_managed(k, link, "supplier unbound (AUTOREMOVE_SUPPLIER)")
        link.status = DeviceLinkState.DORMANT
    _no_driver(k, dev)


def device_links_busy(dev: Device) -> bool:
    busy = False
    for link in dev.links.consumers:
        if not link.flags & DL_FLAG_MANAGED:
            continue
        if link.status in (DeviceLinkState.CONSUMER_PROBE, DeviceLinkState.ACTIVE):
            busy = True
            break
        link.status = DeviceLinkState.SUPPLIER_UNBIND
    dev.links.status = DlDevState.UNBINDING
    return busy


def device_links_unbind_consumers(k: Kernel, dev: Device) -> None:
    """Unbind every consumer whose driver is active, so the supplier can go."""
    restart = True
    while restart:
        restart = False
        for link in dev.links.consumers:
            if not link.flags & DL_FLAG_MANAGED or link.flags & DL_FLAG_SYNC_STATE_ONLY:
                continue
            status = link.status
            link.status = DeviceLinkState.SUPPLIER_UNBIND
            # A consumer still in CONSUMER_PROBE is probing further up this very call chain; Linux
            # would wait for it, which here can only mean letting it finish after we return.
            if status is DeviceLinkState.ACTIVE:
                k.device_release_driver(link.consumer)
                restart = True
                break


def device_links_purge(k: Kernel, dev: Device) -> None:
    """``device_del()``: every link to or from the device goes."""
    for link in list(reversed(dev.links.suppliers)):
        link.refcount = 1
        _link_put(k, link, "consumer deleted")
    for link in list(reversed(dev.links.consumers)):
        link.refcount = 1
        _link_put(k, link, "supplier deleted")
