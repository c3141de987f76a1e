"""Replay files: written and read back, every kind of corruption a clear error naming the file,
and a replay re-run deterministically and explained step by step."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pkvm_smmu.arch.registers import Reg
from pkvm_smmu.verify.adversary import Advance, Dma, RegWrite, SystemSpec
from pkvm_smmu.verify.fuzz import Finding
from pkvm_smmu.verify.replay import Replay, ReplayError, load_replay, run_replay, save_replay

sys.path.insert(0, os.path.dirname(__file__))
from planted import planted

GBPA_BYPASS = [RegWrite(0, int(Reg.GBPA), 4, 0x8000_0000), RegWrite(0, int(Reg.CR0), 4, 0x1C), Advance(1000)]
EXPECTED = Finding("violation", "violation:device:hyp:gbpa-bypass", 1, "every StreamID reaches hyp memory")


@pytest.fixture(autouse=True, scope="module")
def _planted() -> Iterator[None]:
    with planted():
        yield


def test_a_replay_survives_a_round_trip(tmp_path: Path) -> None:
    replay = Replay(
        SystemSpec(policy="planted-gbpa"), [*GBPA_BYPASS, Dma(0, 8, 3, 0x1000, 8, True)], EXPECTED
    )
    replay.origin = {"episode": 3}
    save_replay(tmp_path / "r.json", replay)
    loaded = load_replay(tmp_path / "r.json")
    assert (loaded.system, loaded.actions, loaded.expected, loaded.origin) == (
        replay.system, replay.actions, replay.expected, replay.origin,
    )  # fmt: skip
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically


def _valid() -> dict[str, object]:
    return Replay(SystemSpec(), GBPA_BYPASS, EXPECTED).to_json()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{\n  "format": "pkvm-smmu-replay",\n  "version": 1,\n  oops\n}', "bad JSON at line 4 column 3"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"format": "chrome-trace"}', "not a replay file (format is 'chrome-trace'"),
        ({**_valid(), "version": 99}, "unsupported replay version 99 (this pkvm-smmu reads version 1)"),
        ({**_valid(), "system": {"design": "trap-emulate", "colour": "red"}}, "system.colour: unknown field"),
        ({**_valid(), "system": {"seed": "zero"}}, "system.seed: expected an integer"),
        ({**_valid(), "actions": {"kind": "dma"}}, "actions: expected a list of actions"),
        ({**_valid(), "actions": [{"kind": "dma"}, {"kind": "teleport"}]},
         "actions[1]: kind: unknown action 'teleport'"),
        ({**_valid(), "actions": [{"kind": "reg-write", "size": "four"}]},
         "actions[0]: size: expected an integer"),
        ({**_valid(), "expected": {"kind": "rumour", "signature": "x", "step": 0, "summary": ""}},
         "expected: kind: unknown finding kind"),
        ({**_valid(), "expected": {"kind": "violation"}}, "expected: signature: expected str"),
    ],
)  # fmt: skip
def test_a_corrupt_replay_file_says_what_is_wrong(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ReplayError) as caught:
        load_replay(path)
    assert caught.value.path == str(path)
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"{path}: ")


def test_unreadable_replay_files(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="cannot read"):
        load_replay(tmp_path / "missing.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ReplayError, match="not UTF-8"):
        load_replay(tmp_path / "binary.json")


def test_a_replay_reproduces_and_explains_each_step() -> None:
    run = run_replay(Replay(SystemSpec(policy="planted-gbpa"), GBPA_BYPASS, EXPECTED))
    assert run.reproduced
    boot, gbpa, cr0, _ = run.steps
    assert boot.index == -1 and boot.action is None
    assert gbpa.result == "done" and any("reg=GBPA" in line for line in gbpa.hyp_events)
    [finding] = [f for f in cr0.findings if f.signature == EXPECTED.signature]
    text = "\n".join(cr0.explanations[cr0.findings.index(finding)])
    assert "every StreamID can read/write" in text and "owned by hyp" in text
    assert "page 0x" in text and "(host: NOPAGE, hyp: OWNED)" in text
    assert "SMMU_GBPA=" in text and "ABORT=0, so it bypasses" in text
    assert [s.index for s in run.steps] == [-1, 0, 1, 2]


def test_a_replay_that_does_not_reproduce() -> None:
    assert not run_replay(Replay(SystemSpec(policy="v4"), GBPA_BYPASS, EXPECTED)).reproduced
    # With nothing expected, any finding after boot counts (the boot-time one does not).
    assert not run_replay(Replay(SystemSpec(policy="v4"), [Advance(10)], None)).reproduced
    assert run_replay(Replay(SystemSpec(policy="planted-gbpa"), GBPA_BYPASS, None)).reproduced


def test_replays_are_deterministic() -> None:
    replay = Replay(
        SystemSpec(policy="planted-gbpa"), [*GBPA_BYPASS, Dma(0, 0x18, None, 0x4000_0000, 8, True)], None
    )
    first, second = run_replay(replay), run_replay(replay)
    assert [(s.result, s.findings, s.explanations) for s in first.steps] == [
        (s.result, s.findings, s.explanations) for s in second.steps
    ]


# -- the campaigns' findings (tests/regressions/*.json found by ``pkvm-smmu fuzz``) ----------------------

REGRESSIONS = Path(__file__).resolve().parents[1] / "regressions"
CAMPAIGN = sorted(
    path
    for path in REGRESSIONS.glob("*.json")
    if "pkvm-smmu fuzz" in (load_replay(path).origin or {}).get("found_by", "")
)


@pytest.mark.parametrize("path", CAMPAIGN, ids=lambda p: p.stem)
def test_campaign_findings_reproduce_on_v4_as_shrunk(path: Path) -> None:
    """What ``pkvm-smmu fuzz --policy v4`` found, shrunk: each still reproduces on v4 as posted,
    explained step by step, and says where it came from and what fixes it."""
    replay = load_replay(path)
    assert replay.system.policy == "v4" and replay.expected is not None
    assert {"root_cause", "found_by", "hardened"} <= set(replay.origin)
    assert len(replay.actions) <= 4
    run = run_replay(replay)
    assert run.reproduced, [str(f) for f in run.findings]


def test_there_are_campaign_findings() -> None:
    assert len(CAMPAIGN) >= 5
    assert any(load_replay(path).expected.kind == "stall" for path in CAMPAIGN)  # type: ignore[union-attr]
