"""The ``trap-emulate`` design (v4): the same host kernel boots under pKVM, its unmodified
arm-smmu-v3 driver programs the SMMU the hyp emulates, and devices reach only what the host owns.

``boot_pkvm`` builds the machine, the hypervisor (``Pkvm``) and the host kernel with its KVM half
(``host.kvm.KvmArm``) arranged as the boot variant says; the two meet only through hypercalls
(``PkvmHyp``). An ``IsolationOracle`` checks after every initcall. ``run_pkvm`` then runs the native
DMA workload and ``guest_donation``: pages the host mapped for DMA are given to the hyp and to a
protected VM, and every DMA engine tries to reach them, before and after, through the translations
the SMMU had cached; relinquished and reclaimed pages become reachable again once the identity
stage-2 maps them back.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

from pkvm_smmu.devicetree import DeviceTreeError
from pkvm_smmu.guest import ProtectedVm
from pkvm_smmu.host.driver_core import Device
from pkvm_smmu.host.iommu import DmaDirection, dma_map_single, dma_mapping_error, dma_unmap_single
from pkvm_smmu.host.kernel import HostKernel, KernelParams
from pkvm_smmu.host.kvm import (
    DEFAULT_BOOT_VARIANT,
    KVM_ARM_MODE,
    BootVariant,
    HypSmmuEntry,
    KvmArm,
    boot_variant,
)
from pkvm_smmu.hyp.contracts import DataAbortHandler
from pkvm_smmu.hyp.hypercalls import Arg
from pkvm_smmu.hyp.iommu import KvmIommu
from pkvm_smmu.hyp.pkvm import Pkvm
from pkvm_smmu.hyp.smmuv3 import POLICIES, SmmuDescription, SmmuV3HypDriver, make_policy
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.cpu import CpuFault
from pkvm_smmu.machine.devices import DmaEndpoint
from pkvm_smmu.machine.memory import PAGE_SHIFT, PAGE_SIZE
from pkvm_smmu.machine.platform import DeviceSpecError, Machine, build_machine
from pkvm_smmu.machine.smmu import SmmuFeatures
from pkvm_smmu.scenarios.boot import (
    HostIrqMask,
    RunOptions,
    load_platform_tree,
    new_trace,
    parse_devices,
    wire_host_interrupts,
)
from pkvm_smmu.scenarios.isolation import IsolationOracle
from pkvm_smmu.scenarios.native import run_dma_workload
from pkvm_smmu.scenarios.pkvm_report import (
    WORKLOAD,
    PkvmCollector,
    PkvmRunReport,
    build_pkvm_report,
)
from pkvm_smmu.scenarios.report import AFTER_BOOT, ReportCollector, build_report, report_counters
from pkvm_smmu.trace import Counters, JsonlSink, RecordingSink, Sink, TraceBus, write_chrome_trace

DESIGN = "trap-emulate"
PKVM_FAILURES = {
    "cntfrq": "CNTFRQ_EL0 reads 0: __pkvm_init_finalise fails with -ENODEV (v4 patch 03)",
    "smmu-stage2": "the SMMU implements stage 1 only: the hyp's probe fails with -ENXIO (v4 patch 18)",
}
SMMU_V3 = "arm,smmu-v3"


class PkvmHyp:
    """The hypervisor as the scenario assembles it: ``Pkvm``, and the SMMUv3 hyp driver once the
    host hands over the SMMU array. The host gets this object as its ``Hvc``; only ``hvc`` is for it.

    Boot-time calls it adds to pKVM's host hypercalls (Linux makes the first one a write of hyp
    symbols before pKVM runs; here every host-to-hyp exchange is a call):

    - ``kvm_iommu_register_driver(array_pa, nr_smmus)``: patches 09 and 16;
    - ``__pkvm_init(base_pfn, nr_pages)``: the carveout the host reserved must be the one pKVM
      sizes; ``__pkvm_init`` then ``__pkvm_init_finalise`` (the array becomes the hyp's, patch 17);
    - ``__pkvm_prot_finalize()``: the host stage-2 goes on the host's CPU.
    """

    def __init__(self, machine: Machine, pkvm: Pkvm, policy: str) -> None:
        self.machine = machine
        self.pkvm = pkvm
        self.policy = policy
        self.driver: SmmuV3HypDriver | None = None
        self.iommu: KvmIommu | None = None
        self._array: tuple[int, int] | None = None  # pfn, pages
        self.irq_mask = HostIrqMask()
        register = pkvm.hypercalls.register_hypercall
        register("kvm_iommu_register_driver", self._register_driver, (Arg.PAGE_ADDR, Arg.U64))
        register("__pkvm_init", self._pkvm_init, (Arg.PFN, Arg.NR_PAGES))
        register("__pkvm_prot_finalize", self._prot_finalize, ())

    def hvc(self, name: str, *args: int) -> int:
        with self.irq_mask.at_el2():
            return self.pkvm.hvc(name, *args)

    def _register_driver(self, array_pa: int, count: int) -> int:
        pkvm = self.pkvm
        if pkvm.state not in ("off", "reserved") or not 0 < count <= PAGE_SIZE // HypSmmuEntry.SIZE:
            return -errno.EINVAL if count else -errno.EPERM
        data = pkvm.hyp_cpu.read_bytes(array_pa, count * HypSmmuEntry.SIZE)
        if isinstance(data, CpuFault):
            return -errno.EFAULT
        by_base = {smmu.base: smmu.name for smmu in self.machine.smmus.values()}
        descs = []
        for index in range(count):
            e = HypSmmuEntry.unpack(data[index * HypSmmuEntry.SIZE :])
            descs.append(
                SmmuDescription(
                    by_base.get(e.mmio_addr, f"smmu{index}"),
                    e.mmio_addr,
                    e.mmio_size,
                    e.coherent,
                    e.cmdq_pa,
                    e.cmdq_size,
                    e.strtab_pa,
                    e.strtab_size,
                )
            )
        driver = SmmuV3HypDriver(descs, make_policy(self.policy))
        iommu = KvmIommu(pkvm, driver)
        ret = pkvm.kvm_iommu_register_driver(iommu)
        if not ret:
            self.driver, self.iommu = driver, iommu
            self._array = (array_pa >> PAGE_SHIFT, -(-count * HypSmmuEntry.SIZE // PAGE_SIZE))
        return ret

    def _pkvm_init(self, base_pfn: int, nr_pages: int) -> int:
        pkvm = self.pkvm
        if pkvm.state not in ("off", "reserved"):
            return -errno.EPERM
        ret = pkvm.kvm_hyp_reserve()
        carveout = pkvm.carveout
        if (
            not ret
            and carveout is not None
            and (carveout.base_pfn, carveout.nr_pages) != (base_pfn, nr_pages)
        ):
            pkvm.trace.emit(
                "hyp",
                "warn",
                message="the host reserved another carveout than pKVM sized",
                host=[base_pfn, nr_pages],
                hyp=[carveout.base_pfn, carveout.nr_pages],
            )
            return -errno.EINVAL
        ret = pkvm.init()
        if ret:
            return ret
        if self._array is not None:  # patch 17: the hyp owns the array from now on
            ret = pkvm.mem_protect.host_donate_hyp(*self._array)
            if ret:
                return ret
        ret = pkvm.finalise()
        if not ret:  # a trapped access is handled at EL2 too, host interrupts pending meanwhile
            stage2 = pkvm.host_stage2
            for handler in stage2.data_abort_handlers:
                stage2.remove_data_abort_handler(handler)
                stage2.add_data_abort_handler(_AtEl2(handler, self.irq_mask))
        return ret

    def _prot_finalize(self) -> int:
        pkvm = self.pkvm
        port = self.machine.host_cpu()
        if not pkvm.protected_mode_initialized or port.stage2 is not None:
            return -errno.EPERM
        pkvm.attach_host_cpu(port)
        return 0


class _AtEl2:
    """A hyp data-abort handler entered from a host access: it runs at EL2."""

    def __init__(self, handler: DataAbortHandler, mask: HostIrqMask) -> None:
        self.handler = handler
        self.mask = mask

    def handle_host_dabt(self, address: int, size: int, is_write: bool, value: int) -> int | None:
        with self.mask.at_el2():
            return self.handler.handle_host_dabt(address, size, is_write, value)


@dataclass
class PkvmSystem:
    """A booted machine, hypervisor and host kernel, with the report's trace sinks attached."""

    options: RunOptions
    machine: Machine
    pkvm: Pkvm
    hyp: PkvmHyp
    kvm: KvmArm
    host: HostKernel
    trace: TraceBus
    collector: ReportCollector
    counters: Counters
    pkvm_collector: PkvmCollector
    oracle: IsolationOracle
    boot_ns: int = 0

    def boot(self) -> None:
        """Run every initcall (each followed by an isolation check), then check once more."""
        self.host.boot()
        self.oracle.check(AFTER_BOOT)
        self.boot_ns = self.machine.clock.now_ns

    @property
    def variant(self) -> BootVariant:
        return self.kvm.variant


class OptionError(ValueError):
    """A value the design does not have; ``option`` names the command-line option."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def check_options(options: RunOptions) -> RunOptions:
    """The options with the design's defaults filled in; OptionError for a bad boot variant, policy
    or pKVM failure."""
    try:
        variant = boot_variant(
            DEFAULT_BOOT_VARIANT if options.boot_variant == "none" else options.boot_variant
        )
    except ValueError as error:
        raise OptionError("--boot-variant", str(error)) from None
    if options.policy not in POLICIES:
        have = ", ".join(sorted(POLICIES))
        raise OptionError("--policy", f"unknown policy '{options.policy}' (have: {have})")
    if options.pkvm_fail is not None and options.pkvm_fail not in PKVM_FAILURES:
        have = ", ".join(PKVM_FAILURES)
        raise OptionError("--pkvm-fail", f"unknown pKVM failure '{options.pkvm_fail}' (have: {have})")
    return replace(options, design=DESIGN, boot_variant=variant.value)


def assemble_pkvm(options: RunOptions, *, sinks: Sequence[Sink] = ()) -> PkvmSystem:
    """Build the machine, the hypervisor and the host kernel, not yet booted. Bad input raises
    DeviceTreeError, DeviceSpecError, CmdlineError or OptionError."""
    options = check_options(options)
    tree = load_platform_tree(options.platform)
    specs = parse_devices(options.devices)
    clock = Clock()
    trace = new_trace(clock, options)
    collector = trace.attach(ReportCollector())
    counters = trace.attach(report_counters())
    pkvm_collector = trace.attach(PkvmCollector())
    for sink in sinks:
        trace.attach(sink)
    features = None
    if options.pkvm_fail == "smmu-stage2":
        features = {
            n.path: SmmuFeatures(stage2=False, coherent=n.has("dma-coherent"))
            for n in tree.compatible_nodes(SMMU_V3)
        }
    machine = build_machine(tree, extra_devices=specs, trace=trace, clock=clock, features=features)
    pkvm = Pkvm(machine.bus, clock, trace, machine.hyp_cpu())
    if options.pkvm_fail == "cntfrq":
        pkvm.cntfrq_hz = 0  # firmware left CNTFRQ_EL0 unprogrammed
    hyp = PkvmHyp(machine, pkvm, options.policy)
    kvm = KvmArm(hyp, options.boot_variant)
    cmdline = options.cmdline
    if options.pkvm and f"{KVM_ARM_MODE}=" not in cmdline:
        cmdline = f"{KVM_ARM_MODE}=protected {cmdline}".strip()
    host = HostKernel(
        machine.host_cpu(),
        tree,
        cmdline,
        trace=trace,
        now_ns=lambda: clock.now_ns,
        smmu_level=kvm.variant.smmu_level,
        arch=kvm,
    )
    oracle = trace.attach(IsolationOracle(machine, pkvm, kvm.is_protected_kvm_enabled(), lambda: hyp.iommu))
    wire_host_interrupts(machine, host.irq, hyp.irq_mask)
    return PkvmSystem(
        options, machine, pkvm, hyp, kvm, host, trace, collector, counters, pkvm_collector, oracle
    )


def boot_pkvm(options: RunOptions, *, sinks: Sequence[Sink] = ()) -> PkvmSystem:
    """``assemble_pkvm`` and boot."""
    system = assemble_pkvm(options, sinks=sinks)
    system.boot()
    return system


# -- the guest donation ------------------------------------------------------------------------------


@dataclass
class _Engine:
    name: str
    dev: Device
    endpoint: DmaEndpoint
    iovas: dict[int, int]  # page -> IOVA
    cached: dict[int, bool] = field(default_factory=dict)  # page -> the SMMU held its translation


class GuestDonation:
    """Pages the host mapped for DMA given away and back, every DMA engine checked at each step."""

    SECRET = b"guest secret"

    def __init__(self, system: PkvmSystem) -> None:
        self.s = system
        self.engines: list[_Engine] = []

    def _owner(self, page: int) -> str:
        return str(self.s.pkvm.mem_protect.owner_of(page >> PAGE_SHIFT))

    def _cached(self, engine: _Engine, iova: int) -> bool:
        """The SMMU holds a translation of ``iova`` for this engine's domain (its ASID, or any
        stage-2 entry for a domain without one)."""
        tlb = engine.endpoint.smmu.tlb
        asid = getattr(self.s.host.domain_of(engine.dev), "asid", None)
        return any(
            e.input_base <= iova < e.input_base + e.size and (asid is None or e.asid in (asid, None))
            for e in tlb.entries()
        )

    def check(self, step: str, page: int, expected: bool) -> None:
        """Every engine reads and writes ``page`` through its IOVA. ``cached`` reports whether the
        SMMU held the translation when the step began (left there by the previous access)."""
        trace = self.s.trace
        for engine in self.engines:
            iova = engine.iovas[page]
            cached = engine.cached.get(page, False)
            read = engine.endpoint.read(iova, 16)
            leaked = read.ok and self.SECRET in read.data
            write = engine.endpoint.write(iova, b"device was here")
            engine.cached[page] = self._cached(engine, iova)
            trace.emit(
                WORKLOAD,
                "dma.check",
                step=step,
                page=page,
                owner=self._owner(page),
                device=engine.name,
                iova=iova,
                cached=cached,
                read=read.ok,
                write=write.ok,
                expected=expected,
                leaked=leaked,
            )

    def run(self) -> int:
        s = self.s
        host, kvm, mm = s.host, s.kvm, s.host.mm
        if not kvm.kvm_protected_mode_initialized:
            s.trace.emit(WORKLOAD, "donation.skip", why="pKVM is not protecting the host")
            return 0
        pages = [mm.alloc_zeroed_pages(1) for _ in range(3)]
        if any(p is None for p in pages):
            return -errno.ENOMEM
        guest_page, reclaim_page, pgd_page = (int(p) for p in pages if p is not None)
        by_sid = {d.stream_id: d for d in s.machine.dma_devices.values() if d.stream_id is not None}
        for dmae in host.dma_engines.values():
            sids = host.stream_ids(dmae.dev)
            device = by_sid.get(sids[0]) if sids else None
            if device is None:
                continue
            iovas = {}
            for page in (guest_page, reclaim_page, pgd_page):
                dma = dma_map_single(dmae.dev, page, PAGE_SIZE, DmaDirection.BIDIRECTIONAL)
                if not dma_mapping_error(dmae.dev, dma):
                    iovas[page] = dma
            if len(iovas) == len(pages):
                self.engines.append(_Engine(dmae.name, dmae.dev, device.endpoint, iovas))
        for page in (guest_page, reclaim_page, pgd_page):
            self.check("host-owned, mapped for DMA", page, True)
        handle = kvm.pkvm_init_vm(pgd_page)
        ret = handle if handle < 0 else 0
        if not ret:
            self.check("donated to the hyp (VM state)", pgd_page, False)
            vm = ProtectedVm(handle, s.pkvm)
            for gfn, page in ((0, guest_page), (1, reclaim_page)):
                ret = ret or kvm.pkvm_host_donate_guest(page >> PAGE_SHIFT, gfn, handle)
                vm.write_bytes(gfn << PAGE_SHIFT, self.SECRET)
                self.check("donated to a protected VM", page, False)
            ret = ret or vm.relinquish(0)
            self.check("relinquished by the guest", guest_page, True)
            ret = ret or kvm.pkvm_teardown_vm(handle)
            self.check("VM torn down (state page back to the host)", pgd_page, True)
            self.check("VM torn down, not yet reclaimed", reclaim_page, False)
            ret = ret or kvm.pkvm_host_reclaim_page(reclaim_page >> PAGE_SHIFT)
            self.check("reclaimed by the host", reclaim_page, True)
        for engine in self.engines:
            for iova in engine.iovas.values():
                dma_unmap_single(engine.dev, iova, PAGE_SIZE, DmaDirection.BIDIRECTIONAL)
        s.trace.emit(WORKLOAD, "donation", result=ret, handle=handle)
        return ret


def run_pkvm(options: RunOptions) -> PkvmRunReport:
    """Boot under pKVM, run the DMA workload and the guest donation, report; write the trace files
    the options name. Bad input raises before any file is written."""
    options = check_options(options)
    load_platform_tree(options.platform)
    parse_devices(options.devices)
    KernelParams.parse(options.cmdline)
    with ExitStack() as stack:
        sinks: list[Sink] = []
        jsonl = JsonlSink(options.trace_jsonl, options.metadata()) if options.trace_jsonl else None
        if jsonl is not None:
            sinks.append(stack.enter_context(jsonl))
        recording = RecordingSink() if options.trace_json else None
        if recording is not None:
            sinks.append(recording)
        try:
            system = boot_pkvm(options, sinks=sinks)
        except (DeviceTreeError, DeviceSpecError):
            if jsonl is not None:
                jsonl.discard()
            raise
        copies, faults = run_dma_workload(system.host, options.seed)
        system.oracle.check("DMA workload")
        GuestDonation(system).run()
        system.oracle.check("guest donation")
        base = build_report(
            system.host,
            system.collector,
            system.counters,
            metadata=options.metadata(),
            boot_ns=system.boot_ns,
            total_ns=system.machine.clock.now_ns,
            copies=copies,
            fault_checks=faults,
        )
        report = build_pkvm_report(
            base,
            system.pkvm_collector,
            pkvm_up=system.kvm.kvm_protected_mode_initialized,
            failure_expected=options.pkvm_fail is not None,
        )
        if recording is not None and options.trace_json:
            write_chrome_trace(recording.events, options.trace_json, options.metadata())
    return report


__all__ = [
    "DESIGN",
    "PKVM_FAILURES",
    "GuestDonation",
    "OptionError",
    "PkvmHyp",
    "PkvmSystem",
    "assemble_pkvm",
    "boot_pkvm",
    "check_options",
    "run_pkvm",
]
