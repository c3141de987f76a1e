"""``Session``: one system, actions applied one at a time, and what the watchers saw after each,
turned into findings (each class once per session)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pkvm_smmu.verify.adversary import Action, Checked, RegWrite, System, apply
from pkvm_smmu.verify.fuzz._findings import (
    BOOT,
    STALL_NS,
    Finding,
    from_exception,
    from_observed,
    from_sanitizer,
    from_violation,
    is_trusted_exception,
    stall,
    violation_signature,
)


@dataclass
class StepOutcome:
    """One step: what the action did (``result``), the new findings and, for each, what it came
    from (a ``Violation``, an ``ObservedViolation``, a sanitizer report or an exception)."""

    result: str
    findings: list[Finding] = field(default_factory=list)
    evidence: list[Any] = field(default_factory=list)


class Session:
    """Steps ``system`` through actions. ``apply`` raising through the model, the hyp or a checker is
    a crash finding and the session goes on; an exception from the host kernel's own code is the
    step's result ("host error") and not a finding."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.seen: set[str] = set()
        self.steps = 0
        self._classes: dict[tuple[str, str, tuple[str, ...]], str] = {}  # (actor, owner, path) -> class
        self.host_registers: set[int] = set()  # SMMU register addresses the host has written

    def boot(self) -> StepOutcome:
        """What is wrong before any action."""
        outcome = StepOutcome("booted")
        self._check(BOOT, outcome)
        return outcome

    def step(self, action: Action) -> StepOutcome:
        index = self.steps
        self.steps += 1
        started = self.system.clock_ns
        if isinstance(action, RegWrite) and self.system.smmus:
            base = self.system.smmus[action.smmu % len(self.system.smmus)].base
            self.host_registers.add((base + action.offset) & ~7)
            self.host_registers.add(base + action.offset)
        try:
            outcome = StepOutcome(apply(self.system, action))
        except Exception as exc:  # the point of the runner: nothing may escape from the model or hyp
            if is_trusted_exception(exc):
                outcome = StepOutcome(f"crash: {type(exc).__name__}: {exc}")
                self._add(outcome, from_exception(exc, index, "applying the action"), exc)
            else:
                outcome = StepOutcome(f"host error: {type(exc).__name__}: {exc}")
        took = self.system.clock_ns - started
        if took > STALL_NS:
            self._add(outcome, stall(index, action.KIND, took), took)
        self._check(index, outcome)
        return outcome

    # -- findings ------------------------------------------------------------------------------------------
    def _add(self, outcome: StepOutcome, finding: Finding | None, evidence: Any) -> None:
        if finding is None or finding.signature in self.seen:
            return
        self.seen.add(finding.signature)
        outcome.findings.append(finding)
        outcome.evidence.append(evidence)

    def _check(self, index: int, outcome: StepOutcome) -> None:
        try:
            checked: Checked = self.system.check()
        except Exception as exc:
            self._add(outcome, from_exception(exc, index, "checking isolation"), exc)
            return
        classes = self._classes
        for violation in checked.violations:
            key = (violation.actor, violation.owner, violation.path)
            signature = classes.get(key)
            if signature is None:
                signature = classes[key] = violation_signature(violation)
            if signature not in self.seen:
                self._add(outcome, from_violation(violation, index), violation)
        for observed in checked.observed:
            self._add(outcome, from_observed(observed, index), observed)
        for report in checked.sanitizer:
            self._add(outcome, from_sanitizer(report, index, self.host_registers), report)


__all__ = ["Session", "StepOutcome"]
