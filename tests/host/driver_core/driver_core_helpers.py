"""Helpers for the driver-core tests: a settable clock, a firmware-node stand-in, a traced kernel,
and a driver that records its probes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pkvm_smmu.host.driver_core import Kernel, PlatformDevice, PlatformDriver
from pkvm_smmu.trace import RecordingSink, TraceBus, TraceEvent


class FakeClock:
    def __init__(self) -> None:
        self.now_ns = 0

    def __call__(self) -> int:
        return self.now_ns


@dataclass(frozen=True)
class Node:
    """What the firmware layer will hand over: hashable, with a name and compatible strings."""

    full_name: str
    compatible: tuple[str, ...] = ()


@dataclass
class Booted:
    kernel: Kernel
    sink: RecordingSink
    clock: FakeClock

    def events(self, kind: str) -> list[TraceEvent]:
        return self.sink.select(kind=kind)

    def probes(self, device: str) -> list[dict[str, object]]:
        return [e.fields for e in self.sink.select(kind="probe") if e.fields["device"] == device]


def make_kernel(
    *, modules: bool = True, deferred_probe_timeout_s: int | None = None, fw_devlink: str = "on"
) -> Booted:
    clock = FakeClock()
    trace = TraceBus(clock_ns=clock)
    sink = trace.attach(RecordingSink())
    kernel = Kernel(
        trace,
        now_ns=clock,
        modules=modules,
        deferred_probe_timeout_s=deferred_probe_timeout_s,
        fw_devlink=fw_devlink,
    )
    return Booted(kernel, sink, clock)


def booted_kernel() -> Booted:
    """A kernel past late_initcall: deferred probing is on."""
    b = make_kernel()
    b.kernel.run_initcalls()
    return b


class RecordingDriver(PlatformDriver):
    """A platform driver whose probe answers from ``results`` (then 0) and logs each call."""

    def __init__(self, name: str, *, compatible: str | None = None, results: list[int] | None = None) -> None:
        super().__init__(name, self._probe, self._remove, of_match_table=(compatible,) if compatible else ())
        self.results = list(results or [])
        self.probed: list[str] = []
        self.removed: list[str] = []
        self.before_probe: Callable[[PlatformDevice], None] | None = None

    def _probe(self, pdev: PlatformDevice) -> int:
        self.probed.append(pdev.name)
        if self.before_probe is not None:
            self.before_probe(pdev)
        ret = self.results.pop(0) if self.results else 0
        if ret == 0:
            pdev.driver_data = f"{self.name}-data"
        return ret

    def _remove(self, pdev: PlatformDevice) -> None:
        self.removed.append(pdev.name)
