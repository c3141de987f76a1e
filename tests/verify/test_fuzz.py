"""Campaigns: findings classified, crashes caught, hangs cut, a planted bug found by a short seeded
campaign and shrunk to a short replay, determinism for a seed (in-process and on a process pool),
resume, and the Hypothesis state machine's bounded profile (its soak profile runs with -m soak)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from pkvm_smmu.arch.registers import Reg
from pkvm_smmu.verify.adversary import Action, Advance, Attach, RegRead, RegWrite, SystemSpec, build_system
from pkvm_smmu.verify.adversary import _apply as apply_module
from pkvm_smmu.verify.fuzz import (
    JOURNAL,
    CampaignConfig,
    CampaignError,
    Finding,
    Runner,
    RunOutcome,
    Session,
    run_campaign,
    shrink,
)
from pkvm_smmu.verify.fuzz._findings import is_trusted_exception
from pkvm_smmu.verify.fuzz.stateful import BOUNDED, SOAK, FindingError, adversary_machine
from pkvm_smmu.verify.replay import Replay, load_replay, run_replay

sys.path.insert(0, os.path.dirname(__file__))
from planted import planted


@pytest.fixture(autouse=True, scope="module")
def _planted() -> Iterator[None]:
    with planted():
        yield


ISOLATION = ("violation:*", "observed:*")  # v4 is known to fail these (tests/regressions, the catalogue)
HARDENED_OPEN: tuple[str, ...] = ()  # every finding class is fixed in the hardened policy


# -- sessions --------------------------------------------------------------------------------------------


def test_a_crash_in_the_hyp_is_a_finding_and_the_session_goes_on() -> None:
    system = build_system(SystemSpec(policy="planted-crash"))
    session = Session(system)
    try:
        session.boot()
        outcome = session.step(RegWrite(0, int(Reg.GBPA), 1, 0x11))
        assert outcome.result.startswith("crash: ZeroDivisionError")
        [crash] = [f for f in outcome.findings if f.kind == "crash"]
        assert crash.signature == "crash:ZeroDivisionError:hyp.smmuv3.device.handle_dabt"
        assert crash.step == 0
        assert any("register_access" in line for line in crash.details)
        again = session.step(RegRead(0, int(Reg.CR0), 1))
        assert again.result.startswith("crash") and again.findings == []  # each class once
        assert session.step(RegWrite(0, int(Reg.GBPA), 4, 0x10)).result == "done"
    finally:
        system.close()


def _raiser(path: str) -> object:
    namespace: dict[str, object] = {}
    exec(compile("def boom(*args):\n    raise RuntimeError('boom')\n", path, "exec"), namespace)
    return namespace["boom"]


def test_exceptions_from_host_code_are_the_hosts_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    host_boom = _raiser("/src/pkvm_smmu/host/iommu/core.py")
    hyp_boom = _raiser("/src/pkvm_smmu/hyp/smmuv3/device.py")
    for boom, trusted in ((host_boom, False), (hyp_boom, True)):
        try:
            boom()  # type: ignore[operator]
        except RuntimeError as exc:
            assert is_trusted_exception(exc) is trusted
    system = build_system(SystemSpec())
    try:
        monkeypatch.setattr(system.host.iommu, "iommu_group_replace_domain", host_boom)
        session = Session(system)
        session.boot()
        outcome = session.step(Attach(1, "identity"))
        assert outcome.result == "host error: RuntimeError: boom"
        assert outcome.findings == []
    finally:
        system.close()


def test_a_step_that_does_not_finish_is_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(system: object, action: Action) -> str:
        time.sleep(30)
        return "slept"

    monkeypatch.setitem(apply_module._APPLY, Advance, slow)
    started = time.monotonic()
    outcome = Runner(SystemSpec(), step_timeout=0.5).run_actions([RegWrite(0, 0x44, 4, 0), Advance(1)])
    assert time.monotonic() - started < 20
    assert outcome.hung
    assert outcome.findings[-1].kind == "hang" and outcome.findings[-1].step == 1


def test_forked_and_in_process_runs_agree() -> None:
    forked = Runner(SystemSpec()).run_episode(21, 30, keep_queue_alive=True)
    fresh = Runner(SystemSpec(), fork=False).run_episode(21, 30, keep_queue_alive=True)
    assert (forked.actions, forked.results, forked.findings) == (fresh.actions, fresh.results, fresh.findings)
    assert forked.modeled_ns == fresh.modeled_ns and len(forked.actions) == 30


# -- shrinking -------------------------------------------------------------------------------------------


class _Scripted:
    """A runner whose finding needs RegWrite value 1 and, later, value 2."""

    def __init__(self) -> None:
        self.runs = 0

    def run_actions(self, actions: Sequence[Action], *, stop_at: str | None = None) -> RunOutcome:
        self.runs += 1
        values = [a.value for a in actions if isinstance(a, RegWrite)]
        outcome = RunOutcome(actions=list(actions))
        if 1 in values and 2 in values[values.index(1) :]:
            outcome.findings.append(Finding("violation", "violation:test", values.index(2), "planted"))
        return outcome


def test_ddmin_keeps_exactly_the_actions_that_matter() -> None:
    script: list[Action] = [RegWrite(0, 0x44, 4, 0x100 + i) for i in range(40)]
    script[7] = RegWrite(0, 0x44, 4, 1)
    script[31] = RegWrite(0, 0x44, 4, 2)
    runner = _Scripted()
    shrunk = shrink(runner, script, Finding("violation", "violation:test", 31, "planted"))  # type: ignore[arg-type]
    assert shrunk.actions == [RegWrite(0, 0x44, 4, 1), RegWrite(0, 0x44, 4, 2)]
    assert shrunk.original_length == 40 and not shrunk.exhausted
    assert shrunk.finding.step == 1
    assert runner.runs < 120


# -- campaigns -------------------------------------------------------------------------------------------


def test_a_planted_bug_is_found_and_shrunk_to_a_short_replay(tmp_path: Path) -> None:
    config = CampaignConfig(
        SystemSpec(policy="planted-ste"),
        seed=4,
        steps=120,
        episode_steps=40,
        out=tmp_path,
        keep_queue_alive=True,
        shrink_match="^violation:device:hyp:ste-s1_trans$",
    )
    summary = run_campaign(config)
    planted_findings = [r for r in summary.findings if r.signature == "violation:device:hyp:ste-s1_trans"]
    assert planted_findings, [r.signature for r in summary.findings]
    record = min(planted_findings, key=lambda r: r.length)
    assert 1 <= record.length <= 4
    replay = load_replay(tmp_path / record.replay)
    assert replay.system.policy == "planted-ste" and len(replay.actions) == record.length
    assert run_replay(replay).reproduced
    on_v4 = Replay(SystemSpec(policy="v4"), replay.actions, replay.expected)
    assert not run_replay(on_v4).reproduced


def _episodes(out: Path) -> list[dict[str, object]]:
    records = [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]
    episodes = [r for r in records if r["type"] == "episode"]
    for record in episodes:
        record.pop("elapsed_s")
    return sorted(episodes, key=lambda r: int(r["episode"]))  # type: ignore[call-overload]


def test_campaigns_are_deterministic_for_a_seed_on_one_process_or_a_pool(tmp_path: Path) -> None:
    results = []
    for workers, out in ((1, tmp_path / "a"), (2, tmp_path / "b")):
        config = CampaignConfig(
            SystemSpec(), seed=11, steps=60, episode_steps=20, workers=workers, out=out, keep_queue_alive=True
        )
        summary = run_campaign(config)
        replays = {r.signature: (out / r.replay).read_text() for r in summary.findings}
        results.append((_episodes(out), replays, [r.signature for r in summary.findings]))
    assert results[0] == results[1]
    assert len(results[0][0]) == 3


def test_resume_skips_finished_episodes(tmp_path: Path) -> None:
    config = CampaignConfig(
        SystemSpec(), seed=3, steps=40, episode_steps=10, out=tmp_path, shrink=False, keep_queue_alive=True
    )
    first = run_campaign(config)
    assert first.episodes_run == 4
    with pytest.raises(CampaignError, match="--resume"):
        run_campaign(config)
    # As if killed after two episodes, in the middle of writing the third line.
    journal = tmp_path / JOURNAL
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:3]) + lines[3][:25])
    done = {json.loads(line)["episode"] for line in lines[1:3]}
    resumed = run_campaign(CampaignConfig(**{**config.__dict__, "resume": True}))
    assert resumed.episodes_skipped == 2 and resumed.episodes_run == 2
    episodes = _episodes(tmp_path)
    assert sorted(int(e["episode"]) for e in episodes) == [0, 1, 2, 3]  # type: ignore[call-overload]
    assert done <= {int(e["episode"]) for e in episodes}  # type: ignore[call-overload]
    with pytest.raises(CampaignError, match="another campaign"):
        run_campaign(CampaignConfig(**{**config.__dict__, "resume": True, "seed": 4}))


@pytest.mark.skipif(importlib.util.find_spec("dask") is not None, reason="dask is installed")
def test_the_dask_executor_needs_its_extra(tmp_path: Path) -> None:
    config = CampaignConfig(SystemSpec(), steps=10, out=tmp_path, executor="dask://localhost:8786")
    with pytest.raises(CampaignError, match="optional 'dask' extra"):
        run_campaign(config)


# -- the Hypothesis state machine ------------------------------------------------------------------------


def test_state_machine_bounded_profile() -> None:
    """v4: no crash, stall or hang, and nothing from the sanitizer about the hyp, at any step (its
    isolation failures are the catalogue's and tests/regressions' business)."""
    run_state_machine_as_test(adversary_machine(SystemSpec(), allowed=ISOLATION), settings=BOUNDED)


def test_state_machine_bounded_profile_hardened() -> None:
    """The hardened policy: no finding but the open ones."""
    machine = adversary_machine(SystemSpec(policy="hardened"), allowed=HARDENED_OPEN)
    run_state_machine_as_test(machine, settings=BOUNDED)


def test_state_machine_catches_a_planted_bug() -> None:
    machine = adversary_machine(SystemSpec(policy="planted-crash"), allowed=ISOLATION)
    no_shrinking = settings(BOUNDED, phases=[Phase.generate], max_examples=30)
    with pytest.raises(FindingError, match="crash:ZeroDivisionError"):
        run_state_machine_as_test(machine, settings=no_shrinking)


@pytest.mark.soak
@pytest.mark.parametrize(("policy", "allowed"), [("v4", ISOLATION), ("hardened", HARDENED_OPEN)])
def test_state_machine_soak_profile(policy: str, allowed: tuple[str, ...]) -> None:
    machine = adversary_machine(SystemSpec(policy=policy), allowed=allowed)
    run_state_machine_as_test(machine, settings=SOAK)
