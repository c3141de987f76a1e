"""Adversarial steps per second with the isolation oracle on, on the default platform under pKVM
(``trap-emulate``, v4 unless ``--policy``). Target: >= 1,000 steps/s per core.

Each episode is a fresh system (booted outside the timing: a campaign boots once per worker and
forks every run from that template) driven by the campaign's seeded generator, with the oracle's
incremental check (and its observed mode) after every action, exactly as ``pkvm-smmu fuzz`` runs
them. Two generator mixes:

- ``default``: the campaign's; now and then it stops the hyp's command queue (an illegal command,
  CMDQEN cleared: v4 lets the host do both), after which every trap waits out the hyp's 1 s
  (modeled) timeouts; the polls of those waits that nothing could change are skipped
  (``Clock.poll_backoff``), so that costs a few polls, not 15,000;
- ``alive`` (``--keep-queue-alive``): the same without those.

Figures are process CPU time. Per action kind: count, mean cost and share of the time; the oracle's
share is measured around ``System.check``. ``--profile`` prints the top functions.

    python3 bench/adversary_steps.py [--episodes N] [--steps S] [--seed X] [--mix both|default|alive]
                                     [--policy v4|hardened] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import defaultdict
from collections.abc import Callable

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


def run_mix(
    alive: bool, episodes: int, steps: int, seed: int, policy: str, profiler: cProfile.Profile | None
) -> None:
    per_kind: dict[str, list[float]] = defaultdict(list)
    total = oracle = boot = 0.0
    count = 0
    for episode in range(episodes):
        start = time.process_time()
        system = build_system(SystemSpec(policy=policy))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50, help="steps per episode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", default="v4", help="the hyp's emulation policy (v4, hardened)")
    parser.add_argument("--mix", choices=("both", "default", "alive"), default="both")
    parser.add_argument("--profile", action="store_true", help="print the top functions by cumulative time")
    args = parser.parse_args()
    print(f"pKVM (trap-emulate, {args.policy}) on the default platform; isolation oracle after every step")
    mixes = {"both": (False, True), "default": (False,), "alive": (True,)}[args.mix]
    for alive in mixes:
        profiler = cProfile.Profile() if args.profile else None
        run_mix(alive, args.episodes, args.steps, args.seed, args.policy, profiler)
        if profiler is not None:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
