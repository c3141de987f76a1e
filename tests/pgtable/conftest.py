"""Rigs for page-table tests: a bus with RAM, the hyp's memory path, an allocator, a table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from pkvm_smmu.machine.bus import HYP_CPU, SystemBus
from pkvm_smmu.pgtable import BusTableMemory, IoPageTable, PageTableConfig, RangePageAllocator

TABLE_BASE = 0xF_0000_0000  # table pages: 60 GiB, clear of the test mappings (never accessed)


class RecordingFlush:
    """``TlbFlushOps`` that records each synchronous walk invalidation."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def tlb_flush_walk(self, iova: int, size: int, granule: int) -> None:
        self.calls.append((iova, size, granule))


@dataclass
class Rig:
    bus: SystemBus
    memory: BusTableMemory
    allocator: RangePageAllocator
    table: IoPageTable
    flush: RecordingFlush | None

    def u64(self, pa: int) -> int:
        return self.bus.ram.read_int(pa, 8)


def build_rig(config: PageTableConfig, table_pages: int = 256, *, flush: bool = False) -> Rig:
    bus = SystemBus()
    size = table_pages * config.granule.size
    bus.add_ram(TABLE_BASE, size, "tables")
    memory = BusTableMemory(bus, HYP_CPU)
    allocator = RangePageAllocator(TABLE_BASE, size, config.granule.size, memory=memory)
    ops = RecordingFlush() if flush else None
    return Rig(bus, memory, allocator, IoPageTable(config, memory, allocator, ops), ops)


@pytest.fixture(scope="session")
def make_rig() -> Callable[..., Rig]:
    return build_rig
