"""Adversarial steps per second with the isolation oracle on, on the default platform under pKVM
(``trap-emulate``, v4). Target: >= 1,000 steps/s per core.

Each episode is a fresh system (booted outside the timing: a campaign boots once per worker and
forks every run from that template) driven by the campaign's seeded generator, with the oracle's
incremental check (and its observed mode) after every action, exactly as ``pkvm-smmu fuzz`` runs
them. Two generator mixes:

- ``default``: the campaign's; now and then it stops the hyp's command queue (an illegal command,
  CMDQEN cleared: v4 lets the host do both), after which every trap waits out the hyp's 1 s
  (modeled) timeouts, polled every 64 us, and advancing time drives a GERROR interrupt storm;
- ``alive`` (``--keep-queue-alive``): the same without those.

Figures are process CPU time. Per action kind: count, mean cost and share of the time; the oracle's
share is measured around ``System.check``. ``--profile`` prints the top functions.

``--what-if-wfe`` measures what the mixes would cost if the hyp's ``wait_for`` and the host driver's
``poll_timeout`` slept like WFE (to the next modeled event, the SMMU's next timer, or the deadline)
instead of polling every 64 us: the same deadlines, far fewer polls. It patches them in this
process only; nothing in the package changes.

    python3 bench/adversary_steps.py [--episodes N] [--steps S] [--seed X] [--mix both|default|alive]
                                     [--profile] [--what-if-wfe]
"""

from __future__ import annotations

import argparse
import cProfile
import errno
import pstats
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from pkvm_smmu.verify.adversary import System, SystemSpec, build_system
from pkvm_smmu.verify.fuzz import Session, generated

TARGET = 1000.0


class Timed:
    """Process CPU time spent in ``System.check`` (the oracle)."""

    def __init__(self, system: System) -> None:
        self.seconds = 0.0
        self._check: Callable[[], object] = system.check

        def check() -> object:
            start = time.process_time()
            try:
                return self._check()
            finally:
                self.seconds += time.process_time() - start

        system.check = check  # type: ignore[method-assign]


def run_mix(alive: bool, episodes: int, steps: int, seed: int, profiler: cProfile.Profile | None) -> None:
    per_kind: dict[str, list[float]] = defaultdict(list)
    total = oracle = boot = 0.0
    count = 0
    for episode in range(episodes):
        start = time.process_time()
        system = build_system(SystemSpec())
        boot += time.process_time() - start
        timed = Timed(system)
        session = Session(system)
        session.boot()
        if profiler is not None:
            profiler.enable()
        for action in generated(system, seed + episode, steps, keep_queue_alive=alive):
            start = time.process_time()
            session.step(action)
            took = time.process_time() - start
            per_kind[action.KIND].append(took)
            total += took
            count += 1
        if profiler is not None:
            profiler.disable()
        oracle += timed.seconds
        system.close()
    name = "alive (--keep-queue-alive)" if alive else "default"
    rate = count / total if total else 0.0
    verdict = "meets" if rate >= TARGET else "misses"
    print(f"\nmix {name}: {episodes} episodes x {steps} steps = {count} steps in {total:.2f} s CPU")
    print(
        f"  {rate:,.0f} adversarial steps/s per core with the oracle on ({verdict} the {TARGET:,.0f} target)"
    )
    print(f"  oracle (check after every step): {oracle:.2f} s = {100 * oracle / total:.0f}% of the step time")
    print(f"  boot (not in the rate): {1000 * boot / episodes:.0f} ms per system")
    print(f"  {'kind':12s} {'count':>6s} {'mean ms':>9s} {'max ms':>9s} {'share':>6s}")
    for kind, costs in sorted(per_kind.items(), key=lambda item: -sum(item[1])):
        share = 100 * sum(costs) / total
        mean, worst = 1000 * sum(costs) / len(costs), 1000 * max(costs)
        print(f"  {kind:12s} {len(costs):6d} {mean:9.2f} {worst:9.1f} {share:5.0f}%")


def wfe_wait_for(io: Any, condition: Callable[[], bool], timeout_us: int = 1_000_000) -> int:
    """``wait_for`` that sleeps to the next modeled event instead of polling."""
    clock = io.cpu.clock
    deadline = io.now_ns() + timeout_us * 1000
    while not condition():
        now = io.now_ns()
        if now >= deadline:
            return -errno.ETIMEDOUT
        upcoming = clock.next_deadline()
        target = deadline if upcoming is None or upcoming > deadline else max(upcoming, now + 1)
        io.delay_ns(target - now)
    return 0


def wfe_poll_timeout(
    self: Any, condition: Callable[[], bool], timeout_us: float, max_delay_us: float = 64.0
) -> int:
    """The host driver's ``readx_poll_timeout``, sleeping to the next modeled event."""
    clock = self.cpu.clock
    deadline = clock.now_ns + round(timeout_us * 1000)
    while not condition():
        now = clock.now_ns
        if now >= deadline:
            return -errno.ETIMEDOUT
        upcoming = clock.next_deadline()
        target = deadline if upcoming is None or upcoming > deadline else max(upcoming, now + 1)
        self.cpu.udelay((target - now) / 1000)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50, help="steps per episode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", choices=("both", "default", "alive"), default="both")
    parser.add_argument("--profile", action="store_true", help="print the top functions by cumulative time")
    parser.add_argument("--what-if-wfe", action="store_true", help="the hyp's waits sleep to the next event")
    args = parser.parse_args()
    if args.what_if_wfe:
        from pkvm_smmu.host.arm_smmu_v3.mmio import Mmio
        from pkvm_smmu.hyp.smmuv3 import cmdq, device

        cmdq.wait_for = device.wait_for = wfe_wait_for  # type: ignore[assignment]
        Mmio.poll_timeout = wfe_poll_timeout  # type: ignore[method-assign]
        print("what-if: the hyp's and the host driver's polls sleep to the next modeled event (WFE)")
    print("pKVM (trap-emulate, v4) on the default platform; isolation oracle checked after every step")
    mixes = {"both": (False, True), "default": (False,), "alive": (True,)}[args.mix]
    for alive in mixes:
        profiler = cProfile.Profile() if args.profile else None
        run_mix(alive, args.episodes, args.steps, args.seed, profiler)
        if profiler is not None:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
