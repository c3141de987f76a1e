"""The attack catalogue: every attack's outcome under ``v4`` and ``hardened`` is the catalogue's
expectation, and the CLI reports it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pkvm_smmu.cli import main
from pkvm_smmu.verify.attacks import ATTACKS, Outcome, find_attack, run_attack

CLASSES = {
    "GBPA bypass", "STE behind the hyp's back", "nested stage 1 / CDs", "table and queue bases",
    "address registers", "ATS", "stale TLB after donation", "suppressed/reordered invalidations",
    "racing updates (TOCTOU)", "2-level L1 rewiring", "malformed commands", "CONS/PROD games",
    "enables mid-operation", "out-of-range StreamIDs",
}  # fmt: skip


def test_catalogue_covers_every_attack_class() -> None:
    assert {attack.attack_class for attack in ATTACKS} == CLASSES
    assert len({attack.name for attack in ATTACKS}) == len(ATTACKS)
    for attack in ATTACKS:
        assert attack.description and set(attack.expected) == {"v4", "hardened"}
        # the hardened policy fixes every finding, availability (docs/findings.md, 8) included
        assert attack.expected["hardened"] is Outcome.BLOCKED


@pytest.mark.parametrize("policy", ["v4", "hardened"])
@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_outcome_is_the_expected_one(attack, policy: str) -> None:  # type: ignore[no-untyped-def]
    result = run_attack(attack, policy)
    assert result.outcome is attack.expected[policy], [str(f) for f in result.run.findings]


def test_v4_findings_name_their_cause() -> None:
    nested = run_attack(find_attack("ste-nested"), "v4").run.findings
    assert any("ste-nested" in f.signature for f in nested)
    loads = run_attack(find_attack("l1-repoint"), "v4").run.findings
    assert any(f.signature == "observed:hyp:read:guest" for f in loads)


def test_cli_attacks_exit_status_and_json(tmp_path: Path) -> None:
    out = tmp_path / "attacks.json"
    result = CliRunner().invoke(
        main, ["attacks", "--policy", "v4", "--only", "ste-nested", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["attacks"][0]["outcome"] == "violation" and data["attacks"][0]["as_expected"]
    listing = CliRunner().invoke(main, ["attacks", "--list"])
    assert listing.exit_code == 0 and "gbpa-bypass" in listing.output


def test_cli_attacks_bad_options() -> None:
    bad = CliRunner().invoke(main, ["attacks", "--only", "no-such-attack"])
    assert bad.exit_code == 2 and "no-such-attack" in bad.output
    bad = CliRunner().invoke(main, ["attacks", "--policy", "v9"])
    assert bad.exit_code == 2 and "unknown policy" in bad.output
