"""Named, reproducible experiments: boot a platform under a design, run a workload, report.

``DESIGNS`` maps each design the command line offers to the function that runs it; adding a
design is one entry here.
"""

from collections.abc import Callable

from pkvm_smmu.scenarios.boot import RunOptions
from pkvm_smmu.scenarios.native import run_native
from pkvm_smmu.scenarios.report import RunReport

Design = Callable[[RunOptions], RunReport]

DESIGNS: dict[str, Design] = {
    "native": run_native,
}
DEFAULT_DESIGN = "native"


def run(options: RunOptions) -> RunReport:
    """Run ``options.design``; KeyError naming the choices for an unknown one."""
    try:
        design = DESIGNS[options.design]
    except KeyError:
        raise KeyError(f"unknown design '{options.design}' (have: {', '.join(DESIGNS)})") from None
    return design(options)


__all__ = ["DEFAULT_DESIGN", "DESIGNS", "Design", "RunOptions", "RunReport", "run"]
