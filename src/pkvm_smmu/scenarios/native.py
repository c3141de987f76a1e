"""The ``native`` design: no hypervisor. The host kernel owns the SMMU and programs it directly.

``boot_native`` builds the machine a tree describes (plus ``--device`` endpoints), assembles the
host kernel on the machine's EL1 CPU port, wires interrupts, and boots. ``run_dma_workload``
copies through every DMA engine's default DMA domain and makes one engine fault on an IOVA its
domain does not map. ``run_native`` does both and reports. ``run_endpoint_workload`` drives the
generic endpoints (``pkvm-smmu,dma-endpoint``), if the platform has any, through their driver.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

from pkvm_smmu.devicetree import DeviceTreeError
from pkvm_smmu.host.drivers.dma_engine import PAGE_SIZE, CopyResult, FaultResult
from pkvm_smmu.host.iommu import DomainType
from pkvm_smmu.host.kernel import HostKernel, KernelParams
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.devices.endpoint import DmaResult
from pkvm_smmu.machine.platform import DeviceSpecError, Machine, build_machine
from pkvm_smmu.scenarios.boot import (
    RunOptions,
    load_platform_tree,
    new_trace,
    parse_devices,
    wire_host_interrupts,
)
from pkvm_smmu.scenarios.report import ReportCollector, RunReport, build_report, report_counters
from pkvm_smmu.trace import Counters, JsonlSink, RecordingSink, Sink, TraceBus, write_chrome_trace

DESIGN = "native"
MAX_COPY_PAGES = 16  # the seeded copy moves up to this many pages


@dataclass
class NativeSystem:
    """A booted machine and host kernel, with the report's trace sinks attached."""

    options: RunOptions
    machine: Machine
    host: HostKernel
    trace: TraceBus
    collector: ReportCollector
    counters: Counters
    boot_ns: int


def boot_native(options: RunOptions, *, sinks: Sequence[Sink] = ()) -> NativeSystem:
    """Build and boot. Bad input raises DeviceTreeError, DeviceSpecError or CmdlineError."""
    tree = load_platform_tree(options.platform)
    specs = parse_devices(options.devices)
    clock = Clock()
    trace = new_trace(clock, options)
    collector = trace.attach(ReportCollector())
    counters = trace.attach(report_counters())
    for sink in sinks:
        trace.attach(sink)
    machine = build_machine(tree, extra_devices=specs, trace=trace, clock=clock)
    host = HostKernel(machine.host_cpu(), tree, options.cmdline, trace=trace, now_ns=lambda: clock.now_ns)
    wire_host_interrupts(machine, host.irq)
    host.boot()
    return NativeSystem(options, machine, host, trace, collector, counters, clock.now_ns)


def run_dma_workload(host: HostKernel, seed: int) -> tuple[list[CopyResult], list[FaultResult]]:
    """Two copies per DMA engine (one page; a seeded size and offset), then one deliberate fault
    on the first engine behind a translating domain; then time for lazy invalidation to finish."""
    rng = random.Random(seed)
    copies: list[CopyResult] = []
    engines = list(host.dma_engines.values())
    for engine in engines:
        copies.append(engine.copy(PAGE_SIZE, seed=seed))
        size = rng.randrange(1, MAX_COPY_PAGES * PAGE_SIZE)
        copies.append(engine.copy(size, seed=seed, offset=rng.randrange(0, PAGE_SIZE, 8)))
    faults: list[FaultResult] = []
    translated = [e for e in engines if (d := host.domain_of(e.dev)) is not None and d.type.is_paging]
    if translated:
        faults.append(translated[0].fault_unmapped())
    elif engines:
        faults.append(engines[0].fault_unmapped())  # reports why it was skipped
    # Let a flush queue's timer run (iommu.strict=0), as time passing would on a real system.
    host.cpu.udelay(host.params.iommu.fq_timeout_ms * 1000 + 1)
    host.run_timers()
    return copies, faults


@dataclass(frozen=True)
class EndpointCheck:
    """One generic endpoint's round trip: a seeded pattern written by the device to ``dma_addr``,
    read back by the device, found by the CPU at ``cpu_pa``; then a DMA to the unmapped IOVA."""

    device: str
    stream_id: int
    domain: str | None  # the default domain's type ("dma", "identity"...)
    size: int
    cpu_pa: int
    dma_addr: int
    write: DmaResult
    read: DmaResult
    in_ram: bool  # RAM at cpu_pa holds the pattern
    read_back: bool  # the device read the pattern back
    after_unmap: DmaResult  # a read of dma_addr once the buffer was unmapped

    @property
    def ok(self) -> bool:
        return self.write.ok and self.read_back and self.in_ram

    @property
    def unmapped_aborts(self) -> bool:
        return not self.after_unmap.ok


def run_endpoint_workload(
    host: HostKernel, machine: Machine, seed: int = 0, size: int = PAGE_SIZE
) -> list[EndpointCheck]:
    """For each bound generic endpoint: map a buffer, DMA a seeded pattern in and out of it, check
    RAM, unmap (and let a flush queue drain), then DMA to the stale IOVA."""
    checks: list[EndpointCheck] = []
    by_node = machine.dma_endpoints
    for name, bound in host.dma_endpoints.items():
        fwnode = bound.dev.fwnode
        device = by_node.get(getattr(fwnode, "path", ""))
        buf = bound.map_buffer(size) if device is not None else None
        if device is None or buf is None:
            continue
        domain = host.domain_of(bound.dev)
        pattern = random.Random(f"{seed}:{name}:{size}").randbytes(size)
        write = device.write(buf.dma_addr, pattern)
        read = device.read(buf.dma_addr, size)
        ram = host.cpu.read_bytes(buf.cpu_pa, size)
        bound.unmap_buffer(buf)
        if domain is not None and domain.type is DomainType.DMA_FQ:
            host.cpu.udelay(host.params.iommu.fq_timeout_ms * 1000 + 1)
            host.run_timers()
        after = device.read(buf.dma_addr, 8)
        checks.append(EndpointCheck(
            name, device.stream_id, domain.type.value if domain is not None else None, size, buf.cpu_pa,
            buf.dma_addr, write, read, ram == pattern, read.ok and read.data == pattern, after,
        ))  # fmt: skip
    return checks


def run_native(options: RunOptions) -> RunReport:
    """Boot natively, run the DMA workload, report; write the trace files the options name.
    Bad input raises before any file is written; a run that fails later keeps its JSONL trace."""
    load_platform_tree(options.platform)  # input errors first, while no output file exists
    parse_devices(options.devices)
    KernelParams.parse(options.cmdline)
    with ExitStack() as stack:
        sinks: list[Sink] = []
        jsonl = JsonlSink(options.trace_jsonl, options.metadata()) if options.trace_jsonl else None
        if jsonl is not None:
            sinks.append(stack.enter_context(jsonl))
        recording = RecordingSink() if options.trace_json else None
        if recording is not None:
            sinks.append(recording)
        try:
            system = boot_native(options, sinks=sinks)
        except (DeviceTreeError, DeviceSpecError):
            if jsonl is not None:
                jsonl.discard()  # an inconsistent platform: nothing ran worth keeping
            raise
        copies, faults = run_dma_workload(system.host, options.seed)
        report = build_report(
            system.host,
            system.collector,
            system.counters,
            metadata=options.metadata(),
            boot_ns=system.boot_ns,
            total_ns=system.machine.clock.now_ns,
            copies=copies,
            fault_checks=faults,
        )
        if recording is not None and options.trace_json:
            write_chrome_trace(recording.events, options.trace_json, options.metadata())
    return report


__all__ = [
    "DESIGN",
    "EndpointCheck",
    "NativeSystem",
    "boot_native",
    "run_dma_workload",
    "run_endpoint_workload",
    "run_native",
]
