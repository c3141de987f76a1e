"""Shrinking a finding to a minimal script: delta debugging over the actions, then simpler arguments.

``shrink(runner, actions, finding)`` keeps only the actions up to the finding's step, removes
chunks of them (Zeller's ddmin, then one action at a time until no single action can go), then
tries each remaining action's ``simpler()`` variants; every candidate is run on a fresh system and
kept only if it still produces a finding of the same class (``signature``). A budget of runs and
of seconds bounds the work; what is left when it runs out still reproduces.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from pkvm_smmu.verify.adversary import Action
from pkvm_smmu.verify.fuzz._findings import BOOT, Finding
from pkvm_smmu.verify.fuzz._runner import Runner

DEFAULT_MAX_RUNS = 300
DEFAULT_MAX_SECONDS = 300.0


@dataclass
class Shrunk:
    """The minimal script, the finding it reproduces (at its new step), and what it took."""

    actions: list[Action]
    finding: Finding
    original_length: int
    runs: int
    exhausted: bool  # the budget ran out before the script was 1-minimal


class _Oracle:
    def __init__(self, runner: Runner, signature: str, max_runs: int, max_seconds: float) -> None:
        self.runner = runner
        self.signature = signature
        self.max_runs = max_runs
        self.deadline = time.monotonic() + max_seconds
        self.runs = 0
        self.cache: dict[tuple[Action, ...], Finding | None] = {}

    @property
    def exhausted(self) -> bool:
        return self.runs >= self.max_runs or time.monotonic() >= self.deadline

    def __call__(self, actions: Sequence[Action], *, force: bool = False) -> Finding | None:
        key = tuple(actions)
        if key in self.cache:
            return self.cache[key]
        if self.exhausted and not force:
            return None
        self.runs += 1
        outcome = self.runner.run_actions(actions, stop_at=self.signature)
        found = None if outcome.hung else outcome.first(self.signature)
        self.cache[key] = found
        return found


def _ddmin(test: _Oracle, actions: list[Action]) -> list[Action]:
    n = 2
    while len(actions) >= 2 and not test.exhausted:
        size = -(-len(actions) // n)
        chunks = [actions[i : i + size] for i in range(0, len(actions), size)]
        reduced = False
        for index in range(len(chunks)):  # the complements first: they remove the most
            rest = [a for j, chunk in enumerate(chunks) if j != index for a in chunk]
            if test(rest) is not None:
                actions, n, reduced = rest, max(n - 1, 2), True
                break
        if not reduced:
            for chunk in chunks:
                if len(chunk) < len(actions) and test(chunk) is not None:
                    actions, n, reduced = chunk, 2, True
                    break
        if not reduced:
            if n >= len(actions):
                break
            n = min(len(actions), 2 * n)
    return actions


def _one_by_one(test: _Oracle, actions: list[Action]) -> list[Action]:
    changed = True
    while changed and not test.exhausted:
        changed = False
        for index in range(len(actions) - 1, -1, -1):
            candidate = actions[:index] + actions[index + 1 :]
            if test(candidate) is not None:
                actions, changed = candidate, True
    return actions


def _simplify(test: _Oracle, actions: list[Action]) -> list[Action]:
    for index in range(len(actions)):
        progress = True
        while progress and not test.exhausted:
            progress = False
            for simpler in actions[index].simpler():
                candidate = [*actions[:index], simpler, *actions[index + 1 :]]
                if test(candidate) is not None:
                    actions, progress = candidate, True
                    break
    return actions


def shrink(
    runner: Runner,
    actions: Sequence[Action],
    finding: Finding,
    *,
    max_runs: int = DEFAULT_MAX_RUNS,
    max_seconds: float = DEFAULT_MAX_SECONDS,
) -> Shrunk:
    """The shortest, simplest script found that still produces a finding of ``finding``'s class.
    A finding present at boot shrinks to no actions; a hang is only cut after its step (each
    attempt would cost the runner's whole step timeout)."""
    original = len(actions)
    if finding.step == BOOT:
        return Shrunk([], finding, original, 0, False)
    prefix = list(actions[: finding.step + 1])
    if finding.kind == "hang":
        return Shrunk(prefix, finding, original, 0, True)
    test = _Oracle(runner, finding.signature, max_runs, max_seconds)
    found = test(prefix)
    if found is None:  # does not reproduce on its own (should not happen: runs are deterministic)
        return Shrunk(prefix, finding, original, test.runs, True)
    current = _ddmin(test, prefix)
    current = _one_by_one(test, current)
    current = _simplify(test, current)
    final = test(current, force=True)
    return Shrunk(current, final or found, original, test.runs, test.exhausted)


__all__ = ["DEFAULT_MAX_RUNS", "DEFAULT_MAX_SECONDS", "Shrunk", "shrink"]
