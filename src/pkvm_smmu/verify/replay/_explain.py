"""Running a replay and explaining it step by step: each action, what it did, what the hyp did
about it (its warnings, shadowed STEs, dropped commands, stage-2 faults), and for each finding the
stream, the physical range and its owner, and the registers, table entries and descriptors that
make the range reachable (the oracle's ``Violation.path``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pkvm_smmu.machine.memory import PAGE_SHIFT
from pkvm_smmu.trace import TraceEvent
from pkvm_smmu.verify.adversary import Action, System, build_system
from pkvm_smmu.verify.fuzz._findings import Finding
from pkvm_smmu.verify.fuzz._session import Session, StepOutcome
from pkvm_smmu.verify.oracle import ObservedViolation, Violation
from pkvm_smmu.verify.replay._format import Replay

MAX_EVENTS_PER_STEP = 12
_NOTABLE = {
    "warn",
    "ste.shadow",
    "cmd.drop",
    "cmd.rewrite",
    "stage2-fault",
    "share",
    "unshare",
    "hypercall",
    "strtab.l2",
    "ownership",
    "trap",
}


class _HypEvents:
    """A trace sink keeping only the hyp's notable events (a PROD write can make it see 10^5 commands)."""

    def __init__(self) -> None:
        self.events: list[TraceEvent] = []

    def __call__(self, event: TraceEvent) -> None:
        # The SMMU driver's own "trap" event names the register; pKVM's generic one is left out.
        generic_trap = event.component == "hyp" and event.kind == "trap"
        if event.kind in _NOTABLE and event.component.startswith("hyp") and not generic_trap:
            self.events.append(event)


@dataclass
class ExplainedStep:
    """One step of a replay (``index`` -1 is the boot)."""

    index: int
    action: Action | None
    result: str
    findings: list[Finding] = field(default_factory=list)
    explanations: list[list[str]] = field(default_factory=list)  # per finding
    hyp_events: list[str] = field(default_factory=list)


@dataclass
class ReplayRun:
    replay: Replay
    steps: list[ExplainedStep]
    reproduced: bool

    @property
    def findings(self) -> list[Finding]:
        return [f for step in self.steps for f in step.findings]


def _event_text(event: TraceEvent) -> str:
    fields = " ".join(f"{k}={_value(v)}" for k, v in event.fields.items() if k not in ("smmu",))
    return f"{event.component} {event.kind}: {fields}".rstrip(": ")


def _value(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return hex(value) if value >= 10 else str(value)
    return str(value)


def _summarise(events: list[TraceEvent]) -> list[str]:
    """The step's hyp events as lines; runs of ownership transitions become one line each."""
    lines: list[str] = []
    run: tuple[str, list[int]] | None = None

    def flush() -> None:
        if run is not None:
            name, pfns = run
            span = (
                f"pfn {pfns[0]:#x}"
                if len(pfns) == 1
                else f"{len(pfns)} times, pfn {min(pfns):#x}..{max(pfns):#x}"
            )
            lines.append(f"hyp ownership: {name} ({span})")

    for event in events:
        if event.kind == "ownership":
            name = str(event.fields.get("transition"))
            pfn = event.fields.get("pfn")
            pfn = pfn if isinstance(pfn, int) else 0
            if run is not None and run[0] == name:
                run[1].append(pfn)
                continue
            flush()
            run = (name, [pfn])
            continue
        flush()
        run = None
        lines.append(_event_text(event))
    flush()
    if len(lines) > MAX_EVENTS_PER_STEP:
        lines = [*lines[:MAX_EVENTS_PER_STEP], f"... and {len(lines) - MAX_EVENTS_PER_STEP} more hyp events"]
    return lines


def _owner_line(system: System, start: int) -> str:
    pfn = start >> PAGE_SHIFT
    mp = system.mem_protect
    owner = mp.owner_of(pfn)
    host = getattr(mp.host_state(pfn), "name", "?")
    hyp = getattr(mp.hyp_state(pfn), "name", "?")
    return f"page {pfn:#x} is owned by {owner} (host: {host}, hyp: {hyp})"


def explain(system: System, finding: Finding, evidence: Any) -> list[str]:
    """The lines that explain one finding, from what produced it."""
    if isinstance(evidence, Violation):
        end = evidence.start + evidence.size
        pages = (evidence.size + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
        lines = [
            f"{evidence.smmu}: {evidence.stream} can {evidence.access} [{evidence.start:#x}, {end:#x}) "
            f"({pages} page{'s' if pages != 1 else ''}) owned by {evidence.owner}",
            _owner_line(system, evidence.start),
            "reachable because:",
        ]
        lines.extend(f"  {index}. {step}" for index, step in enumerate(evidence.path, 1))
        return lines
    if isinstance(evidence, ObservedViolation):
        return [str(evidence), _owner_line(system, evidence.address)]
    if isinstance(evidence, BaseException):
        return list(finding.details[-16:])
    return [finding.summary, *finding.details]


def run_replay(replay: Replay) -> ReplayRun:
    """Boot the replay's system, run its actions, and explain every step. The expected finding
    reproduces when a finding of its class appears (for a replay that expects nothing: when any
    finding appears after boot)."""
    system = build_system(replay.system)
    recorder = system.trace.attach(_HypEvents())
    session = Session(system)
    steps: list[ExplainedStep] = []
    try:
        steps.append(_explained(system, -1, None, session.boot(), recorder))
        for index, action in enumerate(replay.actions):
            steps.append(_explained(system, index, action, session.step(action), recorder))
    finally:
        system.trace.detach(recorder)
        system.close()
    if replay.expected is not None:
        signature = replay.expected.signature
        reproduced = any(f.signature == signature for step in steps for f in step.findings)
    else:
        reproduced = any(step.findings for step in steps[1:])
    return ReplayRun(replay, steps, reproduced)


def _explained(
    system: System, index: int, action: Action | None, outcome: StepOutcome, recorder: _HypEvents
) -> ExplainedStep:
    events, recorder.events = recorder.events, []
    lines = _summarise(events)
    step = ExplainedStep(index, action, outcome.result, list(outcome.findings), hyp_events=lines)
    step.explanations = [
        explain(system, f, e) for f, e in zip(outcome.findings, outcome.evidence, strict=True)
    ]
    return step


__all__ = ["ExplainedStep", "ReplayRun", "explain", "run_replay"]
