"""The oracle's building blocks against simple references: ownership runs edited in place, run
intersection, and the table enumerator against the SMMU's own walker."""

from __future__ import annotations

import os
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from pkvm_smmu.machine.memory import PAGE_SIZE
from pkvm_smmu.machine.smmu.types import WalkFault
from pkvm_smmu.machine.smmu.walk import walk
from pkvm_smmu.pgtable import Prot
from pkvm_smmu.verify.oracle._memo import DependencyMemo
from pkvm_smmu.verify.oracle._memory import MemoryView
from pkvm_smmu.verify.oracle._ownership import _PageRuns
from pkvm_smmu.verify.oracle._runs import Forbidden, Runs
from pkvm_smmu.verify.oracle._tables import TreeWalker

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "machine", "smmu"))
from harness import harness, map_pages

OWNERS = st.sampled_from([None, "hyp", "guest1"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 8), OWNERS), max_size=30))
def test_page_runs_match_a_page_by_page_reference(edits: list[tuple[int, int, str | None]]) -> None:
    runs = _PageRuns(())
    reference: dict[int, str] = {}
    for start, count, owner in edits:
        runs.set(start, start + count, owner)
        for pfn in range(start, start + count):
            if owner is None:
                reference.pop(pfn, None)
            else:
                reference[pfn] = owner
    flattened = {pfn: owner for s, e, owner in runs.runs for pfn in range(s, e)}
    assert flattened == reference
    for (_, end, owner), (start, _, next_owner) in zip(runs.runs, runs.runs[1:], strict=False):
        assert end < start or owner != next_owner  # maximal runs, sorted and disjoint
        assert end <= start


@given(
    st.lists(st.tuples(st.integers(0, 60), st.integers(1, 10), st.sampled_from([1, 2, 3])), max_size=12),
    st.lists(st.tuples(st.integers(0, 60), st.integers(1, 10)), max_size=8),
)
def test_intersection_matches_a_byte_by_byte_reference(
    reach: list[tuple[int, int, int]], blocked: list[tuple[int, int]]
) -> None:
    runs = Runs.of((s, s + n, p) for s, n, p in reach)
    pages = _PageRuns((s, n, "hyp") for s, n in blocked)
    forbidden = Forbidden(pages.runs)
    got = {(x, p) for s, e, _, p in forbidden.intersect(runs) for x in range(s, e)}
    blocked_set = {x for s, e, _ in pages.runs for x in range(s, e)}
    want = {(x, p) for s, e, p in runs.items for x in range(s, e) if x in blocked_set}
    assert got == want


def test_enumerated_stage1_tree_agrees_with_the_walker() -> None:
    h = harness()
    pt = h.s1_table()
    targets = [h.buffer(PAGE_SIZE) for _ in range(6)]
    map_pages(pt, 0x1000_0000, targets[0], 3 * PAGE_SIZE)
    map_pages(pt, 0x2000_0000, targets[4], PAGE_SIZE, Prot.READ)
    map_pages(pt, 0x7F_FFFF_F000, targets[5], PAGE_SIZE)
    block = h.alloc(2 << 20, 2 << 20)
    map_pages(pt, 0x4000_0000, block, 2 << 20)
    cd = h.cd(pt)
    from pkvm_smmu.machine.smmu.decode import decode_cd

    ctx = decode_cd(0, 0, cd, 0, (0,), h.smmu.features, "el1")
    assert ctx.ttb0 is not None
    memo = DependencyMemo()
    tree = TreeWalker(MemoryView(h.bus, memo), memo).tree(ctx.ttb0)

    def read(pa: int) -> int:
        return h.bus.ram.read_int(pa, 8)

    mapped = 0
    for va, out, size, perms in tree.runs:
        for offset in (0, size - PAGE_SIZE):
            leaf = walk(ctx.ttb0, va + offset, read)
            assert not isinstance(leaf, WalkFault)
            assert leaf.output_base + (va + offset - leaf.input_base) == out + offset
            assert leaf.writable == bool(perms & 2)
        mapped += size
    assert mapped == 3 * PAGE_SIZE + 2 * PAGE_SIZE + (2 << 20)
    assert isinstance(walk(ctx.ttb0, 0x3000_0000, read), WalkFault)
