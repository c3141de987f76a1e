"""DMA-capable devices: endpoints that master transactions through an SMMU, and a DMA engine."""

from pkvm_smmu.machine.devices.dma_engine import (
    DMA_ENGINE_ID,
    MAX_LEN,
    MMIO_SIZE,
    DmaEngine,
    DmaMode,
    DmaReg,
    DmaState,
    ErrorCode,
    ctrl_value,
    status_fields,
)
from pkvm_smmu.machine.devices.endpoint import (
    ATC_PAGE_SIZE,
    AtcEntry,
    DmaEndpoint,
    DmaFailure,
    DmaResult,
)

__all__ = [
    "ATC_PAGE_SIZE",
    "DMA_ENGINE_ID",
    "MAX_LEN",
    "MMIO_SIZE",
    "AtcEntry",
    "DmaEndpoint",
    "DmaEngine",
    "DmaFailure",
    "DmaMode",
    "DmaReg",
    "DmaResult",
    "DmaState",
    "ErrorCode",
    "ctrl_value",
    "status_fields",
]
