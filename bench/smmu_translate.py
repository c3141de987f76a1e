"""DMA translations per second through a programmed SMMUv3 (``SmmuV3.translate``).

Targets (DESIGN.md rule 9), one core:
  - TLB hits:                 >= 1,000,000 translations/s (prebuilt Transaction, micro-TLB path)
  - stage-1 4-level misses:   >=   200,000 translations/s (4 KiB granule, 48-bit VA)
  - nested misses:            >=    50,000 translations/s (4 KiB/4 KiB, stage-1 tables at IPAs)

Misses cycle through 4096 distinct pages with a TLBI_NSNH_ALL between rounds (timed, and
negligible), so every translation walks. Also reported, without targets: the hit path below the
micro-TLB (configuration cache + architectural TLB), and an 8-byte ``dma_read`` with a TLB hit.
Figures are the best of several runs of process time: this measures the model, not in it.

    python3 bench/smmu_translate.py [--iterations N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable

from pkvm_smmu.arch.registers import CR0, STRTAB_BASE, STRTAB_BASE_CFG, Reg
from pkvm_smmu.arch.strtab import CD, STE, SteConfig
from pkvm_smmu.arch.vmsa import GRANULE_4K
from pkvm_smmu.machine.bus import HYP_CPU, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.smmu import SmmuFeatures, SmmuV3
from pkvm_smmu.machine.smmu.types import Outcome, Transaction
from pkvm_smmu.pgtable import BusTableMemory, IoPageTable, PageTableConfig, Prot, RangePageAllocator

HIT_TARGET = 1_000_000
S1_MISS_TARGET = 200_000
NESTED_MISS_TARGET = 50_000
REPEATS = 5
MISS_PAGES = 4096  # the working set of distinct pages the miss benchmarks cycle through

RAM_BASE = 0x8000_0000
RAM_SIZE = 0x4000_0000
SMMU_BASE = 0x0900_0000
IPA_OFFSET = 0x1_0000_0000  # nested: IPA = PA + this, for all of RAM
VA_BASE = 0x12_0000_0000
RW = Prot.READ | Prot.WRITE | Prot.CACHE


class Machine:
    """One SMMU on a bus with RAM, brought up by direct register writes (no command queue needed:
    the caches start empty)."""

    def __init__(self) -> None:
        self.bus = SystemBus()
        self.bus.add_ram(RAM_BASE, RAM_SIZE)
        self.clock = Clock()
        self.smmu = SmmuV3("smmu0", self.bus, self.clock, SmmuFeatures(), SMMU_BASE)
        self.memory = BusTableMemory(self.bus, HYP_CPU)
        self._next = RAM_BASE

    def alloc(self, size: int, align: int = 4096) -> int:
        base = -(-self._next // align) * align
        self._next = base + size
        return base

    def reg(self, reg: Reg, value: int, size: int = 4) -> None:
        self.bus.write(HYP_CPU, SMMU_BASE + int(reg), size, value)

    def enable(self, strtab: int) -> None:
        self.reg(Reg.STRTAB_BASE, STRTAB_BASE.ADDR.insert_address(strtab), 8)
        self.reg(Reg.STRTAB_BASE_CFG, STRTAB_BASE_CFG.encode(LOG2SIZE=4))
        self.reg(Reg.CR0, CR0.encode(SMMUEN=1))
        self.clock.advance(10_000)
        assert self.smmu.smmu_enabled

    def table(self, stage: int, pages: int = 2048) -> IoPageTable:
        config = PageTableConfig(
            stage=stage, granule=GRANULE_4K, ias=48, oas=48, pgsize_bitmap=GRANULE_4K.size
        )
        base = self.alloc(pages * 4096)
        return IoPageTable(config, self.memory, RangePageAllocator(base, pages * 4096, memory=self.memory))


class IpaMemory:
    """Stage-1 table memory at IPAs, where stage 2 maps IPA = PA + IPA_OFFSET (linear)."""

    def __init__(self, inner: BusTableMemory) -> None:
        self.inner = inner

    def read_u64(self, pa: int) -> int:
        return self.inner.read_u64(pa - IPA_OFFSET)

    def write_u64(self, pa: int, value: int) -> None:
        self.inner.write_u64(pa - IPA_OFFSET, value)

    def read_table(self, pa: int, length: int) -> bytes:
        return self.inner.read_table(pa - IPA_OFFSET, length)

    def write_table(self, pa: int, data: bytes | bytearray | memoryview) -> None:
        self.inner.write_table(pa - IPA_OFFSET, data)

    def zero_page(self, pa: int, size: int = 4096) -> None:
        self.inner.zero_page(pa - IPA_OFFSET, size)


class IpaAllocator(RangePageAllocator):
    """Hands out table pages by IPA."""

    def alloc_page(self) -> int | None:
        pa = super().alloc_page()
        return None if pa is None else pa + IPA_OFFSET

    def alloc_pages(self, count: int) -> int | None:
        if count == 1:
            return self.alloc_page()  # the base class would call alloc_page itself
        pa = super().alloc_pages(count)
        return None if pa is None else pa + IPA_OFFSET


def stage1_rig(pages: int) -> tuple[SmmuV3, list[Transaction]]:
    """SID 1: stage 1 only, ``pages`` distinct 4 KiB pages (one 4-level walk each)."""
    m = Machine()
    pt = m.table(1, pages=pages // 512 + 16)
    data = m.alloc(pages * 4096)
    assert pt.map(VA_BASE, data, pages * 4096, RW).error == 0
    cd_table = m.alloc(64, 64)
    cd = CD.encode(**pt.config.cd_fields(), V=1, ASID=1, R=1, A=1) | CD.TTB0.insert_address(pt.root)
    m.bus.write_bytes(HYP_CPU, cd_table, CD.to_bytes(cd))
    strtab = m.alloc(64 * 16, 1024)
    ste = STE.encode(V=1, CONFIG=SteConfig.S1_TRANS) | STE.S1CONTEXTPTR.insert_address(cd_table)
    m.bus.write_bytes(HYP_CPU, strtab + 64, STE.to_bytes(ste))
    m.enable(strtab)
    return m.smmu, [Transaction(1, VA_BASE + i * 4096 + 0x40, 8, False) for i in range(pages)]


def nested_rig(pages: int) -> tuple[SmmuV3, list[Transaction]]:
    """SID 2: nested, 4 KiB at both stages; the CD and stage-1 tables live at IPAs that stage 2
    maps page by page, as does every data page."""
    m = Machine()
    s2 = m.table(2, pages=1024)
    s1_base = m.alloc((pages // 512 + 16) * 4096)
    s1_config = PageTableConfig(stage=1, granule=GRANULE_4K, ias=48, oas=48, pgsize_bitmap=GRANULE_4K.size)
    allocator = IpaAllocator(s1_base, (pages // 512 + 16) * 4096, memory=m.memory)
    s1 = IoPageTable(s1_config, IpaMemory(m.memory), allocator)
    data = m.alloc(pages * 4096)
    cd_table = m.alloc(4096)
    # Stage 2: every page of RAM used so far at IPA = PA + IPA_OFFSET, 4 KiB leaves.
    used = m.alloc(0) - RAM_BASE
    assert s2.map(RAM_BASE + IPA_OFFSET, RAM_BASE, used, RW).error == 0
    assert s1.map(VA_BASE, data + IPA_OFFSET, pages * 4096, RW).error == 0
    cd = CD.encode(**s1.config.cd_fields(), V=1, ASID=1, R=1, A=1) | CD.TTB0.insert_address(s1.root)
    m.bus.write_bytes(HYP_CPU, cd_table, CD.to_bytes(cd))
    strtab = m.alloc(64 * 16, 1024)
    ste = (
        STE.encode(V=1, CONFIG=SteConfig.NESTED, S2VMID=3, S2R=1, **s2.config.vtcr_fields())
        | STE.S1CONTEXTPTR.insert_address(cd_table + IPA_OFFSET)
        | STE.S2TTB.insert_address(s2.root)
    )
    m.bus.write_bytes(HYP_CPU, strtab + 2 * 64, STE.to_bytes(ste))
    m.enable(strtab)
    return m.smmu, [Transaction(2, VA_BASE + i * 4096 + 0x40, 8, False) for i in range(pages)]


def best_rate(body: Callable[[], int]) -> float:
    best = 0.0
    for _ in range(REPEATS):
        start = time.process_time()
        n = body()
        elapsed = time.process_time() - start
        best = max(best, n / elapsed if elapsed > 0 else float("inf"))
    return best


def missing(
    smmu: SmmuV3, txns: list[Transaction], n: int, rewarm: Transaction | None = None
) -> Callable[[], int]:
    """Translate distinct pages, each once per round; between rounds (inside the timed region)
    TLBI_NSNH_ALL empties the TLB, so every translation walks. ``rewarm``: translated right after
    each invalidation so that a nested stream's stage-2 entries for its table pages are back in the
    TLB, as for a streaming device; the timed misses then walk stage 1 (table IPAs through the
    stage-2 TLB) and stage 2 for each distinct output IPA."""
    translate = smmu.translate
    invalidate = smmu.tlb.invalidate_nsnh_all
    rounds = max(1, n // len(txns))

    def body() -> int:
        for _ in range(rounds):
            invalidate()
            if rewarm is not None:
                translate(rewarm)
            for txn in txns:
                translate(txn)
        return rounds * len(txns)

    return body


def report(label: str, rate: float, target: int | None) -> bool:
    if target is None:
        print(f"{label:44s} {rate:>12,.0f}/s  {1e6 / rate:6.2f} us")
        return True
    met = rate >= target
    verdict = "meets" if met else "MISSES"
    print(f"{label:44s} {rate:>12,.0f}/s  {1e6 / rate:6.2f} us  ({verdict} >= {target:,}/s)")
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50_000, help="translations per timed run")
    parser.add_argument("--profile", action="store_true", help="cProfile each case and print hot spots")
    args = parser.parse_args(argv)
    n = max(args.iterations, 512)
    results = []

    # -- hits -----------------------------------------------------------------------------------
    smmu, txns = stage1_rig(512)
    hit = txns[7]
    assert smmu.translate(hit).outcome is Outcome.OK
    translate = smmu.translate

    def hits() -> int:
        for _ in range(n):
            translate(hit)
        return n

    results.append(report("TLB hit, translate() (micro-TLB)", best_rate(hits), HIT_TARGET))
    warm = txns[:256]
    for txn in warm:
        translate(txn)

    def hits_many() -> int:
        rounds = max(1, n // len(warm))
        for _ in range(rounds):
            for txn in warm:
                translate(txn)
        return rounds * len(warm)

    report("TLB hit, translate(), 256 pages round robin", best_rate(hits_many), None)
    slow = smmu.translator._translate_slow

    def hits_slow() -> int:
        for _ in range(n):
            slow(hit)
        return n

    report("TLB hit below the micro-TLB (config + TLB)", best_rate(hits_slow), None)
    dma_read = smmu.dma_read

    def reads() -> int:
        for _ in range(n):
            dma_read(hit)
        return n

    report("dma_read of 8 bytes, TLB hit", best_rate(reads), None)

    # -- misses ---------------------------------------------------------------------------------
    smmu1, txns1 = stage1_rig(MISS_PAGES)
    s1_misses = missing(smmu1, txns1, n)
    results.append(report("stage-1 4-level miss", best_rate(s1_misses), S1_MISS_TARGET))
    assert all(smmu1.translate(t).outcome is Outcome.OK for t in txns1[:4])

    smmu2, txns2 = nested_rig(MISS_PAGES + 1)
    nested_misses = missing(smmu2, txns2[:-1], n, rewarm=txns2[-1])
    results.append(
        report("nested miss (S1 4-level over S2 4-level)", best_rate(nested_misses), NESTED_MISS_TARGET)
    )
    assert smmu2.translate(txns2[0]).outcome is Outcome.OK

    if args.profile:
        for label, body in (("hits", hits), ("stage-1 misses", s1_misses), ("nested misses", nested_misses)):
            profiler = cProfile.Profile()
            profiler.runcall(body)
            print(f"\n--- profile: {label} ---")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(12)

    met = all(results)
    print("all targets met" if met else "some targets MISSED")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
