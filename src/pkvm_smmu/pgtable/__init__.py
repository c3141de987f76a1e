"""The software page-table library (the io-pgtable-arm of this world): builds and edits AArch64
stage-1 and stage-2 tables in simulated memory, for the host driver and for the hypervisor."""

from pkvm_smmu.pgtable.allocator import PageAllocator, RangePageAllocator
from pkvm_smmu.pgtable.config import PageTableConfig, S2Concat
from pkvm_smmu.pgtable.gather import GatherRange, IotlbGather, TlbFlushOps
from pkvm_smmu.pgtable.memory import BusTableMemory, TableMemory, TableMemoryAbort
from pkvm_smmu.pgtable.prot import MAIR, Prot, leaf_attributes
from pkvm_smmu.pgtable.table import IoPageTable, Leaf, LeafRun, MapResult

__all__ = [
    "MAIR",
    "BusTableMemory",
    "GatherRange",
    "IoPageTable",
    "IotlbGather",
    "Leaf",
    "LeafRun",
    "MapResult",
    "PageAllocator",
    "PageTableConfig",
    "Prot",
    "RangePageAllocator",
    "S2Concat",
    "TableMemory",
    "TableMemoryAbort",
    "TlbFlushOps",
    "leaf_attributes",
]
