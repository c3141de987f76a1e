"""``pkvm-smmu fuzz`` and ``pkvm-smmu replay``: a small campaign end to end, resume, bad options named,
replays explained with exit 1 when the finding reproduces and 0 when not, corrupt files exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pkvm_smmu.cli import main
from pkvm_smmu.verify.adversary import Advance, RegWrite, SystemSpec
from pkvm_smmu.verify.fuzz import Finding
from pkvm_smmu.verify.replay import Replay, save_replay

EVENTQ_TO_HYP = [
    RegWrite(0, 0x20, 4, 0x19),  # CR0: EVENTQEN off
    Advance(10_000),
    RegWrite(0, 0xA0, 8, 0x4000_0004),  # EVENTQ_BASE: hyp RAM (v4 passes it through)
    RegWrite(0, 0x20, 4, 0x1D),
    Advance(10_000),
]
EXPECTED = Finding("violation", "violation:smmu:hyp:eventq", 3, "the SMMU writes event records to hyp RAM")


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture
def replay_file(tmp_path: Path) -> Path:
    path = tmp_path / "eventq.json"
    save_replay(path, Replay(SystemSpec(), EVENTQ_TO_HYP, EXPECTED))
    return path


def test_replay_explains_and_exits_1_when_the_finding_reproduces(replay_file: Path) -> None:
    code, out = invoke("replay", str(replay_file))
    assert code == 1, out
    assert "expects [violation:smmu:hyp:eventq]" in out
    assert "step 2: reg-write smmu=0 offset=0xa0 size=8 value=0x40000004  ->  done" in out
    assert "EXPECTED FINDING [violation:smmu:hyp:eventq]" in out
    assert "the SMMU itself can write" in out and "owned by hyp" in out
    assert "SMMU_EVENTQ_BASE=0x40000004: event records" in out
    assert "REPRODUCED (exit 1)" in out
    code, out = invoke("replay", "--quiet", str(replay_file))
    assert code == 1 and out.strip() == "REPRODUCED (exit 1)"


def test_replay_exits_0_when_it_does_not_reproduce(tmp_path: Path) -> None:
    path = tmp_path / "hardened.json"
    save_replay(path, Replay(SystemSpec(policy="hardened"), EVENTQ_TO_HYP, EXPECTED))
    code, out = invoke("replay", str(path))
    assert code == 0, out
    assert "not reproduced (exit 0)" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{\n  "format": "pkvm-smmu-replay",\n  "version": 1,\n  "actions": [}\n',
            "bad JSON at line 4 column 15",
        ),
        (json.dumps({"format": "pkvm-smmu-replay", "version": 2}), "unsupported replay version 2"),
        (
            json.dumps(
                {"format": "pkvm-smmu-replay", "version": 1, "system": {}, "actions": [{"kind": "warp"}]}
            ),
            "actions[0]: kind: unknown action 'warp'",
        ),
        (
            json.dumps(
                {"format": "pkvm-smmu-replay", "version": 1, "system": {"policy": "nope"}, "actions": []}
            ),
            "system: policy: unknown policy 'nope'",
        ),
    ],
)
def test_replay_of_a_corrupt_file_exits_2_naming_it(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "corrupt.json"
    path.write_text(content)
    code, out = invoke("replay", str(path))
    assert code == 2
    assert f"error: {path}: " in out and message in out
    assert "Traceback" not in out


def test_fuzz_runs_a_campaign_and_resumes_it(tmp_path: Path) -> None:
    out_dir = tmp_path / "campaign"
    args = ["fuzz", "--steps", "30", "--episode-steps", "10", "--seed", "5", "--workers", "1"]
    args += ["--out", str(out_dir), "--keep-queue-alive"]
    code, out = invoke(*args)
    assert code == 1, out  # v4: the boot-time ATS finding at least
    assert "3 episodes run" in out and "violation:device:hyp:ats-trans+ste-nested" in out
    journal = [json.loads(line) for line in (out_dir / "campaign.jsonl").read_text().splitlines()]
    assert journal[0]["type"] == "campaign" and journal[0]["seed"] == 5
    assert sorted(r["episode"] for r in journal if r["type"] == "episode") == [0, 1, 2]
    replays = [r["replay"] for r in journal if r["type"] == "finding"]
    assert replays and all((out_dir / name).is_file() for name in replays)
    code, out = invoke(*args)
    assert code == 2 and "'--out'" in out and "--resume" in out
    code, out = invoke(*args, "--resume")
    assert code == 1, out
    assert "0 episodes run, 3 resumed" in out


@pytest.mark.parametrize(
    ("args", "option", "message"),
    [
        (["--policy", "nope"], "'--policy'", "unknown policy 'nope'"),
        (["--design", "native"], "'--design'", "nothing to attack"),
        (["--boot-variant", "impl-hooks"], "'--boot-variant'", "not a trap-emulate boot variant"),
        (["--steps", "0"], "'--steps'", "must be at least 1"),
        (["--workers", "0"], "'--workers'", "must be at least 1"),
        (["--executor", "tcp://x:1"], "'--executor'", "expected dask://HOST:PORT"),
        (["--shrink-only", "("], "'--shrink-only'", "missing ), unterminated subpattern"),
        (["--device", "gpu,bdf=00:05.0"], "'--device'", "unknown device type 'gpu'"),
    ],
)
def test_fuzz_names_a_bad_option(tmp_path: Path, args: list[str], option: str, message: str) -> None:
    code, out = invoke("fuzz", "--out", str(tmp_path / "c"), "--steps", "10", *args)
    assert code == 2, out
    assert option in out and message in " ".join(out.split())
