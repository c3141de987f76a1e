"""Named, reproducible experiments: boot a platform under a design, run a workload, report.

``DESIGNS`` maps each design the command line offers to the function that runs it
(``module:function``, imported when the design runs, so listing the choices stays cheap);
adding a design is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from pkvm_smmu.scenarios.boot import RunOptions
    from pkvm_smmu.scenarios.report import RunReport

    Design = Callable[[RunOptions], RunReport]

# RunOptions live in scenarios.boot, RunReport in scenarios.report.
DESIGNS: dict[str, str] = {
    "native": "pkvm_smmu.scenarios.native:run_native",
    "pv-identity": "pkvm_smmu.scenarios.pv:run_pv_identity",
    "pv-paging": "pkvm_smmu.scenarios.pv:run_pv_paging",
    "trap-emulate": "pkvm_smmu.scenarios.pkvm:run_pkvm",
}
DEFAULT_DESIGN = "trap-emulate"


def design(name: str) -> Design:
    """The function that runs design ``name``; KeyError naming the choices for an unknown one."""
    try:
        target = DESIGNS[name]
    except KeyError:
        raise KeyError(f"unknown design '{name}' (have: {', '.join(DESIGNS)})") from None
    module, _, function = target.partition(":")
    return cast("Design", getattr(import_module(module), function))


def run(options: RunOptions) -> RunReport:
    """Run ``options.design`` with ``options``."""
    return design(options.design)(options)


__all__ = ["DEFAULT_DESIGN", "DESIGNS", "design", "run"]
