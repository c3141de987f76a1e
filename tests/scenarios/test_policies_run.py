"""Every registered emulation policy must leave the unmodified host driver working: a policy that
"blocks" attacks because the host's SMMU driver could not probe would block them vacuously."""

from __future__ import annotations

import pytest

from pkvm_smmu.hyp.smmuv3 import POLICIES
from pkvm_smmu.scenarios.boot import RunOptions
from pkvm_smmu.scenarios.pkvm import run_pkvm


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_the_unmodified_host_driver_runs_its_workload_under_the_policy(policy: str) -> None:
    report = run_pkvm(RunOptions(design="trap-emulate", policy=policy))
    assert report.problems == ()
    assert len(report.copies) == 8
    assert all(copy.ok for copy in report.copies)
