"""The adversarial host: what a malicious host kernel can do once pKVM has deprivileged it.

Typical use::

    system = build_system(SystemSpec(design="trap-emulate", policy="v4"))
    for action in [RegWrite(0, Reg.GBPA, 4, 0), RegWrite(0, Reg.CR0, 4, 0)]:
        apply(system, action)
        for violation in system.check().violations:
            ...

The vocabulary (``ACTIONS``): register loads and stores at any offset and size (``RegRead``,
``RegWrite``), stores to any memory, named by what the host driver allocated or by address
(``MemWrite``, ``TARGETS``), commands through the host driver's queue (``Command``), any hypercall
with any arguments (``Hypercall``), donating and sharing pages (``Donate``), any DMA from any
StreamID, SubstreamID and address, ATS included (``Dma``), the host's ordinary driver operations
(``Attach``, ``DmaMap``, ``DmaUnmap``, ``IommuMap``, ``IommuUnmap``), and modeled time (``Advance``).
Each action is a frozen dataclass with a JSON form (``to_json``/``action_from_json``); ``apply``
never raises because of an argument's value. ``ActionGenerator`` produces seeded bursts aimed at
the live system; ``pkvm_smmu.verify.adversary.strategies`` has Hypothesis strategies (needs the
``test`` extra).
"""

from pkvm_smmu.verify.adversary._actions import (
    ACCESS_SIZES,
    ACTIONS,
    DIRECTIONS,
    DMA_MODES,
    DOMAIN_KINDS,
    DONATIONS,
    TARGETS,
    Action,
    ActionFormatError,
    Advance,
    Attach,
    Command,
    Dma,
    DmaMap,
    DmaUnmap,
    Donate,
    Hypercall,
    IommuMap,
    IommuUnmap,
    MemWrite,
    RegRead,
    RegWrite,
    action_from_json,
    actions_to_json,
)
from pkvm_smmu.verify.adversary._apply import apply
from pkvm_smmu.verify.adversary._generate import ActionGenerator
from pkvm_smmu.verify.adversary._system import (
    ATTACKABLE_DESIGNS,
    Checked,
    SpecError,
    System,
    SystemSpec,
    build_system,
    resolve_spec,
)
from pkvm_smmu.verify.adversary._targets import resolve

__all__ = [
    "ACCESS_SIZES",
    "ACTIONS",
    "ATTACKABLE_DESIGNS",
    "DIRECTIONS",
    "DMA_MODES",
    "DOMAIN_KINDS",
    "DONATIONS",
    "TARGETS",
    "Action",
    "ActionFormatError",
    "ActionGenerator",
    "Advance",
    "Attach",
    "Checked",
    "Command",
    "Dma",
    "DmaMap",
    "DmaUnmap",
    "Donate",
    "Hypercall",
    "IommuMap",
    "IommuUnmap",
    "MemWrite",
    "RegRead",
    "RegWrite",
    "SpecError",
    "System",
    "SystemSpec",
    "action_from_json",
    "actions_to_json",
    "apply",
    "build_system",
    "resolve",
    "resolve_spec",
]
