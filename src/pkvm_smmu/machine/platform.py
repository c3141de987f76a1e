"""The platform: the hardware a device tree describes, built and wired.

``build_machine(tree)`` makes RAM from ``memory`` nodes, an ``SmmuV3`` per ``arm,smmu-v3`` node,
an MSI doorbell per GICv3 ITS (or GICv2m frame), a ``DmaEngine`` per ``pkvm-smmu,dma-engine``
node (StreamID from ``iommus``), a bare ``DmaEndpoint`` per ``pkvm-smmu,dma-endpoint`` node (a
generic workload device with no registers: StreamID from ``iommus``, ATS with ``pkvm-smmu,ats``;
``Machine.dma_endpoints`` by node path), and per ``pci-host-ecam-generic`` node an ECAM host bridge whose
endpoints get their StreamIDs from ``iommu-map``/``iommu-map-mask``. PCI endpoints come from the
bridge's ``pkvm-smmu,endpoints`` strings and from ``extra_devices`` (QEMU-style specs, see
``parse_device_spec``); "firmware" assigns their BAR0s from the bridge's memory window.

Interrupts follow the tree: an SMMU's wired outputs and a DMA engine's completion pulse the
line named by their ``interrupts`` specifier (``InterruptSpec.line``, e.g. ``intid:106``), so the
kernel finds them where its own reading of the tree says they are.

Every inconsistency between the tree and what the hardware can be (a StreamID beyond SIDSIZE,
an ``iommus`` naming something that is not an SMMU, a clash of addresses) is a
``DeviceTreeError`` naming the file and the node; a bad device spec is a ``DeviceSpecError``
naming the option.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pkvm_smmu.arch.registers import SMMU_MMIO_SIZE
from pkvm_smmu.devicetree import (
    PCI_ECAM,
    SMMU_V3,
    Bdf,
    DeviceTree,
    DeviceTreeError,
    InterruptSpec,
    Node,
    interrupts,
    iommu_map,
    map_interrupt,
    pci_bus_range,
    pci_ranges,
    pci_unit_address,
)
from pkvm_smmu.machine.bus import HOST_CPU, HYP_CPU, MmioDevice, Region, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.cpu import CpuPort
from pkvm_smmu.machine.devices.dma_engine import MMIO_SIZE as DMA_ENGINE_MMIO_SIZE
from pkvm_smmu.machine.devices.dma_engine import DmaEngine
from pkvm_smmu.machine.devices.endpoint import DmaEndpoint
from pkvm_smmu.machine.irq import InterruptController, MsiDoorbell
from pkvm_smmu.machine.pci import DirectUpstream, PciDmaEndpoint, PciFunction, PciHostBridge
from pkvm_smmu.machine.smmu.device import SmmuV3
from pkvm_smmu.machine.smmu.features import SmmuFeatures
from pkvm_smmu.machine.smmu.options import SmmuOptions
from pkvm_smmu.trace.bus import TraceBus

DMA_ENGINE = "pkvm-smmu,dma-engine"
DMA_ENDPOINT = "pkvm-smmu,dma-endpoint"
ATS_PROPERTY = "pkvm-smmu,ats"
ENDPOINTS_PROPERTY = "pkvm-smmu,endpoints"
GIC_V3_ITS = "arm,gic-v3-its"
GIC_V2M_FRAME = "arm,gic-v2m-frame"
ITS_TRANSLATION_FRAME = 0x10000  # GITS_TRANSLATER lives in the ITS's second 64 KiB frame

# DT interrupt-names of arm,smmu-v3 -> the SMMU model's interrupt sources.
SMMU_IRQ_SOURCES: dict[str, tuple[str, ...]] = {
    "eventq": ("eventq",),
    "gerror": ("gerror",),
    "priq": ("priq",),
    "cmdq-sync": ("cmd-sync",),
    "combined": ("eventq", "gerror", "priq", "cmd-sync"),
}

DEVICE_KINDS = ("dma-engine",)


# -- device specs (--device) -------------------------------------------------------------------------


class DeviceSpecError(ValueError):
    """A device spec the platform cannot use; ``option`` names the offending part."""

    def __init__(self, spec: str, option: str, message: str) -> None:
        self.spec = spec
        self.option = option
        self.message = message
        super().__init__(f"device '{spec}': {option}: {message}")


@dataclass(frozen=True)
class DeviceSpec:
    """A PCI endpoint to plug in, QEMU ``-device`` style: ``dma-engine,bdf=00:02.0[,ats=on]``.

    Options: ``bdf`` (required, ``BB:DD.F``), ``ats`` (``on``/``off``), ``bus`` (which host
    bridge: node path, ``&label``, node name or ``pcie.N`` for PCI domain N; the first bridge by
    default), ``id`` (the device's name).
    """

    kind: str
    bdf: Bdf
    ats: bool = False
    bus: str | None = None
    id: str | None = None
    text: str = ""


_ON = {"on": True, "yes": True, "true": True, "1": True}
_ON.update(dict.fromkeys(("off", "no", "false", "0"), False))


def parse_device_spec(text: str) -> DeviceSpec:
    """Parse a device spec; errors name the option at fault."""
    parts = [part.strip() for part in text.split(",")]
    kind = parts[0]
    known = ", ".join(DEVICE_KINDS)
    if not kind:
        raise DeviceSpecError(text, "driver", f"missing device type (known: {known})")
    if "=" in kind or kind not in DEVICE_KINDS:
        raise DeviceSpecError(text, "driver", f"unknown device type '{kind}' (known: {known})")
    options: dict[str, str] = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise DeviceSpecError(text, part or "(empty)", "expected option=value")
        if key in options:
            raise DeviceSpecError(text, key, "given twice")
        if key not in ("bdf", "ats", "bus", "id"):
            raise DeviceSpecError(text, key, "unknown option (known: bdf, ats, bus, id)")
        options[key] = value.strip()
    if "bdf" not in options:
        raise DeviceSpecError(text, "bdf", "required (e.g. bdf=00:02.0)")
    try:
        bdf = Bdf.parse(options["bdf"])
    except ValueError as error:
        raise DeviceSpecError(text, "bdf", str(error)) from None
    ats_text = options.get("ats", "off").lower()
    if ats_text not in _ON:
        raise DeviceSpecError(text, "ats", f"'{options['ats']}' is not on or off")
    if "id" in options and not options["id"]:
        raise DeviceSpecError(text, "id", "empty name")
    return DeviceSpec(kind, bdf, _ON[ats_text], options.get("bus") or None, options.get("id"), text)


# -- the machine ---------------------------------------------------------------------------------------


@dataclass
class SmmuInfo:
    """What the tree says about one SMMU beyond its registers."""

    node: str
    smmu: SmmuV3
    dma_coherent: bool
    interrupts: dict[str, str]  # interrupt-names entry -> line
    msi_parent: str | None  # node path of the MSI controller
    msi_device_id: int | None  # its #msi-cells argument (the ITS DeviceID)


@dataclass
class DmaDevice:
    """A DMA engine and how it is attached: a platform device (``node``) or a PCI function (``bdf``)."""

    name: str
    engine: DmaEngine
    endpoint: DmaEndpoint
    stream_id: int | None  # None: no IOMMU in front of it
    smmu: str | None  # node path of its SMMU
    node: str | None = None
    bridge: str | None = None  # node path of its host bridge
    bdf: Bdf | None = None
    function: PciFunction | None = None
    mmio_base: int | None = None  # CPU address of its registers (BAR0 as firmware assigned it)
    irq_line: str | None = None
    ats: bool = False


@dataclass
class Machine:
    tree: DeviceTree
    bus: SystemBus
    clock: Clock
    irq: InterruptController
    trace: TraceBus
    smmus: dict[str, SmmuV3] = field(default_factory=dict)  # node path -> SMMU
    smmu_info: dict[str, SmmuInfo] = field(default_factory=dict)
    msi_doorbells: dict[str, MsiDoorbell] = field(default_factory=dict)  # node path -> doorbell
    pci_bridges: dict[str, PciHostBridge] = field(default_factory=dict)  # node path -> bridge
    dma_devices: dict[str, DmaDevice] = field(default_factory=dict)  # name -> device
    dma_endpoints: dict[str, DmaEndpoint] = field(default_factory=dict)  # node path -> generic endpoint
    _host_cpu: CpuPort | None = field(default=None, init=False, repr=False)
    _hyp_cpu: CpuPort | None = field(default=None, init=False, repr=False)

    def host_cpu(self) -> CpuPort:
        """The EL1 access path the host kernel runs on (one per machine)."""
        if self._host_cpu is None:
            self._host_cpu = CpuPort(self.bus, self.clock, HOST_CPU)
        return self._host_cpu

    def hyp_cpu(self) -> CpuPort:
        """The EL2 access path of the hypervisor."""
        if self._hyp_cpu is None:
            self._hyp_cpu = CpuPort(self.bus, self.clock, HYP_CPU)
        return self._hyp_cpu

    @property
    def ram_regions(self) -> list[Region]:
        return self.bus.ram_regions()

    def smmu(self, which: str | None = None) -> SmmuV3:
        """An SMMU by node path, ``&label`` or SMMU name; with no argument, the only one."""
        if which is None:
            if len(self.smmus) != 1:
                raise KeyError(f"the machine has {len(self.smmus)} SMMUs; name one of {sorted(self.smmus)}")
            return next(iter(self.smmus.values()))
        node = self.tree.find(which)
        if node is not None and node.path in self.smmus:
            return self.smmus[node.path]
        for smmu in self.smmus.values():
            if smmu.name == which:
                return smmu
        raise KeyError(f"no SMMU '{which}' (have {sorted(self.smmus)})")

    def dma_device(self, which: str) -> DmaDevice:
        """A DMA device by name, node path, or BDF (``00:02.0``)."""
        if which in self.dma_devices:
            return self.dma_devices[which]
        for device in self.dma_devices.values():
            if which in (device.node, str(device.bdf) if device.bdf else None):
                return device
        raise KeyError(f"no DMA device '{which}' (have {sorted(self.dma_devices)})")


FeaturesArg = SmmuFeatures | Mapping[str, SmmuFeatures] | None
OptionsArg = SmmuOptions | Mapping[str, SmmuOptions] | None


def build_machine(
    tree: DeviceTree,
    *,
    extra_devices: Iterable[str | DeviceSpec] = (),
    features: FeaturesArg = None,
    trace: TraceBus | None = None,
    options: OptionsArg = None,
    clock: Clock | None = None,
) -> Machine:
    """Build the hardware ``tree`` describes.

    ``features``/``options``: one value for every SMMU, or a mapping from node path (or
    ``&label``) to a value; SMMUs not named get the defaults, with ``coherent`` following the
    node's ``dma-coherent``. ``extra_devices`` adds PCI endpoints (specs or parsed specs).
    """
    clock = clock if clock is not None else Clock()
    trace = trace if trace is not None else TraceBus(lambda: clock.now_ns)
    machine = Machine(tree, SystemBus(), clock, InterruptController(trace), trace)
    specs = [parse_device_spec(s) if isinstance(s, str) else s for s in extra_devices]
    _add_memory(machine)
    _add_msi_doorbells(machine)
    _add_smmus(machine, features, options)
    _add_platform_dma_engines(machine)
    _add_platform_dma_endpoints(machine)
    _add_pci_bridges(machine, specs)
    _check_stream_ids(machine)
    trace.metadata.setdefault("platform", tree.source)
    if trace.enabled:
        _trace_inventory(machine)
    return machine


def _trace_inventory(machine: Machine) -> None:
    emit = machine.trace.emit
    for region in machine.bus.regions:
        kind = region.kind.value
        emit("platform", "region", name=region.name, base=region.base, size=region.size, kind=kind)
    for path, smmu in machine.smmus.items():
        emit("platform", "smmu", node=path, name=smmu.name, base=smmu.base, sid_bits=smmu.features.sid_bits)
    for device in machine.dma_devices.values():
        emit("platform", "dma-device", name=device.name, sid=device.stream_id, smmu=device.smmu,
             bdf=str(device.bdf) if device.bdf else None, node=device.node, ats=device.ats)  # fmt: skip
    for path, endpoint in machine.dma_endpoints.items():
        emit("platform", "dma-endpoint", name=endpoint.name, node=path, sid=endpoint.stream_id,
             ats=endpoint.ats_capable)  # fmt: skip


def _map(machine: Machine, node: Node, base: int, size: int, device: MmioDevice | None, name: str) -> None:
    """Add a region; the bus's refusal (an overlap the tree checks missed) names the node."""
    try:
        if device is None:
            machine.bus.add_ram(base, size, name)
        else:
            machine.bus.add_mmio(base, size, device, name)
    except ValueError as error:
        raise node.error(str(error), "reg") from None


def _add_memory(machine: Machine) -> None:
    for node in machine.tree.nodes():
        if node.device_type != "memory" or not node.available:
            continue
        for index, region in enumerate(node.mmio()):
            if region.size:
                _map(machine, node, region.address, region.size, None, node.name if index == 0 else
                     f"{node.name}#{index}")  # fmt: skip


def _add_msi_doorbells(machine: Machine) -> None:
    for node in machine.tree.compatible_nodes(GIC_V3_ITS, GIC_V2M_FRAME):
        region = node.mmio()[0]
        doorbell = MsiDoorbell(machine.irq, node.name)
        if node.is_compatible(GIC_V3_ITS):
            if region.size < 2 * ITS_TRANSLATION_FRAME:
                raise node.error(f"an ITS needs 128 KiB of registers, reg gives {region.size:#x}", "reg")
            base, size = region.address + ITS_TRANSLATION_FRAME, ITS_TRANSLATION_FRAME
        else:  # GICv2m: MSI_SETSPI_NS at +0x40 of the frame itself
            base, size = region.address, region.size
        _map(machine, node, base, size, doorbell, node.name)
        machine.msi_doorbells[node.path] = doorbell


def _pick(choice: FeaturesArg | OptionsArg, node: Node) -> object | None:
    """The value of a per-SMMU argument for ``node``: the value itself, or its mapping entry."""
    if choice is None or not isinstance(choice, Mapping):
        return choice
    for key, value in choice.items():
        if key == node.name or node.tree.find(key) is node:
            return value
    return None


def _add_smmus(machine: Machine, features: FeaturesArg, options: OptionsArg) -> None:
    nodes = machine.tree.compatible_nodes(SMMU_V3)
    for choice in (features, options):
        for key in choice if isinstance(choice, Mapping) else ():
            if not any(key == n.name or machine.tree.find(key) is n for n in nodes):
                raise machine.tree.error(f"SMMU features/options name '{key}': no enabled arm,smmu-v3 there")
    names = [n.name for n in nodes]
    for node in nodes:
        region = node.mmio()[0]
        if region.size < SMMU_MMIO_SIZE:
            raise node.error(f"an SMMUv3 needs {SMMU_MMIO_SIZE:#x} bytes (pages 0 and 1), reg gives "
                             f"{region.size:#x}", "reg")  # fmt: skip
        coherent = node.has("dma-coherent")
        picked = _pick(features, node)
        smmu_features = picked if isinstance(picked, SmmuFeatures) else SmmuFeatures(coherent=coherent)
        picked_options = _pick(options, node)
        smmu_options = picked_options if isinstance(picked_options, SmmuOptions) else None
        name = node.name if names.count(node.name) == 1 else node.path
        try:
            smmu = SmmuV3(name, machine.bus, machine.clock, smmu_features, region.address,
                          trace=machine.trace, irq=machine.irq, options=smmu_options)  # fmt: skip
        except ValueError as error:
            raise node.error(str(error), "reg") from None
        lines: dict[str, str] = {}
        for spec in interrupts(node):
            if spec.name is None:
                continue
            lines[spec.name] = spec.line
            for source in SMMU_IRQ_SOURCES.get(spec.name, ()):
                _forward(machine.irq, smmu.interrupts.line(source), spec.line)
        msi_parent, msi_device_id = _msi_parent(node)
        machine.smmus[node.path] = smmu
        machine.smmu_info[node.path] = SmmuInfo(node.path, smmu, coherent, lines, msi_parent, msi_device_id)


def _forward(irq: InterruptController, source: str, line: str) -> None:
    """Wire a device's internal output to the interrupt line the tree gives it."""
    irq.connect(source, lambda _source: irq.pulse(line))


def _msi_parent(node: Node) -> tuple[str | None, int | None]:
    prop = node.get("msi-parent")
    if prop is None:
        return None, None
    cells = prop.u32s()
    if len(cells) == 1:
        return prop.phandle().path, None
    entry = prop.phandle_args("#msi-cells", default_cells=0)[0]
    return entry.target.path, entry.args[0] if entry.args else None


def _upstream_of(machine: Machine, node: Node, prop: str, target: Node, sid: int, what: str) -> SmmuV3:
    """The SMMU ``target`` stands for; the StreamID must fit its SIDSIZE."""
    smmu = machine.smmus.get(target.path)
    if smmu is None:
        raise node.error(f"{what} names {target.path}, which is not an enabled arm,smmu-v3", prop)
    limit = 1 << smmu.features.sid_bits
    if sid >= limit:
        raise node.error(
            f"StreamID {sid:#x} of {what} does not fit {target.path}'s SIDSIZE of "
            f"{smmu.features.sid_bits} bits (StreamIDs below {limit:#x})",
            prop,
        )
    return smmu


def _first_line(node: Node) -> str | None:
    specs = interrupts(node)
    return specs[0].line if specs else None


def _add_platform_dma_engines(machine: Machine) -> None:
    for node in machine.tree.compatible_nodes(DMA_ENGINE):
        region = node.mmio()[0]
        entries = node.prop("iommus").phandle_args("#iommu-cells") if node.has("iommus") else []
        entries = [e for e in entries if e.target.available]
        name = node.name if node.name not in machine.dma_devices else node.path
        sid: int | None = None
        smmu_path: str | None = None
        if entries:
            entry = entries[0]  # the engine masters with one StreamID: its first
            sid = entry.args[0]
            upstream = _upstream_of(machine, node, "iommus", entry.target, sid, "iommus")
            smmu_path = entry.target.path
        else:
            upstream = DirectUpstream(machine.bus, name).as_upstream()
        endpoint = DmaEndpoint(name, upstream, sid if sid is not None else 0)
        line = _first_line(node)
        engine = DmaEngine(name, endpoint, irq=machine.irq, irq_line=line, clock=machine.clock)
        _map(machine, node, region.address, max(region.size, DMA_ENGINE_MMIO_SIZE), engine, name)
        machine.dma_devices[name] = DmaDevice(
            name, engine, endpoint, sid, smmu_path, node=node.path, mmio_base=region.address,
            irq_line=engine.irq_line,
        )  # fmt: skip


def _add_platform_dma_endpoints(machine: Machine) -> None:
    """A generic endpoint: DMA of any size and address through its first ``iommus`` entry (or
    straight to the bus without one); ATS only behind an SMMU."""
    for node in machine.tree.compatible_nodes(DMA_ENDPOINT):
        entries = node.prop("iommus").phandle_args("#iommu-cells") if node.has("iommus") else []
        entries = [e for e in entries if e.target.available]
        ats = node.has(ATS_PROPERTY)
        if entries:
            sid = entries[0].args[0]
            upstream = _upstream_of(machine, node, "iommus", entries[0].target, sid, "iommus")
        elif ats:
            raise node.error("an ATS-capable endpoint needs an SMMU (no usable iommus)", ATS_PROPERTY)
        else:
            sid = 0
            upstream = DirectUpstream(machine.bus, node.name).as_upstream()
        machine.dma_endpoints[node.path] = DmaEndpoint(node.name, upstream, sid, ats_capable=ats)


def _bridge_for(machine: Machine, spec: DeviceSpec, bridges: list[Node]) -> Node:
    if not bridges:
        raise DeviceSpecError(spec.text, "bdf", f"{machine.tree.source} has no PCIe host bridge ({PCI_ECAM})")
    if spec.bus is None:
        return bridges[0]
    for node in bridges:
        domain = node.get("linux,pci-domain")
        if spec.bus in (node.path, node.name) or (node.tree.find(spec.bus) is node):
            return node
        if domain is not None and spec.bus == f"pcie.{domain.u32()}":
            return node
    if spec.bus.startswith("pcie.") and spec.bus[5:].isdigit():
        index = int(spec.bus[5:])
        if index < len(bridges) and all(not n.has("linux,pci-domain") for n in bridges):
            return bridges[index]
    raise DeviceSpecError(spec.text, "bus", f"no PCIe host bridge '{spec.bus}' (have "
                          f"{', '.join(n.path for n in bridges)})")  # fmt: skip


def _add_pci_bridges(machine: Machine, extra: list[DeviceSpec]) -> None:
    bridges = machine.tree.compatible_nodes(PCI_ECAM)
    planned: dict[str, list[tuple[DeviceSpec, bool]]] = {node.path: [] for node in bridges}
    for node in bridges:
        prop = node.get(ENDPOINTS_PROPERTY)
        for text in prop.strings() if prop is not None else ():
            try:
                planned[node.path].append((parse_device_spec(text), True))
            except DeviceSpecError as error:
                raise node.error(str(error), ENDPOINTS_PROPERTY) from None
    for spec in extra:
        planned[_bridge_for(machine, spec, bridges).path].append((spec, False))
    for node in bridges:
        ecam = node.mmio()[0]
        bridge = PciHostBridge(node.name, ecam.address, ecam.size, pci_bus_range(node), pci_ranges(node),
                               node.path)  # fmt: skip
        try:
            bridge.map(machine.bus)
        except ValueError as error:
            raise node.error(str(error), "reg") from None
        machine.pci_bridges[node.path] = bridge
        for spec, from_tree in planned[node.path]:
            _add_pci_endpoint(machine, node, bridge, spec, from_tree)
        try:
            bridge.assign_bars()
        except ValueError as error:
            raise node.error(str(error), "ranges") from None
        for device in machine.dma_devices.values():
            if device.function is not None and device.bridge == node.path:
                device.mmio_base = bridge.cpu_address_of(device.function.bar0_address)


def _add_pci_endpoint(
    machine: Machine, node: Node, bridge: PciHostBridge, spec: DeviceSpec, from_tree: bool
) -> None:
    def fail(option: str, message: str) -> Exception:
        if from_tree:
            return node.error(f"device '{spec.text}': {option}: {message}", ENDPOINTS_PROPERTY)
        return DeviceSpecError(spec.text, option, message)

    bdf = spec.bdf
    if bdf in bridge.functions:
        raise fail("bdf", f"{bdf} is already taken by {bridge.functions[bdf].name}")
    name = spec.id or f"{spec.kind}@{bdf}"
    if name in machine.dma_devices:
        raise fail("id", f"the name '{name}' is already taken")
    mapping = iommu_map(node)
    target = mapping.lookup(bdf.rid) if mapping is not None else None
    sid: int | None = None
    smmu_path: str | None = None
    if target is not None:
        smmu_node, sid = target
        try:
            upstream = _upstream_of(machine, node, "iommu-map", smmu_node, sid, f"RID {bdf.rid:#06x} ({bdf})")
        except DeviceTreeError as error:
            if from_tree:
                raise
            raise fail("bdf", error.message + f" ({error.source}: {error.path})") from None
        smmu_path = smmu_node.path
    else:
        upstream = DirectUpstream(machine.bus, name).as_upstream()
    line = _intx_line(node, bdf)
    function = PciFunction(bdf, None, bar0_size=DMA_ENGINE_MMIO_SIZE, ats=spec.ats,
                           interrupt_pin=1 if line is not None else 0, name=name)  # fmt: skip
    endpoint = PciDmaEndpoint(name, upstream, sid if sid is not None else 0, function, ats_capable=spec.ats)
    engine = DmaEngine(name, endpoint, irq=machine.irq, irq_line=line, clock=machine.clock)
    function.device = engine  # BAR0 fronts the engine's registers
    try:
        bridge.add_function(function)
    except ValueError as error:
        raise fail("bdf", str(error)) from None
    machine.dma_devices[name] = DmaDevice(
        name, engine, endpoint, sid, smmu_path, bridge=node.path, bdf=bdf, function=function,
        irq_line=engine.irq_line, ats=spec.ats,
    )  # fmt: skip


def _intx_line(node: Node, bdf: Bdf) -> str | None:
    """INTA of ``bdf`` routed through the bridge's ``interrupt-map`` (None without one)."""
    if not node.has("interrupt-map"):
        return None
    spec: InterruptSpec | None = map_interrupt(node, pci_unit_address(bdf), (1,))
    return spec.line if spec is not None else None


def _check_stream_ids(machine: Machine) -> None:
    """Every ``iommus`` naming an SMMU, modeled device or not, gives StreamIDs the SMMU can take."""
    for node in machine.tree.nodes():
        if not node.available or not node.has("iommus"):
            continue
        for entry in node.prop("iommus").phandle_args("#iommu-cells"):
            if entry.target.path in machine.smmus:
                _upstream_of(machine, node, "iommus", entry.target, entry.args[0], "iommus")
