"""Fuzz campaigns against the adversarial host's vocabulary (``pkvm_smmu.verify.adversary``).

- ``Session``: one system stepped through actions, watchers checked after each, findings (each
  class once) with what produced them;
- ``Runner``: scripts and seeded episodes on fresh systems, one forked child per run from a booted
  template (POSIX), with a wall-clock watchdog per step;
- ``shrink``: delta debugging down to a minimal script reproducing the same finding class;
- ``run_campaign``: seeded episodes on all cores (or a Dask cluster), shrinking, replay files and
  a resumable JSONL journal (``pkvm-smmu fuzz``);
- ``pkvm_smmu.verify.fuzz.stateful``: a Hypothesis state machine over the same actions (needs the
  ``test`` extra).
"""

from pkvm_smmu.verify.fuzz._campaign import (
    JOURNAL,
    REPLAYS,
    CampaignConfig,
    CampaignError,
    CampaignEvent,
    CampaignSummary,
    FindingRecord,
    episode_seed,
    replay_name,
    run_campaign,
)
from pkvm_smmu.verify.fuzz._findings import BOOT, KINDS, Finding, violation_tags
from pkvm_smmu.verify.fuzz._runner import DEFAULT_STEP_TIMEOUT, Runner, RunOutcome, generated
from pkvm_smmu.verify.fuzz._session import Session, StepOutcome
from pkvm_smmu.verify.fuzz._shrink import Shrunk, shrink

__all__ = [
    "BOOT",
    "DEFAULT_STEP_TIMEOUT",
    "JOURNAL",
    "KINDS",
    "REPLAYS",
    "CampaignConfig",
    "CampaignError",
    "CampaignEvent",
    "CampaignSummary",
    "Finding",
    "FindingRecord",
    "RunOutcome",
    "Runner",
    "Session",
    "Shrunk",
    "StepOutcome",
    "episode_seed",
    "generated",
    "replay_name",
    "run_campaign",
    "shrink",
    "violation_tags",
]
