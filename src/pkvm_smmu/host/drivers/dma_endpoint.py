"""Driver for generic DMA endpoints used by workloads (``compatible = "pkvm-smmu,dma-endpoint"``).

The device has no registers and no interrupt: it only masters DMA, with the StreamID its
``iommus`` gives. Probe sets a 48-bit DMA mask; there is nothing to map. What a workload needs is
buffers the device may reach: ``map_buffer`` allocates pages from host memory and maps them with
``dma_map_single`` (streaming), ``alloc_coherent`` uses ``dma_alloc_coherent``. The workload then
makes the device (the machine's ``DmaEndpoint``) read and write the DMA addresses.

Every operation reports on the trace bus (``host.dma_endpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pkvm_smmu.host.driver_core import (
    Device,
    InitcallLevel,
    Kernel,
    PlatformDevice,
    PlatformDriver,
    platform_driver_register,
)
from pkvm_smmu.host.iommu import (
    DmaDirection,
    IommuCore,
    dma_alloc_coherent,
    dma_bit_mask,
    dma_free_coherent,
    dma_map_single,
    dma_mapping_error,
    dma_set_mask_and_coherent,
    dma_unmap_single,
)
from pkvm_smmu.host.mm import HostMemory

COMPONENT = "host.dma_endpoint"
DRIVER_NAME = "pkvm-smmu-dma-endpoint"
COMPATIBLE = "pkvm-smmu,dma-endpoint"

PAGE_SIZE = 4096
DMA_BITS = 48


@dataclass(frozen=True)
class DmaBuffer:
    """A buffer the device can reach: RAM at ``cpu_pa``, seen by the device at ``dma_addr``."""

    cpu_pa: int
    dma_addr: int
    size: int
    direction: DmaDirection = DmaDirection.BIDIRECTIONAL
    coherent: bool = False  # from alloc_coherent (else a streaming mapping of allocated pages)

    @property
    def pages(self) -> int:
        return -(-self.size // PAGE_SIZE)


class DmaEndpointDev:
    """One bound generic endpoint (the driver's per-device data)."""

    def __init__(self, driver: DmaEndpointDriver, dev: Device) -> None:
        self.driver = driver
        self.dev = dev
        self.name = dev.name
        self.mapped: dict[int, DmaBuffer] = {}  # dma_addr -> live buffer

    def map_buffer(self, size: int, direction: DmaDirection = DmaDirection.BIDIRECTIONAL) -> DmaBuffer | None:
        """Fresh zeroed pages for ``size`` bytes, mapped for the device; None if either failed."""
        if size <= 0:
            raise ValueError("buffer size must be positive")
        drv = self.driver
        pages = -(-size // PAGE_SIZE)
        pa = drv.mm.alloc_zeroed_pages(pages)
        if pa is None:
            drv.emit("map", dev=self.name, size=size, error="no-memory")
            return None
        dma = dma_map_single(self.dev, pa, size, direction)
        if dma_mapping_error(self.dev, dma):
            drv.mm.free_pages(pa, pages)
            drv.emit("map", dev=self.name, size=size, paddr=pa, error="mapping")
            return None
        buf = DmaBuffer(pa, dma, size, direction)
        self.mapped[dma] = buf
        drv.emit("map", dev=self.name, size=size, paddr=pa, dma=dma, dir=direction.name)
        return buf

    def unmap_buffer(self, buf: DmaBuffer) -> None:
        """Unmap a ``map_buffer`` buffer and free its pages."""
        if buf.coherent or self.mapped.pop(buf.dma_addr, None) is None:
            raise ValueError(f"{self.name}: {buf} is not a live streaming mapping of this device")
        dma_unmap_single(self.dev, buf.dma_addr, buf.size, buf.direction)
        self.driver.mm.free_pages(buf.cpu_pa, buf.pages)
        self.driver.emit("unmap", dev=self.name, size=buf.size, paddr=buf.cpu_pa, dma=buf.dma_addr)

    def alloc_coherent(self, size: int) -> DmaBuffer | None:
        """``dma_alloc_coherent``: zeroed memory shared with the device; None if it failed."""
        if size <= 0:
            raise ValueError("buffer size must be positive")
        got = dma_alloc_coherent(self.dev, size)
        if got is None:
            self.driver.emit("alloc", dev=self.name, size=size, error="no-memory")
            return None
        buf = DmaBuffer(got[0], got[1], size, DmaDirection.BIDIRECTIONAL, coherent=True)
        self.mapped[buf.dma_addr] = buf
        self.driver.emit("alloc", dev=self.name, size=size, paddr=buf.cpu_pa, dma=buf.dma_addr)
        return buf

    def free_coherent(self, buf: DmaBuffer) -> None:
        if not buf.coherent or self.mapped.pop(buf.dma_addr, None) is None:
            raise ValueError(f"{self.name}: {buf} is not a live coherent buffer of this device")
        dma_free_coherent(self.dev, buf.size, buf.cpu_pa, buf.dma_addr)
        self.driver.emit("free", dev=self.name, size=buf.size, paddr=buf.cpu_pa, dma=buf.dma_addr)


class DmaEndpointDriver:
    """The platform driver of generic endpoints, bound to one kernel."""

    def __init__(
        self,
        kernel: Kernel,
        mm: HostMemory,
        iommu: IommuCore,
        *,
        level: InitcallLevel | str = InitcallLevel.DEVICE,
    ) -> None:
        self.kernel = kernel
        self.mm = mm
        self.iommu = iommu
        self.level = InitcallLevel.parse(level)
        self.trace = kernel.trace
        self.endpoints: dict[str, DmaEndpointDev] = {}  # bind order
        self.platform_driver = PlatformDriver(
            DRIVER_NAME, self.probe, self.remove, of_match_table=(COMPATIBLE,)
        )

    def emit(self, kind: str, **fields: Any) -> None:
        if self.trace.enabled:
            self.trace.emit(COMPONENT, kind, **fields)

    def register(self) -> None:
        """``module_platform_driver``: built in, at ``self.level``."""
        k = self.kernel
        k.register_initcall(
            self.level, lambda: platform_driver_register(k, self.platform_driver), "dmaep_init"
        )

    def probe(self, pdev: PlatformDevice) -> int:
        ret = dma_set_mask_and_coherent(pdev, dma_bit_mask(DMA_BITS))
        if ret:
            self.emit("probe", dev=pdev.name, result=ret)
            return ret
        endpoint = DmaEndpointDev(self, pdev)
        pdev.driver_data = endpoint
        self.endpoints[pdev.name] = endpoint
        self.emit("probe", dev=pdev.name, result=0)
        return 0

    def remove(self, pdev: PlatformDevice) -> None:
        endpoint = self.endpoints.pop(pdev.name, None)
        if endpoint is None:
            return
        for buf in list(endpoint.mapped.values()):  # a driver frees what it mapped
            if buf.coherent:
                endpoint.free_coherent(buf)
            else:
                endpoint.unmap_buffer(buf)


__all__ = ["COMPATIBLE", "DMA_BITS", "DmaBuffer", "DmaEndpointDev", "DmaEndpointDriver"]
