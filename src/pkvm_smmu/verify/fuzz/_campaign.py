"""Seeded campaigns: many independent episodes on all cores, every new finding class shrunk to a
replay file, results streamed to a JSONL journal a killed campaign resumes from.

A campaign of ``steps`` adversarial steps is cut into episodes of ``episode_steps``; episode ``i``
runs on a fresh system with actions generated from ``episode_seed(seed, i)``, so an episode is the
same wherever and whenever it runs. Episodes run on a ``ProcessPoolExecutor`` with ``workers``
processes (in this process when ``workers`` is 1), or on a Dask cluster (``executor
"dask://HOST:PORT"``, the optional ``dask`` extra). Once every episode is done, each finding class
is shrunk from its first occurrence (the lowest episode), so the replays do not depend on which
worker finished first.

The journal (``OUT/campaign.jsonl``) has one JSON object per line::

    {"type": "campaign", "version": 1, "system": {...}, "seed": 7, "steps": 2000, "episode_steps": 100,
     "keep_queue_alive": false}
    {"type": "episode", "episode": 3, "seed": ..., "steps": 100, "findings": [{...}], "hung": false, ...}
    {"type": "finding", "signature": "...", "kind": "violation", "episode": 3, "step": 41,
     "summary": "...", "replay": "replays/violation-....json", "length": 2, "original_length": 42}
    {"type": "done", "episodes": 20, "findings": 3, "elapsed_s": 12.5}

Each line is flushed and synced when written. ``resume`` reads the journal back (ignoring a line
cut short by a kill), skips the episodes it records and the finding classes already shrunk; the
header must match (system, seed, episode length, generator mode), ``steps`` may grow.

Shrinking costs runs (up to ``max_shrink_runs`` per class); ``shrink_match`` limits it to the
classes a regular expression matches, the others are listed as found but not shrunk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pkvm_smmu.verify.adversary import Action, SystemSpec, resolve_spec
from pkvm_smmu.verify.fuzz._findings import Finding
from pkvm_smmu.verify.fuzz._runner import DEFAULT_STEP_TIMEOUT, Runner, RunOutcome
from pkvm_smmu.verify.fuzz._shrink import DEFAULT_MAX_RUNS, DEFAULT_MAX_SECONDS, Shrunk, shrink

JOURNAL = "campaign.jsonl"
REPLAYS = "replays"
JOURNAL_VERSION = 1
DASK_PREFIX = "dask://"


class CampaignError(ValueError):
    """A campaign that cannot start: ``option`` names the command-line option at fault."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(message)


def episode_seed(seed: int, index: int) -> int:
    """The seed of episode ``index`` of the campaign seeded ``seed``."""
    digest = hashlib.sha256(f"pkvm-smmu:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class CampaignConfig:
    spec: SystemSpec
    seed: int = 0
    steps: int = 1000
    episode_steps: int = 100
    workers: int = 1
    executor: str | None = None  # None: local processes; "dask://HOST:PORT": a Dask scheduler
    out: Path = Path("fuzz-out")
    resume: bool = False
    step_timeout: float = DEFAULT_STEP_TIMEOUT
    shrink: bool = True
    max_shrink_runs: int = DEFAULT_MAX_RUNS
    max_shrink_seconds: float = DEFAULT_MAX_SECONDS
    fork: bool | None = None  # None: fork where the OS can
    keep_queue_alive: bool = False  # the generator never stops the hyp's command queue (faster)
    shrink_match: str | None = None  # a regular expression: shrink only the classes it matches

    @property
    def episodes(self) -> int:
        return math.ceil(self.steps / self.episode_steps) if self.steps > 0 else 0

    def episode_length(self, index: int) -> int:
        return min(self.episode_steps, self.steps - index * self.episode_steps)


@dataclass
class EpisodeResult:
    index: int
    seed: int
    steps: int
    outcome: RunOutcome

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "episode",
            "episode": self.index,
            "seed": self.seed,
            "steps": len(self.outcome.actions),
            "findings": [_brief(f) for f in self.outcome.findings],
            "hung": self.outcome.hung,
            "modeled_ns": self.outcome.modeled_ns,
            "elapsed_s": round(self.outcome.elapsed_s, 3),
        }


def _brief(finding: Finding) -> dict[str, Any]:
    return {
        "signature": finding.signature,
        "kind": finding.kind,
        "step": finding.step,
        "summary": finding.summary,
    }


@dataclass
class FindingRecord:
    """A finding class the campaign shrank: where it was first seen and its replay file."""

    signature: str
    kind: str
    episode: int
    step: int
    summary: str
    replay: str
    length: int
    original_length: int
    shrink_runs: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"type": "finding", **self.__dict__}


@dataclass
class CampaignSummary:
    config: CampaignConfig
    episodes_run: int = 0
    episodes_skipped: int = 0
    steps_run: int = 0
    findings: list[FindingRecord] = field(default_factory=list)
    unshrunk: list[str] = field(default_factory=list)  # classes found but not shrunk (shrink off)
    elapsed_s: float = 0.0
    episode_seconds: float = 0.0  # summed over episodes (all workers)

    @property
    def steps_per_second(self) -> float:
        return self.steps_run / self.episode_seconds if self.episode_seconds else 0.0


@dataclass(frozen=True)
class CampaignEvent:
    """Progress: ``kind`` is "start", "episode", "shrink-start", "shrink-done" or "done"."""

    kind: str
    done: int = 0
    total: int = 0
    findings: int = 0
    text: str = ""


Progress = Callable[[CampaignEvent], None]


# -- the tasks (module level, so a process pool or Dask can run them) ----------------------------------------

_RUNNERS: dict[tuple[SystemSpec, bool | None, float], Runner] = {}


def _runner(spec: SystemSpec, fork: bool | None, step_timeout: float) -> Runner:
    key = (spec, fork, step_timeout)
    runner = _RUNNERS.get(key)
    if runner is None:
        runner = _RUNNERS[key] = Runner(spec, fork=fork, step_timeout=step_timeout)
    return runner


def episode_task(
    spec: SystemSpec, fork: bool | None, timeout: float, alive: bool, index: int, seed: int, steps: int
) -> EpisodeResult:
    outcome = _runner(spec, fork, timeout).run_episode(seed, steps, keep_queue_alive=alive)
    return EpisodeResult(index, seed, steps, outcome)


def reproduce_task(
    spec: SystemSpec, fork: bool | None, timeout: float, alive: bool, seed: int, steps: int, signature: str
) -> RunOutcome:
    return _runner(spec, fork, timeout).run_episode(seed, steps, stop_at=signature, keep_queue_alive=alive)


def shrink_task(
    spec: SystemSpec,
    fork: bool | None,
    timeout: float,
    alive: bool,
    actions: list[Action],
    finding: Finding,
    max_runs: int,
    max_seconds: float,
) -> Shrunk:
    return shrink(_runner(spec, fork, timeout), actions, finding, max_runs=max_runs, max_seconds=max_seconds)


# -- executors -----------------------------------------------------------------------------------------------


class _InProcess:
    """``workers=1``: the tasks run in this process, one after the other, when their results are
    asked for (so progress shows as they finish); the template system is reused throughout."""


Call = tuple[Callable[..., Any], tuple[Any, ...]]


def _results(executor: Executor | _InProcess, calls: dict[Any, Call]) -> Iterator[tuple[Any, Any]]:
    """``(key, result)`` for each call, as they complete."""
    if isinstance(executor, _InProcess):
        for key, (fn, args) in calls.items():
            yield key, fn(*args)
        return
    futures = {executor.submit(fn, *args): key for key, (fn, args) in calls.items()}
    for future in as_completed(futures):
        yield futures[future], future.result()


@contextmanager
def _executor(config: CampaignConfig) -> Iterator[Executor | _InProcess]:
    if config.executor is not None:
        if not config.executor.startswith(DASK_PREFIX) or len(config.executor) == len(DASK_PREFIX):
            raise CampaignError("--executor", f"'{config.executor}': expected dask://HOST:PORT")
        try:
            from dask.distributed import Client
        except ImportError:
            raise CampaignError(
                "--executor",
                "the Dask executor needs the optional 'dask' extra: pip install 'pkvm-smmu[dask]'",
            ) from None
        address = "tcp://" + config.executor.removeprefix(DASK_PREFIX)
        try:
            client = Client(address, timeout=10)
        except OSError as error:
            raise CampaignError(
                "--executor", f"cannot reach the Dask scheduler at {address}: {error}"
            ) from None
        try:
            yield client.get_executor()
        finally:
            client.close()
    elif config.workers <= 1:
        yield _InProcess()
    else:
        with ProcessPoolExecutor(max_workers=config.workers) as pool:
            yield pool


# -- the journal ---------------------------------------------------------------------------------------------


@dataclass
class _Journal:
    path: Path
    episodes: dict[int, dict[str, Any]] = field(default_factory=dict)
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=False) + "\n"
        with self.path.open("a", encoding="utf-8") as out:
            out.write(line)
            out.flush()
            os.fsync(out.fileno())


def _header(config: CampaignConfig) -> dict[str, Any]:
    return {
        "type": "campaign",
        "version": JOURNAL_VERSION,
        "system": config.spec.to_json(),
        "seed": config.seed,
        "steps": config.steps,
        "episode_steps": config.episode_steps,
        "keep_queue_alive": config.keep_queue_alive,
    }


def _open_journal(config: CampaignConfig) -> _Journal:
    path = config.out / JOURNAL
    journal = _Journal(path)
    if not path.exists():
        config.out.mkdir(parents=True, exist_ok=True)
        journal.write(_header(config))
        return journal
    if not config.resume:
        raise CampaignError("--out", f"{path} already holds a campaign: use --resume, or another --out")
    records = list(_read_journal(path))
    head = records[0] if records else None
    if head is None or head.get("type") != "campaign":
        raise CampaignError("--out", f"{path}: not a campaign journal (no header line)")
    mine = _header(config)
    for key in ("version", "system", "seed", "episode_steps", "keep_queue_alive"):
        if head.get(key) != mine[key]:
            raise CampaignError(
                "--resume", f"{path} is another campaign ({key} {head.get(key)!r}, not {mine[key]!r})"
            )
    for record in records[1:]:
        if record.get("type") == "episode" and isinstance(record.get("episode"), int):
            journal.episodes[record["episode"]] = record
        elif record.get("type") == "finding" and isinstance(record.get("signature"), str):
            journal.findings[record["signature"]] = record
    return journal


def _read_journal(path: Path) -> Iterable[dict[str, Any]]:
    """Every complete record; a last line cut short by a kill is dropped from the file."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as out:
            out.truncate(end)
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CampaignError("--resume", f"{path}: line {number} is not JSON ({error.msg})") from None
        if isinstance(record, dict):
            yield record


def replay_name(signature: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", signature.lower()).strip("-")[:72]
    return f"{slug}-{hashlib.sha1(signature.encode()).hexdigest()[:8]}.json"


# -- the campaign --------------------------------------------------------------------------------------------


def run_campaign(config: CampaignConfig, progress: Progress | None = None) -> CampaignSummary:
    """Run (or resume) the campaign ``config`` describes. ``CampaignError`` for bad options."""
    from pkvm_smmu.verify.replay import Replay, save_replay

    if config.steps < 1 or config.episode_steps < 1:
        raise CampaignError("--steps", "the campaign needs at least one step")
    if config.workers < 1:
        raise CampaignError("--workers", f"{config.workers}: need at least one worker")
    spec = resolve_spec(config.spec)
    config = _replace_spec(config, spec)
    notify = progress if progress is not None else (lambda event: None)
    start = time.perf_counter()
    journal = _open_journal(config)
    summary = CampaignSummary(config)
    total = config.episodes
    todo = [i for i in range(total) if i not in journal.episodes]
    summary.episodes_skipped = total - len(todo)
    # signature -> (episode, step) of its first occurrence, and the actions when we have them
    first: dict[str, tuple[int, Finding]] = {}
    actions_of: dict[tuple[str, int], list[Action]] = {}
    for index, record in journal.episodes.items():
        for brief in record.get("findings", []):
            _note(first, index, Finding(brief["kind"], brief["signature"], brief["step"], brief["summary"]))
    notify(CampaignEvent("start", summary.episodes_skipped, total, len(first)))
    args = (spec, config.fork, config.step_timeout, config.keep_queue_alive)
    with _executor(config) as executor:
        episodes: dict[Any, Call] = {
            i: (episode_task, (*args, i, episode_seed(config.seed, i), config.episode_length(i)))
            for i in todo
        }
        done = summary.episodes_skipped
        for _, result in _results(executor, episodes):
            journal.write(result.to_json())
            done += 1
            summary.episodes_run += 1
            summary.steps_run += len(result.outcome.actions)
            summary.episode_seconds += result.outcome.elapsed_s
            for finding in result.outcome.findings:
                if _note(first, result.index, finding):
                    actions_of[(finding.signature, result.index)] = list(result.outcome.actions)
            notify(CampaignEvent("episode", done, total, len(first), f"episode {result.index}"))
        pending = sorted(sig for sig in first if sig not in journal.findings)
        match = re.compile(config.shrink_match) if config.shrink_match else None
        summary.unshrunk = [
            s for s in pending if not config.shrink or (match is not None and not match.search(s))
        ]
        pending = [s for s in pending if s not in summary.unshrunk]
        # Classes first seen in an earlier session: run their episode again, up to the finding.
        again: dict[Any, Call] = {}
        for signature in pending:
            index, _ = first[signature]
            if (signature, index) not in actions_of:
                seed = episode_seed(config.seed, index)
                again[signature] = (reproduce_task, (*args, seed, config.episode_length(index), signature))
        for signature, outcome in _results(executor, again):
            actions_of[(signature, first[signature][0])] = list(outcome.actions)
        shrinks: dict[Any, Call] = {}
        for signature in pending:
            index, finding = first[signature]
            actions = actions_of[(signature, index)]
            limits = (config.max_shrink_runs, config.max_shrink_seconds)
            shrinks[signature] = (shrink_task, (*args, actions, finding, *limits))
        if shrinks:
            notify(CampaignEvent("shrink-start", findings=len(first), text=", ".join(shrinks)))
        for signature, shrunk in _results(executor, shrinks):
            index, finding = first[signature]
            name = f"{REPLAYS}/{replay_name(signature)}"
            origin = {
                "campaign_seed": config.seed,
                "episode": index,
                "episode_seed": episode_seed(config.seed, index),
                "original_length": shrunk.original_length,
                "shrink_runs": shrunk.runs,
            }
            save_replay(config.out / name, Replay(spec, shrunk.actions, shrunk.finding, origin))
            shrunk_record = FindingRecord(
                signature,
                finding.kind,
                index,
                finding.step,
                finding.summary,
                name,
                len(shrunk.actions),
                shrunk.original_length,
                shrunk.runs,
            )
            journal.write(shrunk_record.to_json())
            journal.findings[signature] = shrunk_record.to_json()
            text = f"{signature}: {len(shrunk.actions)} actions"
            notify(CampaignEvent("shrink-done", findings=len(first), text=text))
    for signature in sorted(journal.findings):
        data = {k: v for k, v in journal.findings[signature].items() if k != "type"}
        summary.findings.append(FindingRecord(**data))
    summary.elapsed_s = time.perf_counter() - start
    journal.write(
        {
            "type": "done",
            "episodes": total,
            "episodes_run": summary.episodes_run,
            "findings": len(summary.findings),
            "elapsed_s": round(summary.elapsed_s, 3),
        }
    )
    notify(CampaignEvent("done", total, total, len(first)))
    return summary


def _note(first: dict[str, tuple[int, Finding]], index: int, finding: Finding) -> bool:
    """Remember ``finding`` if it is its class's earliest occurrence so far."""
    known = first.get(finding.signature)
    if known is None or index < known[0]:
        first[finding.signature] = (index, finding)
        return True
    return False


def _replace_spec(config: CampaignConfig, spec: SystemSpec) -> CampaignConfig:
    from dataclasses import replace

    return replace(config, spec=spec)


__all__ = [
    "DASK_PREFIX",
    "JOURNAL",
    "REPLAYS",
    "CampaignConfig",
    "CampaignError",
    "CampaignEvent",
    "CampaignSummary",
    "EpisodeResult",
    "FindingRecord",
    "episode_seed",
    "episode_task",
    "replay_name",
    "reproduce_task",
    "run_campaign",
    "shrink_task",
]
