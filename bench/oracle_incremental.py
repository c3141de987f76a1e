"""Cost of the isolation oracle on the pKVM-booted default platform (``trap-emulate``, v4): an
incremental ``check()`` after one step, and ``check_full()`` from scratch.

Target: ``check()`` after a typical step well under 1 ms, so an adversary with the oracle on can
reach >= 1,000 steps/s per core.

After boot and the native DMA workload, a seeded mix of steps runs, each followed by one timed
``check()``: a DMA engine's DMA to an IOVA its domain maps or to one it does not (a fault, an event
record), a driver copy (map, doorbell, DMA, unmap, TLBI), a trapped host register read or write,
a host store to its own memory, a donation to the hyp or back (the identity stage-2 and the TLBs
follow), and an ATS Translated write. Figures are process CPU time (other processes on the
machine do not count), medians and means per kind in microseconds; ``check_full()`` is the mean
of a few runs. The default platform's ATS-capable
endpoint is a standing violation under v4 (STE.EATS passes through), so every check has some.

    python3 bench/oracle_incremental.py [--steps N] [--seed S] [--kind TEXT] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import time
from collections.abc import Callable

from pkvm_smmu.arch.registers import IRQ_CTRL, Reg
from pkvm_smmu.host.iommu import DmaDirection, dma_map_single, dma_mapping_error
from pkvm_smmu.machine.memory import PAGE_SHIFT, PAGE_SIZE
from pkvm_smmu.scenarios.boot import RunOptions
from pkvm_smmu.scenarios.native import run_dma_workload
from pkvm_smmu.scenarios.pkvm import PkvmSystem, boot_pkvm
from pkvm_smmu.verify.oracle import IsolationOracle

TARGET_US = 1000.0
FULL_REPEATS = 5


class Steps:
    """The step vocabulary, over one booted system."""

    def __init__(self, system: PkvmSystem, rng: random.Random) -> None:
        self.s = system
        self.rng = rng
        machine = system.machine
        self.host = system.host
        self.cpu = machine.host_cpu()
        self.smmu = next(iter(machine.smmus.values()))
        self.mp = system.pkvm.mem_protect
        by_sid = {d.stream_id: d for d in machine.dma_devices.values() if d.stream_id is not None}
        self.engines = []  # (driver's device, endpoint, IOVAs its domain maps)
        for dmae in self.host.dma_engines.values():
            sids = self.host.stream_ids(dmae.dev)
            device = by_sid.get(sids[0]) if sids else None
            if device is None:
                continue
            iovas = []
            for _ in range(4):
                page = self.host.mm.alloc_zeroed_pages(1)
                assert page is not None
                iova = dma_map_single(dmae.dev, page, PAGE_SIZE, DmaDirection.BIDIRECTIONAL)
                if not dma_mapping_error(dmae.dev, iova):
                    iovas.append(iova)
            self.engines.append((dmae, device.endpoint, iovas))
        self.ats = [endpoint for _, endpoint, _ in self.engines if endpoint.ats_capable]
        self.own_pages = [self.host.mm.alloc_zeroed_pages(1) for _ in range(64)]
        self.spare = [p >> PAGE_SHIFT for p in self.own_pages[32:] if p is not None]
        self.donated: list[int] = []

    def kinds(self) -> dict[str, Callable[[], object]]:
        return {
            "DMA, mapped IOVA": self.dma_mapped,
            "DMA, unmapped IOVA (fault)": self.dma_fault,
            "driver copy (map/DMA/unmap/TLBI)": self.copy,
            "host register read (trapped)": self.reg_read,
            "host register write (trapped)": self.reg_write,
            "host store to its memory": self.store,
            "donate a page to the hyp / back": self.donate,
            "ATS Translated write": self.ats_write,
        }

    def dma_mapped(self) -> object:
        _, endpoint, iovas = self.rng.choice(self.engines)
        iova = self.rng.choice(iovas) + self.rng.randrange(0, PAGE_SIZE - 64, 8)
        return endpoint.write(iova, b"bench") if self.rng.random() < 0.5 else endpoint.read(iova, 32)

    def dma_fault(self) -> object:
        _, endpoint, _ = self.rng.choice(self.engines)
        return endpoint.read(0xDEAD_0000 + self.rng.randrange(0, 1 << 20, PAGE_SIZE), 8)

    def copy(self) -> object:
        dmae, _, _ = self.rng.choice(self.engines)
        return dmae.copy(PAGE_SIZE, seed=self.rng.randrange(1 << 16))

    def reg_read(self) -> object:
        reg = self.rng.choice([Reg.CR0, Reg.CR0ACK, Reg.GERROR, Reg.IDR0, Reg.CMDQ_CONS])
        return self.cpu.read(self.smmu.base + reg, 4)

    def reg_write(self) -> object:
        value = self.smmu.regs.irq_ctrl | IRQ_CTRL.GERROR_IRQEN.in_place_mask
        return self.cpu.write(self.smmu.base + Reg.IRQ_CTRL, 4, value)

    def store(self) -> object:
        page = self.rng.choice(self.own_pages[:32])
        assert page is not None
        return self.cpu.write(page + self.rng.randrange(0, PAGE_SIZE, 8), 8, self.rng.getrandbits(64))

    def donate(self) -> object:
        if self.donated and (not self.spare or self.rng.random() < 0.5):
            pfn = self.donated.pop(self.rng.randrange(len(self.donated)))
            self.spare.append(pfn)
            return self.mp.hyp_donate_host(pfn)
        pfn = self.spare.pop(self.rng.randrange(len(self.spare)))
        self.donated.append(pfn)
        return self.mp.host_donate_hyp(pfn)

    def ats_write(self) -> object:
        if not self.ats:
            return None
        page = self.rng.choice(self.own_pages[:32])
        assert page is not None
        return self.rng.choice(self.ats).issue_translated(page, data=b"ats")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="profile the checks of the step mix")
    parser.add_argument("--kind", help="run only the step kinds whose name contains this")
    parser.add_argument("--sort", default="tottime", help="profile order (pstats key)")
    args = parser.parse_args()

    system = boot_pkvm(RunOptions(design="trap-emulate"))
    machine = system.machine
    driver = system.hyp.driver
    assert driver is not None
    smmus = list(machine.smmus.values())
    start = time.process_time()
    oracle = IsolationOracle.for_pkvm(machine.bus, smmus, system.pkvm.mem_protect, driver)
    first = oracle.check()
    first_s = time.process_time() - start
    run_dma_workload(system.host, 0)
    oracle.check()
    steps = Steps(system, random.Random(args.seed))
    kinds = steps.kinds()
    names = [name for name in kinds if args.kind is None or args.kind in name]
    times: dict[str, list[float]] = {name: [] for name in names}
    step_times: dict[str, list[float]] = {name: [] for name in names}
    profiler = cProfile.Profile() if args.profile else None
    for _ in range(args.steps):
        name = steps.rng.choice(names)
        t0 = time.process_time()
        kinds[name]()
        t1 = time.process_time()
        if profiler is not None:
            profiler.enable()
        oracle.check()
        if profiler is not None:
            profiler.disable()
        t2 = time.process_time()
        step_times[name].append(t1 - t0)
        times[name].append(t2 - t1)

    full = []
    for _ in range(FULL_REPEATS):
        t0 = time.process_time()
        result = oracle.check_full()
        full.append(time.process_time() - t0)
    assert result == oracle.check(), "incremental and full checks disagree"

    every = [t for name in names for t in times[name]]
    mean_us = statistics.fmean(every) * 1e6
    print(f"pKVM (v4) default platform, {len(smmus)} SMMU, {len(steps.engines)} DMA engines; "
          f"{len(first)} standing violations")  # fmt: skip
    print(f"first check() after attaching (from scratch): {first_s * 1e3:8.1f} ms")
    print(f"check_full():                                 {statistics.fmean(full) * 1e3:8.1f} ms")
    header = "median     mean      max   (the step itself, mean)"
    print(f"check() after one step, {args.steps} steps (us):   {header}")
    for name in names:
        t = times[name]
        if t:
            print(f"  {name:36s} {statistics.median(t) * 1e6:9.1f} {statistics.fmean(t) * 1e6:8.1f} "
                  f"{max(t) * 1e6:8.0f}   ({statistics.fmean(step_times[name]) * 1e6:7.0f})")  # fmt: skip
    verdict = "OK" if mean_us < TARGET_US else "SLOW"
    print(f"  all steps: mean {mean_us:.1f} us, median {statistics.median(every) * 1e6:.1f} us "
          f"(target well under {TARGET_US:.0f} us) {verdict}")  # fmt: skip
    print(f"  oracle-limited rate: {1e6 / mean_us:,.0f} checks/s")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats(args.sort).print_stats(30)


if __name__ == "__main__":
    main()
