"""The isolation oracle: what every StreamID, and the SMMU itself, can reach, against what the
host may access (DESIGN.md: no device DMA ever reaches memory its owner may not touch).

``IsolationOracle.check()`` decides it statically after each step, incrementally;
``check_full()`` from scratch; ``observe=True`` also records actual accesses as they happen.
"""

from pkvm_smmu.verify.oracle._items import Violation
from pkvm_smmu.verify.oracle._observed import AccessMonitor, ObservedViolation
from pkvm_smmu.verify.oracle._oracle import HypSmmuDriver, IsolationOracle, hyp_structures
from pkvm_smmu.verify.oracle._ownership import (
    DeclaredStructures,
    HostOwnership,
    NoHypervisor,
    OwnershipView,
    StructuresSource,
)

__all__ = [
    "AccessMonitor",
    "DeclaredStructures",
    "HostOwnership",
    "HypSmmuDriver",
    "IsolationOracle",
    "NoHypervisor",
    "ObservedViolation",
    "OwnershipView",
    "StructuresSource",
    "Violation",
    "hyp_structures",
]
