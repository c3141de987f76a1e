"""The IOMMU core (Linux ``iommu.c`` and ``of_iommu.c``): IOMMU registration, fwspec, probe,
groups, default domains, attach/replace/detach, and ``iommu_map``/``iommu_unmap``.

State that Linux keeps in globals (the IOMMU device list, the default-domain policy) lives in one
``IommuCore`` per modeled kernel. Everything is reported on the trace bus under ``host.iommu``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pkvm_smmu.host.firmware import Firmware, FwNode, of_iommu_specs, of_pci_iommu_specs
from pkvm_smmu.host.iommu import dma
from pkvm_smmu.host.iommu.ops import (
    DomainType,
    IommuCap,
    IommuDomain,
    IommuFwspec,
    IommuOps,
    IommuResvRegion,
    ResvType,
)
from pkvm_smmu.pgtable.gather import IotlbGather
from pkvm_smmu.pgtable.memory import TableMemoryAbort
from pkvm_smmu.pgtable.prot import Prot
from pkvm_smmu.trace import TraceBus

COMPONENT = "host.iommu"
EPROBE_DEFER = 517  # Linux's kernel-internal errno: "try again once more drivers have probed"


# -- what the IOMMU core needs from the rest of the kernel ---------------------------------------------


@dataclass(frozen=True)
class IommuSpec:
    """One ``iommus`` entry, or a PCI requester ID put through ``iommu-map``: the IOMMU's fwnode and
    the cells that follow the phandle (the StreamID for arm-smmu-v3). ``available`` is False when
    the IOMMU node is disabled (``status``)."""

    fwnode: Any
    args: tuple[int, ...]
    available: bool = True


class IommuSpecLike(Protocol):
    @property
    def fwnode(self) -> Any: ...

    @property
    def args(self) -> tuple[int, ...]: ...

    @property
    def available(self) -> bool: ...


class IommuFirmware(Protocol):
    """Firmware's answer to "which IOMMU translates this device's DMA, with which IDs?"."""

    def iommu_specs(self, dev: Any) -> Sequence[IommuSpecLike] | int:
        """The specs (empty when firmware names no IOMMU), or a negative errno for a description
        that cannot be used."""
        ...


class OfIommuFirmware:
    """``IommuFirmware`` over a device tree: a platform device's ``iommus``, or a PCI function's
    requester ID through its host bridge's ``iommu-map`` (the bridge is the nearest non-PCI
    ancestor with a firmware node, as ``pci_get_host_bridge_device()->parent`` in Linux)."""

    def __init__(self, fw: Firmware) -> None:
        self.fw = fw

    def iommu_specs(self, dev: Any) -> Sequence[IommuSpecLike] | int:
        if dev_is_pci(dev):
            bridge = getattr(dev, "parent", None)
            while bridge is not None and (dev_is_pci(bridge) or getattr(bridge, "fwnode", None) is None):
                bridge = getattr(bridge, "parent", None)
            if bridge is None:
                return []
            return of_pci_iommu_specs(self.fw, bridge.fwnode, dev.rid)
        fwnode = getattr(dev, "fwnode", None)
        if not isinstance(fwnode, FwNode):
            return []
        return of_iommu_specs(self.fw, fwnode)


class DriverCoreHooks(Protocol):
    """The driver core services the IOMMU core uses (``host.driver_core.Kernel`` provides them)."""

    devices: list[Any]  # every registered device, in registration order

    def driver_deferred_probe_check_state(self, dev: Any) -> int:
        """-EPROBE_DEFER while waiting for a supplier still makes sense; -ETIMEDOUT (or -ENODEV)
        once the deferred-probe timeout has passed and the dependency is to be ignored."""
        ...

    def driver_deferred_probe_trigger(self) -> None:
        """Retry the devices whose probe was deferred."""
        ...


class _NoDriverCore:
    def __init__(self) -> None:
        self.devices: list[Any] = []

    def driver_deferred_probe_check_state(self, dev: Any) -> int:
        return -EPROBE_DEFER

    def driver_deferred_probe_trigger(self) -> None:
        return None


# -- policy --------------------------------------------------------------------------------------------


_TRUE = frozenset({"1", "y", "yes", "on", "true"})
_FALSE = frozenset({"0", "n", "no", "off", "false"})


def _kstrtobool(option: str, value: str) -> bool:
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{option}={value}: expected a boolean (1/0, y/n, on/off)")


@dataclass(frozen=True)
class IommuPolicy:
    """The kernel's DMA-domain policy.

    ``default_domain_type``: DMA (strict, arm64's default), DMA_FQ (lazy) or IDENTITY
    (``iommu.passthrough=1``). ``forcedac``: do not try 32-bit IOVAs first for PCI devices.
    ``strict_probe``: an IOMMU probe error fails the device's probe; False is mainline Linux's
    ``of_dma_configure``, which carries on without the IOMMU (DMA then bypasses it or aborts).
    ``fq_size``/``fq_timeout_ms``: the flush queue (Linux: 256 entries, 10 ms).
    """

    default_domain_type: DomainType = DomainType.DMA
    forcedac: bool = False
    strict_probe: bool = True
    fq_size: int = 256
    fq_timeout_ms: float = 10.0

    def __post_init__(self) -> None:
        if self.default_domain_type not in (DomainType.DMA, DomainType.DMA_FQ, DomainType.IDENTITY):
            raise ValueError(
                f"default domain type must be dma, dma-fq or identity, not {self.default_domain_type}"
            )
        if self.fq_size < 2 or self.fq_timeout_ms <= 0:
            raise ValueError("flush queue needs at least 2 entries and a positive timeout")

    @classmethod
    def from_cmdline(cls, cmdline: str, **overrides: Any) -> IommuPolicy:
        """Parse ``iommu.passthrough=``, ``iommu.strict=`` and ``iommu.forcedac=``; other words are
        ignored. A bad value raises ``ValueError`` naming the option."""
        passthrough: bool | None = None
        strict: bool | None = None
        forcedac = False
        for word in cmdline.split():
            key, sep, value = word.partition("=")
            if key == "iommu.passthrough":
                passthrough = _kstrtobool(key, value if sep else "1")
            elif key == "iommu.strict":
                strict = _kstrtobool(key, value if sep else "1")
            elif key == "iommu.forcedac":
                forcedac = _kstrtobool(key, value if sep else "1")
        if passthrough:
            dtype = DomainType.IDENTITY
        elif strict is False:
            dtype = DomainType.DMA_FQ
        else:
            dtype = DomainType.DMA
        return cls(default_domain_type=dtype, forcedac=forcedac, **overrides)


# -- registered IOMMUs, groups, per-device state ---------------------------------------------------------


@dataclass(eq=False)
class IommuDevice:
    """A registered IOMMU instance (Linux ``struct iommu_device``)."""

    iommu: Any  # the driver's object
    ops: IommuOps
    fwnode: Any
    name: str


@dataclass(eq=False)
class IommuGroup:
    """Devices the IOMMU cannot isolate from each other; they always share one domain."""

    id: int
    ops: IommuOps
    devices: list[Any] = field(default_factory=list)
    default_domain: IommuDomain | None = None
    domain: IommuDomain | None = None
    blocking_domain: IommuDomain | None = None
    owner_cnt: int = 0  # kernel drivers using the default domain, or 1 for a claiming user
    owner: Any = None  # a user that claimed the group for its own domains (VFIO-like)

    @property
    def name(self) -> str:
        return str(self.id)


@dataclass(eq=False)
class DevIommu:
    """Linux ``struct dev_iommu``: what the core knows of a device behind an IOMMU."""

    dev: Any
    iommu: IommuDevice
    iommu_dev: Any = None  # what the driver's probe_device returned
    priv: Any = None  # the driver's per-device data (dev_iommu_priv_set)
    resv_regions: list[IommuResvRegion] = field(default_factory=list)
    require_direct: bool = False  # firmware wants 1:1 mappings kept: never block this device
    domain: IommuDomain | None = None  # the domain the device is attached to
    pci_32bit_workaround: bool = False


def dev_name(dev: Any) -> str:
    name = getattr(dev, "name", None)
    return str(name) if name is not None else repr(dev)


def dev_is_pci(dev: Any) -> bool:
    bus = getattr(dev, "bus", None)
    bus_name = bus if isinstance(bus, str) else getattr(bus, "name", None)
    return bus_name == "pci"


def _dev_is_bound(dev: Any) -> bool:
    bound = getattr(dev, "bound", None)
    return bool(bound) if bound is not None else getattr(dev, "driver", None) is not None


def _pci_segment(dev: Any) -> int:
    segment = getattr(dev, "domain", 0)  # struct pci_dev's PCI domain (segment) number
    return segment if isinstance(segment, int) else 0


def _driver_managed_dma(dev: Any) -> bool:
    return bool(getattr(getattr(dev, "driver", None), "driver_managed_dma", False))


def iommu_fwspec_add_ids(dev: Any, ids: Iterable[int]) -> int:
    """Append IDs to the device's fwspec (what a driver's ``of_xlate`` does); -EINVAL without one."""
    fwspec = getattr(dev, "iommu_fwspec", None)
    if fwspec is None:
        return -errno.EINVAL
    fwspec.ids.extend(int(i) for i in ids)
    return 0


def dev_iommu_fwspec_get(dev: Any) -> IommuFwspec | None:
    fwspec = getattr(dev, "iommu_fwspec", None)
    return fwspec if isinstance(fwspec, IommuFwspec) else None


# -- the core ------------------------------------------------------------------------------------------


class IommuCore:
    """One kernel's IOMMU subsystem. ``of_iommu_configure`` is the driver core's dma_configure hook."""

    def __init__(
        self,
        trace: TraceBus | None = None,
        *,
        firmware: IommuFirmware | None = None,
        kernel: DriverCoreHooks | None = None,
        policy: IommuPolicy | None = None,
        now_us: Callable[[], float] | None = None,
        mm: Any = None,
    ) -> None:
        self.trace = trace if trace is not None else TraceBus()
        self.firmware = firmware
        self.kernel: DriverCoreHooks = kernel if kernel is not None else _NoDriverCore()
        self.policy = policy if policy is not None else IommuPolicy()
        if now_us is None:
            now_ns = getattr(kernel, "now_ns", None)
            now_us = (lambda: now_ns() / 1000.0) if now_ns is not None else (lambda: 0.0)
        self.now_us: Callable[[], float] = now_us
        self.mm = mm  # a host.mm.HostMemory: the DMA API's page allocator (coherent buffers)
        self.iommus: list[IommuDevice] = []
        self.groups: list[IommuGroup] = []
        self._next_group = 0
        self._domain_ids: dict[int, int] = {}
        self._next_domain = 0
        self.dma_cookies: list[Any] = []  # live DMA cookies, for the flush-queue timer
        self._dma_ops: dma.IommuDmaOps | None = None
        self._direct_ops: dma.DmaDirectOps | None = None

    # -- tracing -----------------------------------------------------------------------------------
    def emit(self, kind: str, **fields: Any) -> None:
        if self.trace.enabled:
            self.trace.emit(COMPONENT, kind, **fields)

    def domain_label(self, domain: IommuDomain | None) -> str:
        if domain is None:
            return "none"
        key = id(domain)
        number = self._domain_ids.get(key)
        if number is None:
            number = self._domain_ids[key] = self._next_domain
            self._next_domain += 1
        return f"{domain.type.value}#{number}"

    # -- IOMMU registration (iommu_device_register, iommu_ops_from_fwnode) --------------------------------
    def iommu_device_register(self, iommu: Any, ops: IommuOps, fwnode: Any, name: str | None = None) -> int:
        """Make ``iommu`` findable by its fwnode, then probe the devices that were waiting for it
        (``bus_iommu_probe``) and retry deferred probes. 0, or -EEXIST for a second registration."""
        if any(entry.iommu is iommu or entry.fwnode == fwnode for entry in self.iommus):
            self.emit("iommu.register", iommu=name or repr(iommu), result=-errno.EEXIST)
            return -errno.EEXIST
        entry = IommuDevice(iommu, ops, fwnode, name or dev_name(iommu))
        self.iommus.append(entry)
        self.emit("iommu.register", iommu=entry.name, result=0)
        self._bus_iommu_probe(entry)
        self.kernel.driver_deferred_probe_trigger()
        return 0

    def iommu_device_unregister(self, iommu: Any) -> int:
        entry = next((e for e in self.iommus if e.iommu is iommu), None)
        if entry is None:
            return -errno.ENOENT
        probed = [dev for group in self.groups for dev in group.devices]
        for dev in probed:
            state = self.dev_iommu(dev)
            if state is not None and state.iommu is entry:
                self.iommu_release_device(dev)
        self.iommus.remove(entry)
        self.emit("iommu.unregister", iommu=entry.name)
        return 0

    def iommu_from_fwnode(self, fwnode: Any) -> IommuDevice | None:
        return next((entry for entry in self.iommus if entry.fwnode == fwnode), None)

    def iommu_ops_from_fwnode(self, fwnode: Any) -> IommuOps | None:
        entry = self.iommu_from_fwnode(fwnode)
        return entry.ops if entry is not None else None

    def _bus_iommu_probe(self, entry: IommuDevice) -> None:
        for dev in list(self.kernel.devices):
            self._probe_if_ready(dev, entry)

    def _probe_if_ready(self, dev: Any, entry: IommuDevice | None = None) -> None:
        """Probe ``dev`` into its IOMMU if firmware names a registered one (``entry`` if given).
        Devices already bound ran dma_configure and found no IOMMU: they are left alone."""
        if self.firmware is None or getattr(dev, "iommu_group", None) is not None or _dev_is_bound(dev):
            return
        specs = self.firmware.iommu_specs(dev)
        if isinstance(specs, int) or not specs:
            return
        if entry is not None and not any(spec.fwnode == entry.fwnode for spec in specs):
            return
        if any(self.iommu_from_fwnode(spec.fwnode) is None for spec in specs):
            return
        self.of_iommu_configure(dev)  # its DMA ops are installed if the probe succeeds

    # -- fwspec ------------------------------------------------------------------------------------------
    def iommu_fwspec_init(self, dev: Any, iommu_fwnode: Any) -> int:
        """Attach a fwspec naming ``iommu_fwnode``; -EPROBE_DEFER (or what the deferred-probe
        timeout turns it into) while that IOMMU is not registered."""
        entry = self.iommu_from_fwnode(iommu_fwnode)
        if entry is None:
            return self.kernel.driver_deferred_probe_check_state(dev)
        fwspec = dev_iommu_fwspec_get(dev)
        if fwspec is not None:
            return 0 if fwspec.iommu_fwnode == iommu_fwnode else -errno.EINVAL
        dev.iommu_fwspec = IommuFwspec(iommu_fwnode, [], entry.ops)
        return 0

    def iommu_fwspec_free(self, dev: Any) -> None:
        dev.iommu_fwspec = None

    # -- dma_configure (of_iommu_configure + the IOMMU half of of_dma_configure) ------------------------
    def of_iommu_configure(self, dev: Any) -> int:
        """Translate firmware's ``iommus``/``iommu-map`` into a fwspec and probe the device into
        its IOMMU (which installs its DMA ops). 0, -ENODEV when firmware names no usable IOMMU,
        -EPROBE_DEFER while the IOMMU is not registered (-ETIMEDOUT/-ENODEV once the driver core
        gave up waiting), or the probe's error."""
        return self._configure(dev)[1]

    def _configure(self, dev: Any) -> tuple[str, int]:
        """(the step that decided, 0 or -errno): "firmware" or "probe"."""
        if getattr(dev, "iommu_group", None) is not None:
            return "probe", 0  # probed on an earlier attempt, or when the IOMMU registered
        err = self._of_iommu_configure_fwspec(dev)
        if err:
            self.iommu_fwspec_free(dev)
            return "firmware", err
        err = self.iommu_probe_device(dev)
        if err:
            self.iommu_fwspec_free(dev)
        return "probe", err

    def of_dma_configure(self, dev: Any) -> int:
        """The driver core's ``dma_configure`` step before a driver's probe.

        0: the driver may probe, behind the IOMMU or (no IOMMU described, or the deferred-probe
        timeout passed) with dma-direct; -EPROBE_DEFER: wait for the IOMMU; another negative
        errno fails the probe (an IOMMU probe error under ``policy.strict_probe``, or -EBUSY when
        a user owns the device's group).
        """
        stage, err = self._configure(dev)
        name = dev_name(dev)
        if err == -EPROBE_DEFER:
            self.emit("defer", dev=name)
            return err
        if err == -errno.ETIMEDOUT:
            # Linux: "deferred probe timeout, ignoring dependency". The device runs without its
            # IOMMU driver: its DMA goes wherever the SMMU's reset state sends it.
            self.emit("warn", dev=name, message="deferred probe timeout, ignoring IOMMU dependency")
        elif err and (stage == "probe" or err != -errno.ENODEV):
            self.emit("warn", dev=name, message="adding to IOMMU failed", error=err)
            if self.policy.strict_probe:
                return err
        if err:
            self._setup_direct(dev)
        if not _driver_managed_dma(dev):
            err = self.iommu_device_use_default_domain(dev)
            if err:
                return err
        return 0

    def dma_cleanup(self, dev: Any) -> None:
        """The driver core's ``dma_cleanup`` step after a failed probe or an unbind."""
        if not _driver_managed_dma(dev):
            self.iommu_device_unuse_default_domain(dev)

    def iommu_subsys_init(self) -> None:
        """Plug into the driver core: the ``dma_configure``/``dma_cleanup`` steps of every bus
        that has them, and the bus notifier that releases removed devices."""
        kernel = self.kernel
        register = getattr(kernel, "register_dma_configure", None)
        if register is not None:
            register(self.of_dma_configure)
        register_cleanup = getattr(kernel, "register_dma_cleanup", None)
        if register_cleanup is not None:
            register_cleanup(self.dma_cleanup)
        for bus in getattr(kernel, "buses", {}).values():
            notifiers = getattr(bus, "notifiers", None)
            if notifiers is not None and getattr(bus, "has_dma_configure", False):
                notifiers.append(self._bus_notifier)
        self.emit("subsys_init", default_domain=self.policy.default_domain_type.value)

    def _bus_notifier(self, event: str, dev: Any) -> None:
        if event == "add_device":
            self._probe_if_ready(dev)
        elif event == "removed_device":
            self.iommu_release_device(dev)

    def _of_iommu_configure_fwspec(self, dev: Any) -> int:
        if self.firmware is None:
            return -errno.ENODEV
        if dev_iommu_fwspec_get(dev) is not None:
            return 0
        specs = self.firmware.iommu_specs(dev)
        if isinstance(specs, int):
            return specs
        if not specs:
            return -errno.ENODEV  # firmware names no IOMMU: plain dma-direct
        for spec in specs:
            if not spec.available:
                return -errno.ENODEV
            err = self.iommu_fwspec_init(dev, spec.fwnode)
            if err:
                return err
            fwspec = dev_iommu_fwspec_get(dev)
            ops = fwspec.ops if fwspec is not None else None
            if ops is None or not hasattr(ops, "of_xlate"):
                return -errno.ENODEV
            err = ops.of_xlate(dev, list(spec.args))
            if err:
                return err
        return 0

    # -- probe (iommu_probe_device, iommu_init_device) ---------------------------------------------------
    def iommu_probe_device(self, dev: Any) -> int:
        if getattr(dev, "iommu_group", None) is not None:
            return 0
        fwspec = dev_iommu_fwspec_get(dev)
        entry = self.iommu_from_fwnode(fwspec.iommu_fwnode) if fwspec is not None else None
        name = dev_name(dev)
        if entry is None:
            return -errno.ENODEV
        ops = entry.ops
        # dev->iommu exists before probe_device so the driver can dev_iommu_priv_set() in it.
        state = DevIommu(dev, entry)
        dev.iommu = state
        result = self.call_driver(ops.probe_device, dev)
        if isinstance(result, int) and result < 0:
            dev.iommu = None
            self.emit("probe", dev=name, iommu=entry.name, result=result)
            return result
        state.iommu_dev = result
        state.pci_32bit_workaround = dev_is_pci(dev) and not self.policy.forcedac
        get_resv = getattr(ops, "get_resv_regions", None)
        if get_resv is not None:
            state.resv_regions = list(get_resv(dev))
        state.require_direct = any(r.type is ResvType.DIRECT for r in state.resv_regions)
        group = self._device_group(dev, ops)
        if isinstance(group, int):
            self._undo_probe(dev, ops)
            self.emit("probe", dev=name, iommu=entry.name, result=group)
            return group
        group.devices.append(dev)
        dev.iommu_group = group
        if group.domain is not None:
            self._create_direct_mappings(group.default_domain, dev)
            err = self._device_set_domain(group, dev, group.domain)
        else:
            err = self.iommu_setup_default_domain(group)
        if err:
            group.devices.remove(dev)
            dev.iommu_group = None
            self._forget_group_if_empty(group)
            self._undo_probe(dev, ops)
            self.emit("probe", dev=name, iommu=entry.name, result=err)
            return err
        finalize = getattr(ops, "probe_finalize", None)
        if finalize is not None:
            finalize(dev)
        self.iommu_setup_dma_ops(dev)
        self.emit(
            "probe",
            dev=name,
            iommu=entry.name,
            result=0,
            group=group.id,
            ids=list(fwspec.ids) if fwspec is not None else [],
            default_domain=self.domain_label(group.default_domain),
        )
        return 0

    def _undo_probe(self, dev: Any, ops: IommuOps) -> None:
        dev.iommu = None
        release = getattr(ops, "release_device", None)
        if release is not None:
            release(dev)

    def iommu_release_device(self, dev: Any) -> None:
        """Take ``dev`` out of its group and its IOMMU (device removal or IOMMU unregistration)."""
        state = self.dev_iommu(dev)
        group: IommuGroup | None = getattr(dev, "iommu_group", None)
        if state is None or group is None:
            return
        if state.domain is not None and dev in state.domain.devices:
            state.domain.devices.remove(dev)
        group.devices.remove(dev)
        dev.iommu_group = None
        self._forget_group_if_empty(group)
        self._undo_probe(dev, state.iommu.ops)
        dev.iommu_fwspec = None
        dev.dma_ops = None
        self.emit("release", dev=dev_name(dev))

    def _forget_group_if_empty(self, group: IommuGroup) -> None:
        if group.devices:
            return
        for domain in {id(d): d for d in (group.default_domain, group.blocking_domain) if d}.values():
            self._domain_free(domain, group.ops)
        group.domain = group.default_domain = group.blocking_domain = None
        if group in self.groups:
            self.groups.remove(group)

    def dev_iommu(self, dev: Any) -> DevIommu | None:
        state = getattr(dev, "iommu", None)
        return state if isinstance(state, DevIommu) else None

    def dev_iommu_priv_get(self, dev: Any) -> Any:
        state = self.dev_iommu(dev)
        return state.priv if state is not None else None

    def dev_iommu_priv_set(self, dev: Any, priv: Any) -> None:
        state = self.dev_iommu(dev)
        if state is not None:
            state.priv = priv

    def dev_iommu_ops(self, dev: Any) -> IommuOps | None:
        state = self.dev_iommu(dev)
        return state.iommu.ops if state is not None else None

    # -- groups ---------------------------------------------------------------------------------------
    def _device_group(self, dev: Any, ops: IommuOps) -> IommuGroup | int:
        device_group = getattr(ops, "device_group", None)
        if device_group is not None:
            group = device_group(dev)
            if isinstance(group, IommuGroup) and group not in self.groups:
                self.groups.append(group)
            return group
        if dev_is_pci(dev):
            return self.pci_device_group(dev, ops)
        return self.generic_device_group(ops)

    def iommu_group_alloc(self, ops: IommuOps) -> IommuGroup:
        group = IommuGroup(self._next_group, ops)
        self._next_group += 1
        self.groups.append(group)
        self.emit("group.alloc", group=group.id)
        return group

    def generic_device_group(self, ops: IommuOps) -> IommuGroup:
        return self.iommu_group_alloc(ops)

    def pci_device_group(self, dev: Any, ops: IommuOps) -> IommuGroup:
        """PCI functions that alias each other's requester IDs (``dma_aliases``) share a group."""
        aliases = set(getattr(dev, "dma_aliases", ()) or ())
        rid = getattr(dev, "rid", None)
        if rid is not None:
            aliases.add(rid)
        if aliases:
            for group in self.groups:
                if group.ops is not ops:
                    continue
                for other in group.devices:
                    if not dev_is_pci(other):
                        continue
                    theirs = set(getattr(other, "dma_aliases", ()) or ())
                    if getattr(other, "rid", None) is not None:
                        theirs.add(other.rid)
                    if aliases & theirs and _pci_segment(other) == _pci_segment(dev):
                        return group
        return self.iommu_group_alloc(ops)

    def iommu_group_get(self, dev: Any) -> IommuGroup | None:
        return getattr(dev, "iommu_group", None)

    def iommu_get_domain_for_dev(self, dev: Any) -> IommuDomain | None:
        group = self.iommu_group_get(dev)
        return group.domain if group is not None else None

    def iommu_get_dma_domain(self, dev: Any) -> IommuDomain | None:
        """The domain the DMA API maps into: the group's default domain."""
        group = self.iommu_group_get(dev)
        return group.default_domain if group is not None else None

    # -- domain allocation ---------------------------------------------------------------------------
    def _domain_alloc(self, ops: IommuOps, dev: Any, dtype: DomainType) -> IommuDomain | int:
        if dtype is DomainType.IDENTITY:
            static = getattr(ops, "identity_domain", None)
            return static if static is not None else -errno.EOPNOTSUPP
        if dtype is DomainType.BLOCKED:
            static = getattr(ops, "blocked_domain", None)
            return static if static is not None else -errno.EOPNOTSUPP
        if not dtype.is_paging:
            return -errno.EINVAL
        alloc = getattr(ops, "domain_alloc_paging", None)
        if alloc is None:
            return -errno.EOPNOTSUPP
        domain = self.call_driver(alloc, dev)
        if domain is None:
            domain = -errno.ENOMEM
        if isinstance(domain, int):
            self.emit("domain.alloc", dev=dev_name(dev), type=dtype.value, result=domain)
            return domain
        domain.type = dtype
        domain.owner = ops
        if not domain.pgsize_bitmap:
            domain.pgsize_bitmap = ops.pgsize_bitmap
        self.emit("domain.alloc", dev=dev_name(dev), domain=self.domain_label(domain), result=0)
        return domain

    def iommu_paging_domain_alloc(self, dev: Any) -> IommuDomain | int:
        """An UNMANAGED paging domain for a user that drives it (VFIO-like); -ENODEV when ``dev``
        is not behind an IOMMU."""
        ops = self.dev_iommu_ops(dev)
        if ops is None:
            return -errno.ENODEV
        return self._domain_alloc(ops, dev, DomainType.UNMANAGED)

    def _is_static(self, domain: IommuDomain, ops: Any) -> bool:
        return any(
            domain is getattr(ops, attr, None)
            for attr in ("identity_domain", "blocked_domain", "default_domain")
        )

    def iommu_domain_free(self, domain: IommuDomain) -> None:
        self._domain_free(domain, domain.owner)

    def _domain_free(self, domain: IommuDomain, ops: Any) -> None:
        if ops is not None and self._is_static(domain, ops):
            return  # the driver's static domains live as long as the driver
        cookie = domain.iova_cookie
        if cookie is not None:
            cookie.put()
            domain.iova_cookie = None
        self.emit("domain.free", domain=self.domain_label(domain))
        self._domain_ids.pop(id(domain), None)
        self.call_driver(domain.free)

    # -- default domains --------------------------------------------------------------------------------
    def _def_domain_type(self, group: IommuGroup) -> DomainType | None:
        """The type the driver requires for this group (its static default domain or its
        ``def_domain_type``), or None to follow policy."""
        ops = group.ops
        static = getattr(ops, "default_domain", None)
        if static is not None:
            return static.type
        ask = getattr(ops, "def_domain_type", None)
        chosen: DomainType | None = None
        for dev in group.devices:
            wanted = ask(dev) if ask is not None else None
            if not wanted or wanted == chosen:
                continue
            if chosen is None:
                chosen = wanted
                continue
            self.emit(
                "warn",
                group=group.id,
                message="conflicting def_domain_type",
                types=[chosen.value, wanted.value],
            )
            # Linux: drivers may force IDENTITY or DMA; IDENTITY wins.
            if wanted is DomainType.IDENTITY:
                chosen = wanted
        return chosen

    def _alloc_default_domain(self, group: IommuGroup, required: DomainType | None) -> IommuDomain | int:
        ops = group.ops
        dev = group.devices[0]
        static = getattr(ops, "default_domain", None)
        if static is not None:
            return static
        if required is not None:
            return self._domain_alloc(ops, dev, required)
        wanted = self.policy.default_domain_type
        tried: list[DomainType] = []
        # Policy first; then a strict DMA domain; then identity, for drivers (such as the
        # paravirtual identity design) that cannot build paging domains at all.
        for dtype in (wanted, DomainType.DMA, DomainType.IDENTITY):
            if dtype in tried:
                continue
            tried.append(dtype)
            domain = self._domain_alloc(ops, dev, dtype)
            if not isinstance(domain, int):
                if dtype is not wanted:
                    self.emit(
                        "warn",
                        group=group.id,
                        message=f"default domain type {wanted.value} unavailable, using {dtype.value}",
                    )
                return domain
        return -errno.ENODEV

    def iommu_setup_default_domain(self, group: IommuGroup) -> int:
        required = self._def_domain_type(group)
        domain = self._alloc_default_domain(group, required)
        if isinstance(domain, int):
            return domain
        if domain is group.default_domain:
            return 0
        for dev in group.devices:
            self._create_direct_mappings(domain, dev)
        old = group.domain
        err = 0
        if old is None:
            for dev in group.devices:
                err = self._device_set_domain(group, dev, domain)
                if err:
                    break
            if not err:
                group.domain = domain
        else:
            err = self._group_set_domain(group, domain)
        if err:
            if domain is not group.default_domain:
                self._domain_free(domain, group.ops)
            return err
        previous = group.default_domain
        group.default_domain = domain
        if previous is not None and previous is not domain:
            self._domain_free(previous, group.ops)
        return 0

    def _create_direct_mappings(self, domain: IommuDomain | None, dev: Any) -> None:
        """Map firmware's DIRECT regions 1:1 in a paging default domain (Linux
        ``iommu_create_device_direct_mappings``)."""
        state = self.dev_iommu(dev)
        if domain is None or state is None or not domain.type.is_paging:
            return
        for region in state.resv_regions:
            if region.type not in (ResvType.DIRECT, ResvType.DIRECT_RELAXABLE):
                continue
            granule = domain.pgsize_bitmap & -domain.pgsize_bitmap
            if not granule:
                continue
            start = region.start // granule * granule
            end = -(-(region.start + region.length) // granule) * granule
            addr = start
            while addr < end:  # skip pages another device of the group already mapped
                if self.iommu_iova_to_phys(domain, addr):
                    addr += granule
                    continue
                run = addr
                while run < end and not self.iommu_iova_to_phys(domain, run):
                    run += granule
                self.iommu_map(domain, addr, addr, run - addr, region.prot)
                addr = run

    # -- attach ------------------------------------------------------------------------------------------
    def call_driver(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call into a driver; a page-table access that faulted becomes -EFAULT, not an exception."""
        try:
            return fn(*args)
        except TableMemoryAbort as exc:
            self.emit("fault", op=getattr(fn, "__name__", "?"), message=str(exc))
            return -errno.EFAULT

    def _attach_device(self, domain: IommuDomain, dev: Any) -> int:
        result = self.call_driver(domain.attach_dev, dev)
        result = result if isinstance(result, int) else -errno.EINVAL
        self.emit("attach", dev=dev_name(dev), domain=self.domain_label(domain), result=result)
        return result

    def _device_set_domain(self, group: IommuGroup, dev: Any, domain: IommuDomain) -> int:
        state = self.dev_iommu(dev)
        if (
            state is not None
            and state.require_direct
            and (domain.type is DomainType.BLOCKED or domain is group.blocking_domain)
        ):
            self.emit("warn", dev=dev_name(dev), message="firmware requires a 1:1 mapping; refusing to block")
            return -errno.EINVAL
        if domain.owner is not None and domain.owner is not group.ops:
            return -errno.EINVAL
        err = self._attach_device(domain, dev)
        if err:
            return err
        if state is not None:
            previous = state.domain
            if previous is not None and previous is not domain and dev in previous.devices:
                previous.devices.remove(dev)
            state.domain = domain
        if dev not in domain.devices:
            domain.devices.append(dev)
        return 0

    def _group_set_domain(self, group: IommuGroup, new: IommuDomain) -> int:
        """Move every device of the group to ``new`` directly (no blocked step in between); on a
        failure the devices already moved go back to the old domain."""
        old = group.domain
        if old is new:
            return 0
        moved: list[Any] = []
        for dev in group.devices:
            err = self._device_set_domain(group, dev, new)
            if err:
                for back in moved:
                    if old is not None and self._device_set_domain(group, back, old):
                        self.emit("warn", dev=dev_name(back), message="could not restore the old domain")
                return err
            moved.append(dev)
        group.domain = new
        return 0

    def _group_blocking_domain(self, group: IommuGroup, dev: Any) -> IommuDomain | int:
        if group.blocking_domain is None:
            domain = self._domain_alloc(group.ops, dev, DomainType.BLOCKED)
            if isinstance(domain, int):
                # Linux: a driver without a blocked domain gets an empty paging domain instead.
                domain = self._domain_alloc(group.ops, dev, DomainType.UNMANAGED)
                if isinstance(domain, int):
                    return domain
            group.blocking_domain = domain
        return group.blocking_domain

    def iommu_attach_device(self, domain: IommuDomain, dev: Any) -> int:
        group = self.iommu_group_get(dev)
        if group is None:
            return -errno.ENODEV
        if len(group.devices) != 1:
            return -errno.EINVAL  # a device of a shared group is attached as a group
        return self.iommu_attach_group(domain, group)

    def iommu_attach_group(self, domain: IommuDomain, group: IommuGroup) -> int:
        """Attach ``group`` to ``domain``; -EBUSY when a user's domain is attached already."""
        current = group.domain
        if (
            current is not None
            and current not in (group.default_domain, group.blocking_domain)
            and current is not domain
        ):
            return -errno.EBUSY
        return self._group_set_domain(group, domain)

    def iommu_detach_device(self, domain: IommuDomain, dev: Any) -> int:
        """Back to the default domain."""
        group = self.iommu_group_get(dev)
        if group is None:
            return -errno.ENODEV
        if domain is not group.domain or len(group.devices) != 1:
            self.emit("warn", dev=dev_name(dev), message="detach of a domain the device is not attached to")
            return -errno.EINVAL
        return self.iommu_detach_group(domain, group)

    def iommu_detach_group(self, domain: IommuDomain, group: IommuGroup) -> int:
        if domain is not group.domain:
            return -errno.EINVAL
        return self._group_set_core_domain(group)

    def _group_set_core_domain(self, group: IommuGroup) -> int:
        """Back to where the kernel wants the group: blocked while a user owns it, else default."""
        target = group.default_domain if group.owner is None else None
        if target is None:
            blocking = self._group_blocking_domain(group, group.devices[0])
            if isinstance(blocking, int):
                return blocking
            target = blocking
        return self._group_set_domain(group, target)

    # -- DMA ownership -----------------------------------------------------------------------------------
    def iommu_device_use_default_domain(self, dev: Any) -> int:
        """A kernel driver is about to use the DMA API: -EBUSY if a user owns the group."""
        group = self.iommu_group_get(dev)
        if group is None:
            return 0
        if group.owner_cnt and (group.owner is not None or group.domain is not group.default_domain):
            self.emit("warn", dev=dev_name(dev), message="group is owned by a user; driver may not bind")
            return -errno.EBUSY
        group.owner_cnt += 1
        return 0

    def iommu_device_unuse_default_domain(self, dev: Any) -> None:
        group = self.iommu_group_get(dev)
        if group is not None and group.owner is None and group.owner_cnt:
            group.owner_cnt -= 1

    def iommu_group_claim_dma_owner(self, group: IommuGroup, owner: Any) -> int:
        """A user (VFIO-like) takes the group: no kernel driver may use its DMA API, and it sits in
        the blocking domain until the user attaches its own. -EPERM if anyone uses it already."""
        if group.owner_cnt:
            return -errno.EPERM
        if group.domain is not None and group.domain is not group.default_domain:
            return -errno.EBUSY
        blocking = self._group_blocking_domain(group, group.devices[0])
        if isinstance(blocking, int):
            return blocking
        err = self._group_set_domain(group, blocking)
        if err:
            return err
        group.owner = owner
        group.owner_cnt = 1
        self.emit("group.claim", group=group.id)
        return 0

    def iommu_group_release_dma_owner(self, group: IommuGroup) -> None:
        if group.owner is None:
            return
        group.owner = None
        group.owner_cnt = 0
        if self._group_set_core_domain(group):
            self.emit("warn", group=group.id, message="could not return to the default domain")
        self.emit("group.release", group=group.id)

    def iommu_group_replace_domain(self, group: IommuGroup, new: IommuDomain) -> int:
        """Switch the group to ``new`` in one step, never through blocked: devices that must keep
        DMA running (RMRs, a scan-out engine) see either the old or the new translation."""
        if new is None:
            return -errno.EINVAL
        return self._group_set_domain(group, new)

    # -- map / unmap ------------------------------------------------------------------------------------
    @staticmethod
    def iommu_pgsize(bitmap: int, iova: int, paddr: int, size: int) -> tuple[int, int]:
        """Linux ``iommu_pgsize``: the largest page size alignment and length allow, and how many
        of them to map before a larger size could take over."""
        sizes = bitmap & ((1 << size.bit_length()) - 1)
        merged = iova | paddr
        if merged:
            sizes &= ((merged & -merged) << 1) - 1
        if not sizes:
            return 0, 0
        pgsize = 1 << (sizes.bit_length() - 1)
        larger = bitmap & ~((pgsize << 1) - 1)
        if larger:
            next_size = larger & -larger
            if not (iova ^ paddr) & (next_size - 1):
                offset = next_size - (merged & (next_size - 1))
                if offset + next_size <= size:
                    size = offset
        return pgsize, size // pgsize

    def iommu_map(self, domain: IommuDomain, iova: int, paddr: int, size: int, prot: Prot | int) -> int:
        """Map ``[iova, iova + size)`` to ``paddr``: 0, or a negative errno with nothing left mapped."""
        err = self._map(domain, iova, paddr, size, Prot(prot))
        self.emit("map", domain=self.domain_label(domain), iova=iova, paddr=paddr, size=size, result=err)
        return err

    def _map(self, domain: IommuDomain, iova: int, paddr: int, size: int, prot: Prot) -> int:
        bitmap = domain.pgsize_bitmap
        if not domain.type.is_paging:
            return -errno.EINVAL
        if not bitmap:
            return -errno.ENODEV
        min_pagesz = bitmap & -bitmap
        if iova < 0 or paddr < 0 or size < 0 or (iova | paddr | size) & (min_pagesz - 1):
            return -errno.EINVAL
        if domain.aperture_end and size and iova + size - 1 > domain.aperture_end:
            return -errno.EINVAL
        orig_iova, orig_size = iova, size
        err = 0
        while size:
            pgsize, count = self.iommu_pgsize(bitmap, iova, paddr, size)
            result = self.call_driver(domain.map_pages, iova, paddr, pgsize, count, prot)
            mapped, err = (0, result) if isinstance(result, int) else result
            size -= mapped
            if err:
                break
            if not mapped:
                err = -errno.EIO  # a driver that maps nothing and reports no error would loop
                break
            iova += mapped
            paddr += mapped
        if err and orig_size - size:
            self.iommu_unmap(domain, orig_iova, orig_size - size)
        return err

    def iommu_unmap_fast(self, domain: IommuDomain, iova: int, size: int, gather: IotlbGather) -> int:
        """Unmap without invalidating: the caller syncs ``gather`` (or queues it). Bytes unmapped."""
        bitmap = domain.pgsize_bitmap
        if not domain.type.is_paging or not bitmap:
            return 0
        min_pagesz = bitmap & -bitmap
        if iova < 0 or size <= 0 or (iova | size) & (min_pagesz - 1):
            return 0
        unmapped = 0
        start = iova
        while unmapped < size:
            pgsize, count = self.iommu_pgsize(bitmap, iova, iova, size - unmapped)
            done = self.call_driver(domain.unmap_pages, iova, pgsize, count, gather)
            if not isinstance(done, int) or done <= 0:
                break
            iova += done
            unmapped += done
        self.emit("unmap", domain=self.domain_label(domain), iova=start, size=size, unmapped=unmapped)
        return unmapped

    def iommu_iotlb_sync(self, domain: IommuDomain, gather: IotlbGather) -> None:
        self.emit("iotlb_sync", domain=self.domain_label(domain), start=gather.start, end=gather.end)
        self.call_driver(domain.iotlb_sync, gather)
        self.call_driver(domain.free_gathered_tables, gather)
        gather.reset()

    def iommu_flush_iotlb_all(self, domain: IommuDomain) -> None:
        self.emit("flush_iotlb_all", domain=self.domain_label(domain))
        self.call_driver(domain.flush_iotlb_all)

    def iommu_unmap(self, domain: IommuDomain, iova: int, size: int) -> int:
        """Unmap and invalidate (strict): returns the bytes unmapped from ``iova``."""
        gather = IotlbGather()
        unmapped = self.iommu_unmap_fast(domain, iova, size, gather)
        self.iommu_iotlb_sync(domain, gather)
        return unmapped

    def iommu_iova_to_phys(self, domain: IommuDomain, iova: int) -> int:
        """The physical address ``iova`` maps to (0 when unmapped), identity for identity domains."""
        if domain.type is DomainType.IDENTITY:
            return iova
        if not domain.type.is_paging:
            return 0
        result = self.call_driver(domain.iova_to_phys, iova)
        return result if isinstance(result, int) and result > 0 else 0

    # -- DMA ops -----------------------------------------------------------------------------------------
    def iommu_setup_dma_ops(self, dev: Any) -> None:
        """Install the DMA API ops by the group's default domain (iommu_setup_dma_ops)."""
        group = self.iommu_group_get(dev)
        domain = group.default_domain if group is not None else None
        if domain is not None and domain.type in (DomainType.DMA, DomainType.DMA_FQ):
            err = dma.iommu_dma_init_domain(self, domain, dev)
            if err:
                self.emit("warn", dev=dev_name(dev), message="DMA domain setup failed", error=err)
        if self._dma_ops is None:
            self._dma_ops = dma.IommuDmaOps(self)
        dev.dma_ops = self._dma_ops

    def direct_ops(self) -> dma.DmaDirectOps:
        if self._direct_ops is None:
            self._direct_ops = dma.DmaDirectOps(self)
        return self._direct_ops

    def _setup_direct(self, dev: Any) -> None:
        dev.dma_ops = self.direct_ops()

    def capable(self, dev: Any, cap: IommuCap) -> bool:
        ops = self.dev_iommu_ops(dev)
        ask = getattr(ops, "capable", None) if ops is not None else None
        return bool(ask(dev, cap)) if ask is not None else False

    def run_timers(self) -> None:
        """The flush-queue timer: drain every queue whose timeout has passed on the modeled clock.
        The DMA API also checks on each call; a kernel with timers calls this when they fire."""
        for cookie in list(self.dma_cookies):
            cookie.check_timer()
