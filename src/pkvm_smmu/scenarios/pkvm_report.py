"""What a run under pKVM adds to the report, derived from the trace bus only.

``PkvmCollector`` is a sink: attach it before the run. It keeps what the hyp, the host's KVM half,
the isolation oracle and the guest-donation workload report: traps by register, the command filter's
verdicts by opcode, how STEs were shadowed, the IOMMU pool and the identity stage-2, every ownership
change with the identity-map updates and invalidations it caused, pKVM's boot steps, the isolation
check after each initcall, the endpoints that probed without IOMMU ops, and the donation checks.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from pkvm_smmu.scenarios.isolation import IsolationCheck
from pkvm_smmu.scenarios.report import RunReport
from pkvm_smmu.trace import TraceEvent

WORKLOAD = "scenario.pkvm"
_HYP_COMPONENTS = ("hyp", "hyp.iommu", "hyp.smmuv3")
_INVALIDATION_OPCODES = ("TLBI_S2_IPA", "TLBI_NH_ALL", "SYNC")


@dataclass(frozen=True)
class TrapRow:
    smmu: str
    reg: str
    access: str  # how the policy handles it: pass, read-only, emulate, drop
    reads: int
    writes: int


@dataclass(frozen=True)
class FilterRow:
    """One opcode through the hyp's command filter."""

    opcode: str
    seen: int  # host commands copied out of the host's queue
    passed: int  # placed in the shadow queue unchanged
    rewritten: int
    dropped: int
    hyp: int  # the hyp's own commands with this opcode (take-over, STE shadowing, TLB maintenance)


@dataclass(frozen=True)
class OwnershipRow:
    """Page-ownership transitions of one kind, and what they cost the identity stage-2."""

    transition: str
    calls: int
    pages: int
    errors: int
    idmap_unmapped: int  # bytes unmapped from the identity stage-2
    idmap_mapped: int  # bytes mapped again
    invalidations: int  # identity-map invalidations (each a TLBI_S2_IPA range + SYNC, TLBI_NH_ALL + SYNC)
    tlbi_commands: int  # TLBI_S2_IPA / TLBI_NH_ALL / CMD_SYNC the hyp issued for them


@dataclass(frozen=True)
class IdmapStats:
    pages: int  # table pages of the identity stage-2 at build
    entries: int  # leaf entries at build
    bytes: int  # bytes mapped at build
    maps: int  # updates after build
    unmaps: int
    invalidations: int


@dataclass(frozen=True)
class DmaCheck:
    """One device's DMA to one page of the donation workload."""

    step: str
    page: int
    owner: str  # who owns the page at this step
    device: str
    iova: int
    cached: bool  # the SMMU held a translation for the IOVA before the access
    read: bool  # the read completed
    write: bool  # the write completed
    expected: bool  # reachable is what isolation requires here
    remapped: bool  # the identity stage-2 mapped the page again since the previous check on it
    leaked: bool = False  # a completed read returned what the guest or hyp wrote

    @property
    def reachable(self) -> bool:
        return self.read or self.write

    @property
    def ok(self) -> bool:
        if self.expected:
            return self.read and self.write and not self.leaked
        return not self.read and not self.write


@dataclass(frozen=True)
class PkvmStatus:
    state: str  # protected, off, failed
    failure: str  # the step that failed and its error
    carveout_base: int | None
    carveout_pages: int
    iommu_pool_pages: int  # reserved for the IOMMU pool
    pool_pages_used: int  # in use at the end of the run


@dataclass(frozen=True)
class PkvmRunReport(RunReport):
    pkvm: PkvmStatus | None = None
    isolation: tuple[IsolationCheck, ...] = ()
    without_iommu_ops: tuple[str, ...] = ()  # endpoints bound although their IOMMU probe did not succeed
    traps: tuple[TrapRow, ...] = ()
    filter: tuple[FilterRow, ...] = ()
    stes: tuple[tuple[str, int], ...] = ()  # how -> count
    idmap: IdmapStats | None = None
    ownership: tuple[OwnershipRow, ...] = ()
    donation: tuple[DmaCheck, ...] = ()
    hypercalls: tuple[tuple[str, int, int], ...] = ()  # name, calls, errors
    hyp_warnings: tuple[str, ...] = ()
    spawned: tuple[str, ...] = ()  # devices the pKVM driver created for arm-smmu-v3 (aux, child)
    iommu_probe_failures: tuple[str, ...] = ()  # arm_smmu_probe_device refusals, with the lookup's answer


@dataclass
class _Ownership:
    calls: int = 0
    pages: int = 0
    errors: int = 0
    unmapped: int = 0
    mapped: int = 0
    invalidations: int = 0
    tlbi: int = 0


@dataclass
class PkvmCollector:
    """The trace sink behind ``PkvmRunReport``."""

    traps: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    verdicts: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    stes: Counter[str] = field(default_factory=Counter)
    pool_in_use: int = 0
    idmap_build: dict[str, int] = field(default_factory=dict)
    idmap_updates: Counter[str] = field(default_factory=Counter)
    ownership: dict[str, _Ownership] = field(default_factory=dict)
    init_steps: list[dict[str, Any]] = field(default_factory=list)
    isolation: list[IsolationCheck] = field(default_factory=list)
    hypercalls: Counter[tuple[str, bool]] = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)
    spawned: list[str] = field(default_factory=list)
    donation: list[DmaCheck] = field(default_factory=list)
    _pending: _Ownership = field(default_factory=_Ownership)
    _iommu_state: dict[str, str] = field(default_factory=dict)  # device -> ok / failed
    _bound_without: list[str] = field(default_factory=list)
    _maps: list[tuple[int, int, int]] = field(default_factory=list)  # idmap.map: start, end, seq
    _last_check: dict[tuple[int, str], int] = field(default_factory=dict)  # (page, device) -> seq
    _bound_to: dict[str, str] = field(default_factory=dict)  # device -> driver
    _lookup: dict[str, Any] = field(default_factory=dict)  # the last fwnode lookup
    probe_device_failures: list[tuple[str, str]] = field(default_factory=list)  # device, why

    def __call__(self, event: TraceEvent) -> None:
        component, kind, f = event.component, event.kind, event.fields
        if component == "hyp.smmuv3":
            if kind == "trap":
                key = (str(f.get("smmu")), str(f.get("reg")), str(f.get("access")), str(f.get("direction")))
                self.traps[key] += 1
            elif kind.startswith("cmd."):
                action = kind[4:]
                self.verdicts[str(f.get("opcode"))][action] += 1
                # Commands after an identity-map invalidation began, up to the ownership change.
                if (
                    action == "hyp"
                    and self._pending.invalidations
                    and f.get("opcode") in _INVALIDATION_OPCODES
                ):
                    self._pending.tlbi += 1
            elif kind == "ste.shadow":
                self.stes[str(f.get("how"))] += 1
        elif component == "hyp.iommu":
            if kind in ("pool.alloc", "pool.free"):
                self.pool_in_use = int(f.get("in_use", self.pool_in_use))
            elif kind == "idmap.build":
                self.idmap_build = {k: int(f.get(k, 0)) for k in ("pages", "entries", "bytes")}
            elif kind == "idmap.unmap":
                self.idmap_updates["unmap"] += 1
                self._pending.unmapped += int(f.get("unmapped", 0))
            elif kind == "idmap.map":
                self.idmap_updates["map"] += 1
                self._pending.mapped += int(f.get("size", 0))
                start = int(f.get("start", 0))
                self._maps.append((start, start + int(f.get("size", 0)), event.seq))
            elif kind == "idmap.invalidate":
                self.idmap_updates["invalidate"] += 1
                self._pending.invalidations += 1
        elif component == "hyp":
            if kind == "ownership":
                self._ownership(f)
            elif kind == "init":
                self.init_steps.append(dict(f))
            elif kind == "hypercall":
                self.hypercalls[(str(f.get("name")), int(f.get("result", 0)) < 0)] += 1
        elif component == "isolation" and kind == "check":
            self.isolation.append(IsolationCheck.from_event(event))
        elif component == "host.kvm" and kind == "spawn":
            self.spawned.append(f"{f.get('device')} ({f.get('how')} of {f.get('parent')})")
        elif component == "host.iommu":
            self._iommu_event(kind, f)
        elif component == "driver_core" and kind == "bind":
            device = str(f.get("device"))
            self._bound_to[device] = str(f.get("driver"))
            if self._iommu_state.get(device) == "failed":
                self._bound_without.append(device)
        elif component == "driver_core" and kind == "lookup":
            self._lookup = dict(f)
        elif component.startswith("arm-smmu-v3.") and kind == "probe_device" and int(f.get("result", 0)):
            self._probe_device_failed(f)
        elif component == WORKLOAD and kind == "dma.check":
            self._dma_check(event)
        if kind == "warn" and component in _HYP_COMPONENTS:
            self.warnings.append(f"{component}: {f.get('message')}")

    def _ownership(self, f: dict[str, Any]) -> None:
        row = self.ownership.setdefault(str(f.get("transition")), _Ownership())
        pending = self._pending
        row.calls += 1
        row.pages += int(f.get("nr_pages") or 0)
        row.errors += int(int(f.get("result", 0)) != 0)
        row.unmapped += pending.unmapped
        row.mapped += pending.mapped
        row.invalidations += pending.invalidations
        row.tlbi += pending.tlbi
        self._pending = _Ownership()

    def _iommu_event(self, kind: str, f: dict[str, Any]) -> None:
        device = str(f.get("dev"))
        if kind == "probe":
            self._iommu_state[device] = "ok" if f.get("result") == 0 else "failed"
        elif kind == "warn" and self._iommu_state.get(device) != "ok":
            self._iommu_state[device] = "failed"

    def _probe_device_failed(self, f: dict[str, Any]) -> None:
        device = str(f.get("dev"))
        text = f"{device}: arm_smmu_probe_device {f.get('result')}"
        look = self._lookup
        if look:
            found = look.get("found")
            bound = self._bound_to.get(str(found), "no driver") if found else None
            where = (
                f"; {look.get('candidates')} devices have the fwnode"
                if look.get("fn", "").startswith("bus")
                else ""
            )
            text += f": {look.get('fn')}({look.get('fwnode')}) found {found} (bound to {bound}{where})"
        self.probe_device_failures.append((device, text))

    def _dma_check(self, event: TraceEvent) -> None:
        f = event.fields
        page, device = int(f["page"]), str(f["device"])
        previous = self._last_check.get((page, device), -1)
        remapped = any(start <= page < end and previous < seq for start, end, seq in self._maps)
        self._last_check[(page, device)] = event.seq
        self.donation.append(
            DmaCheck(
                str(f["step"]),
                page,
                str(f["owner"]),
                str(f["device"]),
                int(f["iova"]),
                bool(f["cached"]),
                bool(f["read"]),
                bool(f["write"]),
                bool(f["expected"]),
                remapped,
                bool(f.get("leaked", False)),
            )
        )

    # -- the report ------------------------------------------------------------------------------------
    @property
    def without_iommu_ops(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self._bound_without))

    def status(self) -> PkvmStatus | None:
        steps = self.init_steps
        if not steps:
            return None
        failed = next((s for s in steps if int(s.get("result", 0)) < 0), None)
        reserve = next((s for s in steps if s.get("step") == "kvm_hyp_reserve"), {})
        finalised = any(s.get("step") == "host_stage2_installed" for s in steps)
        state = "failed" if failed else "protected" if finalised else "initialising"
        failure = f"{failed.get('step')}: {failed.get('result')}" if failed else ""
        return PkvmStatus(
            state,
            failure,
            reserve.get("base"),
            int(reserve.get("pages", 0)),
            int(reserve.get("iommu_pages", 0)),
            self.pool_in_use,
        )

    def traps_rows(self) -> tuple[TrapRow, ...]:
        merged: dict[tuple[str, str, str], list[int]] = {}
        for (smmu, reg, access, direction), count in self.traps.items():
            counts = merged.setdefault((smmu, reg, access), [0, 0])
            counts[direction == "write"] += count
        rows = [TrapRow(s, r, a, c[0], c[1]) for (s, r, a), c in merged.items()]
        return tuple(sorted(rows, key=lambda r: (r.smmu, -(r.reads + r.writes), r.reg)))

    def filter_rows(self) -> tuple[FilterRow, ...]:
        rows = [
            FilterRow(op, c["seen"], c["pass"], c["rewrite"], c["drop"], c["hyp"])
            for op, c in self.verdicts.items()
        ]
        return tuple(sorted(rows, key=lambda r: (-(r.seen + r.hyp), r.opcode)))

    def ownership_rows(self) -> tuple[OwnershipRow, ...]:
        return tuple(
            OwnershipRow(name, o.calls, o.pages, o.errors, o.unmapped, o.mapped, o.invalidations, o.tlbi)
            for name, o in self.ownership.items()
        )

    def idmap_stats(self) -> IdmapStats | None:
        if not self.idmap_build:
            return None
        b, u = self.idmap_build, self.idmap_updates
        return IdmapStats(b["pages"], b["entries"], b["bytes"], u["map"], u["unmap"], u["invalidate"])

    def probe_refusals(self) -> tuple[str, ...]:
        """``arm_smmu_probe_device`` refusals, each marked when a later IOMMU probe of the device
        succeeded (the refusal happened while the SMMU itself was still registering)."""
        later = "; a later probe succeeded"
        return tuple(
            text + (later if self._iommu_state.get(device) == "ok" else "")
            for device, text in dict.fromkeys(self.probe_device_failures)
        )

    def hypercall_rows(self) -> tuple[tuple[str, int, int], ...]:
        names = dict.fromkeys(name for name, _ in self.hypercalls)
        return tuple(
            (n, self.hypercalls[(n, False)] + self.hypercalls[(n, True)], self.hypercalls[(n, True)])
            for n in names
        )


def build_pkvm_report(
    base: RunReport, collector: PkvmCollector, *, pkvm_up: bool, failure_expected: bool = False
) -> PkvmRunReport:
    """``base`` (the native report's parts) plus what ``collector`` saw. Isolation is a problem
    wherever it was promised; the donation checks only when pKVM was up; pKVM failing only when the
    run did not ask for it."""
    problems = list(base.problems)
    status = collector.status()
    if status is not None and status.state == "failed" and not failure_expected:
        problems.append(f"pKVM failed to initialise ({status.failure})")
    for check in collector.isolation:
        if check.protected:
            problems += [f"isolation after {check.after}: {v}" for v in check.violations]
    if pkvm_up:
        for dma in collector.donation:
            if not dma.ok:
                what = "reached" if dma.reachable else "could not reach"
                problems.append(f"{dma.device} {what} page {dma.page:#x} ({dma.owner}) at step '{dma.step}'")
    for device in collector.without_iommu_ops:
        problems.append(f"{device}: probed without IOMMU ops")
    final = {step.device: step for step in base.probes}
    for device, step in final.items():
        if step.result in ("rejected", "failed") and step.stage == "dma_configure":
            problems.append(
                f"{device}: probe failed in dma_configure ({step.reason}): not added to its IOMMU"
            )
    fields = {name: getattr(base, name) for name in RunReport.__dataclass_fields__}
    fields["problems"] = tuple(dict.fromkeys(problems))
    return PkvmRunReport(
        **fields,
        pkvm=status,
        isolation=tuple(collector.isolation),
        without_iommu_ops=collector.without_iommu_ops,
        traps=collector.traps_rows(),
        filter=collector.filter_rows(),
        stes=tuple(sorted(collector.stes.items())),
        idmap=collector.idmap_stats(),
        ownership=collector.ownership_rows(),
        donation=tuple(collector.donation),
        hypercalls=collector.hypercall_rows(),
        hyp_warnings=tuple(collector.warnings),
        spawned=tuple(collector.spawned),
        iommu_probe_failures=collector.probe_refusals(),
    )


__all__ = [
    "WORKLOAD",
    "DmaCheck",
    "FilterRow",
    "IdmapStats",
    "OwnershipRow",
    "PkvmCollector",
    "PkvmRunReport",
    "PkvmStatus",
    "TrapRow",
    "build_pkvm_report",
]
