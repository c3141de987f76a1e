"""The sanitizer: architecture-contract checks on the software that programs an SMMUv3.

Typical use::

    sanitizer = Sanitizer.for_machine(machine, host_pages=pkvm.mem_protect)
    ...  # boot, run a workload
    for report in sanitizer.finish():
        ...
    sanitizer.coverage  # what was judged: zero reports of zero checks mean nothing

Checks (each report names the writer's access and where the reliance showed, see ``Check``):
stale use of cached configuration or translations, non-hitless or ILLEGAL intermediate states of
live STE/CD updates, register interface misuse (guarded writes, enables used before their ACK,
queue index misuse), and hyp double fetches of host memory while handling one trap.
"""

from pkvm_smmu.verify.sanitizer._core import TRAP_BEGIN, TRAP_END, Sanitizer
from pkvm_smmu.verify.sanitizer._double_fetch import HostPages
from pkvm_smmu.verify.sanitizer._report import Check, Coverage, Location, SanitizerReport

__all__ = [
    "TRAP_BEGIN",
    "TRAP_END",
    "Check",
    "Coverage",
    "HostPages",
    "Location",
    "Sanitizer",
    "SanitizerReport",
]
