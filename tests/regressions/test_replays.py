"""Every finding of docs/findings.md as a replay file: it reproduces on ``v4`` and not on ``hardened``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pkvm_smmu.hyp.contracts import HOST
from pkvm_smmu.verify.adversary import SystemSpec, build_system
from pkvm_smmu.verify.attacks import Outcome, run_script
from pkvm_smmu.verify.fuzz import Session
from pkvm_smmu.verify.replay import load_replay

HERE = Path(__file__).parent
REPLAYS = sorted(HERE.glob("*.json"))


def test_every_finding_has_a_replay() -> None:
    assert len(REPLAYS) >= 10


@pytest.mark.parametrize("path", REPLAYS, ids=lambda p: p.stem)
def test_replay_reproduces_on_v4_and_not_on_hardened(path: Path) -> None:
    replay = load_replay(path)
    assert replay.expected is not None and replay.system.policy == "v4"
    signature = replay.expected.signature
    if not replay.actions:  # present at boot
        v4 = Session(build_system(replay.system)).boot().findings
        assert signature in [f.signature for f in v4]
        assert Session(build_system(replace(replay.system, policy="hardened"))).boot().findings == []
        return
    v4_run = run_script(replay.system, replay.actions)
    assert signature in [f.signature for f in v4_run.findings]
    hardened = run_script(replace(replay.system, policy="hardened"), replay.actions)
    assert hardened.outcome is Outcome.BLOCKED, [str(f) for f in hardened.findings]


@pytest.mark.parametrize("policy", ["v4", "hardened"])
def test_mmio_return_of_a_ram_page(policy: str) -> None:
    """Finding 5: ``hyp_donate_host_mmio`` on hyp RAM hands the page to the host in v4 as posted;
    the hardened policy turns on the v5 checks (not MMIO: -EINVAL)."""
    system = build_system(SystemSpec(policy=policy))
    mp = system.mem_protect
    hyp_ram = next(pfn for pfn, _, owner in mp.non_host_owned_ranges() if not mp.is_mmio(pfn))
    ret = system.mem_protect.hyp_donate_host_mmio(hyp_ram)
    if policy == "v4":
        assert ret == 0 and system.mem_protect.owner_of(hyp_ram) == HOST
    else:
        assert ret < 0 and system.mem_protect.owner_of(hyp_ram) != HOST
