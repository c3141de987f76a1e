"""The host's KVM half: protected mode from the command line, the carveout reserved before the page
allocator hands anything out, the SMMU array and hyp driver handed over at core_initcall before any
driver touches the SMMU, __pkvm_init at kvm_arm_init and the host deprivileged at finalize_pkvm, all
through hypercalls."""

from __future__ import annotations

import pytest

from pkvm_smmu.arch.registers import Reg
from pkvm_smmu.host.driver_core import InitcallLevel
from pkvm_smmu.host.kvm import HypSmmuEntry, kvm_mode_from_cmdline
from pkvm_smmu.host.kvm.arm_smmu_v3 import SMMU_KVM_CMDQ_SIZE, SMMU_KVM_STRTAB_SIZE
from pkvm_smmu.machine.cpu import CpuFault
from pkvm_smmu.machine.memory import PAGE_SHIFT
from pkvm_smmu.scenarios.boot import RunOptions
from pkvm_smmu.scenarios.pkvm import PkvmSystem, assemble_pkvm, boot_pkvm
from pkvm_smmu.trace import RecordingSink, TraceEvent

SMMU_BASE = 0x0905_0000


def booted(**options: object) -> tuple[PkvmSystem, list[TraceEvent]]:
    sink = RecordingSink()
    system = boot_pkvm(RunOptions(design="trap-emulate", **options), sinks=[sink])  # type: ignore[arg-type]
    return system, sink.events


def first(events: list[TraceEvent], component: str, kind: str, **fields: object) -> TraceEvent:
    for event in events:
        if (event.component, event.kind) == (component, kind) and all(
            event.fields.get(k) == v for k, v in fields.items()
        ):
            return event
    raise AssertionError(f"no {component}/{kind} {fields}")


def initcall_of(events: list[TraceEvent], event: TraceEvent) -> str:
    """The initcall span that encloses ``event`` (spans arrive when they end)."""
    for span in events:
        if span.kind == "initcall" and span.seq > event.seq and span.time_ns <= event.time_ns:
            return str(span.fields["fn"])
    return "(none)"


@pytest.mark.parametrize(
    ("cmdline", "mode"),
    [("", "nvhe"), ("kvm-arm.mode=protected", "protected"), ("kvm-arm.mode=none quiet", "none"),
     ("kvm-arm.mode=protected kvm-arm.mode=nvhe", "nvhe"), ("kvm-arm.mode=bogus", "nvhe")],
)  # fmt: skip
def test_kvm_mode_from_the_command_line(cmdline: str, mode: str) -> None:
    assert kvm_mode_from_cmdline(cmdline) == mode


def test_the_array_entry_round_trips() -> None:
    entry = HypSmmuEntry(SMMU_BASE, 0x20000, True, 0x4000_0000, SMMU_KVM_CMDQ_SIZE, 0x4010_0000, 1 << 20)
    assert len(entry.pack()) == HypSmmuEntry.SIZE
    assert HypSmmuEntry.unpack(entry.pack()) == entry
    assert not HypSmmuEntry.unpack(HypSmmuEntry(1, 2, False, 3, 4, 5, 6).pack()).coherent


def test_carveout_is_reserved_before_the_allocator_hands_anything_out() -> None:
    system, events = booted()
    reserve = first(events, "host.kvm", "kvm_hyp_reserve")
    allocs = [e for e in events if e.component == "host.mm" and e.kind == "alloc"]
    assert allocs and reserve.seq < allocs[0].seq
    base, pages = int(reserve.fields["base"]), int(reserve.fields["pages"])
    assert reserve.fields["result"] == 0 and base % (2 << 20) == 0
    for alloc in allocs:
        start, end = int(alloc.fields["pa"]), int(alloc.fields["pa"]) + (int(alloc.fields["pages"]) << 12)
        assert end <= base or start >= base + (pages << PAGE_SHIFT)
    # The host sized and placed it exactly where pKVM did, and the hyp owns it now.
    carveout = system.pkvm.carveout
    assert carveout is not None and (carveout.base_pfn << PAGE_SHIFT, carveout.nr_pages) == (base, pages)
    assert reserve.fields["iommu_pages"] == carveout.iommu_pages > 500
    assert isinstance(system.machine.host_cpu().read(base, 8), CpuFault)


def test_smmu_array_and_driver_are_handed_over_at_core_initcall_before_any_driver_probes() -> None:
    system, events = booted()
    register = first(events, "hyp", "hypercall", name="kvm_iommu_register_driver")
    assert register.fields["result"] == 0 and initcall_of(events, register) == "kvm_arm_smmu_v3_register"
    host_mmio = [e for e in events if e.component == "hyp.smmuv3" and e.kind == "trap"]
    assert host_mmio and register.seq < host_mmio[0].seq
    (entry,) = system.kvm.smmu.entries
    assert (entry.mmio_addr, entry.mmio_size, entry.coherent) == (SMMU_BASE, 0x20000, True)
    assert entry.cmdq_size == SMMU_KVM_CMDQ_SIZE and entry.strtab_size == SMMU_KVM_STRTAB_SIZE
    assert entry.cmdq_pa % SMMU_KVM_CMDQ_SIZE == 0 and entry.strtab_pa % SMMU_KVM_STRTAB_SIZE == 0
    driver = system.hyp.driver
    assert driver is not None and [d.mmio_base for d in driver.descriptions] == [SMMU_BASE]
    (hyp_smmu,) = driver.smmus
    assert hyp_smmu.taken_over and hyp_smmu.strtab_base == entry.strtab_pa
    # Patch 17: the array and the shadows are the hyp's; the host can no longer read them.
    host = system.machine.host_cpu()
    array = system.kvm.smmu.array_pa
    assert array is not None
    for pa in (array, entry.cmdq_pa, entry.strtab_pa):
        assert isinstance(host.read(pa, 8), CpuFault)


def test_init_at_kvm_arm_init_and_deprivilege_at_finalize_pkvm() -> None:
    system, events = booted()
    calls = [(e.fields["name"], e.fields["result"]) for e in events if e.kind == "hypercall"]
    boot_calls = [
        c for c in calls if c[0] in ("kvm_iommu_register_driver", "__pkvm_init", "__pkvm_prot_finalize")
    ]
    assert boot_calls == [("kvm_iommu_register_driver", 0), ("__pkvm_init", 0), ("__pkvm_prot_finalize", 0)]
    take_over = first(events, "hyp.smmuv3", "init", result=0)
    assert initcall_of(events, take_over) == "kvm_arm_init"
    installed = first(events, "hyp", "init", step="host_stage2_installed")
    assert initcall_of(events, installed) == "finalize_pkvm"
    assert system.kvm.kvm_protected_mode_initialized and system.pkvm.state == "finalised"
    # Only now does a host access to the SMMU trap.
    assert isinstance(system.machine.host_cpu().read(SMMU_BASE + Reg.IDR0, 4), int)
    assert system.pkvm_collector.traps


def test_between_kvm_arm_init_and_finalize_pkvm_the_host_is_not_yet_deprivileged() -> None:
    system = assemble_pkvm(RunOptions(design="trap-emulate"))
    system.host.kernel.run_initcalls(until=InitcallLevel.DEVICE)
    assert system.pkvm.state == "finalised" and not system.kvm.kvm_protected_mode_initialized
    assert system.machine.host_cpu().stage2 is None  # the host stage-2 is built but not on
    system.host.kernel.run_initcalls(until=InitcallLevel.DEVICE_SYNC)
    assert system.machine.host_cpu().stage2 is not None and system.kvm.kvm_protected_mode_initialized


def test_boot_calls_are_refused_once_pkvm_is_up() -> None:
    system, _ = booted()
    hyp = system.hyp
    array = system.kvm.smmu.array_pa
    assert array is not None
    assert hyp.hvc("kvm_iommu_register_driver", array, 1) < 0
    assert hyp.hvc("__pkvm_init", system.kvm.hyp_mem_base >> PAGE_SHIFT, 1) < 0
    assert hyp.hvc("__pkvm_prot_finalize") < 0
    assert hyp.hvc("__pkvm_init", 1 << 60, 1) < 0  # malformed: validated, never raises


def test_without_protected_mode_nothing_is_reserved_or_handed_over() -> None:
    system, events = booted(pkvm=False)
    assert system.kvm.mode == "nvhe" and not system.kvm.hyp_mem_size
    assert not [e for e in events if e.kind == "hypercall"]
    assert not [e for e in events if e.component == "host.kvm" and e.kind == "kvm_hyp_reserve"]
    assert system.pkvm.state == "off" and system.machine.host_cpu().stage2 is None
    assert system.host.smmus and system.host.smmus[0].probed  # natively


def test_a_carveout_the_hyp_did_not_size_is_refused() -> None:
    system = assemble_pkvm(RunOptions(design="trap-emulate"))
    system.kvm.hyp_mem_base += 2 << 20  # a host that reserved elsewhere
    system.host.kernel.run_initcalls(until=InitcallLevel.DEVICE)
    assert system.kvm.init_error == -22 and system.pkvm.state != "finalised"
