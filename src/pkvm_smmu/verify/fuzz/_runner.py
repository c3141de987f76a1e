"""``Runner``: scripts of actions, or seeded generated episodes, each on a fresh system of one spec.

Booting is the expensive part of a run (the hyp builds an identity stage-2 over all of RAM), so on
POSIX the runner boots one *template* system per process and forks a child for every run: the child
starts from the booted, already-checked system, runs, streams its steps and findings back over a
pipe and exits. A child that sends nothing for ``step_timeout`` seconds is killed and the run ends
with a ``hang`` finding at the step it was on. Without ``fork`` (or with ``fork=False``) every run
boots afresh in-process, with no timeout. Both give the same answer: the system is a pure function
of its spec.
"""

from __future__ import annotations

import os
import pickle
import random
import select
import signal
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from pkvm_smmu.verify.adversary import Action, ActionGenerator, System, SystemSpec, build_system, resolve_spec
from pkvm_smmu.verify.fuzz._findings import Finding, from_exception, hang
from pkvm_smmu.verify.fuzz._session import Session

DEFAULT_STEP_TIMEOUT = 120.0  # seconds of wall-clock time one step may take before it is a hang
_HEADER = struct.Struct("<I")


@dataclass
class RunOutcome:
    """What one run did: the actions it ran (for a generated episode, the ones generated), each
    one's result, the findings in order, and whether it was cut short by a hang."""

    actions: list[Action] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    hung: bool = False
    elapsed_s: float = 0.0
    modeled_ns: int = 0

    def first(self, signature: str) -> Finding | None:
        return next((f for f in self.findings if f.signature == signature), None)


def generated(system: System, seed: int, steps: int, *, keep_queue_alive: bool = False) -> Iterator[Action]:
    """``steps`` actions from an ``ActionGenerator`` seeded with ``seed``, aimed at the system as
    each burst is drawn."""
    generator = ActionGenerator(system, random.Random(seed), keep_queue_alive=keep_queue_alive)
    count = 0
    while count < steps:
        for action in generator.next():
            if count >= steps:
                return
            count += 1
            yield action


Emit = Callable[[str, object], None]


def _drive(system: System, source: Iterator[Action], emit: Emit, stop_at: str | None) -> None:
    session = Session(system)
    for finding in session.boot().findings:
        emit("finding", finding)
        if finding.signature == stop_at:
            return
    while True:
        try:
            action = next(source)
        except StopIteration:
            return
        except Exception as exc:  # a bug in the generator: a crash finding, and the run ends
            emit("error", from_exception(exc, session.steps, "generating the next action"))
            return
        emit("action", action)
        outcome = session.step(action)
        emit("result", outcome.result)
        for finding in outcome.findings:
            emit("finding", finding)
        if stop_at is not None and any(f.signature == stop_at for f in outcome.findings):
            return


class Runner:
    """Runs scripts and episodes on fresh systems of ``spec`` (see the module docstring)."""

    def __init__(
        self, spec: SystemSpec, *, fork: bool | None = None, step_timeout: float | None = None
    ) -> None:
        self.spec = resolve_spec(spec)
        self.fork = hasattr(os, "fork") if fork is None else fork and hasattr(os, "fork")
        self.step_timeout = DEFAULT_STEP_TIMEOUT if step_timeout is None else step_timeout
        self._template: System | None = None
        self.runs = 0

    @property
    def template(self) -> System:
        if self._template is None:
            self._template = build_system(self.spec)
        return self._template

    # -- the two kinds of run ------------------------------------------------------------------------------
    def run_actions(self, actions: Sequence[Action], *, stop_at: str | None = None) -> RunOutcome:
        """Run ``actions`` in order (stopping early once a finding of class ``stop_at`` appears)."""
        return self._run(lambda system: iter(actions), stop_at)

    def run_episode(
        self, seed: int, steps: int, *, stop_at: str | None = None, keep_queue_alive: bool = False
    ) -> RunOutcome:
        """Run ``steps`` actions generated with ``seed``."""
        return self._run(
            lambda system: generated(system, seed, steps, keep_queue_alive=keep_queue_alive), stop_at
        )

    # -- running -------------------------------------------------------------------------------------------
    def _run(self, source: Callable[[System], Iterator[Action]], stop_at: str | None) -> RunOutcome:
        self.runs += 1
        start = time.perf_counter()
        outcome = self._forked(source, stop_at) if self.fork else self._in_process(source, stop_at)
        outcome.elapsed_s = time.perf_counter() - start
        return outcome

    def _in_process(self, source: Callable[[System], Iterator[Action]], stop_at: str | None) -> RunOutcome:
        outcome = RunOutcome()
        system = build_system(self.spec)
        try:
            _drive(system, source(system), lambda kind, value: _collect(outcome, kind, value), stop_at)
        except Exception as exc:  # a bug in the runner or the generator: report it as a crash
            outcome.findings.append(from_exception(exc, -1, "driving the run"))
        finally:
            outcome.modeled_ns = system.clock_ns
            system.close()
        return outcome

    def _forked(self, source: Callable[[System], Iterator[Action]], stop_at: str | None) -> RunOutcome:
        template = self.template
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run, stream, exit without running the parent's cleanup
            code = 0
            try:
                os.close(read_fd)
                _child(template, source, stop_at, write_fd)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(write_fd)
        outcome = RunOutcome()
        done = timed_out = False
        try:
            for kind, value in _messages(read_fd, self.step_timeout):
                if kind == "done":
                    outcome.modeled_ns = int(value)  # type: ignore[call-overload]
                    done = True
                else:
                    _collect(outcome, kind, value)
        except TimeoutError:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
        finally:
            os.close(read_fd)
            _, status = os.waitpid(pid, 0)
        if timed_out:
            outcome.hung = True
            last = outcome.actions[-1].KIND if outcome.actions else "boot"
            outcome.findings.append(hang(len(outcome.actions) - 1, last, self.step_timeout))
        elif not done:
            outcome.findings.append(_died(status, len(outcome.actions) - 1))
        return outcome


def _collect(outcome: RunOutcome, kind: str, value: object) -> None:
    if kind == "action":
        assert isinstance(value, Action)
        outcome.actions.append(value)
    elif kind == "result":
        outcome.results.append(str(value))
    elif kind in ("finding", "error"):
        assert isinstance(value, Finding)
        outcome.findings.append(value)


def _child(
    template: System, source: Callable[[System], Iterator[Action]], stop_at: str | None, fd: int
) -> None:
    def emit(kind: str, value: object) -> None:
        data = pickle.dumps((kind, value), protocol=pickle.HIGHEST_PROTOCOL)
        _write_all(fd, _HEADER.pack(len(data)) + data)

    try:
        _drive(template, source(template), emit, stop_at)
    except Exception as exc:  # a bug in the runner or the generator: report it as a crash
        emit("error", from_exception(exc, -1, "driving the run"))
    emit("done", template.clock_ns)
    os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _messages(fd: int, timeout: float) -> Iterator[tuple[str, object]]:
    buffer = b""
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise TimeoutError
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        buffer += chunk
        while len(buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(buffer)
            if len(buffer) < _HEADER.size + length:
                break
            message = pickle.loads(buffer[_HEADER.size : _HEADER.size + length])
            buffer = buffer[_HEADER.size + length :]
            yield message


def _died(status: int, step: int) -> Finding:
    how = (
        f"was killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else "ended without a result"
    )
    return Finding("crash", "crash:child-died", step, f"the run's process {how}")


__all__ = ["DEFAULT_STEP_TIMEOUT", "RunOutcome", "Runner", "generated"]
