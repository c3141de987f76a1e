"""Encodings only: SMMUv3 registers, stream-table structures, commands, events and VMSAv8-64
descriptors, each declared once in the specification's bit numbering. No state, no behaviour."""

from pkvm_smmu.arch._bitfield import Field, Layout

__all__ = ["Field", "Layout"]
