"""Running the catalogue: each attack's script on a fresh system of the policy, the watchers after
every step (oracle, observed accesses, the sanitizer when the attack asks for it, the hyp-load
watcher), and the attack's outcome from what appeared after boot."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pkvm_smmu.verify.adversary import Action, System, SystemSpec, build_system
from pkvm_smmu.verify.attacks._catalogue import ATTACKS, Attack, Outcome
from pkvm_smmu.verify.attacks._hyp_loads import HypLoadWatcher
from pkvm_smmu.verify.fuzz import Finding, Session

_OUTCOME_OF_KIND = {
    "violation": Outcome.VIOLATION,
    "observed": Outcome.VIOLATION,
    "sanitizer": Outcome.SANITIZER,
    "crash": Outcome.CRASH,
    "hang": Outcome.CRASH,
    "stall": Outcome.STALL,
}
_PRIORITY = (Outcome.CRASH, Outcome.VIOLATION, Outcome.SANITIZER, Outcome.STALL)


@dataclass
class ScriptRun:
    """One script's run: each action's result and the findings that appeared after boot."""

    actions: list[Action]
    results: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def outcome(self) -> Outcome:
        seen = {_OUTCOME_OF_KIND[f.kind] for f in self.findings}
        return next((o for o in _PRIORITY if o in seen), Outcome.BLOCKED)


def run_script(
    spec: SystemSpec, actions: Sequence[Action] | None = None, attack: Attack | None = None
) -> ScriptRun:
    """Boot ``spec``, run ``actions`` (or ``attack``'s script, built on this system), and collect
    the findings made after boot, the hyp's loads of memory it was not given included.

    On POSIX the system is booted once per spec and each run happens in a forked child of that
    template (booting is the expensive part); the answer is the same either way."""
    if not hasattr(os, "fork"):
        return _run_on(build_system(spec), actions, attack)
    template = _TEMPLATES.get(spec)
    if template is None:
        template = _TEMPLATES[spec] = build_system(spec)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run on the template, send the result, exit at once
        code = 0
        try:
            os.close(read_fd)
            try:
                payload: object = _run_on(template, actions, attack)
            except Exception as exc:  # reported to the parent, which raises it
                payload = RuntimeError(f"{type(exc).__name__}: {exc}")
            data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
            view = memoryview(data)
            while view:
                view = view[os.write(write_fd, view) :]
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        while chunk := pipe.read(1 << 16):
            chunks.append(chunk)
    os.waitpid(pid, 0)
    if not chunks:
        raise RuntimeError("the attack's process died without a result")
    result = pickle.loads(b"".join(chunks))
    if isinstance(result, Exception):
        raise result
    assert isinstance(result, ScriptRun)
    return result


_TEMPLATES: dict[SystemSpec, System] = {}


def _run_on(system: System, actions: Sequence[Action] | None, attack: Attack | None) -> ScriptRun:
    watcher = HypLoadWatcher(system.machine.bus, system.mem_protect)
    try:
        script = list(actions) if actions is not None else _script(system, attack)
        run = ScriptRun(script)
        session = Session(system)
        session.boot()
        watcher.take()
        for index, action in enumerate(script):
            outcome = session.step(action)
            run.results.append(outcome.result)
            run.findings.extend(outcome.findings)
            for load in watcher.take():
                if load.signature not in session.seen:
                    session.seen.add(load.signature)
                    run.findings.append(Finding("observed", load.signature, index, str(load)))
        return run
    finally:
        watcher.close()
        system.close()


def _script(system: System, attack: Attack | None) -> list[Action]:
    if attack is None:
        raise ValueError("run_script needs actions or an attack")
    return attack.actions(system)


@dataclass
class AttackResult:
    attack: Attack
    policy: str
    run: ScriptRun

    @property
    def outcome(self) -> Outcome:
        return self.run.outcome

    @property
    def expected(self) -> Outcome | None:
        return self.attack.expected.get(self.policy)

    @property
    def as_expected(self) -> bool:
        return self.expected is None or self.outcome == self.expected


def attack_spec(attack: Attack, policy: str) -> SystemSpec:
    return SystemSpec(design="trap-emulate", policy=policy, sanitizer=attack.sanitizer)


def run_attack(attack: Attack, policy: str) -> AttackResult:
    return AttackResult(attack, policy, run_script(attack_spec(attack, policy), attack=attack))


def find_attack(name: str) -> Attack:
    """The attack called ``name``; ``KeyError`` listing the known ones otherwise."""
    for attack in ATTACKS:
        if attack.name == name:
            return attack
    raise KeyError(f"unknown attack {name!r}; known: {', '.join(a.name for a in ATTACKS)}")


def run_attacks(policy: str, names: Iterable[str] | None = None) -> list[AttackResult]:
    attacks = [find_attack(name) for name in names] if names else list(ATTACKS)
    return [run_attack(attack, policy) for attack in attacks]


__all__ = [
    "AttackResult",
    "ScriptRun",
    "attack_spec",
    "find_attack",
    "run_attack",
    "run_attacks",
    "run_script",
]
