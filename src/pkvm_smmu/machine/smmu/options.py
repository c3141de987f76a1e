"""Implementation choices of one SMMU instance that the architecture leaves open (timing, resets,
CONSTRAINED UNPREDICTABLE options). Features (what the ID registers advertise) live in ``features.py``."""

from __future__ import annotations

from dataclasses import dataclass

from pkvm_smmu.arch.registers import GBPA, Shcfg

# GBPA reset values: QEMU's (bypass, SHCFG = use incoming), and a default-deny one.
GBPA_RESET_BYPASS = GBPA.encode(SHCFG=Shcfg.INCOMING)
GBPA_RESET_ABORT = GBPA.encode(SHCFG=Shcfg.INCOMING, ABORT=1)


@dataclass(frozen=True)
class SmmuOptions:
    # Modeled time from a CR0 / IRQ_CTRL / GBPA write until its Update completes (CR0ACK,
    # IRQ_CTRLACK, GBPA.UPDATE=0). Software that does not let time pass sees the old state.
    register_update_ns: int = 100
    # Modeled time to consume one command.
    command_ns: int = 50
    # Used by the configuration cache: prefetch reachable configuration ahead of use.
    eager_config_prefetch: bool = False
    # TLB entries kept (None: unbounded).
    tlb_capacity: int | None = None
    # GBPA after reset (UPDATE must be 0).
    gbpa_reset: int = GBPA_RESET_BYPASS
    # Page 0 offsets 0xA8/0xAC/0xC8/0xCC and the undefined Page 1 offsets are either RAZ/WI
    # (False, the default) or Page 0 and Page 1 alias each other completely (True, like QEMU).
    page1_alias_page0: bool = False
    # The implementation has wired interrupt outputs (edge, one per source). They pulse whenever a
    # source fires, alongside any MSI the source's configuration asks for (IHI 0070 §3.18.2).
    wired_irqs: bool = True

    def __post_init__(self) -> None:
        if self.register_update_ns < 0 or self.command_ns < 0:
            raise ValueError("register_update_ns and command_ns must not be negative")
        if self.tlb_capacity is not None and self.tlb_capacity < 0:
            raise ValueError("tlb_capacity must be None or >= 0")
        if self.gbpa_reset & ~GBPA.DEFINED_MASK or GBPA.UPDATE.get(self.gbpa_reset):
            raise ValueError(f"gbpa_reset {self.gbpa_reset:#x} sets UPDATE or undefined bits")
