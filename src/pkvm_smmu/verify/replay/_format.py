"""Replay files: a finding's minimal script, with everything needed to run it again.

A replay file is one JSON object::

    {
      "format": "pkvm-smmu-replay",
      "version": 1,
      "system": {"design": "trap-emulate", "policy": "v4", "boot_variant": "late-register",
                 "platform": null, "devices": [], "seed": 0, "sanitizer": false},
      "actions": [{"kind": "reg-write", "smmu": 0, "offset": "0x44", "size": 4, "value": "0x0"}, ...],
      "expected": {"kind": "violation", "signature": "violation:device:hyp:gbpa-bypass",
                   "step": 1, "summary": "...", "details": ["..."]},
      "origin": {"campaign_seed": 7, "episode": 3, "original_length": 58}
    }

``system`` is a ``SystemSpec``, ``actions`` the vocabulary's JSON (``pkvm_smmu.verify.adversary``),
``expected`` the finding the script reproduces (its ``signature`` is what must come back; the other
fields say what it looked like when it was recorded) or null for a script that expects nothing
(an attack that should be stopped), ``origin`` free-form provenance. Later versions may add
fields; readers reject a version they do not know. Writing is atomic.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pkvm_smmu.verify.adversary import Action, ActionFormatError, SpecError, SystemSpec, action_from_json
from pkvm_smmu.verify.fuzz._findings import Finding

REPLAY_FORMAT = "pkvm-smmu-replay"
REPLAY_VERSION = 1


class ReplayError(ValueError):
    """A replay file that cannot be used: names the file and what is wrong with it."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")


@dataclass
class Replay:
    system: SystemSpec
    actions: list[Action]
    expected: Finding | None = None
    origin: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REPLAY_FORMAT,
            "version": REPLAY_VERSION,
            "system": self.system.to_json(),
            "actions": [action.to_json() for action in self.actions],
            "expected": self.expected.to_json() if self.expected is not None else None,
            "origin": self.origin,
        }


def replay_from_json(data: object, path: str | os.PathLike[str] = "<replay>") -> Replay:
    """The replay ``data`` (parsed JSON) describes; ``ReplayError`` saying what is wrong."""
    if not isinstance(data, dict):
        raise ReplayError(path, f"expected a JSON object, got {type(data).__name__}")
    if data.get("format") != REPLAY_FORMAT:
        raise ReplayError(
            path, f"not a replay file (format is {data.get('format')!r}, not {REPLAY_FORMAT!r})"
        )
    version = data.get("version")
    if version != REPLAY_VERSION:
        raise ReplayError(
            path, f"unsupported replay version {version!r} (this pkvm-smmu reads version {REPLAY_VERSION})"
        )
    try:
        system = SystemSpec.from_json(data.get("system"))
    except SpecError as error:
        raise ReplayError(path, str(error)) from None
    raw_actions = data.get("actions")
    if not isinstance(raw_actions, list):
        raise ReplayError(path, "actions: expected a list of actions")
    actions = []
    for index, raw in enumerate(raw_actions):
        try:
            actions.append(action_from_json(raw))
        except ActionFormatError as error:
            raise ReplayError(path, f"actions[{index}]: {error}") from None
    expected = None
    if data.get("expected") is not None:
        try:
            expected = Finding.from_json(data["expected"])
        except ValueError as error:
            raise ReplayError(path, f"expected: {error}") from None
    origin = data.get("origin") or {}
    if not isinstance(origin, dict):
        raise ReplayError(path, "origin: expected a JSON object")
    return Replay(system, actions, expected, origin)


def load_replay(path: str | os.PathLike[str]) -> Replay:
    """Read a replay file; ``ReplayError`` naming the file for anything wrong (unreadable, bad JSON
    with its line and column, wrong format or version, an unknown action or a bad field)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ReplayError(path, f"cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ReplayError(path, f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ReplayError(
            path, f"bad JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    return replay_from_json(data, path)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` through a temporary file and a rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def save_replay(path: str | os.PathLike[str], replay: Replay) -> None:
    write_json_atomic(path, replay.to_json())


__all__ = [
    "REPLAY_FORMAT",
    "REPLAY_VERSION",
    "Replay",
    "ReplayError",
    "load_replay",
    "replay_from_json",
    "save_replay",
    "write_json_atomic",
]
