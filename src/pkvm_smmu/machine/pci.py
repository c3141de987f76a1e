"""PCIe as the platform needs it: an ECAM host bridge, its memory windows, and type-0 functions.

Config space (PCI Local Bus 3.0 / PCIe 6.0 ch. 7) holds the minimum a kernel needs to enumerate
and enable a function: vendor/device ID, Command (Memory Space, **Bus Master Enable**, INTx
Disable), Status with a capability list, class code, header type 0, one 64-bit non-prefetchable
BAR0, interrupt pin, a PCI Express capability, and an ATS extended capability when the function
has ATS.

A function with Bus Master Enable clear must not issue requests (PCIe 6.0 §7.5.1.1.3): its
``PciDmaEndpoint`` refuses every DMA and every Translation Request until software sets BME, and
Translation Requests additionally need ATS Enable. ``issue_translated`` is deliberately not
gated: it models a device that ignores the rules.

Reads of config space where no function exists complete with all ones (how enumeration finds
the holes); writes there are dropped. A memory window access that no enabled BAR decodes is an
external abort.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from pkvm_smmu.devicetree import Bdf, PciRange, PciSpace
from pkvm_smmu.machine.bus import ExternalAbort, Initiator, InitiatorKind, MmioDevice, SystemBus
from pkvm_smmu.machine.devices.endpoint import DmaEndpoint, DmaFailure, DmaResult
from pkvm_smmu.machine.smmu.translate import AtsResponse, AtsStatus
from pkvm_smmu.machine.smmu.types import Outcome, Transaction, TranslationResult

if TYPE_CHECKING:
    from pkvm_smmu.machine.smmu.device import SmmuV3

# -- type-0 header (Linux include/uapi/linux/pci_regs.h names) --------------------------------------
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_CLASS_REVISION = 0x08
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_1 = 0x14
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS_CAP_LIST = 0x10

PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_CAP_ID_EXP = 0x10
PCI_EXT_CAP_ID_ATS = 0x000F

PCIE_CAP_OFFSET = 0x40  # PCI Express capability (endpoint, version 2)
PCI_EXP_FLAGS = PCIE_CAP_OFFSET + 2
ATS_CAP_OFFSET = 0x100  # first extended capability
PCI_ATS_CAP = ATS_CAP_OFFSET + 4
PCI_ATS_CTRL = ATS_CAP_OFFSET + 6
PCI_ATS_CTRL_ENABLE = 0x8000
PCI_ATS_CTRL_STU_MASK = 0x1F

CONFIG_SIZE = 0x1000  # PCIe: 4 KiB of config space per function
ECAM_BUS_SHIFT = 20
ECAM_DEVFN_SHIFT = 12

# The model's own IDs (not PCI-SIG assignments): a DMA controller, class 08h/01h.
PKVM_SMMU_VENDOR_ID = 0xC0DE
DMA_ENGINE_DEVICE_ID = 0xD4A0
PCI_CLASS_DMA_CONTROLLER = 0x080100


class PciFunction:
    """A type-0 function with a 64-bit memory BAR0 in front of ``device`` (its MMIO registers;
    may be set after construction, since a device's DMA side usually needs the function)."""

    def __init__(
        self,
        bdf: Bdf,
        device: MmioDevice | None,
        *,
        vendor_id: int = PKVM_SMMU_VENDOR_ID,
        device_id: int = DMA_ENGINE_DEVICE_ID,
        class_code: int = PCI_CLASS_DMA_CONTROLLER,
        revision: int = 1,
        bar0_size: int = 0x1000,
        ats: bool = False,
        interrupt_pin: int = 0,
        name: str = "",
    ) -> None:
        if bar0_size < 16 or bar0_size & (bar0_size - 1):
            raise ValueError(f"BAR0 size {bar0_size:#x} must be a power of two of at least 16 bytes")
        self.bdf = bdf
        self.device = device
        self.name = name or str(bdf)
        self.bar0_size = bar0_size
        self.ats = ats
        self.interrupt_pin = interrupt_pin
        self._cfg = bytearray(CONFIG_SIZE)
        self._wmask = bytearray(CONFIG_SIZE)  # which bits software may change
        # Called on ATS Enable 1 -> 0: the function must drop its ATC.
        self.on_ats_disable: Callable[[], None] | None = None
        self._build_header(vendor_id, device_id, class_code, revision)

    # -- header layout ---------------------------------------------------------------------------
    def _put(self, offset: int, size: int, value: int, wmask: int = 0) -> None:
        self._cfg[offset : offset + size] = value.to_bytes(size, "little")
        self._wmask[offset : offset + size] = wmask.to_bytes(size, "little")

    def _build_header(self, vendor_id: int, device_id: int, class_code: int, revision: int) -> None:
        self._put(PCI_VENDOR_ID, 2, vendor_id)
        self._put(PCI_DEVICE_ID, 2, device_id)
        self._put(PCI_COMMAND, 2, 0, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE)
        self._put(PCI_STATUS, 2, PCI_STATUS_CAP_LIST)
        self._put(PCI_CLASS_REVISION, 4, class_code << 8 | revision)
        self._put(PCI_HEADER_TYPE, 1, 0x00)
        self._put(PCI_BASE_ADDRESS_0, 4, PCI_BASE_ADDRESS_MEM_TYPE_64, ~(self.bar0_size - 1) & 0xFFFF_FFF0)
        self._put(PCI_BASE_ADDRESS_1, 4, 0, 0xFFFF_FFFF)
        self._put(PCI_SUBSYSTEM_VENDOR_ID, 2, vendor_id)
        self._put(PCI_SUBSYSTEM_ID, 2, device_id)
        self._put(PCI_CAPABILITY_LIST, 1, PCIE_CAP_OFFSET)
        self._put(PCI_INTERRUPT_LINE, 1, 0xFF, 0xFF)
        self._put(PCI_INTERRUPT_PIN, 1, self.interrupt_pin)
        # PCI Express capability: ID, next = none, version 2, device/port type 0 (endpoint).
        self._put(PCIE_CAP_OFFSET, 2, PCI_CAP_ID_EXP)
        self._put(PCI_EXP_FLAGS, 2, 0x0002)
        if self.ats:
            # ATS extended capability, version 1, last in the list; Invalidate Queue Depth 0
            # (= 32), STU and Enable writable.
            self._put(ATS_CAP_OFFSET, 4, 1 << 16 | PCI_EXT_CAP_ID_ATS)
            self._put(PCI_ATS_CAP, 2, 0)
            self._put(PCI_ATS_CTRL, 2, 0, PCI_ATS_CTRL_ENABLE | PCI_ATS_CTRL_STU_MASK)

    # -- config accesses -------------------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self._cfg[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        was_ats = self.ats_enabled
        for i in range(size):
            mask = self._wmask[offset + i]
            byte = (value >> (8 * i)) & 0xFF
            self._cfg[offset + i] = (self._cfg[offset + i] & ~mask) | (byte & mask)
        if was_ats and not self.ats_enabled and self.on_ats_disable is not None:
            self.on_ats_disable()

    # -- state the device and the bridge read ----------------------------------------------------
    @property
    def command(self) -> int:
        return self.config_read(PCI_COMMAND, 2)

    @property
    def bus_master_enabled(self) -> bool:
        return bool(self.command & PCI_COMMAND_MASTER)

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & PCI_COMMAND_MEMORY)

    @property
    def ats_enabled(self) -> bool:
        return self.ats and bool(self.config_read(PCI_ATS_CTRL, 2) & PCI_ATS_CTRL_ENABLE)

    @property
    def bar0_address(self) -> int:
        """BAR0's PCI bus address (low flag bits stripped)."""
        low = self.config_read(PCI_BASE_ADDRESS_0, 4) & ~0xF
        return low | self.config_read(PCI_BASE_ADDRESS_1, 4) << 32

    def assign_bar0(self, address: int) -> None:
        """What firmware does before the kernel runs: program BAR0 (decoding stays off)."""
        self.config_write(PCI_BASE_ADDRESS_0, 4, address & 0xFFFF_FFFF)
        self.config_write(PCI_BASE_ADDRESS_1, 4, address >> 32)

    def decodes(self, pci_address: int, size: int) -> bool:
        base = self.bar0_address
        return self.memory_enabled and base <= pci_address and pci_address + size <= base + self.bar0_size


class PciWindow:
    """A host bridge memory window on the system bus: routes accesses to the BAR that decodes them."""

    def __init__(self, bridge: PciHostBridge, window: PciRange) -> None:
        self.bridge = bridge
        self.window = window

    def _target(self, offset: int, size: int) -> tuple[PciFunction, int] | ExternalAbort:
        pci_address = self.window.pci_address + offset
        for function in self.bridge.functions.values():
            if function.device is not None and function.decodes(pci_address, size):
                return function, pci_address - function.bar0_address
        return ExternalAbort(self.window.cpu_address + offset, "no enabled PCI BAR decodes this address")

    def mmio_read(self, offset: int, size: int, initiator: Initiator) -> int | ExternalAbort:
        target = self._target(offset, size)
        if isinstance(target, ExternalAbort):
            return target
        function, bar_offset = target
        assert function.device is not None
        return function.device.mmio_read(bar_offset, size, initiator)

    def mmio_write(self, offset: int, size: int, value: int, initiator: Initiator) -> ExternalAbort | None:
        target = self._target(offset, size)
        if isinstance(target, ExternalAbort):
            return target
        function, bar_offset = target
        assert function.device is not None
        return function.device.mmio_write(bar_offset, size, value, initiator)


class PciHostBridge:
    """A ``pci-host-ecam-generic`` root complex: ECAM config space plus its memory windows."""

    def __init__(
        self,
        name: str,
        ecam_base: int,
        ecam_size: int,
        bus_range: tuple[int, int],
        windows: tuple[PciRange, ...],
        node_path: str = "",
    ) -> None:
        self.name = name
        self.ecam_base = ecam_base
        self.ecam_size = ecam_size
        self.bus_range = bus_range
        self.windows = windows
        self.node_path = node_path
        self.functions: dict[Bdf, PciFunction] = {}

    def map(self, bus: SystemBus) -> None:
        bus.add_mmio(self.ecam_base, self.ecam_size, self, f"{self.name}.ecam")
        for window in self.windows:
            if window.space in (PciSpace.MEM32, PciSpace.MEM64):
                bus.add_mmio(
                    window.cpu_address, window.size, PciWindow(self, window),
                    f"{self.name}.mem@{window.cpu_address:#x}",
                )  # fmt: skip

    def add_function(self, function: PciFunction) -> None:
        bdf = function.bdf
        first, last = self.bus_range
        if not first <= bdf.bus <= last:
            raise ValueError(f"bus {bdf.bus:02x} is outside the bridge's bus range {first:02x}-{last:02x}")
        if (bdf.bus - first) << ECAM_BUS_SHIFT >= self.ecam_size:
            raise ValueError(f"bus {bdf.bus:02x} is beyond the ECAM window")
        if bdf in self.functions:
            raise ValueError(f"{bdf} is already taken by {self.functions[bdf].name}")
        self.functions[bdf] = function

    def assign_bars(self) -> None:
        """Firmware resource assignment: BAR0s in BDF order, naturally aligned, from the first
        32-bit window (the 64-bit one if there is none)."""
        windows = sorted(
            (w for w in self.windows if w.space in (PciSpace.MEM32, PciSpace.MEM64)),
            key=lambda w: (w.space != PciSpace.MEM32, w.prefetchable),
        )
        if not windows and self.functions:
            raise ValueError("the bridge has no memory window for BARs")
        cursor = {id(w): w.pci_address for w in windows}
        for function in sorted(self.functions.values(), key=lambda f: f.bdf):
            size = function.bar0_size
            for window in windows:
                start = -(-cursor[id(window)] // size) * size
                if start + size <= window.pci_address + window.size:
                    function.assign_bar0(start)
                    cursor[id(window)] = start + size
                    break
            else:
                raise ValueError(f"no room in the memory windows for {function.bdf}'s BAR0 ({size:#x} bytes)")

    def cpu_address_of(self, pci_address: int) -> int | None:
        for window in self.windows:
            if window.pci_address <= pci_address < window.pci_address + window.size:
                return window.cpu_address + (pci_address - window.pci_address)
        return None

    # -- ECAM ------------------------------------------------------------------------------------
    def _function_at(self, offset: int) -> tuple[PciFunction | None, int]:
        bus = self.bus_range[0] + (offset >> ECAM_BUS_SHIFT)
        devfn = (offset >> ECAM_DEVFN_SHIFT) & 0xFF
        bdf = Bdf(bus & 0xFF, devfn >> 3, devfn & 7)
        return self.functions.get(bdf), offset & (CONFIG_SIZE - 1)

    def mmio_read(self, offset: int, size: int, initiator: Initiator) -> int | ExternalAbort:
        function, register = self._function_at(offset)
        if function is None:
            return (1 << (8 * size)) - 1
        return function.config_read(register, size)

    def mmio_write(self, offset: int, size: int, value: int, initiator: Initiator) -> ExternalAbort | None:
        function, register = self._function_at(offset)
        if function is not None:
            function.config_write(register, size, value)
        return None


class PciDmaEndpoint(DmaEndpoint):
    """A PCI function's DMA master: nothing leaves it while Bus Master Enable is clear."""

    def __init__(
        self, name: str, upstream: SmmuV3, stream_id: int, function: PciFunction, *, ats_capable: bool = False
    ) -> None:
        super().__init__(name, upstream, stream_id, ats_capable=ats_capable)
        self.function = function
        self.refused = 0  # requests refused because BME (or ATS Enable) was clear
        function.on_ats_disable = self.atc_flush

    def _blocked(self, address: int) -> DmaResult | None:
        if self.function.bus_master_enabled:
            return None
        self.refused += 1
        return DmaResult(False, failure=DmaFailure.ABORT, address=address, outcome=Outcome.ABORT)

    def read(
        self, address: int, size: int, *, ssid: int | None = None, privileged: bool = False,
        instruction: bool = False,
    ) -> DmaResult:  # fmt: skip
        blocked = self._blocked(address)
        if blocked is not None:
            return blocked
        return super().read(address, size, ssid=ssid, privileged=privileged, instruction=instruction)

    def write(
        self, address: int, data: bytes, *, ssid: int | None = None, privileged: bool = False
    ) -> DmaResult:
        blocked = self._blocked(address)
        if blocked is not None:
            return blocked
        return super().write(address, data, ssid=ssid, privileged=privileged)

    def ats_translate(
        self, address: int, ssid: int | None = None, write: bool = False, *, privileged: bool = False
    ) -> AtsResponse:
        if not self.function.bus_master_enabled or not self.function.ats_enabled:
            self.refused += 1
            return AtsResponse(AtsStatus.UNSUPPORTED_REQUEST)  # never sent: the device answers itself
        return super().ats_translate(address, ssid, write, privileged=privileged)

    def ats_read(
        self, address: int, size: int, *, ssid: int | None = None, privileged: bool = False
    ) -> DmaResult:
        blocked = self._blocked(address)
        if blocked is not None:
            return blocked
        return super().ats_read(address, size, ssid=ssid, privileged=privileged)

    def ats_write(
        self, address: int, data: bytes, *, ssid: int | None = None, privileged: bool = False
    ) -> DmaResult:
        blocked = self._blocked(address)
        if blocked is not None:
            return blocked
        return super().ats_write(address, data, ssid=ssid, privileged=privileged)


class DirectUpstream:
    """What a device with no IOMMU masters into: the bus, untranslated. It has the shape of the
    SMMU's upstream interface that ``DmaEndpoint`` uses, and answers Translation Requests with UR."""

    def __init__(self, bus: SystemBus, name: str) -> None:
        self.bus = bus
        self.name = name
        self.ats_endpoints: dict[int, object] = {}
        self._initiator = Initiator(InitiatorKind.DEVICE, name)

    def as_upstream(self) -> SmmuV3:
        return cast("SmmuV3", self)  # duck-typed: DmaEndpoint calls only the methods below

    def dma_read(self, txn: Transaction) -> bytes | TranslationResult:
        data = self.bus.read_bytes(self._initiator, txn.address, txn.size)
        if isinstance(data, ExternalAbort):
            return TranslationResult(Outcome.ABORT, txn.address)
        return data

    def dma_write(self, txn: Transaction, data: bytes) -> TranslationResult:
        if self.bus.write_bytes(self._initiator, txn.address, data) is not None:
            return TranslationResult(Outcome.ABORT, txn.address)
        return TranslationResult(Outcome.OK, txn.address)

    def ats_request(
        self, sid: int, ssid: int | None, address: int, is_write: bool, privileged: bool = False
    ) -> AtsResponse:
        return AtsResponse(AtsStatus.UNSUPPORTED_REQUEST)
