"""What a run reports, derived from the trace bus (an ordered collector and ``Counters``) and the
host kernel's state, never from the machine's insides.

``ReportCollector`` is a sink: attach it (and ``report_counters()``) before the run, then
``build_report`` turns what it saw, plus the kernel's devices and domains, into a ``RunReport``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pkvm_smmu.host.drivers.dma_engine import CopyResult, FaultResult
from pkvm_smmu.host.kernel import DomainInfo, HostKernel
from pkvm_smmu.trace import Counters, TraceEvent

DRIVER_CORE = "driver_core"
SMMU_DRIVER_PREFIX = "arm-smmu-v3."
AFTER_BOOT = "(after boot)"


def report_counters() -> Counters:
    """The counters a report reads: events per kind, commands by opcode."""
    return Counters(by_fields=("opcode",))


@dataclass(frozen=True)
class ProbeStep:
    """One probe attempt, in the order the driver core made it."""

    initcall: str  # "device_initcall gen_pci_driver_init"; AFTER_BOOT for later attempts
    device: str
    driver: str
    result: str  # bound, defer, rejected, failed
    stage: str  # the step that decided: links, dma_configure, probe
    reason: str | None
    attempt: int  # 1 for the device's first attempt


@dataclass(frozen=True)
class DeviceRow:
    name: str
    bus: str
    driver: str | None
    stream_ids: tuple[int, ...]
    domain: str | None
    domain_type: str | None
    deferrals: int


@dataclass(frozen=True)
class TranslationStats:
    """DMA traffic as the trace saw it. TLB figures are None when the trace does not carry them."""

    transfers: int  # DMA-engine copies started
    bytes_copied: int
    verified: int
    dma_maps: int
    dma_unmaps: int
    iommu_maps: int
    iommu_unmaps: int
    iotlb_syncs: int
    fq_flushes: int
    smmu_faults: int  # transactions the SMMU faulted
    tlb_hits: int | None = None
    tlb_misses: int | None = None


@dataclass(frozen=True)
class FaultRow:
    """One event record the arm-smmu-v3 driver logged."""

    smmu: str
    event: str
    sid: int
    address: int
    client: str
    access: str  # read or write


@dataclass(frozen=True)
class CommandRow:
    smmu: str
    opcode: str
    count: int


@dataclass(frozen=True)
class RunReport:
    metadata: dict[str, Any]
    boot_ns: int
    total_ns: int
    probes: tuple[ProbeStep, ...]
    devices: tuple[DeviceRow, ...]
    domains: tuple[DomainInfo, ...]
    copies: tuple[CopyResult, ...]
    fault_checks: tuple[FaultResult, ...]
    translations: TranslationStats
    faults: tuple[FaultRow, ...]
    commands: tuple[CommandRow, ...]
    problems: tuple[str, ...] = ()  # what went wrong, in words; empty for a clean run

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class ReportCollector:
    """A trace sink keeping, in order, the few events a report needs."""

    probes: list[ProbeStep] = field(default_factory=list)
    faults: list[FaultRow] = field(default_factory=list)
    copies: list[TraceEvent] = field(default_factory=list)
    smmu_faults: int = 0  # transactions an SMMU model faulted (recorded or not)
    _pending: list[TraceEvent] = field(default_factory=list)
    _attempts: Counter[str] = field(default_factory=Counter)

    def __call__(self, event: TraceEvent) -> None:
        component, kind = event.component, event.kind
        if component == DRIVER_CORE:
            if kind == "probe":
                self._pending.append(event)  # its initcall's span ends (and arrives) later
            elif kind == "initcall":
                label = f"{event.fields.get('level')} {event.fields.get('fn')}"
                self._flush(label)
        elif kind == "evtq.event" and component.startswith(SMMU_DRIVER_PREFIX):
            f = event.fields
            self.faults.append(
                FaultRow(
                    component[len(SMMU_DRIVER_PREFIX) :],
                    str(f.get("event")),
                    int(f.get("sid", 0)),
                    int(f.get("inputaddr", 0)),
                    str(f.get("client")),
                    "read" if f.get("rnw") else "write",
                )
            )
        elif component == "host.dma_engine" and kind == "copy":
            self.copies.append(event)
        elif kind == "fault" and "sid" in event.fields and not component.startswith("host."):
            self.smmu_faults += 1

    def _flush(self, initcall: str) -> None:
        # Spans arrive when they end: order by start, an enclosing probe (a bus driver adding
        # its children) before what it encloses.
        self._pending.sort(key=lambda e: (e.time_ns, -(e.dur_ns or 0), e.seq))
        for event in self._pending:
            f = event.fields
            device = str(f.get("device"))
            self._attempts[device] += 1
            self.probes.append(
                ProbeStep(
                    initcall,
                    device,
                    str(f.get("driver")),
                    str(f.get("result")),
                    str(f.get("stage")),
                    f.get("reason"),
                    self._attempts[device],
                )
            )
        self._pending.clear()

    def finish(self) -> None:
        """Probes that no initcall enclosed (after boot)."""
        self._flush(AFTER_BOOT)


def _count(counters: Counters, component: str, kind: str) -> int:
    return counters.get(component, kind)


def translation_stats(counters: Counters, collector: ReportCollector) -> TranslationStats:
    copies = collector.copies
    tlb_hits = counters.total("tlb.hit")
    tlb_misses = counters.total("tlb.miss")
    return TranslationStats(
        transfers=len(copies),
        bytes_copied=sum(int(e.fields.get("size", 0)) for e in copies if e.fields.get("state") == "done"),
        verified=sum(1 for e in copies if e.fields.get("verified")),
        dma_maps=_count(counters, "host.iommu", "dma.map"),
        dma_unmaps=_count(counters, "host.iommu", "dma.unmap"),
        iommu_maps=_count(counters, "host.iommu", "map"),
        iommu_unmaps=_count(counters, "host.iommu", "unmap"),
        iotlb_syncs=_count(counters, "host.iommu", "iotlb_sync"),
        fq_flushes=_count(counters, "host.iommu", "dma.fq_flush"),
        smmu_faults=collector.smmu_faults,
        tlb_hits=tlb_hits or None,
        tlb_misses=tlb_misses or None,
    )


def command_rows(counters: Counters) -> list[CommandRow]:
    """Commands the SMMUs consumed, by opcode (the ``cmd`` events every SMMU model emits)."""
    rows = []
    by_field = counters.snapshot()["by_field"]
    for component, kinds in by_field.items():
        for opcode, count in kinds.get("cmd", {}).get("opcode", {}).items():
            rows.append(CommandRow(component, str(opcode), count))
    return sorted(rows, key=lambda r: (r.smmu, -r.count, r.opcode))


def build_report(
    host: HostKernel,
    collector: ReportCollector,
    counters: Counters,
    *,
    metadata: dict[str, Any],
    boot_ns: int,
    total_ns: int,
    copies: list[CopyResult],
    fault_checks: list[FaultResult],
) -> RunReport:
    collector.finish()
    deferrals = Counter(p.device for p in collector.probes if p.result == "defer")
    devices = tuple(
        DeviceRow(d.name, d.bus, d.driver, d.stream_ids, d.domain, d.domain_type, deferrals[d.name])
        for d in host.devices()
    )
    problems: list[str] = []
    for copy in copies:
        if not copy.ok:
            where = "" if copy.mismatch_at is None else f", first bad byte at +{copy.mismatch_at:#x}"
            problems.append(f"{copy.device}: copy of {copy.size:#x} bytes {copy.state}/{copy.error}{where}")
    for check in fault_checks:
        if check.skipped:
            continue
        if not check.observed:
            problems.append(f"{check.device}: no error at IOVA {check.iova:#x} (STATUS {check.state})")
        elif not any(f.address == check.iova and f.client == check.device for f in collector.faults):
            problems.append(f"{check.device}: the SMMU driver logged no event for IOVA {check.iova:#x}")
    for dev, reason in host.kernel.deferred_devices:
        problems.append(f"{dev.name}: still deferred ({reason})")
    return RunReport(
        metadata=dict(metadata),
        boot_ns=boot_ns,
        total_ns=total_ns,
        probes=tuple(collector.probes),
        devices=devices,
        domains=tuple(host.domains()),
        copies=tuple(copies),
        fault_checks=tuple(fault_checks),
        translations=translation_stats(counters, collector),
        faults=tuple(collector.faults),
        commands=tuple(command_rows(counters)),
        problems=tuple(problems),
    )


__all__ = [
    "CommandRow",
    "DeviceRow",
    "FaultRow",
    "ProbeStep",
    "ReportCollector",
    "RunReport",
    "TranslationStats",
    "build_report",
    "report_counters",
]
