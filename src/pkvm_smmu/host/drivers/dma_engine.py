"""Driver for the model's memory-to-memory DMA engine, as a platform device
(``compatible = "pkvm-smmu,dma-engine"``) and as a PCI function (vendor 0xc0de, device 0xd4a0).

Probe maps the registers, checks the ID, sets a 48-bit DMA mask, requests the interrupt (shared,
since PCI INTx lines are) and, on PCI, enables decoding and bus mastering. Workloads then call
``copy`` (buffers from host memory, mapped with the DMA API, moved by the engine, checked by the
CPU) and ``fault_unmapped`` (the engine is pointed at an IOVA its domain does not map; the SMMU
records the fault, arm-smmu-v3's event handler logs it, and STATUS shows the error).

Results are returned as data and reported on the trace bus (component ``host.dma_engine``).

Register map (the device's programming model; the driver keeps its own copy, as drivers do):
ID 0x00, SRC 0x08, DST 0x10 (64-bit), LEN 0x18, CTRL 0x20 ([0] START, [2:1] MODE, [3] IRQ_EN),
STATUS 0x28 ([1:0] STATE, [7:4] ERROR, [8] ERR_WRITE, [23:16] SMMU event type; any write clears
it unless busy), ERR_ADDR 0x30, DONE_LEN 0x38.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass
from typing import Any

from pkvm_smmu.arch.events import EventType
from pkvm_smmu.host.driver_core import (
    IORESOURCE_MEM,
    Device,
    InitcallLevel,
    Kernel,
    PciDevice,
    PciDeviceId,
    PciDriver,
    PlatformDevice,
    PlatformDriver,
    pci_register_driver,
    platform_driver_register,
    platform_get_irq,
    platform_get_resource,
)
from pkvm_smmu.host.hw import Cpu, is_fault
from pkvm_smmu.host.iommu import (
    DmaDirection,
    IommuCore,
    dma_bit_mask,
    dma_map_single,
    dma_mapping_error,
    dma_set_mask_and_coherent,
    dma_unmap_single,
)
from pkvm_smmu.host.irq import HostIrq
from pkvm_smmu.host.mm import HostMemory
from pkvm_smmu.host.pci import (
    EcamPciDevice,
    pci_clear_master,
    pci_disable_device,
    pci_enable_device,
    pci_resource_len,
    pci_resource_start,
    pci_set_master,
)

COMPONENT = "host.dma_engine"
DRIVER_NAME = "pkvm-smmu-dma"
PCI_DRIVER_NAME = "pkvm-smmu-dma-pci"
COMPATIBLE = "pkvm-smmu,dma-engine"
PCI_VENDOR_ID_PKVM_SMMU = 0xC0DE
PCI_DEVICE_ID_DMA_ENGINE = 0xD4A0

DMAE_ID = 0x00
DMAE_SRC = 0x08
DMAE_DST = 0x10
DMAE_LEN = 0x18
DMAE_CTRL = 0x20
DMAE_STATUS = 0x28
DMAE_ERR_ADDR = 0x30
DMAE_DONE_LEN = 0x38
DMAE_ID_VALUE = 0x444D_4145  # "DMAE"
DMAE_MMIO_SIZE = 0x1000
DMAE_MAX_LEN = 1 << 20

CTRL_START = 1 << 0
CTRL_MODE_COPY = 0 << 1
CTRL_IRQ_EN = 1 << 3

STATE_IDLE, STATE_BUSY, STATE_DONE, STATE_ERROR = 0, 1, 2, 3
STATE_NAMES = {STATE_IDLE: "idle", STATE_BUSY: "busy", STATE_DONE: "done", STATE_ERROR: "error"}
ERROR_NAMES = {0: "none", 1: "read-abort", 2: "write-abort", 3: "bad-length", 4: "bad-address", 5: "bad-mode"}

PAGE_SIZE = 4096
DMA_BITS = 48
TIMEOUT_US = 10_000.0  # how long a transfer may take before the driver gives up
FAULT_IOVA = 0x7E57_0000_0000  # where fault_unmapped starts looking for an unmapped page


@dataclass(frozen=True)
class CopyResult:
    """One ``copy``: where the buffers were, what the engine said, whether the data arrived."""

    device: str
    size: int
    seed: int
    src_pa: int
    dst_pa: int
    src_dma: int | None
    dst_dma: int | None
    state: str  # the engine's STATE at the end ("done", "error", "busy" on timeout), or "unmapped",
    # "no-memory" when the driver could not set the transfer up
    error: str
    verified: bool  # the destination holds exactly the source pattern
    via_irq: bool  # completion seen by the interrupt handler (else by polling STATUS)
    done_len: int
    err_addr: int
    duration_ns: int
    mismatch_at: int | None = None  # first differing byte offset, when not verified

    @property
    def ok(self) -> bool:
        return self.state == "done" and self.verified


@dataclass(frozen=True)
class FaultResult:
    """One ``fault_unmapped``: the IOVA used and how the engine reported the abort."""

    device: str
    iova: int | None
    state: str
    error: str
    err_addr: int
    err_write: bool
    event: str | None  # the SMMU event type the engine's STATUS names (a model-only diagnostic)
    via_irq: bool
    skipped: str | None = None  # why nothing was tried (no translating domain)

    @property
    def observed(self) -> bool:
        """The engine stopped with an error at the IOVA."""
        return self.state == "error" and self.err_addr == self.iova


@dataclass(frozen=True)
class _Status:
    status: int
    err_addr: int
    done_len: int

    @property
    def state(self) -> int:
        return self.status & 0b11

    @property
    def error(self) -> int:
        return (self.status >> 4) & 0xF

    @property
    def err_write(self) -> bool:
        return bool(self.status & (1 << 8))

    @property
    def event(self) -> int:
        return (self.status >> 16) & 0xFF


def _event_name(number: int) -> str | None:
    if not number:
        return None
    try:
        return EventType(number).name
    except ValueError:
        return f"{number:#04x}"


class DmaEngineDev:
    """One bound engine (the driver's per-device data)."""

    def __init__(self, driver: DmaEngineDriver, dev: Device, base: int, irq: int) -> None:
        self.driver = driver
        self.dev = dev
        self.name = dev.name
        self.base = base
        self.irq = irq  # Linux IRQ (0: poll STATUS)
        self.is_pci = isinstance(dev, PciDevice)
        self._completion: _Status | None = None
        self._waiting = False
        self.irqs = 0  # interrupts this device claimed

    # -- MMIO (readl/writel on the ioremapped BAR) ------------------------------------------------
    def readl(self, offset: int) -> int:
        value = self.driver.cpu.read(self.base + offset, 4)
        return value if isinstance(value, int) else 0xFFFF_FFFF

    def readq(self, offset: int) -> int:
        value = self.driver.cpu.read(self.base + offset, 8)
        return value if isinstance(value, int) else (1 << 64) - 1

    def writel(self, value: int, offset: int) -> bool:
        return not is_fault(self.driver.cpu.write(self.base + offset, 4, value))

    def writeq(self, value: int, offset: int) -> bool:
        return not is_fault(self.driver.cpu.write(self.base + offset, 8, value))

    def _snapshot(self) -> _Status:
        return _Status(self.readl(DMAE_STATUS), self.readq(DMAE_ERR_ADDR), self.readq(DMAE_DONE_LEN))

    # -- interrupt ----------------------------------------------------------------------------------
    def irq_handler(self) -> bool:
        """Shared-line handler: IRQ_NONE unless this engine finished something."""
        snap = self._snapshot()
        if snap.state not in (STATE_DONE, STATE_ERROR):
            return False
        self.irqs += 1
        self.writel(0, DMAE_STATUS)  # acknowledge: back to idle
        if self._waiting:
            self._completion = snap
        return True

    # -- one transfer ---------------------------------------------------------------------------------
    def _run(self, src: int, dst: int, length: int, timeout_us: float) -> tuple[_Status, bool]:
        """Program and start a copy, wait on the modeled clock; (final status, seen by IRQ)."""
        cpu = self.driver.cpu
        self._completion = None
        self._waiting = True
        self.writeq(src, DMAE_SRC)
        self.writeq(dst, DMAE_DST)
        self.writel(length, DMAE_LEN)
        self.writel(CTRL_START | CTRL_MODE_COPY | (CTRL_IRQ_EN if self.irq else 0), DMAE_CTRL)
        if self.irq:
            cpu.poll(lambda: self._completion is not None, timeout_us)
        else:
            cpu.poll(lambda: self.readl(DMAE_STATUS) & 0b11 != STATE_BUSY, timeout_us)
        self._waiting = False
        if self._completion is not None:
            return self._completion, True
        snap = self._snapshot()
        if snap.state in (STATE_DONE, STATE_ERROR):
            self.writel(0, DMAE_STATUS)
        return snap, False

    def copy(
        self, size: int, *, seed: int = 0, offset: int = 0, timeout_us: float = TIMEOUT_US
    ) -> CopyResult:
        """Copy ``size`` bytes of a seeded pattern between two fresh buffers through the DMA API;
        the buffers start ``offset`` bytes into their first page."""
        drv = self.driver
        if size <= 0 or size > DMAE_MAX_LEN or not 0 <= offset < PAGE_SIZE:
            raise ValueError(f"copy size must be 1..{DMAE_MAX_LEN} and offset 0..{PAGE_SIZE - 1}")
        pages = -(-(offset + size) // PAGE_SIZE)
        start_ns = drv.now_ns()
        src_page = drv.mm.alloc_pages(pages)
        dst_page = drv.mm.alloc_zeroed_pages(pages)
        if src_page is None or dst_page is None:
            for page in (src_page, dst_page):
                if page is not None:
                    drv.mm.free_pages(page, pages)
            drv.emit("copy", dev=self.name, size=size, state="no-memory", verified=False)
            return CopyResult(self.name, size, seed, 0, 0, None, None, "no-memory", "none", False, False, 0,
                              0, 0)  # fmt: skip
        src_pa, dst_pa = src_page + offset, dst_page + offset
        pattern = random.Random(f"{seed}:{self.name}:{size}").randbytes(size)
        drv.cpu.write_bytes(src_pa, pattern)
        src_dma = dma_map_single(self.dev, src_pa, size, DmaDirection.TO_DEVICE)
        dst_dma = dma_map_single(self.dev, dst_pa, size, DmaDirection.FROM_DEVICE)
        mapped = not dma_mapping_error(self.dev, src_dma) and not dma_mapping_error(self.dev, dst_dma)
        if mapped:
            snap, via_irq = self._run(src_dma, dst_dma, size, timeout_us)
        else:
            snap, via_irq = _Status(0, 0, 0), False
        for dma, pa in ((src_dma, src_pa), (dst_dma, dst_pa)):
            if not dma_mapping_error(self.dev, dma):
                direction = DmaDirection.TO_DEVICE if pa == src_pa else DmaDirection.FROM_DEVICE
                dma_unmap_single(self.dev, dma, size, direction)
        got = drv.cpu.read_bytes(dst_pa, size)
        data = got if isinstance(got, bytes) else b""
        verified = data == pattern
        mismatch = None if verified else next(
            (i for i, (a, b) in enumerate(zip(data, pattern, strict=False)) if a != b), min(len(data), size)
        )  # fmt: skip
        drv.mm.free_pages(src_page, pages)
        drv.mm.free_pages(dst_page, pages)
        state = STATE_NAMES.get(snap.state, "?") if mapped else "unmapped"
        result = CopyResult(
            self.name, size, seed, src_pa, dst_pa,
            None if dma_mapping_error(self.dev, src_dma) else src_dma,
            None if dma_mapping_error(self.dev, dst_dma) else dst_dma,
            state, ERROR_NAMES.get(snap.error, str(snap.error)), verified, via_irq, snap.done_len,
            snap.err_addr, drv.now_ns() - start_ns, mismatch,
        )  # fmt: skip
        drv.emit(
            "copy", dev=self.name, size=size, src=src_pa, dst=dst_pa, src_dma=result.src_dma,
            dst_dma=result.dst_dma, state=state, error=result.error, verified=verified, irq=via_irq,
        )  # fmt: skip
        return result

    def fault_unmapped(self, *, timeout_us: float = TIMEOUT_US) -> FaultResult:
        """Point the engine at an IOVA its domain does not map and report how it failed."""
        drv = self.driver
        domain = drv.iommu.iommu_get_domain_for_dev(self.dev)
        if domain is None or not domain.type.is_paging:
            kind = domain.type.value if domain is not None else "no IOMMU"
            result = FaultResult(self.name, None, "skipped", "none", 0, False, None, False,
                                 skipped=f"no translating domain ({kind})")  # fmt: skip
            drv.emit("fault", dev=self.name, skipped=result.skipped)
            return result
        iova = FAULT_IOVA
        mapped = drv.iommu.iommu_iova_to_phys
        while mapped(domain, iova) or mapped(domain, iova + PAGE_SIZE):
            iova += 2 * PAGE_SIZE
        snap, via_irq = self._run(iova, iova + PAGE_SIZE, PAGE_SIZE, timeout_us)
        event = _event_name(snap.event)
        result = FaultResult(
            self.name, iova, STATE_NAMES.get(snap.state, "?"), ERROR_NAMES.get(snap.error, str(snap.error)),
            snap.err_addr, snap.err_write, event, via_irq,
        )  # fmt: skip
        drv.emit(
            "fault", dev=self.name, iova=iova, state=result.state, error=result.error,
            err_addr=snap.err_addr, event=event, irq=via_irq,
        )  # fmt: skip
        return result


class DmaEngineDriver:
    """The platform and PCI drivers of the DMA engine, bound to one kernel."""

    def __init__(
        self,
        kernel: Kernel,
        cpu: Cpu,
        mm: HostMemory,
        iommu: IommuCore,
        irq: HostIrq,
        *,
        level: InitcallLevel | str = InitcallLevel.DEVICE,
    ) -> None:
        self.kernel = kernel
        self.cpu = cpu
        self.mm = mm
        self.iommu = iommu
        self.irq = irq
        self.level = InitcallLevel.parse(level)
        self.trace = kernel.trace
        self.engines: dict[str, DmaEngineDev] = {}  # bind order
        self.platform_driver = PlatformDriver(
            DRIVER_NAME, self.probe_platform, self.remove_platform, of_match_table=(COMPATIBLE,)
        )
        self.pci_driver = PciDriver(
            PCI_DRIVER_NAME,
            [PciDeviceId(PCI_VENDOR_ID_PKVM_SMMU, PCI_DEVICE_ID_DMA_ENGINE)],
            self.probe_pci,
            self.remove_pci,
        )

    def now_ns(self) -> int:
        return round(self.cpu.now_us() * 1000)

    def emit(self, kind: str, **fields: Any) -> None:
        if self.trace.enabled:
            self.trace.emit(COMPONENT, kind, **fields)

    def register(self) -> None:
        """``module_platform_driver`` and ``module_pci_driver``: built in, both at ``self.level``."""
        k, level = self.kernel, self.level
        k.register_initcall(level, lambda: platform_driver_register(k, self.platform_driver), "dmae_init")
        k.register_initcall(level, lambda: pci_register_driver(k, self.pci_driver), "dmae_pci_init")

    # -- probe ----------------------------------------------------------------------------------------
    def _setup(self, dev: Device, base: int, irq: int) -> int:
        engine = DmaEngineDev(self, dev, base, irq)
        ident = engine.readl(DMAE_ID)
        if ident != DMAE_ID_VALUE:
            self.emit("probe", dev=dev.name, result=-errno.ENODEV, id=ident)
            return -errno.ENODEV
        ret = dma_set_mask_and_coherent(dev, dma_bit_mask(DMA_BITS))
        if ret:
            return ret
        if irq:
            ret = self.irq.request_irq(irq, engine.irq_handler, f"dmae:{dev.name}", engine, shared=True)
            if ret:
                self.emit("probe", dev=dev.name, result=ret, why="request_irq")
                return ret
        dev.driver_data = engine
        self.engines[dev.name] = engine
        self.emit("probe", dev=dev.name, base=base, irq=irq, result=0)
        return 0

    def probe_platform(self, pdev: PlatformDevice) -> int:
        res = platform_get_resource(pdev, IORESOURCE_MEM, 0)
        if res is None or res.size < DMAE_MMIO_SIZE:
            return -errno.EINVAL
        irq = platform_get_irq(pdev, 0)
        return self._setup(pdev, res.start, max(irq, 0))

    def probe_pci(self, pdev: PciDevice, _id: PciDeviceId) -> int:
        if not isinstance(pdev, EcamPciDevice):
            return -errno.ENODEV
        if pci_resource_len(pdev, 0) < DMAE_MMIO_SIZE:
            return -errno.ENODEV
        ret = pci_enable_device(pdev)
        if ret:
            return ret
        pci_set_master(pdev)
        ret = self._setup(pdev, pci_resource_start(pdev, 0), pdev.irq)
        if ret:
            pci_clear_master(pdev)
            pci_disable_device(pdev)
        return ret

    def _remove(self, dev: Device) -> None:
        engine = self.engines.pop(dev.name, None)
        if engine is not None and engine.irq:
            self.irq.free_irq(engine.irq, engine)

    def remove_platform(self, pdev: PlatformDevice) -> None:
        self._remove(pdev)

    def remove_pci(self, pdev: PciDevice) -> None:
        self._remove(pdev)
        if isinstance(pdev, EcamPciDevice):
            pci_clear_master(pdev)
            pci_disable_device(pdev)


__all__ = [
    "COMPATIBLE",
    "DMA_BITS",
    "FAULT_IOVA",
    "PCI_DEVICE_ID_DMA_ENGINE",
    "PCI_VENDOR_ID_PKVM_SMMU",
    "CopyResult",
    "DmaEngineDev",
    "DmaEngineDriver",
    "FaultResult",
]
