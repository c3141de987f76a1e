"""Firmware node handles: what the kernel holds instead of a tree node.

A ``FwNode`` is small, immutable and hashable; two handles for the same node path are equal, so
the driver core can key dictionaries on them (``fwnode->dev``, fw_devlink links) without
holding the tree. ``compatible`` is a tuple, most specific first.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FwNode:
    path: str
    name: str = field(compare=False)  # node name with unit address, e.g. "iommu@9050000"
    compatible: tuple[str, ...] = field(default=(), compare=False)

    @property
    def full_name(self) -> str:
        """How traces print it (``%pOF``): the full path."""
        return self.path

    def __str__(self) -> str:
        return self.path
