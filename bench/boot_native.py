"""Time to boot the default platform natively and run the DMA workload (``pkvm-smmu run``'s work
without printing), in host process CPU time.

Target: under 0.5 s per boot + workload, so a design change is tried in seconds. Also reports the
boot alone and the modeled time the run covers.

Run: python3 bench/boot_native.py [--repeats N] [--trace]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from pkvm_smmu.scenarios.boot import RunOptions
from pkvm_smmu.scenarios.native import boot_native, run_dma_workload, run_native
from pkvm_smmu.trace import RecordingSink

TARGET_S = 0.5


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--trace", action="store_true", help="also time with a recording sink attached")
    args = parser.parse_args()
    options = RunOptions()

    boot_only = best(lambda: boot_native(options), args.repeats)

    def boot_and_work() -> None:
        system = boot_native(options)
        run_dma_workload(system.host, options.seed)

    total = best(boot_and_work, args.repeats)
    report = run_native(options)
    print(f"native boot, default platform:        {boot_only * 1000:7.1f} ms")
    print(f"native boot + DMA workload:           {total * 1000:7.1f} ms  (target < {TARGET_S * 1000:.0f} ms)"
          f"  {'OK' if total < TARGET_S else 'SLOW'}")  # fmt: skip
    print(f"modeled time covered:                 boot {report.boot_ns / 1000:.1f} us, "
          f"run {report.total_ns / 1e6:.2f} ms")  # fmt: skip
    if args.trace:

        def traced() -> None:
            system = boot_native(options, sinks=[RecordingSink()])
            run_dma_workload(system.host, options.seed)

        print(f"  ... with a recording sink:          {best(traced, args.repeats) * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
