"""Step-by-step explanations of a reachable address: which input reaches it and which descriptors
the walk reads on the way, found with the SMMU model's own walker over current memory."""

from __future__ import annotations

from collections.abc import Callable

from pkvm_smmu.machine.bus import ExternalAbort
from pkvm_smmu.machine.smmu.types import WalkConfig, WalkFault, WalkLeaf
from pkvm_smmu.machine.smmu.walk import walk
from pkvm_smmu.verify.oracle._items import WalkRef
from pkvm_smmu.verify.oracle._memory import MemoryView
from pkvm_smmu.verify.oracle._tables import Tree, TreeWalker


def _inputs_for(tree: Tree, output: int) -> list[int]:
    return [r_in + output - r_out for r_in, r_out, size, _ in tree.runs if r_out <= output < r_out + size]


class Explainer:
    def __init__(self, walker: TreeWalker, memory: MemoryView) -> None:
        self.walker = walker
        self.memory = memory

    def _read(self, pa: int) -> int | ExternalAbort:
        raw = self.memory.read(pa, 8)
        return ExternalAbort(pa, "not RAM") if raw is None else int.from_bytes(raw, "little")

    def _describe(self, what: str, address: int, leaf: WalkLeaf | WalkFault) -> str:
        if isinstance(leaf, WalkFault):
            return f"{what} of {address:#x} now faults ({leaf.event_type.name} at level {leaf.level})"
        chain = " -> ".join(f"{pa:#x}" for pa in leaf.path)
        output = leaf.output_base + (address - leaf.input_base)
        return (
            f"{what} of {address:#x}: descriptors at {chain}; level-{leaf.level} leaf "
            f"{leaf.descriptor:#x} maps it to {output:#x}"
        )

    def explain(self, ref: WalkRef, pa: int) -> tuple[str, ...]:
        """How a stream's translation reaches physical address ``pa``."""
        stage1, stage2 = ref.stage1, ref.stage2
        if stage1 is None:
            assert stage2 is not None
            return self._stage2(stage2, pa)
        s1 = self.walker.tree(stage1, stage2)
        if s1.device_defined:
            return (f"stage-1 table memory at {s1.device_defined[0]:#x} is MMIO: any output",)
        if stage2 is None:
            inputs = _inputs_for(s1, pa)
            if not inputs:
                return ()
            return (self._describe("stage-1 walk", inputs[0], walk(stage1, inputs[0], self._read)),)
        s2 = self.walker.tree(stage2)
        for ipa in _inputs_for(s2, pa):
            inputs = _inputs_for(s1, ipa)
            if inputs:
                translate = self._through(stage2)
                leaf = walk(stage1, inputs[0], self._read, translate)
                return (
                    self._describe("stage-1 walk (tables at IPAs)", inputs[0], leaf),
                    self._describe("stage-2 walk", ipa, walk(stage2, ipa, self._read)),
                )
        return self._stage2(stage2, pa)

    def _stage2(self, stage2: WalkConfig, pa: int) -> tuple[str, ...]:
        s2 = self.walker.tree(stage2)
        if s2.device_defined:
            return (f"stage-2 table memory at {s2.device_defined[0]:#x} is MMIO: any output",)
        inputs = _inputs_for(s2, pa)
        if not inputs:
            return ()
        return (self._describe("stage-2 walk", inputs[0], walk(stage2, inputs[0], self._read)),)

    def _through(self, stage2: WalkConfig) -> Callable[[int], int | WalkFault]:
        def translate(ipa: int) -> int | WalkFault:
            leaf = walk(stage2, ipa, self._read)
            if isinstance(leaf, WalkFault):
                return leaf
            return leaf.output_base + (ipa - leaf.input_base)

        return translate


__all__ = ["Explainer"]
