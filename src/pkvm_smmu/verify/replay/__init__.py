"""Replay files: a finding's minimal script, run again deterministically and explained step by step.

``load_replay(path)`` reads one (``ReplayError`` names the file and what is wrong), ``save_replay``
writes one atomically, ``run_replay`` boots the system and explains each step. The format is
described in ``pkvm_smmu.verify.replay._format``; ``pkvm-smmu replay FILE`` is the command.
"""

from pkvm_smmu.verify.replay._explain import ExplainedStep, ReplayRun, explain, run_replay
from pkvm_smmu.verify.replay._format import (
    REPLAY_FORMAT,
    REPLAY_VERSION,
    Replay,
    ReplayError,
    load_replay,
    replay_from_json,
    save_replay,
    write_json_atomic,
)

__all__ = [
    "REPLAY_FORMAT",
    "REPLAY_VERSION",
    "ExplainedStep",
    "Replay",
    "ReplayError",
    "ReplayRun",
    "explain",
    "load_replay",
    "replay_from_json",
    "run_replay",
    "save_replay",
    "write_json_atomic",
]
