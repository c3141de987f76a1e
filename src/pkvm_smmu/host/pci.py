"""PCI for the host kernel: the generic ECAM host-bridge driver (``pci-host-generic``), bus
enumeration through config space, and the helpers endpoint drivers call (``pci_enable_device``,
``pci_set_master``, ``pci_enable_ats``...).

Everything goes through the CPU port: config space is ECAM MMIO (``bus << 20 | devfn << 12 |
where`` from the bridge's ``reg``), so under pKVM the same reads and writes pass the host stage-2.
A config read that faults completes with all ones, as a PCIe Unsupported Request does.

BARs are taken as firmware left them (Linux's probe-only mode); their size is found by the
standard write-all-ones sizing with decoding disabled, as ``__pci_read_base`` does.
"""

from __future__ import annotations

import errno
from collections.abc import Hashable
from typing import Any

from pkvm_smmu.devicetree import Bdf, PciSpace
from pkvm_smmu.host.driver_core import (
    IORESOURCE_MEM,
    Device,
    InitcallLevel,
    Kernel,
    PciDevice,
    PlatformDevice,
    PlatformDriver,
    pci_device_add,
    platform_driver_register,
    platform_get_resource,
)
from pkvm_smmu.host.firmware import Firmware, PciHostBridgeDesc, pci_host_bridge_descs, pci_intx
from pkvm_smmu.host.hw import Cpu
from pkvm_smmu.host.irq import HostIrq
from pkvm_smmu.trace import TraceBus

COMPONENT = "host.pci"
PCI_HOST_GENERIC_DRIVER = "pci-host-generic"
PCI_HOST_ECAM_GENERIC = "pci-host-ecam-generic"

# include/uapi/linux/pci_regs.h
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_CLASS_REVISION = 0x08
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_PIN = 0x3D

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS_CAP_LIST = 0x10
PCI_HEADER_TYPE_MASK = 0x7F
PCI_HEADER_TYPE_MFD = 0x80
PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_MASK = 0x6
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_MASK = ~0xF

PCI_CAP_ID_EXP = 0x10
PCI_CFG_SPACE_SIZE = 0x100
PCI_CFG_SPACE_EXP_SIZE = 0x1000
PCI_EXT_CAP_ID_ATS = 0x000F
PCI_ATS_CAP = 0x04
PCI_ATS_CTRL = 0x06
PCI_ATS_CTRL_ENABLE = 0x8000
PCI_ATS_MIN_STU = 12  # the Smallest Translation Unit field counts from 4 KiB

_CAP_TTL = 48  # how many list entries a well-formed space can hold (PCI_FIND_CAP_TTL)
_EXT_CAP_TTL = (PCI_CFG_SPACE_EXP_SIZE - PCI_CFG_SPACE_SIZE) // 8


class PciEcam:
    """``pci_ecam_ops`` over one ECAM window, through the CPU port."""

    def __init__(self, cpu: Cpu, base: int, size: int, bus_range: tuple[int, int]) -> None:
        self.cpu = cpu
        self.base = base
        self.size = size
        self.bus_range = bus_range

    def map_bus(self, bus: int, devfn: int, where: int) -> int | None:
        if not self.bus_range[0] <= bus <= self.bus_range[1]:
            return None
        offset = (bus - self.bus_range[0]) << 20 | devfn << 12 | where
        return self.base + offset if offset < self.size else None

    def read(self, bus: int, devfn: int, where: int, size: int) -> int:
        address = self.map_bus(bus, devfn, where)
        value = self.cpu.read(address, size) if address is not None else None
        return value if isinstance(value, int) else (1 << (8 * size)) - 1

    def write(self, bus: int, devfn: int, where: int, size: int, value: int) -> int:
        address = self.map_bus(bus, devfn, where)
        if address is None:
            return -errno.ENODEV
        return 0 if self.cpu.write(address, size, value & ((1 << (8 * size)) - 1)) is None else -errno.EIO


class EcamPciDevice(PciDevice):
    """A ``struct pci_dev`` found by enumeration: config-space access, BAR0, INTx, ATS."""

    def __init__(self, ecam: PciEcam, bdf: Bdf, vendor: int, device: int, **kwargs: Any) -> None:
        super().__init__(vendor, device, bus_nr=bdf.bus, devfn=bdf.devfn, **kwargs)
        self.ecam = ecam
        self.bdf = bdf
        self.revision = 0
        self.hdr_type = 0
        self.is_pcie = False
        self.irq = 0  # Linux IRQ of INTx (0: none)
        self.pin = 0
        self.bar0: tuple[int, int] = (0, 0)  # (CPU address, size); size 0: no BAR0
        self.ats_cap = 0  # config offset of the ATS capability (0: none)
        self.ats_stu = 0
        self.ats_enabled = False
        self.enable_cnt = 0
        self.is_busmaster = False
        self.untrusted = False
        self.dma_coherent = False  # of_dma_configure: the host bridge's dma-coherent

    @property
    def ats_supported(self) -> bool:
        """``pci_ats_supported``: what arm-smmu-v3 asks before putting EATS in the STE."""
        return bool(self.ats_cap) and not self.untrusted

    # arm-smmu-v3 calls these on the device it masters.
    def pci_enable_ats(self, stu: int) -> int:
        return pci_enable_ats(self, stu)

    def pci_disable_ats(self) -> None:
        pci_disable_ats(self)


# -- config accessors and helpers for drivers ---------------------------------------------------------


def _trace_of(pdev: EcamPciDevice) -> TraceBus | None:
    kernel = pdev.kernel
    return kernel.trace if kernel is not None else None


def _emit(pdev: EcamPciDevice, kind: str, **fields: Any) -> None:
    trace = _trace_of(pdev)
    if trace is not None and trace.enabled:
        trace.emit(COMPONENT, kind, dev=pdev.name, **fields)


def pci_read_config(pdev: EcamPciDevice, where: int, size: int) -> int:
    return pdev.ecam.read(pdev.bus_nr, pdev.devfn, where, size)


def pci_write_config(pdev: EcamPciDevice, where: int, size: int, value: int) -> int:
    return pdev.ecam.write(pdev.bus_nr, pdev.devfn, where, size, value)


def pci_read_config_byte(pdev: EcamPciDevice, where: int) -> int:
    return pci_read_config(pdev, where, 1)


def pci_read_config_word(pdev: EcamPciDevice, where: int) -> int:
    return pci_read_config(pdev, where, 2)


def pci_read_config_dword(pdev: EcamPciDevice, where: int) -> int:
    return pci_read_config(pdev, where, 4)


def pci_write_config_word(pdev: EcamPciDevice, where: int, value: int) -> int:
    return pci_write_config(pdev, where, 2, value)


def pci_write_config_dword(pdev: EcamPciDevice, where: int, value: int) -> int:
    return pci_write_config(pdev, where, 4, value)


def _find_capability(ecam: PciEcam, bus: int, devfn: int, cap: int) -> int:
    if not ecam.read(bus, devfn, PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
        return 0
    pos = ecam.read(bus, devfn, PCI_CAPABILITY_LIST, 1)
    for _ in range(_CAP_TTL):
        pos &= ~3
        if pos < 0x40:
            return 0
        header = ecam.read(bus, devfn, pos, 2)
        if header & 0xFF == 0xFF:
            return 0
        if header & 0xFF == cap:
            return pos
        pos = header >> 8
    return 0


def _find_ext_capability(ecam: PciEcam, bus: int, devfn: int, cap: int) -> int:
    pos = PCI_CFG_SPACE_SIZE
    for _ in range(_EXT_CAP_TTL):
        header = ecam.read(bus, devfn, pos, 4)
        if header in (0, 0xFFFF_FFFF):
            return 0
        if header & 0xFFFF == cap:
            return pos
        pos = header >> 20
        if pos < PCI_CFG_SPACE_SIZE:
            return 0
    return 0


def pci_find_capability(pdev: EcamPciDevice, cap: int) -> int:
    return _find_capability(pdev.ecam, pdev.bus_nr, pdev.devfn, cap)


def pci_find_ext_capability(pdev: EcamPciDevice, cap: int) -> int:
    if not pdev.is_pcie:
        return 0
    return _find_ext_capability(pdev.ecam, pdev.bus_nr, pdev.devfn, cap)


def pci_resource_start(pdev: EcamPciDevice, bar: int) -> int:
    return pdev.bar0[0] if bar == 0 else 0


def pci_resource_len(pdev: EcamPciDevice, bar: int) -> int:
    return pdev.bar0[1] if bar == 0 else 0


def _update_command(pdev: EcamPciDevice, set_bits: int, clear_bits: int) -> int:
    old = pci_read_config_word(pdev, PCI_COMMAND)
    new = (old & ~clear_bits) | set_bits
    if new != old:
        return pci_write_config_word(pdev, PCI_COMMAND, new)
    return 0


def pci_enable_device(pdev: EcamPciDevice) -> int:
    """Turn on decoding of the BARs the device has (``pci_enable_resources``)."""
    if pdev.enable_cnt:
        pdev.enable_cnt += 1
        return 0
    start, size = pdev.bar0
    if size and not start:
        _emit(pdev, "enable", result=-errno.EINVAL, why="BAR 0 not assigned")
        return -errno.EINVAL
    ret = _update_command(pdev, PCI_COMMAND_MEMORY if size else 0, 0)
    if not ret:
        pdev.enable_cnt = 1
    _emit(pdev, "enable", result=ret)
    return ret


def pci_disable_device(pdev: EcamPciDevice) -> None:
    if pdev.enable_cnt == 0:
        return
    pdev.enable_cnt -= 1
    if pdev.enable_cnt == 0:
        pci_clear_master(pdev)
        _update_command(pdev, 0, PCI_COMMAND_MEMORY)
        _emit(pdev, "disable")


def pci_set_master(pdev: EcamPciDevice) -> None:
    """Set Bus Master Enable: from here the function may issue DMA."""
    _update_command(pdev, PCI_COMMAND_MASTER, 0)
    pdev.is_busmaster = bool(pci_read_config_word(pdev, PCI_COMMAND) & PCI_COMMAND_MASTER)
    _emit(pdev, "set_master", bme=pdev.is_busmaster)


def pci_clear_master(pdev: EcamPciDevice) -> None:
    _update_command(pdev, 0, PCI_COMMAND_MASTER)
    pdev.is_busmaster = False


def pci_enable_ats(pdev: EcamPciDevice, ps: int) -> int:
    """Enable ATS with a Smallest Translation Unit of ``2**ps`` bytes."""
    if not pdev.ats_cap:
        return -errno.EINVAL
    if pdev.ats_enabled:
        return -errno.EBUSY
    if ps < PCI_ATS_MIN_STU:
        return -errno.EINVAL
    ctrl = PCI_ATS_CTRL_ENABLE | (ps - PCI_ATS_MIN_STU)
    ret = pci_write_config_word(pdev, pdev.ats_cap + PCI_ATS_CTRL, ctrl)
    if not ret:
        pdev.ats_stu = ps
        pdev.ats_enabled = True
    _emit(pdev, "ats.enable", stu=ps, result=ret)
    return ret


def pci_disable_ats(pdev: EcamPciDevice) -> None:
    if not pdev.ats_enabled:
        return
    ctrl = pci_read_config_word(pdev, pdev.ats_cap + PCI_ATS_CTRL)
    pci_write_config_word(pdev, pdev.ats_cap + PCI_ATS_CTRL, ctrl & ~PCI_ATS_CTRL_ENABLE)
    pdev.ats_enabled = False
    _emit(pdev, "ats.disable")


# -- the host bridge driver -----------------------------------------------------------------------------


class PciHostGenericDriver:
    """``gen_pci_driver`` (drivers/pci/controller/pci-host-generic.c) bound to one kernel: a
    platform driver for ``pci-host-ecam-generic`` that scans the root bus and adds what it finds."""

    def __init__(
        self,
        kernel: Kernel,
        cpu: Cpu,
        fw: Firmware,
        irq: HostIrq,
        *,
        level: InitcallLevel | str = InitcallLevel.DEVICE,
    ) -> None:
        self.kernel = kernel
        self.cpu = cpu
        self.fw = fw
        self.irq = irq
        self.level = InitcallLevel.parse(level)
        self.trace = kernel.trace
        self.bridges: dict[Hashable, PciHostBridgeDesc] = {d.fwnode: d for d in pci_host_bridge_descs(fw)}
        self.root_buses: list[Device] = []
        self.devices: list[EcamPciDevice] = []
        self._next_domain = 0
        self.driver = PlatformDriver(
            PCI_HOST_GENERIC_DRIVER,
            self.probe,
            of_match_table=(PCI_HOST_ECAM_GENERIC,),
            suppress_bind_attrs=True,
        )

    def register(self) -> None:
        """``builtin_platform_driver(gen_pci_driver)``."""
        self.kernel.register_initcall(
            self.level, lambda: platform_driver_register(self.kernel, self.driver), "gen_pci_driver_init"
        )

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.trace.enabled:
            self.trace.emit(COMPONENT, kind, **fields)

    def _domain_nr(self, desc: PciHostBridgeDesc) -> int:
        if desc.domain is not None:
            return desc.domain
        used = {d.domain for d in self.bridges.values() if d.domain is not None}
        while self._next_domain in used:
            self._next_domain += 1
        self._next_domain += 1
        return self._next_domain - 1

    def probe(self, pdev: PlatformDevice) -> int:
        """``pci_host_common_probe``: map ECAM, create the root bus, scan it, add the devices."""
        desc = self.bridges.get(pdev.fwnode) if pdev.fwnode is not None else None
        res = platform_get_resource(pdev, IORESOURCE_MEM, 0)
        if desc is None or res is None:
            return -errno.ENODEV
        ecam = PciEcam(self.cpu, res.start, res.size, desc.bus_range)
        domain = self._domain_nr(desc)
        busn = desc.bus_range[0]
        root = Device(f"pci{domain:04x}:{busn:02x}", parent=pdev)
        ret = self.kernel.device_add(root)
        if ret:
            return ret
        self.root_buses.append(root)
        found = self.pci_scan_bus(ecam, desc, domain, busn, root)
        self._emit("scan", bridge=pdev.name, domain=domain, bus=busn, found=[d.name for d in found])
        for dev in found:  # pci_bus_add_devices: drivers bind from here
            pci_device_add(self.kernel, dev)
        return 0

    def pci_scan_bus(
        self, ecam: PciEcam, desc: PciHostBridgeDesc, domain: int, busn: int, parent: Device
    ) -> list[EcamPciDevice]:
        found: list[EcamPciDevice] = []
        for slot in range(32):
            for fn in range(8):
                bdf = Bdf(busn, slot, fn)
                dev = self.pci_scan_device(ecam, desc, domain, bdf, parent)
                if dev is None:
                    if fn == 0:
                        break  # no function 0: nothing in this slot
                    continue
                found.append(dev)
                if fn == 0 and not dev.hdr_type & PCI_HEADER_TYPE_MFD:
                    break
        return found

    def pci_scan_device(
        self, ecam: PciEcam, desc: PciHostBridgeDesc, domain: int, bdf: Bdf, parent: Device
    ) -> EcamPciDevice | None:
        """``pci_scan_device`` + ``pci_setup_device``: None when nothing answers (vendor 0xFFFF)."""
        bus, devfn = bdf.bus, bdf.devfn
        vendor = ecam.read(bus, devfn, PCI_VENDOR_ID, 2)
        if vendor in (0xFFFF, 0x0000):
            return None
        class_rev = ecam.read(bus, devfn, PCI_CLASS_REVISION, 4)
        dev = EcamPciDevice(
            ecam,
            bdf,
            vendor,
            ecam.read(bus, devfn, PCI_DEVICE_ID, 2),
            domain=domain,
            class_code=class_rev >> 8,
            subsystem_vendor=ecam.read(bus, devfn, PCI_SUBSYSTEM_VENDOR_ID, 2),
            subsystem_device=ecam.read(bus, devfn, PCI_SUBSYSTEM_ID, 2),
            parent=parent,
        )
        dev.revision = class_rev & 0xFF
        dev.dma_coherent = desc.dma_coherent
        dev.hdr_type = ecam.read(bus, devfn, PCI_HEADER_TYPE, 1)
        if dev.hdr_type & PCI_HEADER_TYPE_MASK != 0:
            self._emit("skip", dev=dev.name, why=f"header type {dev.hdr_type & PCI_HEADER_TYPE_MASK}")
            return None  # bridges and CardBus: not modeled
        dev.is_pcie = bool(pci_find_capability(dev, PCI_CAP_ID_EXP))
        dev.bar0 = self._read_bar0(dev, desc)
        dev.pin = pci_read_config_byte(dev, PCI_INTERRUPT_PIN)
        if dev.pin:
            res = pci_intx(self.fw, desc.fwnode, bdf, dev.pin)
            dev.irq = self.irq.irq_create_of_mapping(res) if res is not None else 0
        dev.ats_cap = pci_find_ext_capability(dev, PCI_EXT_CAP_ID_ATS)
        self.devices.append(dev)
        self._emit(
            "device", dev=dev.name, vendor=vendor, device=dev.device, class_code=dev.class_code,
            bar0=dev.bar0[0], bar0_size=dev.bar0[1], irq=dev.irq, ats=bool(dev.ats_cap),
        )  # fmt: skip
        return dev

    def _read_bar0(self, dev: EcamPciDevice, desc: PciHostBridgeDesc) -> tuple[int, int]:
        """``__pci_read_base`` for BAR0 with decoding off while it is sized: (CPU address, size)."""
        command = pci_read_config_word(dev, PCI_COMMAND)
        decode = PCI_COMMAND_MEMORY | PCI_COMMAND_IO
        if command & decode:
            pci_write_config_word(dev, PCI_COMMAND, command & ~decode)
        low = pci_read_config_dword(dev, PCI_BASE_ADDRESS_0)
        pci_write_config_dword(dev, PCI_BASE_ADDRESS_0, 0xFFFF_FFFF)
        size_low = pci_read_config_dword(dev, PCI_BASE_ADDRESS_0)
        pci_write_config_dword(dev, PCI_BASE_ADDRESS_0, low)
        address, mask = low & PCI_BASE_ADDRESS_MEM_MASK & 0xFFFF_FFFF, size_low & PCI_BASE_ADDRESS_MEM_MASK
        if low & PCI_BASE_ADDRESS_SPACE_IO or not size_low or size_low == 0xFFFF_FFFF:
            address = mask = 0  # no memory BAR0 (I/O space is not modeled)
        elif low & PCI_BASE_ADDRESS_MEM_TYPE_MASK == PCI_BASE_ADDRESS_MEM_TYPE_64:
            high = pci_read_config_dword(dev, PCI_BASE_ADDRESS_0 + 4)
            pci_write_config_dword(dev, PCI_BASE_ADDRESS_0 + 4, 0xFFFF_FFFF)
            size_high = pci_read_config_dword(dev, PCI_BASE_ADDRESS_0 + 4)
            pci_write_config_dword(dev, PCI_BASE_ADDRESS_0 + 4, high)
            address |= high << 32
            mask = (mask & 0xFFFF_FFFF) | size_high << 32
            mask |= ~((1 << 64) - 1)
        else:
            mask |= ~0xFFFF_FFFF
        if command & decode:
            pci_write_config_word(dev, PCI_COMMAND, command)
        size = (~mask + 1) & ((1 << 64) - 1) if mask else 0
        if not size:
            return 0, 0
        for window in desc.windows:
            if window.space not in (PciSpace.MEM32, PciSpace.MEM64):
                continue
            if window.pci_address <= address and address + size <= window.pci_address + window.size:
                return window.cpu_address + (address - window.pci_address), size
        return 0, size  # outside every window: firmware did not assign it


__all__ = [
    "PCI_HOST_ECAM_GENERIC",
    "PCI_HOST_GENERIC_DRIVER",
    "EcamPciDevice",
    "PciEcam",
    "PciHostGenericDriver",
    "pci_clear_master",
    "pci_disable_ats",
    "pci_disable_device",
    "pci_enable_ats",
    "pci_enable_device",
    "pci_find_capability",
    "pci_find_ext_capability",
    "pci_read_config_byte",
    "pci_read_config_dword",
    "pci_read_config_word",
    "pci_resource_len",
    "pci_resource_start",
    "pci_set_master",
    "pci_write_config_dword",
    "pci_write_config_word",
]
