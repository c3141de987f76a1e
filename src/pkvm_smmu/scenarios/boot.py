"""What every design's run shares: its options, loading the platform, tracing, and the wiring of
the machine's interrupt lines and MSIs to the host's IRQ layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pkvm_smmu.devicetree import DeviceTree, load_devicetree
from pkvm_smmu.host.irq import HostIrq, IrqMapping
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.irq import msi_line
from pkvm_smmu.machine.platform import DeviceSpec, Machine, parse_device_spec
from pkvm_smmu.platforms import DEFAULT, default_platform
from pkvm_smmu.trace import TraceBus


@dataclass(frozen=True)
class RunOptions:
    """One run of the main job. With the same options (seed included) a run is the same run."""

    platform: str | None = None  # a DTS or DTB file; None: the embedded default platform
    devices: tuple[str, ...] = ()  # extra PCI endpoints, --device syntax
    seed: int = 0
    cmdline: str = ""
    design: str = "native"
    boot_variant: str = "none"  # how drivers are ordered against pKVM's init; natively there is none
    trace_json: str | None = None  # Chrome/Perfetto trace-event file to write
    trace_jsonl: str | None = None  # JSONL trace to write
    # Designs with a hypervisor only: its emulation policy, whether the host asks for protected mode
    # (kvm-arm.mode=protected), and a way to make pKVM's initialisation fail ("cntfrq", "smmu-stage2").
    policy: str = "v4"
    pkvm: bool = True
    pkvm_fail: str | None = None

    @property
    def platform_name(self) -> str:
        return self.platform if self.platform is not None else f"{DEFAULT} (embedded)"

    def metadata(self) -> dict[str, Any]:
        """What every trace and report of the run records."""
        meta: dict[str, Any] = {"design": self.design}
        trap_emulate = self.design == "trap-emulate"
        if trap_emulate:  # the policy axis exists only where the hyp emulates the SMMU
            meta["policy"] = self.policy
        meta["boot_variant"] = self.boot_variant
        if trap_emulate:
            meta["pkvm"] = ("protected" if self.pkvm else "off") + (
                f", fail:{self.pkvm_fail}" if self.pkvm_fail else ""
            )
        meta.update(
            seed=self.seed, platform=self.platform_name, devices=list(self.devices), cmdline=self.cmdline
        )
        return meta


def load_platform_tree(platform: str | None) -> DeviceTree:
    """The tree of ``--platform`` (DTS or DTB; DeviceTreeError names the file) or the default."""
    return default_platform() if platform is None else load_devicetree(Path(platform))


def parse_devices(specs: Sequence[str]) -> list[DeviceSpec]:
    """Parse ``--device`` specs; DeviceSpecError names the bad option."""
    return [parse_device_spec(spec) for spec in specs]


def new_trace(clock: Clock, options: RunOptions) -> TraceBus:
    return TraceBus(lambda: clock.now_ns, metadata=options.metadata())


class HostIrqMask:
    """PSTATE.I of the host's CPU as far as the hypervisor is concerned: while the CPU is at EL2
    (a hypercall), host interrupts stay pending and are taken, once each, when it returns."""

    def __init__(self) -> None:
        self.depth = 0
        self._pending: dict[int, Callable[[], None]] = {}

    @contextmanager
    def at_el2(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            while not self.depth and self._pending:
                number = next(iter(self._pending))
                self._pending.pop(number)()

    def deliver(self, number: int, handler: Callable[[], None]) -> None:
        if self.depth:
            self._pending.setdefault(number, handler)
        else:
            handler()


def wire_host_interrupts(machine: Machine, irq: HostIrq, mask: HostIrqMask | None = None) -> None:
    """The interrupt controller as the host's irqchip: every line or MSI the host maps is
    delivered to ``generic_handle_irq`` when the machine raises it (or, with ``mask``, once the
    CPU is back from the hypervisor)."""

    def connect(mapping: IrqMapping) -> None:
        data = mapping.msi_data
        line = msi_line(data) if data is not None else mapping.hwirq
        number = mapping.irq

        def handle() -> None:
            irq.generic_handle_irq(number)

        def deliver(_line: str) -> None:
            if mask is None:
                handle()
            else:
                mask.deliver(number, handle)

        machine.irq.connect(line, deliver)

    irq.set_irqchip(connect)


__all__ = [
    "HostIrqMask",
    "RunOptions",
    "load_platform_tree",
    "new_trace",
    "parse_devices",
    "wire_host_interrupts",
]
