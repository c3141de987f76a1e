"""Endpoint drivers of the host kernel: what workloads run DMA through."""

from pkvm_smmu.host.drivers.dma_engine import CopyResult, DmaEngineDev, DmaEngineDriver, FaultResult

__all__ = ["CopyResult", "DmaEngineDev", "DmaEngineDriver", "FaultResult"]
