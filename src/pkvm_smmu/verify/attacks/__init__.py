"""The attack catalogue: named scripts of the adversary's actions, one per attack class a careful
reviewer of the trap-and-emulate design would try, each with the outcome expected under every
policy (``pkvm-smmu attacks``).

Typical use::

    for result in run_attacks("hardened"):
        assert result.as_expected, (result.attack.name, result.outcome)
"""

from pkvm_smmu.verify.attacks._catalogue import ATTACKS, Attack, Outcome
from pkvm_smmu.verify.attacks._hyp_loads import HypLoad, HypLoadWatcher
from pkvm_smmu.verify.attacks._run import (
    AttackResult,
    ScriptRun,
    attack_spec,
    find_attack,
    run_attack,
    run_attacks,
    run_script,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackResult",
    "HypLoad",
    "HypLoadWatcher",
    "Outcome",
    "ScriptRun",
    "attack_spec",
    "find_attack",
    "run_attack",
    "run_attacks",
    "run_script",
]
