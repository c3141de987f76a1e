"""What hardened campaigns reported that was not a fault of the hyp (tests/verify/quiet): the
sanitizer judged two updates as one, a store nothing could fetch as an update step, or two
commands as one trap's double fetch; or the hyp handled a whole host queue in one trap. Each
replay is the campaign's shrunk sequence; under the hardened policy, with the sanitizer, it must
now run to the end with nothing found (the checks' teeth are tested on v4 in test_sanitizer.py
and tests/regressions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pkvm_smmu.verify.attacks import Outcome, run_script
from pkvm_smmu.verify.replay import load_replay

QUIET = sorted((Path(__file__).parent / "quiet").glob("*.json"))


def test_every_quiet_replay_says_why() -> None:
    assert len(QUIET) >= 7
    for path in QUIET:
        origin = json.loads(path.read_text())["origin"]
        assert origin["why_quiet"] and "pkvm-smmu fuzz --policy hardened" in origin["found_by"]


@pytest.mark.parametrize("path", QUIET, ids=lambda p: p.stem)
def test_hardened_campaign_sequences_are_quiet(path: Path) -> None:
    replay = load_replay(path)
    assert replay.system.policy == "hardened" and replay.system.sanitizer
    run = run_script(replay.system, replay.actions)
    assert run.outcome is Outcome.BLOCKED, [str(f) for f in run.findings]
