"""A Hypothesis state machine over the adversary's actions (needs the ``test`` extra).

``adversary_machine(spec)`` returns a ``RuleBasedStateMachine`` class: each example boots ``spec``,
then every step applies either an action with arbitrary arguments (``strategies.actions()``) or a
burst aimed at the live system (``ActionGenerator`` driven by a Hypothesis random), and checks the
isolation oracle (and the sanitizer, when the spec attaches it) after each action. A finding whose
class matches none of the ``allowed`` glob patterns (``fnmatch``: ``"violation:*"``) fails the
example, with the script so far as a replay file's JSON in the message. Use it with a settings
profile::

    Machine = adversary_machine(SystemSpec(policy="v4"), allowed=["violation:*", "observed:*"])
    run_state_machine_as_test(Machine, settings=BOUNDED)

``BOUNDED`` is the test run's profile (a few dozen short examples, derandomized so the run is the
same every time); ``SOAK`` is the long one.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from fnmatch import fnmatchcase

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from pkvm_smmu.verify.adversary import Action, ActionGenerator, SystemSpec, build_system, resolve_spec
from pkvm_smmu.verify.adversary.strategies import actions
from pkvm_smmu.verify.fuzz._findings import Finding
from pkvm_smmu.verify.fuzz._session import Session

BOUNDED = settings(
    max_examples=12,
    stateful_step_count=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
SOAK = settings(
    max_examples=400,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


class FindingError(AssertionError):
    """A state-machine step found something not allowed."""

    def __init__(self, finding: Finding, replay: dict[str, object]) -> None:
        self.finding = finding
        self.replay = replay
        super().__init__(
            f"{finding}\n" + "\n".join(finding.details[-20:]) + "\nreplay:\n" + json.dumps(replay)
        )


def adversary_machine(
    spec: SystemSpec, *, allowed: Collection[str] = (), hypercall_names: tuple[str, ...] | None = None
) -> type[RuleBasedStateMachine]:
    """The state machine class for ``spec``; findings whose class matches a pattern of ``allowed``
    pass, every other finding fails the example."""
    resolved = resolve_spec(spec)
    patterns = tuple(allowed)

    def known(signature: str) -> bool:
        return any(fnmatchcase(signature, pattern) for pattern in patterns)

    any_action = actions(hypercall_names) if hypercall_names is not None else actions()

    class AdversaryMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.system = build_system(resolved)
            self.session = Session(self.system)
            self.generator = ActionGenerator(self.system)
            self.script: list[Action] = []
            self._judge(self.session.boot().findings)

        def _judge(self, findings: list[Finding]) -> None:
            for finding in findings:
                if not known(finding.signature):
                    replay = {
                        "format": "pkvm-smmu-replay",
                        "version": 1,
                        "system": resolved.to_json(),
                        "actions": [a.to_json() for a in self.script],
                        "expected": finding.to_json(),
                        "origin": {"found_by": "hypothesis state machine"},
                    }
                    raise FindingError(finding, replay)

        def _apply(self, action: Action) -> None:
            self.script.append(action)
            self._judge(self.session.step(action).findings)

        @rule(action=any_action)
        def arbitrary(self, action: Action) -> None:
            self._apply(action)

        @rule(rng=st.randoms(use_true_random=False))
        def aimed(self, rng: object) -> None:
            self.generator.rng = rng
            for action in self.generator.next():
                self._apply(action)

        def teardown(self) -> None:
            self.system.close()

    AdversaryMachine.__name__ = AdversaryMachine.__qualname__ = f"AdversaryMachine_{resolved.policy}"
    return AdversaryMachine


__all__ = ["BOUNDED", "SOAK", "FindingError", "adversary_machine"]
