"""Modeled time: counts of what a host operation made happen (taken from the trace) times a cost in
nanoseconds for each kind of event.

The defaults describe a Neoverse-N1-class host (the RFC v2 benchmark ran on Morello, whose cores are
N1-derived) with an SMMU behind a coherent interconnect. Every default names where it comes from in
``CALIBRATION``; ``docs/design-comparison.md`` explains the derivations. The model is deliberately
linear: no queueing, no contention, no overlap between the CPU and the SMMU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

CORE_GHZ = 2.5  # cycle counts from other cores are converted at this clock


@dataclass(frozen=True)
class PricedCounts:
    """What the model charges for, per operation (means over iterations may be fractional)."""

    traps: float = 0.0  # host accesses trapped to EL2 and emulated there
    hypercalls: float = 0.0
    mmio_writes: float = 0.0  # SMMU register writes that reached the hardware
    commands: float = 0.0  # commands the SMMU consumed, CMD_SYNC included
    syncs: float = 0.0  # CMD_SYNC completions somebody waited for
    pte_writes: float = 0.0  # page-table descriptors written (host or hyp)
    walk_levels: float = 0.0  # descriptors the SMMU read on TLB misses
    cache_maintenance: float = 0.0  # descriptor cleans to the PoC (non-coherent walkers only)
    dma_api_calls: float = 0.0  # dma_map/unmap calls that went through an IOMMU domain


@dataclass(frozen=True)
class CostModel:
    """Nanoseconds per counted event. ``replace()`` (dataclasses) makes a variant."""

    trap_ns: float = 295.0
    hypercall_ns: float = 150.0
    mmio_write_ns: float = 40.0
    command_ns: float = 80.0
    sync_wait_ns: float = 400.0
    pte_write_ns: float = 2.7
    walk_level_ns: float = 81.0
    cache_maintenance_ns: float = 81.0
    dma_api_call_ns: float = 100.0

    # PricedCounts field -> the parameter that prices it
    _PRICES: ClassVar[dict[str, str]] = {
        "traps": "trap_ns",
        "hypercalls": "hypercall_ns",
        "mmio_writes": "mmio_write_ns",
        "commands": "command_ns",
        "syncs": "sync_wait_ns",
        "pte_writes": "pte_write_ns",
        "walk_levels": "walk_level_ns",
        "cache_maintenance": "cache_maintenance_ns",
        "dma_api_calls": "dma_api_call_ns",
    }

    def breakdown(self, counts: PricedCounts) -> dict[str, float]:
        """Modeled nanoseconds per kind of event (only the non-zero ones)."""
        out: dict[str, float] = {}
        for name, parameter in self._PRICES.items():
            ns = getattr(counts, name) * getattr(self, parameter)
            if ns:
                out[name] = ns
        return out

    def time_ns(self, counts: PricedCounts) -> float:
        return sum(self.breakdown(counts).values())

    def parameters(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_overrides(self, **overrides: float) -> CostModel:
        unknown = set(overrides) - set(self.parameters())
        if unknown:
            raise ValueError(f"unknown cost parameter(s): {', '.join(sorted(unknown))}")
        return replace(self, **overrides)


@dataclass(frozen=True)
class Calibration:
    parameter: str
    value_ns: float
    derivation: str
    sources: tuple[str, ...]


LINARO_ARM_VIRT = "https://www.linaro.org/blog/core-dump/on-the-performance-of-arm-virtualization/"
ALTRA_MICROBENCH = "<CAJHc60xQNeTwSBuPhrKO_JBuikqZ7R=BM5rkWht3YwieVXwkHg@mail.gmail.com>"
RFC_V2_COVER = "<20241212180423.1578358-1-smostafa@google.com>"
ANANDTECH_N1_LATENCY = (
    "https://www.anandtech.com/show/15578/cloud-clash-amazon-graviton2-arm-against-intel-and-amd/3"
)

CALIBRATION: tuple[Calibration, ...] = (
    Calibration(
        "hypercall_ns",
        150.0,
        "Xen ARM no-op hypercall, 376 cycles (X-Gene), at 2.5 GHz: an EL2-resident hypervisor saving "
        "only the GPRs, which is what pKVM's host HVC path does. Upper bound: a full KVM/VHE guest "
        "exit for an HVC on Ampere Altra (Neoverse N1) is 306 ns.",
        (LINARO_ARM_VIRT, ALTRA_MICROBENCH),
    ),
    Calibration(
        "trap_ns",
        295.0,
        "hypercall_ns plus the cost of decoding and emulating a trapped MMIO access: on Altra, "
        "mmio_read_vgic (data abort emulated in the kernel) is 451 ns against 306 ns for an HVC, "
        "so 145 ns on top of the transition.",
        (LINARO_ARM_VIRT, ALTRA_MICROBENCH),
    ),
    Calibration(
        "pte_write_ns",
        2.7,
        "RFC v2 native dma_map: 0.1 us at 4 KiB (1 PTE) and 0.8 us at 1 MiB (256 PTEs), so "
        "(0.8 - 0.1) us / 255 PTEs.",
        (RFC_V2_COVER,),
    ),
    Calibration(
        "dma_api_call_ns",
        100.0,
        "RFC v2 native dma_map of 4 KiB (0.1 us) less one PTE write: IOVA allocation and the "
        "dma-iommu bookkeeping of one call.",
        (RFC_V2_COVER,),
    ),
    Calibration(
        "command_ns",
        80.0,
        "RFC v2 native dma_unmap: 0.7 us at 4 KiB and 21.5 us at 1 MiB. Without range invalidation "
        "(SMMUv3.1, like MMU-600) Linux issues one TLBI per page, so the 255 extra pages cost "
        "(21.5 - 0.7) us / 255 - pte_write_ns = 79 ns each.",
        (RFC_V2_COVER, "https://developer.arm.com/docs/100310/0002/introduction/about-the-mmu-600"),
    ),
    Calibration(
        "sync_wait_ns",
        400.0,
        "RFC v2 native dma_unmap of 4 KiB (0.7 us) less the DMA API call, one PTE, two commands "
        "(TLBI, CMD_SYNC) and one CMDQ_PROD write: the wait for the CMD_SYNC completion.",
        (RFC_V2_COVER,),
    ),
    Calibration(
        "mmio_write_ns",
        40.0,
        "Assumed (no public figure found): a barrier plus a posted Device-nGnRE store, ~100 cycles. "
        "It enters only once or twice per invalidation, so its error is small.",
        (),
    ),
    Calibration(
        "walk_level_ns",
        81.0,
        "One descriptor read from DRAM: 81 ns structural memory latency measured on Graviton2 "
        "(Neoverse N1; Arm published 83 ns). An upper bound per level: real SMMUs cache upper levels "
        "in walk caches, the model's TLB does not.",
        (ANANDTECH_N1_LATENCY,),
    ),
    Calibration(
        "cache_maintenance_ns",
        81.0,
        "A clean to the PoC (DC CVAC + DSB) waits for the line to reach memory: one memory latency "
        "per descriptor written, charged only when an SMMU walks non-coherently.",
        (ANANDTECH_N1_LATENCY,),
    ),
)


@dataclass(frozen=True)
class RfcMeasurement:
    """One row of the RFC v2 cover letter's CONFIG_DMA_MAP_BENCHMARK table (4 cores, 1 thread)."""

    size: str  # "4K" or "1M"
    operation: str  # "map" or "unmap"
    native_us: float
    pkvm_us: float

    @property
    def ratio(self) -> float:
        return self.pkvm_us / self.native_us


RFC_V2_MORELLO: tuple[RfcMeasurement, ...] = (
    RfcMeasurement("4K", "map", 0.1, 0.3),
    RfcMeasurement("4K", "unmap", 0.7, 1.3),
    RfcMeasurement("1M", "map", 0.8, 2.6),
    RfcMeasurement("1M", "unmap", 21.5, 27.3),
)


def calibration_table() -> list[dict[str, Any]]:
    """``CALIBRATION`` as plain data (JSON output, docs)."""
    return [asdict(entry) | {"sources": list(entry.sources)} for entry in CALIBRATION]


__all__ = [
    "CALIBRATION",
    "CORE_GHZ",
    "RFC_V2_COVER",
    "RFC_V2_MORELLO",
    "Calibration",
    "CostModel",
    "PricedCounts",
    "RfcMeasurement",
    "calibration_table",
]
