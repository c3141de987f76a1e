"""The paravirtual designs: ``pv-identity`` (v3) and ``pv-paging`` (RFC v2 / Android).

The same machine, host kernel and DMA workload as ``native``; pKVM owns every SMMU outright and the
host asks for configuration by hypercall. ``pv-identity`` boots in either host arrangement
(``--boot-variant three-drivers`` or ``impl-hooks``); its devices run in identity domains, so the
DMA API runs in identity mode and the workload's deliberate fault is skipped (nothing translates).
``pv-paging`` uses the three-drivers arrangement with paging domains whose map/unmap are hypercalls.

The hyp owns the SMMUs' event queues: their records are traced by the hyp (``hyp.pv``
``evtq.event``) and reported here with the device the StreamID belongs to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

from pkvm_smmu.devicetree import DeviceTreeError
from pkvm_smmu.host.kernel import KernelParams
from pkvm_smmu.host.pv_iommu import PvHostKernel
from pkvm_smmu.host.pv_iommu.pkvm_smmu import Spawn
from pkvm_smmu.hyp.pkvm import Pkvm
from pkvm_smmu.hyp.pv import PV_DESIGNS, PvIommu
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.platform import DeviceSpecError, Machine, build_machine
from pkvm_smmu.scenarios.boot import (
    RunOptions,
    load_platform_tree,
    new_trace,
    parse_devices,
    wire_host_interrupts,
)
from pkvm_smmu.scenarios.native import run_dma_workload
from pkvm_smmu.scenarios.report import FaultRow, ReportCollector, RunReport, build_report, report_counters
from pkvm_smmu.trace import Counters, JsonlSink, RecordingSink, Sink, TraceBus, TraceEvent, write_chrome_trace

# design -> its boot variants, the first being the default
BOOT_VARIANTS: dict[str, tuple[str, ...]] = {
    "pv-identity": ("three-drivers", "impl-hooks"),
    "pv-paging": ("three-drivers",),
}
DMA_API_MODE = {
    "pv-identity": "identity: the design has identity and blocked domains only",
    "pv-paging": "paging: map/unmap are hypercalls, the hyp fills the page tables",
}


class BootVariantError(ValueError):
    """A boot variant the design does not have; ``option`` names the command-line option."""

    option = "--boot-variant"


def boot_variant_for(options: RunOptions) -> str:
    variants = BOOT_VARIANTS[options.design]
    variant = options.boot_variant
    if variant in ("", "none"):
        return variants[0]
    if variant not in variants:
        raise BootVariantError(f"--boot-variant {variant}: {options.design} has {', '.join(variants)}")
    return variant


class PkvmServices:
    """What the host kernel's KVM code may ask of pKVM while it is trusted (``PkvmSetup``)."""

    def __init__(self, pkvm: Pkvm, pv: PvIommu) -> None:
        self.pkvm = pkvm
        self.pv = pv

    def kvm_hyp_reserve(self) -> tuple[int, int] | int:
        ret = self.pkvm.kvm_hyp_reserve()
        carveout = self.pkvm.carveout
        if ret or carveout is None:
            return ret or -1
        return carveout.base, carveout.size

    def register_smmu(self, name: str, base: int, size: int, coherent: bool) -> int:
        return self.pv.register_smmu(name, base, size, coherent)

    def kvm_arm_init(self) -> int:
        return self.pkvm.init()

    def finalize_pkvm(self) -> int:
        return self.pkvm.finalise()

    def protected_mode_initialized(self) -> bool:
        return self.pkvm.protected_mode_initialized


@dataclass
class PvCollector(ReportCollector):
    """``ReportCollector`` plus the event records the hyp drained (it owns the event queues)."""

    resolve_sid: Callable[[int], str] = field(default=lambda sid: "?")

    def __call__(self, event: TraceEvent) -> None:
        super().__call__(event)
        if event.component == "hyp.pv" and event.kind == "evtq.event":
            f = event.fields
            sid = int(f.get("sid", 0))
            self.faults.append(
                FaultRow(
                    str(f.get("smmu")),
                    str(f.get("event")),
                    sid,
                    int(f.get("inputaddr", 0)),
                    self.resolve_sid(sid),
                    "read" if f.get("rnw") else "write",
                )
            )


@dataclass
class PvSystem:
    options: RunOptions
    machine: Machine
    pkvm: Pkvm
    pv: PvIommu
    host: PvHostKernel
    trace: TraceBus
    collector: PvCollector
    counters: Counters
    boot_ns: int


def boot_pv(options: RunOptions, *, sinks: Sequence[Sink] = (), spawn: Spawn = "auxiliary") -> PvSystem:
    """Build the machine, pKVM with the design's hyp IOMMU, and the host kernel; boot. ``spawn``:
    the bus of the devices the pKVM SMMU driver creates for the PV IOMMU driver (three-drivers)."""
    variant = boot_variant_for(options)
    options = replace(options, boot_variant=variant)
    tree = load_platform_tree(options.platform)
    specs = parse_devices(options.devices)
    clock = Clock()
    trace = new_trace(clock, options)
    collector = trace.attach(PvCollector())
    counters = trace.attach(report_counters())
    for sink in sinks:
        trace.attach(sink)
    machine = build_machine(tree, extra_devices=specs, trace=trace, clock=clock)
    pkvm = Pkvm(machine.bus, clock, trace, machine.hyp_cpu())
    pkvm.attach_host_cpu(machine.host_cpu())
    pv = PV_DESIGNS[options.design](pkvm)
    ret = pv.register()
    if ret:
        raise RuntimeError(f"kvm_iommu_register_driver failed: {ret}")

    def hyp_irq(_line: str) -> None:
        pv.poll_events()

    for smmu in machine.smmus.values():
        # The hyp owns the SMMUs' interrupts: it drains events and global errors itself.
        machine.irq.connect(smmu.interrupts.line("eventq"), hyp_irq)
        machine.irq.connect(smmu.interrupts.line("gerror"), hyp_irq)
    host = PvHostKernel(
        machine.host_cpu(),
        tree,
        options.cmdline,
        pkvm=PkvmServices(pkvm, pv),
        hvc=pkvm,
        arrangement="impl-hooks" if variant == "impl-hooks" else "three-drivers",
        spawn=spawn,
        trace=trace,
        now_ns=lambda: clock.now_ns,
    )
    collector.resolve_sid = lambda sid: _device_of_sid(host, sid)
    wire_host_interrupts(machine, host.irq)
    host.boot()
    return PvSystem(options, machine, pkvm, pv, host, trace, collector, counters, clock.now_ns)


def _device_of_sid(host: PvHostKernel, sid: int) -> str:
    for dev in host.bus_devices():
        if sid in host.stream_ids(dev):
            return dev.name
    return "?"


def report_metadata(system: PvSystem) -> dict[str, Any]:
    meta = system.options.metadata()
    types = sorted({d.type for d in system.host.domains()})
    meta["domain_types"] = types
    meta["dma_api"] = DMA_API_MODE[system.options.design]
    return meta


def run_pv(options: RunOptions) -> RunReport:
    """Boot under a paravirtual design, run the DMA workload, report; trace files as ``native``."""
    boot_variant_for(options)  # input errors first, while no output file exists
    load_platform_tree(options.platform)
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
            system = boot_pv(options, sinks=sinks)
        except (DeviceTreeError, DeviceSpecError):
            if jsonl is not None:
                jsonl.discard()
            raise
        copies, faults = run_dma_workload(system.host, options.seed)
        system.pv.poll_events()
        report = build_report(
            system.host,
            system.collector,
            system.counters,
            metadata=report_metadata(system),
            boot_ns=system.boot_ns,
            total_ns=system.machine.clock.now_ns,
            copies=copies,
            fault_checks=faults,
        )
        if recording is not None and options.trace_json:
            write_chrome_trace(recording.events, options.trace_json, options.metadata())
    return report


def run_pv_identity(options: RunOptions) -> RunReport:
    return run_pv(replace(options, design="pv-identity"))


def run_pv_paging(options: RunOptions) -> RunReport:
    return run_pv(replace(options, design="pv-paging"))


__all__ = [
    "BOOT_VARIANTS",
    "BootVariantError",
    "PkvmServices",
    "PvCollector",
    "PvSystem",
    "boot_pv",
    "boot_variant_for",
    "run_pv",
    "run_pv_identity",
    "run_pv_paging",
]
