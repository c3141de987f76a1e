"""The system an adversary attacks: a design booted on a platform, with the isolation oracle (and,
on request, the sanitizer) watching, and the little state the adversary keeps between actions.

``SystemSpec`` is the whole recipe (design, policy, boot variant, platform, devices, seed,
sanitizer); ``build_system(spec)`` boots it. Two builds of one spec are the same system, so a
list of actions replays exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pkvm_smmu.hyp.mem_protect import MemProtect
from pkvm_smmu.hyp.pkvm import Pkvm
from pkvm_smmu.machine.devices import DmaEndpoint
from pkvm_smmu.machine.irq import MsiDoorbell
from pkvm_smmu.machine.platform import Machine
from pkvm_smmu.machine.smmu import SmmuV3
from pkvm_smmu.trace import TraceBus
from pkvm_smmu.verify.oracle import IsolationOracle, ObservedViolation, Violation

ADVERSARY_BUFFERS = 8  # host pages the adversary allocates at boot (target "buffer")
ATTACKABLE_DESIGNS = ("trap-emulate", "pv-identity", "pv-paging")


class SpecError(ValueError):
    """A system spec that cannot be built; ``option`` names the part at fault."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(f"{option}: {message}")


@dataclass(frozen=True)
class SystemSpec:
    """Everything a system is built from. ``boot_variant`` "none" means the design's default."""

    design: str = "trap-emulate"
    policy: str = "v4"
    boot_variant: str = "none"
    platform: str | None = None
    devices: tuple[str, ...] = ()
    seed: int = 0
    sanitizer: bool = False

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["devices"] = list(self.devices)
        return data

    @classmethod
    def from_json(cls, data: object) -> SystemSpec:
        """The spec ``data`` describes; ``SpecError`` naming the field otherwise."""
        if not isinstance(data, Mapping):
            raise SpecError("system", f"expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SpecError(f"system.{unknown[0]}", f"unknown field (fields: {', '.join(sorted(names))})")
        values: dict[str, Any] = {}
        for name in ("design", "policy", "boot_variant"):
            if name in data:
                if not isinstance(data[name], str):
                    raise SpecError(f"system.{name}", f"expected a string, got {data[name]!r}")
                values[name] = data[name]
        if "platform" in data:
            if data["platform"] is not None and not isinstance(data["platform"], str):
                raise SpecError("system.platform", f"expected a path or null, got {data['platform']!r}")
            values["platform"] = data["platform"]
        if "devices" in data:
            devices = data["devices"]
            if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
                raise SpecError("system.devices", "expected a list of device specs")
            values["devices"] = tuple(devices)
        if "seed" in data:
            if isinstance(data["seed"], bool) or not isinstance(data["seed"], int):
                raise SpecError("system.seed", f"expected an integer, got {data['seed']!r}")
            values["seed"] = data["seed"]
        if "sanitizer" in data:
            if not isinstance(data["sanitizer"], bool):
                raise SpecError("system.sanitizer", f"expected true or false, got {data['sanitizer']!r}")
            values["sanitizer"] = data["sanitizer"]
        return cls(**values)

    def describe(self) -> str:
        platform = self.platform if self.platform is not None else "default"
        text = f"{self.design} policy={self.policy} boot-variant={self.boot_variant} platform={platform}"
        if self.devices:
            text += f" devices={','.join(self.devices)}"
        return text + f" seed={self.seed}" + (" +sanitizer" if self.sanitizer else "")


@dataclass
class DmaMapping:
    """A mapping the adversary made through the DMA API."""

    device: int  # index into ``System.devices``
    dma: int
    paddr: int
    size: int
    direction: str


@dataclass
class AdversaryState:
    """What the adversary remembers between actions (all of it deterministic)."""

    buffers: list[int] = field(default_factory=list)
    mappings: list[DmaMapping] = field(default_factory=list)
    vms: dict[bool, int] = field(default_factory=dict)  # protected? -> handle
    next_gfn: int = 0x100
    shared_gfns: dict[int, tuple[int, int]] = field(default_factory=dict)  # pfn -> (handle, gfn)
    domains: list[Any] = field(default_factory=list)  # paging domains the adversary allocated
    endpoints: dict[tuple[str, int], DmaEndpoint] = field(default_factory=dict)


@dataclass
class Checked:
    """What the watchers found after a step: the oracle's violations (all of them, not only new
    ones), the accesses that touched foreign pages since the last check, and new sanitizer reports."""

    violations: list[Violation]
    observed: list[ObservedViolation]
    sanitizer: list[Any]


class System:
    """A booted design under attack. ``host`` is the host kernel (``HostKernel`` or
    ``PvHostKernel``), ``hvc`` the host's hypercall instruction, ``hyp_driver`` the hyp's IOMMU
    driver (``SmmuV3HypDriver`` for trap-emulate)."""

    def __init__(
        self,
        spec: SystemSpec,
        machine: Machine,
        pkvm: Pkvm,
        host: Any,
        hvc: Callable[..., int],
        hyp_driver: Any,
        trace: TraceBus,
    ) -> None:
        self.spec = spec
        self.machine = machine
        self.pkvm = pkvm
        self.host = host
        self.hvc = hvc
        self.hyp_driver = hyp_driver
        self.trace = trace
        self.smmus: list[SmmuV3] = list(machine.smmus.values())
        self.adv = AdversaryState()
        self.devices: list[Any] = [dev for dev in host.bus_devices() if host.stream_ids(dev)]
        self.sid_owner = {
            (d.smmu, d.stream_id): d.endpoint
            for d in machine.dma_devices.values()
            if d.smmu is not None and d.stream_id is not None
        }
        self.doorbells = sorted(
            region.base for region in machine.bus.regions if isinstance(region.device, MsiDoorbell)
        )
        declared = {}
        if hyp_driver is not None:
            for smmu in self.smmus:
                declared[smmu.name] = _structures(hyp_driver, smmu)
        self.oracle = IsolationOracle(machine.bus, self.smmus, pkvm.mem_protect, declared, observe=True)
        self.sanitizer: Any = None
        self._reported = 0

    @property
    def mem_protect(self) -> MemProtect:
        return self.pkvm.mem_protect

    @property
    def clock_ns(self) -> int:
        return self.machine.clock.now_ns

    # -- the adversary's setup --------------------------------------------------------------------------
    def _allocate_buffers(self) -> None:
        for _ in range(ADVERSARY_BUFFERS):
            page = self.host.mm.alloc_zeroed_pages(1)
            if page is not None:
                self.adv.buffers.append(int(page))

    def endpoint(self, smmu_index: int, sid: int) -> DmaEndpoint:
        """The platform's device with StreamID ``sid`` behind that SMMU, else the scenario's
        generic endpoint for ``sid`` (not ATS-capable: it forges Translated transactions only)."""
        smmu = self.smmus[smmu_index % len(self.smmus)]
        path = next(p for p, s in self.machine.smmus.items() if s is smmu)
        device = self.sid_owner.get((path, sid))
        if device is not None:
            return device
        key = (smmu.name, sid)
        generic = self.adv.endpoints.get(key)
        if generic is None:
            generic = DmaEndpoint(f"generic-sid{sid:#x}", smmu, sid)
            self.adv.endpoints[key] = generic
        return generic

    # -- watching ------------------------------------------------------------------------------------------
    def attach_sanitizer(self) -> None:
        from pkvm_smmu.verify.sanitizer import Sanitizer

        if self.sanitizer is None:
            self.sanitizer = Sanitizer.for_machine(self.machine, host_pages=self.mem_protect)

    def check(self) -> Checked:
        """Run the oracle (incrementally) and collect what the watchers saw since the last check."""
        violations = self.oracle.check()
        monitor = self.oracle.monitor
        observed = monitor.take() if monitor is not None else []
        reports: list[Any] = []
        if self.sanitizer is not None:
            everything = self.sanitizer.reports
            reports = list(everything[self._reported :])
            self._reported = len(everything)
        return Checked(violations, observed, reports)

    def close(self) -> None:
        self.oracle.close()
        if self.sanitizer is not None:
            self.sanitizer.detach()


def _structures(driver: Any, smmu: SmmuV3) -> Callable[[], Any]:
    class _Nothing:
        reads: tuple[tuple[int, int, str], ...] = ()
        writes: tuple[tuple[int, int, str], ...] = ()

    def structures() -> Any:
        hyp = driver.smmu_at(smmu.base)
        return hyp.smmu_structures() if hyp is not None else _Nothing()

    return structures


# -- building ------------------------------------------------------------------------------------------------


def resolve_spec(spec: SystemSpec) -> SystemSpec:
    """``spec`` with the design's default boot variant filled in; ``SpecError`` for a design,
    policy or boot variant that does not exist."""
    from pkvm_smmu.hyp.smmuv3 import POLICIES

    if spec.design not in ATTACKABLE_DESIGNS:
        why = "no hypervisor, nothing to attack" if spec.design == "native" else "unknown design"
        raise SpecError("design", f"'{spec.design}': {why} (have: {', '.join(ATTACKABLE_DESIGNS)})")
    if spec.design == "trap-emulate":
        from pkvm_smmu.host.kvm import BOOT_VARIANTS as TRAP_VARIANTS

        if spec.policy not in POLICIES:
            raise SpecError("policy", f"unknown policy '{spec.policy}' (have: {', '.join(sorted(POLICIES))})")
        variant = "late-register" if spec.boot_variant in ("", "none") else spec.boot_variant
        if variant not in TRAP_VARIANTS:
            have = ", ".join(TRAP_VARIANTS)
            raise SpecError("boot-variant", f"'{variant}' is not a trap-emulate boot variant (have: {have})")
        return replace(spec, boot_variant=variant)
    from pkvm_smmu.scenarios.pv import BOOT_VARIANTS

    variants = BOOT_VARIANTS[spec.design]
    variant = variants[0] if spec.boot_variant in ("", "none") else spec.boot_variant
    if variant not in variants:
        raise SpecError("boot-variant", f"'{variant}': {spec.design} has {', '.join(variants)}")
    return replace(spec, boot_variant=variant)


def build_system(spec: SystemSpec) -> System:
    """Boot ``spec`` and attach the watchers. Bad input raises ``SpecError`` (design, policy, boot
    variant) or the platform's own errors (``DeviceTreeError``, ``DeviceSpecError``)."""
    from pkvm_smmu.scenarios.boot import RunOptions

    spec = resolve_spec(spec)
    options = RunOptions(
        platform=spec.platform,
        devices=spec.devices,
        seed=spec.seed,
        design=spec.design,
        boot_variant=spec.boot_variant,
        policy=spec.policy,
    )
    system: System
    if spec.design == "trap-emulate":
        from pkvm_smmu.scenarios.pkvm import boot_pkvm

        booted = boot_pkvm(options)
        system = System(
            spec, booted.machine, booted.pkvm, booted.host, booted.hyp.hvc, booted.hyp.driver, booted.trace
        )
    else:
        from pkvm_smmu.scenarios.pv import boot_pv

        pv = boot_pv(options)
        system = System(spec, pv.machine, pv.pkvm, pv.host, pv.pkvm.hvc, pv.pv.driver, pv.trace)
    # The reports' sinks are not wanted while attacking: with none attached, tracing costs nothing.
    for sink in system.trace.sinks:
        system.trace.detach(sink)
    system._allocate_buffers()
    if spec.sanitizer:
        system.attach_sanitizer()
    system.check()  # the first (full) evaluation, so that every later check is incremental
    return system


__all__ = [
    "ADVERSARY_BUFFERS",
    "ATTACKABLE_DESIGNS",
    "AdversaryState",
    "Checked",
    "DmaMapping",
    "SpecError",
    "System",
    "SystemSpec",
    "build_system",
    "resolve_spec",
]
