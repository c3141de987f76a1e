"""``pkvm-smmu compare``: the same host operations under every design, counted from the trace and
priced by the cost model, with the isolation oracle's verdict.

Each design boots the platform (the embedded default unless one is given); then, through the host
DMA API in strict mode, ``iterations`` rounds of dma_map_single / device DMA / dma_unmap_single of a
4 KiB and of a 1 MiB buffer on one DMA engine; then, where the design has a hypervisor, a protected
VM receives ``iterations`` pages one by one while every DMA engine keeps reading its own buffer,
and after the VM is torn down the host reclaims them. Every count is the difference of two
``Counters`` snapshots around one operation; the oracle checks after each operation
(incrementally) and once from scratch at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pkvm_smmu.host.drivers.dma_engine import DmaEngineDev
from pkvm_smmu.host.iommu import DmaDirection, dma_map_single, dma_mapping_error, dma_unmap_single
from pkvm_smmu.host.kernel import HostKernel
from pkvm_smmu.hyp.pkvm import Pkvm
from pkvm_smmu.hyp.smmuv3.device import HypSmmuV3, SmmuStructures
from pkvm_smmu.machine.devices import DmaEndpoint
from pkvm_smmu.machine.memory import PAGE_SHIFT, PAGE_SIZE
from pkvm_smmu.machine.platform import Machine
from pkvm_smmu.machine.smmu import SmmuV3
from pkvm_smmu.scenarios import DESIGNS
from pkvm_smmu.scenarios.boot import RunOptions, load_platform_tree
from pkvm_smmu.scenarios.cost_model import RFC_V2_MORELLO, CostModel, PricedCounts, calibration_table
from pkvm_smmu.trace import Counters, Snapshot
from pkvm_smmu.trace._atomic import AtomicTextFile
from pkvm_smmu.verify.oracle import DeclaredStructures, IsolationOracle, StructuresSource, Violation

FORMAT = "pkvm-smmu-compare/1"
DEFAULT_ITERATIONS = 8
SIZES = {"4K": PAGE_SIZE, "1M": 1 << 20}
OPERATIONS = (
    "boot",
    "map 4K", "dma 4K", "unmap 4K",
    "map 1M", "dma 1M", "unmap 1M",
    "donate", "reclaim",
)  # fmt: skip
# The event fields whose values the counters keep (the counts below are sums over them).
COUNTED_FIELDS = ("opcode", "name", "mode", "reg", "levels", "pte_writes", "table_pages", "pages", "nr_pages")
ISOLATION_NA = "n/a"
T = TypeVar("T")


class CompareError(ValueError):
    """A bad comparison request; ``option`` names the command-line option."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


# -- counts --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpCounts:
    """What operations made happen, summed over them (``per_op`` divides by their number)."""

    traps: int = 0
    hypercalls: int = 0
    commands: Mapping[str, int] = field(default_factory=dict)  # by opcode
    mmio_writes: int = 0
    pte_writes: int = 0
    table_pages: int = 0  # page-table pages taken (negative: freed), host's and hyp's tables
    pool_pages: int = 0  # pages taken from (negative: returned to) the hypervisor's pools
    tlb_misses: int = 0
    walk_levels: int = 0
    dma_api_calls: int = 0  # dma_map/unmap through an IOMMU domain (not dma-direct)
    page_state_pages: int = 0  # pages whose pKVM ownership or DMA refcount changed
    hypercall_names: Mapping[str, int] = field(default_factory=dict)
    trapped_registers: Mapping[str, int] = field(default_factory=dict)  # SMMU registers the hyp emulated

    @property
    def command_total(self) -> int:
        return sum(self.commands.values())

    @property
    def syncs(self) -> int:
        return self.commands.get("SYNC", 0)

    def __add__(self, other: OpCounts) -> OpCounts:
        return OpCounts(
            self.traps + other.traps,
            self.hypercalls + other.hypercalls,
            _add_maps(self.commands, other.commands),
            self.mmio_writes + other.mmio_writes,
            self.pte_writes + other.pte_writes,
            self.table_pages + other.table_pages,
            self.pool_pages + other.pool_pages,
            self.tlb_misses + other.tlb_misses,
            self.walk_levels + other.walk_levels,
            self.dma_api_calls + other.dma_api_calls,
            self.page_state_pages + other.page_state_pages,
            _add_maps(self.hypercall_names, other.hypercall_names),
            _add_maps(self.trapped_registers, other.trapped_registers),
        )

    def priced(self, n: int, *, coherent: bool) -> PricedCounts:
        """Per operation, as the cost model prices it; a non-coherent walker needs every
        descriptor write cleaned to the point of coherency."""
        n = max(n, 1)
        return PricedCounts(
            traps=self.traps / n,
            hypercalls=self.hypercalls / n,
            mmio_writes=self.mmio_writes / n,
            commands=self.command_total / n,
            syncs=self.syncs / n,
            pte_writes=self.pte_writes / n,
            walk_levels=self.walk_levels / n,
            cache_maintenance=0.0 if coherent else self.pte_writes / n,
            dma_api_calls=self.dma_api_calls / n,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "traps": self.traps,
            "hypercalls": self.hypercalls,
            "commands": self.command_total,
            "cmd_syncs": self.syncs,
            "mmio_writes": self.mmio_writes,
            "pte_writes": self.pte_writes,
            "table_pages": self.table_pages,
            "pool_pages": self.pool_pages,
            "tlb_misses": self.tlb_misses,
            "walk_levels": self.walk_levels,
            "dma_api_calls": self.dma_api_calls,
            "page_state_pages": self.page_state_pages,
            "commands_by_opcode": dict(sorted(self.commands.items())),
            "hypercalls_by_name": dict(sorted(self.hypercall_names.items())),
            "traps_by_register": dict(sorted(self.trapped_registers.items())),
        }


def _add_maps(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0) + value
    return {k: v for k, v in out.items() if v}


def _weighted_sum(per_value: Mapping[Any, int] | None) -> int:
    """Sum of value x occurrences for a counted numeric field."""
    if not per_value:
        return 0
    return sum(
        value * n for value, n in per_value.items() if isinstance(value, int) and not isinstance(value, bool)
    )


def measure(delta: Snapshot, smmus: Iterable[str]) -> OpCounts:
    """The counts in a ``Counters.diff`` (``smmus``: the SMMU models' component names)."""
    counts: dict[str, dict[str, int]] = delta.get("counts", {})
    by_field: dict[str, dict[str, dict[str, dict[Any, int]]]] = delta.get("by_field", {})
    smmus = tuple(smmus)

    def count(component: str, kind: str) -> int:
        return counts.get(component, {}).get(kind, 0)

    def values(component: str, kind: str, name: str) -> dict[Any, int]:
        return by_field.get(component, {}).get(kind, {}).get(name, {})

    commands: dict[str, int] = {}
    for smmu in smmus:
        commands = _add_maps(commands, {str(k): v for k, v in values(smmu, "cmd", "opcode").items()})
    # Page-table updates, wherever they happen, carry pte_writes and table_pages.
    pte_writes = table_pages = 0
    for kinds in by_field.values():
        for fields_ in kinds.values():
            pte_writes += _weighted_sum(fields_.get("pte_writes"))
            table_pages += _weighted_sum(fields_.get("table_pages"))
    dma_calls = sum(count("host.iommu", kind) for kind in ("dma.map", "dma.unmap"))
    direct = sum(values("host.iommu", kind, "mode").get("direct", 0) for kind in ("dma.map", "dma.unmap"))
    return OpCounts(
        traps=count("hyp", "trap"),
        hypercalls=count("hyp", "hypercall"),
        commands=commands,
        mmio_writes=sum(count(smmu, "reg.write") for smmu in smmus),
        pte_writes=pte_writes,
        table_pages=table_pages,
        # The buddy pools' own events (the IOMMU pool layer above them repeats its allocations).
        pool_pages=_weighted_sum(values("hyp", "pool.alloc", "pages"))
        - _weighted_sum(values("hyp", "pool.free", "pages")),
        tlb_misses=sum(count(smmu, "tlb.miss") for smmu in smmus),
        walk_levels=sum(_weighted_sum(values(smmu, "walk", "levels")) for smmu in smmus),
        dma_api_calls=dma_calls - direct,
        page_state_pages=_weighted_sum(values("hyp", "ownership", "nr_pages")),
        hypercall_names={str(k): v for k, v in values("hyp", "hypercall", "name").items()},
        trapped_registers={str(k): v for k, v in values("hyp.smmuv3", "trap", "reg").items()},
    )


# -- results ---------------------------------------------------------------------------------------------


@dataclass
class IsolationTally:
    """The oracle's checks after a group of operations."""

    checks: int = 0
    failed: int = 0
    worst: int = 0  # the most violations one check reported

    def add(self, violations: int) -> None:
        self.checks += 1
        self.failed += bool(violations)
        self.worst = max(self.worst, violations)

    def verdict(self, promised: bool) -> str:
        """``ISOLATION_NA`` where nothing is promised (no hypervisor), "ok", or "violated (N)"."""
        if not promised:
            return ISOLATION_NA
        return "ok" if not self.failed else f"violated ({self.worst})"

    def as_dict(self) -> dict[str, int]:
        return {"checks": self.checks, "failed": self.failed, "worst": self.worst}


@dataclass(frozen=True)
class OperationResult:
    design: str
    operation: str
    n: int  # how many times it ran (0: the design does not have it)
    total: OpCounts
    modeled_ns: float  # per operation
    breakdown_ns: Mapping[str, float]
    isolation: str  # the oracle after these operations: "ok", "violated (N)" or ISOLATION_NA
    checks: IsolationTally = field(default_factory=IsolationTally)
    note: str = ""

    @property
    def supported(self) -> bool:
        return self.n > 0

    def per_op(self, name: str) -> float:
        value = self.total.as_dict()[name]
        return value / self.n if self.n else 0.0

    def as_dict(self) -> dict[str, Any]:
        total = self.total.as_dict()
        return {
            "operation": self.operation,
            "n": self.n,
            "supported": self.supported,
            "note": self.note,
            "total": total,
            "per_op": {k: (v / self.n if self.n else 0.0) for k, v in total.items() if isinstance(v, int)},
            "modeled_ns_per_op": round(self.modeled_ns, 3),
            "modeled_breakdown_ns": {k: round(v, 3) for k, v in self.breakdown_ns.items()},
            "isolation": self.isolation,
            "isolation_checks": self.checks.as_dict(),
        }


@dataclass(frozen=True)
class DesignResult:
    design: str
    metadata: Mapping[str, Any]
    operations: tuple[OperationResult, ...]
    isolation: str  # the design's verdict over every check
    violations: tuple[str, ...]  # what the oracle reported, one line per stream and cause
    problems: tuple[str, ...]  # workload failures (a device DMA that did not go through...)

    def operation(self, name: str) -> OperationResult:
        return next(op for op in self.operations if op.operation == name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "design": self.design,
            "metadata": dict(self.metadata),
            "isolation": self.isolation,
            "violations": list(self.violations),
            "problems": list(self.problems),
            "operations": [op.as_dict() for op in self.operations],
        }


@dataclass(frozen=True)
class RfcComparison:
    size: str
    operation: str
    measured_native_us: float
    measured_pkvm_us: float
    model_native_us: float
    model_pv_paging_us: float

    @property
    def measured_ratio(self) -> float:
        return self.measured_pkvm_us / self.measured_native_us

    @property
    def model_ratio(self) -> float:
        return self.model_pv_paging_us / self.model_native_us if self.model_native_us else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": f"{self.operation} {self.size}",
            "measured_native_us": self.measured_native_us,
            "measured_pkvm_us": self.measured_pkvm_us,
            "measured_ratio": round(self.measured_ratio, 3),
            "model_native_us": round(self.model_native_us, 4),
            "model_pv_paging_us": round(self.model_pv_paging_us, 4),
            "model_ratio": round(self.model_ratio, 3),
        }


@dataclass(frozen=True)
class Comparison:
    seed: int
    iterations: int
    designs: tuple[str, ...]
    cost_model: CostModel
    results: tuple[DesignResult, ...]
    platform: str | None = None

    def result(self, design: str) -> DesignResult:
        return next(r for r in self.results if r.design == design)

    def rfc_v2(self) -> list[RfcComparison]:
        """The model's native and pv-paging map/unmap next to RFC v2's Morello numbers (when both
        designs ran)."""
        if not {"native", "pv-paging"} <= set(self.designs):
            return []
        native, pv = self.result("native"), self.result("pv-paging")
        out = []
        for m in RFC_V2_MORELLO:
            name = f"{m.operation} {m.size}"
            out.append(
                RfcComparison(
                    m.size,
                    m.operation,
                    measured_native_us=m.native_us,
                    measured_pkvm_us=m.pkvm_us,
                    model_native_us=native.operation(name).modeled_ns / 1000,
                    model_pv_paging_us=pv.operation(name).modeled_ns / 1000,
                )
            )
        return out

    @property
    def ok(self) -> bool:
        return not any(r.problems or r.violations for r in self.results)

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "seed": self.seed,
            "iterations": self.iterations,
            "platform": self.platform,
            "designs": list(self.designs),
            "operations": list(OPERATIONS),
            "cost_model": {
                "parameters_ns": self.cost_model.parameters(),
                "calibration": calibration_table(),
            },
            "results": [r.as_dict() for r in self.results],
            "rfc_v2": [row.as_dict() for row in self.rfc_v2()],
        }


# -- booting each design with the comparison's counters ----------------------------------------------


@dataclass
class BootedDesign:
    design: str
    machine: Machine
    host: HostKernel
    hvc: Callable[..., int] | None  # the host's hypercall instruction (None: no hypervisor)
    pkvm: Pkvm | None
    oracle: IsolationOracle
    metadata: dict[str, Any]

    @property
    def smmus(self) -> list[SmmuV3]:
        return list(self.machine.smmus.values())


def _declared(smmu_at: Callable[[int], HypSmmuV3 | None], smmu: SmmuV3) -> StructuresSource:
    """What the hyp has ``smmu`` read and write for itself, asked at every check."""

    def structures() -> DeclaredStructures:
        hyp = smmu_at(smmu.base)
        return hyp.smmu_structures() if hyp is not None else SmmuStructures((), ())

    return structures


def _boot_native(options: RunOptions, counters: Counters) -> BootedDesign:
    from pkvm_smmu.scenarios.native import boot_native

    system = boot_native(options, sinks=(counters,))
    machine = system.machine
    oracle = IsolationOracle(machine.bus, list(machine.smmus.values()))
    return BootedDesign(options.design, machine, system.host, None, None, oracle, options.metadata())


def _boot_pv(options: RunOptions, counters: Counters) -> BootedDesign:
    from pkvm_smmu.scenarios.pv import boot_pv

    system = boot_pv(options, sinks=(counters,))
    machine = system.machine
    smmus = list(machine.smmus.values())
    declared = {smmu.name: _declared(system.pv.driver.smmu_at, smmu) for smmu in smmus}
    oracle = IsolationOracle(machine.bus, smmus, system.pkvm.mem_protect, declared)
    metadata = system.options.metadata()
    return BootedDesign(options.design, machine, system.host, system.pkvm.hvc, system.pkvm, oracle, metadata)


def _boot_trap_emulate(options: RunOptions, counters: Counters) -> BootedDesign:
    from pkvm_smmu.scenarios.pkvm import boot_pkvm

    system = boot_pkvm(options, sinks=(counters,))
    machine = system.machine
    smmus = list(machine.smmus.values())
    driver = system.hyp.driver
    if driver is not None:
        declared = {smmu.name: _declared(driver.smmu_at, smmu) for smmu in smmus}
        oracle = IsolationOracle(machine.bus, smmus, system.pkvm.mem_protect, declared)
    else:  # pKVM did not take the SMMUs: host ownership alone
        oracle = IsolationOracle(machine.bus, smmus, system.pkvm.mem_protect)
    metadata = system.options.metadata()
    return BootedDesign(options.design, machine, system.host, system.hyp.hvc, system.pkvm, oracle, metadata)


BOOTERS: dict[str, Callable[[RunOptions, Counters], BootedDesign]] = {
    "native": _boot_native,
    "pv-identity": _boot_pv,
    "pv-paging": _boot_pv,
    "trap-emulate": _boot_trap_emulate,
}


def check_designs(designs: Sequence[str]) -> tuple[str, ...]:
    """The designs in registry order, each once; CompareError naming ``--designs`` otherwise."""
    if not designs:
        raise CompareError("--designs", "--designs: name at least one design")
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown:
        raise CompareError(
            "--designs", f"--designs: unknown design(s) {', '.join(unknown)} (have: {', '.join(DESIGNS)})"
        )
    missing = [d for d in designs if d not in BOOTERS]
    if missing:
        raise CompareError("--designs", f"--designs: compare cannot boot {', '.join(missing)} yet")
    return tuple(d for d in DESIGNS if d in designs)


# -- the workload ----------------------------------------------------------------------------------------


class _Run:
    """One design's pass over the operations."""

    def __init__(self, booted: BootedDesign, counters: Counters, cost: CostModel, iterations: int, seed: int):
        self.b = booted
        self.counters = counters
        self.cost = cost
        self.iterations = iterations
        self.rng = random.Random(f"{seed}:compare")
        self.smmu_names = tuple(smmu.name for smmu in booted.smmus)
        self.coherent = all(smmu.features.coherent for smmu in booted.smmus)
        self.results: list[OperationResult] = []
        self.problems: list[str] = []
        self.overall = IsolationTally()
        # (smmu, stream, owner, path) -> [ranges seen, first operation it was seen after]
        self._causes: dict[tuple[str, str, str, tuple[str, ...]], list[Any]] = {}

    # -- bookkeeping ---------------------------------------------------------------------------------
    def timed(self, action: Callable[..., T], *args: Any) -> tuple[OpCounts, T]:
        """``action(*args)`` and the counts of what it made happen."""
        before = self.counters.snapshot()
        value = action(*args)
        return measure(Counters.diff(before, self.counters.snapshot()), self.smmu_names), value

    def check_isolation(self, tally: IsolationTally, after: str, *, full: bool = False) -> None:
        found = self.b.oracle.check_full() if full else self.b.oracle.check()
        tally.add(len(found))
        self.overall.add(len(found))
        for violation in found:
            self._note_cause(violation, after)

    def _note_cause(self, v: Violation, after: str) -> None:
        key = (v.smmu, v.stream, v.owner, v.path)
        entry = self._causes.setdefault(key, [set(), after])
        entry[0].add((v.start, v.size))

    def violations(self) -> list[str]:
        out = []
        for (smmu, stream, owner, path), (ranges, after) in self._causes.items():
            why = "; ".join(path[-2:])
            out.append(f"{smmu}: {stream} reaches {len(ranges)} range(s) {owner} owns (from {after}): {why}")
        return out

    def record(
        self, operation: str, n: int, total: OpCounts, tally: IsolationTally | None = None, note: str = ""
    ) -> None:
        tally = tally or IsolationTally()
        priced = total.priced(n, coherent=self.coherent)
        breakdown = self.cost.breakdown(priced) if n else {}
        self.results.append(
            OperationResult(
                self.b.design,
                operation,
                n,
                total,
                modeled_ns=float(sum(breakdown.values())),
                breakdown_ns=breakdown,
                isolation=tally.verdict(self.b.pkvm is not None),
                checks=tally,
                note=note,
            )
        )

    # -- operations ----------------------------------------------------------------------------------
    def boot(self, boot_counts: OpCounts) -> None:
        tally = IsolationTally()
        self.check_isolation(tally, "boot")
        self.record("boot", 1, boot_counts, tally)

    def engines(self) -> list[tuple[DmaEngineDev, DmaEndpoint]]:
        """Every DMA engine the host drives, by name, with the endpoint its StreamID belongs to."""
        host, machine = self.b.host, self.b.machine
        by_sid = {d.stream_id: d for d in machine.dma_devices.values() if d.stream_id is not None}
        out = []
        for name in sorted(host.dma_engines):
            engine = host.dma_engines[name]
            sids = host.stream_ids(engine.dev)
            device = by_sid.get(sids[0]) if sids else None
            if device is not None:
                out.append((engine, device.endpoint))
        return out

    def map_unmap(self, label: str, size: int, engine: DmaEngineDev, endpoint: DmaEndpoint) -> None:
        host, dev = self.b.host, engine.dev
        pages = size >> PAGE_SHIFT
        totals = {"map": OpCounts(), "unmap": OpCounts(), "dma": OpCounts()}
        tallies = {"map": IsolationTally(), "unmap": IsolationTally(), "dma": IsolationTally()}
        done = 0
        for _ in range(self.iterations):
            buffer = host.mm.alloc_pages(pages)
            if buffer is None:
                self.problems.append(f"{label}: the host has no {size:#x}-byte buffer")
                break
            counts, dma = self.timed(dma_map_single, dev, buffer, size, DmaDirection.BIDIRECTIONAL)
            totals["map"] += counts
            self.check_isolation(tallies["map"], f"map {label}")
            if dma_mapping_error(dev, dma):
                self.problems.append(f"{label}: dma_map_single failed for {engine.name}")
                host.mm.free_pages(buffer, pages)
                break
            pattern = self.rng.randbytes(size)
            counts, ok = self.timed(self.device_round_trip, endpoint, dma, pattern)
            totals["dma"] += counts
            self.check_isolation(tallies["dma"], f"dma {label}")
            if not ok:
                self.problems.append(f"{label}: {engine.name} could not write and read back its buffer")
            counts, _ = self.timed(dma_unmap_single, dev, dma, size, DmaDirection.BIDIRECTIONAL)
            totals["unmap"] += counts
            self.check_isolation(tallies["unmap"], f"unmap {label}")
            host.mm.free_pages(buffer, pages)
            done += 1
        domain = host.domain_of(dev)
        note = "" if domain is None or domain.type.is_paging else f"{domain.type.value} domain: dma-direct"
        for op in ("map", "dma", "unmap"):
            self.record(f"{op} {label}", done, totals[op], tallies[op], note)

    @staticmethod
    def device_round_trip(endpoint: DmaEndpoint, dma: int, pattern: bytes) -> bool:
        """The device writes the buffer and reads it back."""
        if not endpoint.write(dma, pattern).ok:
            return False
        read = endpoint.read(dma, len(pattern))
        return read.ok and read.data == pattern

    def donation(self, engines: list[tuple[DmaEngineDev, DmaEndpoint]]) -> None:
        hvc, pkvm = self.b.hvc, self.b.pkvm
        if hvc is None or pkvm is None:
            for op in ("donate", "reclaim"):
                self.record(op, 0, OpCounts(), note="no hypervisor: no protected VMs")
            return
        host = self.b.host
        # Devices keep DMA going on buffers of their own, mapped once for the whole workload.
        working: list[tuple[DmaEngineDev, DmaEndpoint, int, int]] = []
        for engine, endpoint in engines:
            page = host.mm.alloc_zeroed_pages(1)
            if page is None:
                continue
            dma = dma_map_single(engine.dev, page, PAGE_SIZE, DmaDirection.BIDIRECTIONAL)
            if dma_mapping_error(engine.dev, dma):
                host.mm.free_pages(page, 1)
                continue
            working.append((engine, endpoint, page, dma))
        pgd = host.mm.alloc_zeroed_pages(1)
        handle = hvc("__pkvm_init_vm", pgd >> PAGE_SHIFT, 1) if pgd is not None else -1
        if handle < 0:
            self.problems.append(f"donate: __pkvm_init_vm failed ({handle})")
            for op in ("donate", "reclaim"):
                self.record(op, 0, OpCounts(), note="no VM")
            self._unmap_working(working)
            return
        donated: list[int] = []
        donate_total, donate_checks = OpCounts(), IsolationTally()
        for gfn in range(self.iterations):
            page = host.mm.alloc_zeroed_pages(1)
            if page is None:
                self.problems.append("donate: the host has no page to give")
                break
            counts, ret = self.timed(hvc, "__pkvm_host_donate_guest", page >> PAGE_SHIFT, gfn, handle)
            donate_total += counts
            if ret:
                self.problems.append(f"donate: __pkvm_host_donate_guest returned {ret}")
                host.mm.free_pages(page, 1)
                break
            donated.append(page)
            self.check_isolation(donate_checks, "donate")
            for engine, endpoint, _, dma in working:
                if not endpoint.read(dma, 64).ok:
                    self.problems.append(f"donate: {engine.name} lost its own buffer")
        self.record("donate", len(donated), donate_total, donate_checks)
        ret = hvc("__pkvm_teardown_vm", handle)
        if ret:
            self.problems.append(f"reclaim: __pkvm_teardown_vm returned {ret}")
        reclaim_total, reclaim_checks, reclaimed = OpCounts(), IsolationTally(), 0
        for page in donated:
            counts, ret = self.timed(hvc, "__pkvm_host_reclaim_page", page >> PAGE_SHIFT)
            reclaim_total += counts
            if ret:
                self.problems.append(f"reclaim: __pkvm_host_reclaim_page returned {ret}")
                continue
            reclaimed += 1
            self.check_isolation(reclaim_checks, "reclaim")
            host.mm.free_pages(page, 1)
        self.record("reclaim", reclaimed, reclaim_total, reclaim_checks, "after __pkvm_teardown_vm")
        if pgd is not None and not ret:
            host.mm.free_pages(pgd, 1)
        self._unmap_working(working)

    def _unmap_working(self, working: list[tuple[DmaEngineDev, DmaEndpoint, int, int]]) -> None:
        for engine, _, page, dma in working:
            dma_unmap_single(engine.dev, dma, PAGE_SIZE, DmaDirection.BIDIRECTIONAL)
            self.b.host.mm.free_pages(page, 1)

    def finish(self) -> DesignResult:
        """The final check from scratch, which must agree with the incremental one."""
        incremental = self.b.oracle.check()
        full = self.b.oracle.check_full()
        if set(incremental) != set(full):
            self.problems.append(
                f"oracle: the incremental check found {len(incremental)} violation(s), "
                f"the full check {len(full)}"
            )
        self.check_isolation(IsolationTally(), "the end (full check)", full=True)
        self.b.oracle.close()
        if self.b.pkvm is None:
            isolation = "not applicable: no hypervisor, the host may touch all memory"
        elif self.overall.failed:
            isolation = f"VIOLATED in {self.overall.failed} of {self.overall.checks} checks"
        else:
            isolation = f"isolated in all {self.overall.checks} checks"
        return DesignResult(
            self.b.design,
            self.b.metadata,
            tuple(self.results),
            isolation,
            tuple(self.violations()),
            tuple(self.problems),
        )


def run_design(
    design: str, *, iterations: int, seed: int, cost: CostModel, platform: str | None = None
) -> DesignResult:
    """Boot ``design`` and run every operation; strict invalidation (``iommu.strict=1``)."""
    counters = Counters(by_fields=COUNTED_FIELDS)
    options = RunOptions(platform=platform, design=design, seed=seed, cmdline="iommu.strict=1")
    booted = BOOTERS[design](options, counters)
    run = _Run(booted, counters, cost, iterations, seed)
    run.boot(measure(Counters.diff({}, counters.snapshot()), run.smmu_names))
    engines = run.engines()
    if not engines:
        run.problems.append("no DMA engine with a StreamID")
    else:
        for label, size in SIZES.items():
            run.map_unmap(label, size, *engines[0])
    run.donation(engines)
    return run.finish()


def compare(
    designs: Sequence[str] | None = None,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    seed: int = 0,
    cost: CostModel | None = None,
    platform: str | None = None,
) -> Comparison:
    """Run the comparison. ``designs``: names from the registry (default: all of them);
    ``platform``: a DTS or DTB (default: the embedded platform). A bad platform raises
    DeviceTreeError before anything runs."""
    chosen = check_designs(list(designs) if designs is not None else list(DESIGNS))
    if iterations < 1:
        raise CompareError("--iterations", f"--iterations must be at least 1 (got {iterations})")
    cost = cost or CostModel()
    load_platform_tree(platform)  # input errors first
    results = tuple(
        run_design(d, iterations=iterations, seed=seed, cost=cost, platform=platform) for d in chosen
    )
    return Comparison(seed, iterations, chosen, cost, results, platform)


# -- output files ---------------------------------------------------------------------------------------


class PlotUnavailable(ImportError):
    """``--plot`` without matplotlib (the ``plot`` extra)."""


def write_json(comparison: Comparison, path: str | os.PathLike[str]) -> None:
    """The comparison as JSON, written atomically."""
    out = AtomicTextFile(path)
    out.write(json.dumps(comparison.as_dict(), indent=2, sort_keys=False) + "\n")
    out.commit()


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_plot(comparison: Comparison, path: str | os.PathLike[str]) -> None:
    """Modeled time per operation, one bar per design (log scale), as a PNG written atomically.
    PlotUnavailable without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'pkvm-smmu[plot]' (or pip install matplotlib)"
        ) from error
    operations = [op for op in OPERATIONS if op != "boot"]
    width = 0.8 / max(len(comparison.results), 1)
    figure, axes = plt.subplots(figsize=(11, 5))
    for index, result in enumerate(comparison.results):
        heights = [max(result.operation(op).modeled_ns / 1000, 0.0) for op in operations]
        positions = [i + (index - (len(comparison.results) - 1) / 2) * width for i in range(len(operations))]
        axes.bar(positions, heights, width, label=result.design)
    axes.set_xticks(range(len(operations)), operations)
    axes.set_yscale("symlog", linthresh=0.1)
    axes.set_ylabel("modeled time per operation (us)")
    axes.set_title(f"pkvm-smmu compare: {comparison.iterations} iterations, seed {comparison.seed}")
    axes.legend()
    figure.tight_layout()
    target = Path(path)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".png")
    os.close(fd)
    try:
        figure.savefig(temp, format="png", dpi=120, metadata={"Software": None})
        os.replace(temp, target)
    finally:
        plt.close(figure)
        if os.path.exists(temp):
            os.unlink(temp)


__all__ = [
    "BOOTERS",
    "DEFAULT_ITERATIONS",
    "FORMAT",
    "OPERATIONS",
    "CompareError",
    "Comparison",
    "DesignResult",
    "OpCounts",
    "OperationResult",
    "PlotUnavailable",
    "RfcComparison",
    "check_designs",
    "compare",
    "measure",
    "plot_available",
    "run_design",
    "write_json",
    "write_plot",
]
