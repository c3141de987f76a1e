"""The sanitizer: silent on correct software (the native boot and workload, the pKVM system), and one
exact report for each way purpose-broken software relies on what the architecture does not
guarantee."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence

import pytest

from pkvm_smmu.arch.commands import CMD_SIZE, Opcode, build_command, cfgi_all, pretty_command
from pkvm_smmu.arch.registers import CMDQ_BASE, CR0, CR1, GBPA, IRQ_CTRL, STRTAB_BASE, Reg
from pkvm_smmu.arch.strtab import CD, STE, STE_SIZE
from pkvm_smmu.arch.vmsa import S1_LEAF
from pkvm_smmu.host.arm_smmu_v3.domain import ArmSmmuDomain
from pkvm_smmu.machine.devices import DmaEndpoint
from pkvm_smmu.machine.memory import PAGE_SIZE
from pkvm_smmu.pgtable import IoPageTable
from pkvm_smmu.pgtable.gather import IotlbGather
from pkvm_smmu.pgtable.prot import Prot
from pkvm_smmu.scenarios import native
from pkvm_smmu.scenarios import pkvm as pkvm_scenario
from pkvm_smmu.scenarios.boot import RunOptions
from pkvm_smmu.smmu_lib.entry import SteWriterOps, to_words, write_entry
from pkvm_smmu.verify.sanitizer import Check, Sanitizer, SanitizerReport

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "machine", "smmu"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "hyp", "smmuv3"))
from harness import SMMU_BASE, SmmuHarness, make_machine, map_pages
from hyp_smmu_rig import BUF, HOST_L2, HOSTQ, FakeDev, HostQueue, HostStreamTable, PkvmRig, make_rig

K4 = 4096
VA = 0x3_0000_0000
SID = 1
RW = Prot.READ | Prot.WRITE | Prot.CACHE


def sanitized_harness(*, init: bool = True) -> tuple[SmmuHarness, Sanitizer]:
    """A bare SMMU under a sanitizer attached before anything programs it."""
    machine = make_machine()
    sanitizer = Sanitizer(machine.bus, machine.smmu.trace, [machine.smmu])
    h = SmmuHarness(machine)
    if init:
        h.init()
        assert sanitizer.reports == []
    return h, sanitizer


def summary(reports: Sequence[SanitizerReport]) -> list[tuple[Check, str, int, str]]:
    return [(r.check, r.structure, r.writer.address, r.missing) for r in reports]


def leaf(pt: IoPageTable, iova: int) -> tuple[int, int]:
    """(descriptor, its address) of the leaf that maps ``iova``."""
    for found in pt.walk_leaves(iova, iova + 1):
        return found.desc, found.pte_pa
    raise AssertionError(f"{iova:#x} is not mapped")


def s1_stream(h: SmmuHarness, sid: int = SID, asid: int = 1) -> tuple[IoPageTable, list[int], int]:
    """A stage-1 stream mapping VA (two pages) to two frames; returns (table, frames, CD address).
    Written as correct software does: the STE made valid, then CFGI_STE + CMD_SYNC."""
    pt = h.s1_table()
    frames = [h.buffer() for _ in range(2)]
    for i, frame in enumerate(frames):
        map_pages(pt, VA + i * K4, frame, K4)
    cds = h.cd_table()
    cd = h.write_cd(cds, 0, h.cd(pt, asid=asid))
    make_valid(h, sid, h.ste_s1(cds))
    return pt, frames, cd


def make_valid(h: SmmuHarness, sid: int, ste: int) -> int:
    """Install an STE where an invalid one is, as software must: words 1-7, then word 0 (V=1) in
    one store, then CFGI_STE + CMD_SYNC; returns its address."""
    address = h.ste_address(sid)
    words = to_words(ste)
    for index in (*range(1, len(words)), 0):
        h.write_u64(address + 8 * index, words[index])
    h.cfgi_ste(sid)
    return address


def repoint(h: SmmuHarness, pt: IoPageTable, iova: int, pa: int) -> int:
    """One 64-bit store changing the output of ``iova``'s leaf; returns the descriptor's address."""
    desc, pte = leaf(pt, iova)
    h.write_u64(pte, S1_LEAF.OA.set_address(desc, pa))
    return pte


def tlbi_va(asid: int = 1) -> int:
    return build_command(Opcode.TLBI_NH_VA, ASID=asid, VMID=0, LEAF=1, ADDR=VA)


# ---- correct software: nothing to report --------------------------------------------------------------


@pytest.fixture
def native_sanitizer(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Sanitizer]]:
    """Every machine ``run_native`` builds gets a sanitizer before the host touches it."""
    made: list[Sanitizer] = []
    build = native.build_machine

    def build_sanitized(*args: object, **kwargs: object) -> native.Machine:
        machine = build(*args, **kwargs)  # type: ignore[arg-type]
        made.append(Sanitizer.for_machine(machine))
        return machine

    monkeypatch.setattr(native, "build_machine", build_sanitized)
    yield made


@pytest.mark.parametrize("cmdline", ["", "iommu.strict=0", "iommu.passthrough=1"])
def test_native_boot_and_workload_rely_on_nothing_unguaranteed(
    native_sanitizer: list[Sanitizer], cmdline: str
) -> None:
    report = native.run_native(RunOptions(cmdline=cmdline))
    assert report.copies and all(copy.ok for copy in report.copies)
    (sanitizer,) = native_sanitizer
    assert sanitizer.finish() == []
    coverage = sanitizer.coverage  # it watched: translations, invalidations and STE updates
    assert coverage.translations > 0 and coverage.invalidations > 0 and coverage.updates >= 4
    assert coverage.register_writes > 0 and coverage.traps == 0


@pytest.fixture
def pkvm_sanitizer(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[list[tuple[pkvm_scenario.PkvmSystem, Sanitizer]]]:
    """Every system ``run_pkvm`` assembles gets a sanitizer (with pKVM's page ownership) before it
    boots."""
    made: list[tuple[pkvm_scenario.PkvmSystem, Sanitizer]] = []
    assemble = pkvm_scenario.assemble_pkvm

    def assemble_sanitized(*args: object, **kwargs: object) -> pkvm_scenario.PkvmSystem:
        system = assemble(*args, **kwargs)  # type: ignore[arg-type]
        made.append((system, Sanitizer.for_machine(system.machine, host_pages=system.pkvm.mem_protect)))
        return system

    monkeypatch.setattr(pkvm_scenario, "assemble_pkvm", assemble_sanitized)
    yield made


# What the sanitizer finds in the v4 pKVM run, per boot variant: the host L1 descriptors v4 reads
# twice in one trap (see test_v4_reshadow_reads_the_host_l1_descriptor_twice), one per L2 table
# the hyp shadows; in ``naive`` (the host enabled the SMMU before the take-over) the hyp
# reprogramming the queue and stream table of a live SMMU.
PKVM_RUN_FINDINGS = {
    "late-register": [(Check.DOUBLE_FETCH, "L1STD 1"), (Check.DOUBLE_FETCH, "L1STD 0")],
    "defer": [(Check.DOUBLE_FETCH, "L1STD 1"), (Check.DOUBLE_FETCH, "L1STD 0")],
    "aux-device": [(Check.DOUBLE_FETCH, "L1STD 1"), (Check.DOUBLE_FETCH, "L1STD 0")],
    "child-platform": [],
    "naive": [
        (Check.QUEUE_INDEX, "CMDQ_PROD"),
        (Check.GUARDED_WRITE, "CMDQ_CONS"),
        (Check.GUARDED_WRITE, "CMDQ_BASE"),
        (Check.GUARDED_WRITE, "STRTAB_BASE"),
        (Check.GUARDED_WRITE, "STRTAB_BASE_CFG"),
    ],
}


# naive's host churns through ~262k illegal commands after pKVM fails: minutes under the sanitizer.
@pytest.mark.parametrize(
    "variant",
    [pytest.param(v, marks=pytest.mark.soak) if v == "naive" else v for v in PKVM_RUN_FINDINGS],
)
def test_pkvm_boot_workload_and_donation_findings(
    pkvm_sanitizer: list[tuple[pkvm_scenario.PkvmSystem, Sanitizer]], variant: str
) -> None:
    report = pkvm_scenario.run_pkvm(RunOptions(design="trap-emulate", boot_variant=variant))
    # child-platform's arm-smmu-v3 never binds (the scenario's own finding): no DMA domains.
    assert bool(report.copies) == (variant != "child-platform")
    assert all(copy.ok for copy in report.copies)
    ((system, sanitizer),) = pkvm_sanitizer
    found = []
    for finding in sanitizer.finish():
        assert finding.writer.initiator == "hyp"
        if finding.check is Check.DOUBLE_FETCH:
            assert system.hyp.driver is not None
            host_l1 = STRTAB_BASE.ADDR.get_address(system.hyp.driver.smmus[0].host_ste_base)
            found.append((finding.check, f"L1STD {(finding.writer.address - host_l1) // 8}"))
        else:
            found.append((finding.check, finding.structure))
    assert found == PKVM_RUN_FINDINGS[variant]
    assert sanitizer.coverage.traps > 0 or variant == "naive"  # naive's host never traps


def test_linux_entry_update_algorithm_is_hitless() -> None:
    """arm_smmu_write_entry moving a live STE from stage 1 to stage 2 (through V=0) and back
    (hitless where it can be), with CFGI_STE + CMD_SYNC after each step: no report."""
    h, sanitizer = sanitized_harness()
    s1_stream(h)
    ep = DmaEndpoint("dev", h.smmu, SID)
    assert ep.read(VA, 8).ok
    address = h.ste_address(SID)

    class Writer(SteWriterOps):
        def write_qword(self, index: int, value: int) -> None:
            h.write_u64(address + 8 * index, value)

        def sync(self) -> None:
            h.cfgi_ste(SID)

    s2 = h.s2_table()
    map_pages(s2, VA, h.buffer(), K4)
    current = to_words(h.read_ste(SID))
    s1 = list(current)
    write_entry(Writer(), current, to_words(h.ste_s2(s2, vmid=3)))
    assert ep.read(VA, 8).ok
    write_entry(Writer(), current, s1)
    assert ep.read(VA, 8).ok
    assert sanitizer.finish() == []


# ---- check 1: stale use ---------------------------------------------------------------------------------


def test_pte_changed_and_dmad_without_tlbi() -> None:
    h, sanitizer = sanitized_harness()
    pt, frames, _ = s1_stream(h)
    ep = DmaEndpoint("dev", h.smmu, SID)
    assert ep.read(VA, 8).ok
    pte = repoint(h, pt, VA, frames[1])
    assert ep.read(VA, 8).ok  # the SMMU still uses the cached translation to frames[0]
    (report,) = sanitizer.reports
    assert summary([report]) == [
        (
            Check.STALE_USE,
            f"TLB entry S1 el1 VMID=0 ASID=1 VA {VA:#x}+0x1000 -> {frames[0]:#x}",
            pte,
            f"CMD_TLBI_NH_VA VMID=0 ASID=1 ADDR={VA:#x} + CMD_SYNC",
        )
    ]
    assert (
        report.writer.initiator == "hyp"
        and report.writer.what == f"store {S1_LEAF.OA.set_address(leaf(pt, VA)[0], frames[1]):#x}"
    )
    assert report.at.address == VA and report.at.initiator == f"dma sid={SID:#x}"
    assert report.writer.seq <= report.at.seq and report.writer.time_ns <= report.at.time_ns
    # Doing it right afterwards (TLBI + CMD_SYNC) adds nothing.
    h.submit(tlbi_va())
    assert ep.read(VA, 8).ok
    assert len(sanitizer.reports) == 1


def test_tlbi_queued_but_not_completed_before_the_dma() -> None:
    h, sanitizer = sanitized_harness()
    pt, frames, _ = s1_stream(h)
    ep = DmaEndpoint("dev", h.smmu, SID)
    assert ep.read(VA, 8).ok
    pte = repoint(h, pt, VA, frames[1])
    h.submit(tlbi_va(), wait=False)  # TLBI + CMD_SYNC queued, PROD written, no wait
    assert ep.read(VA, 8).ok
    assert summary(sanitizer.reports) == [
        (
            Check.STALE_USE,
            f"TLB entry S1 el1 VMID=0 ASID=1 VA {VA:#x}+0x1000 -> {frames[0]:#x}",
            pte,
            f"completion of {pretty_command(tlbi_va())} (queued, not consumed: wait for a CMD_SYNC after it)",
        )
    ]


def test_tlbi_consumed_without_cmd_sync_before_the_dma() -> None:
    h, sanitizer = sanitized_harness()
    pt, frames, _ = s1_stream(h)
    ep = DmaEndpoint("dev", h.smmu, SID)
    assert ep.read(VA, 8).ok
    pte = repoint(h, pt, VA, frames[1])
    h.submit(tlbi_va(), sync=False)  # the SMMU consumed the TLBI; no CMD_SYNC followed
    assert ep.read(VA, 8).ok  # this model dropped the entry already; the architecture need not have
    (report,) = sanitizer.reports
    assert summary([report]) == [
        (
            Check.STALE_USE,
            f"TLB entry S1 el1 VMID=0 ASID=1 VA {VA:#x}+0x1000 -> {frames[0]:#x}",
            pte,
            f"CMD_SYNC after {pretty_command(tlbi_va())}",
        )
    ]
    assert "no CMD_SYNC after it" in report.message
    h.submit(build_command(Opcode.SYNC), sync=False)  # completes it: later DMAs are fine
    assert ep.read(VA, 8).ok
    assert len(sanitizer.reports) == 1


def test_ste_changed_without_cfgi() -> None:
    h, sanitizer = sanitized_harness()
    buf = h.buffer()
    address = h.write_ste(SID, h.ste_bypass())
    h.cfgi_ste(SID)
    ep = DmaEndpoint("dev", h.smmu, SID)
    assert ep.write(buf, b"a").ok
    h.write_u64(address, to_words(h.ste_abort())[0])  # bypass -> abort in one store, no CFGI
    assert ep.write(buf, b"b").ok  # the cached bypass STE is still used
    assert summary(sanitizer.reports) == [
        (Check.STALE_USE, f"STE sid={SID:#x} @{address:#x}", address, f"CMD_CFGI_STE SID={SID:#x} + CMD_SYNC")
    ]
    h.cfgi_ste(SID)
    assert not ep.write(buf, b"c").ok
    assert len(sanitizer.finish()) == 1  # the update itself was one store: hitless


def test_cd_asid_changed_without_tlbi_of_the_old_asid() -> None:
    """Stream 1's CD moves from ASID 1 to ASID 2 (CFGI_CD + CMD_SYNC, but no TLBI of ASID 1); ASID 1
    is then reused by stream 2's CD, whose DMA hits stream 1's old translation."""
    h, sanitizer = sanitized_harness()
    _, frames_a, cd_a = s1_stream(h, 1, asid=1)
    ep_a = DmaEndpoint("a", h.smmu, 1)
    assert ep_a.read(VA, 8).ok
    word0 = to_words(CD.from_bytes(h.read_mem(cd_a, 64)))[0]
    h.write_u64(cd_a, CD.ASID.set(word0, 2))
    h.cfgi_cd(1)
    assert ep_a.read(VA, 8).ok
    _, frames_b, _ = s1_stream(h, 2, asid=1)
    ep_b = DmaEndpoint("b", h.smmu, 2)
    h.write_mem(frames_a[0], b"stream-A")
    h.write_mem(frames_b[0], b"stream-B")
    assert ep_b.read(VA, 8).data == b"stream-A"  # the stale ASID-1 entry of stream 1
    (report,) = sanitizer.reports
    assert summary([report]) == [
        (
            Check.STALE_USE,
            f"TLB entry S1 el1 VMID=0 ASID=1 VA {VA:#x}+0x1000 -> {frames_a[0]:#x}",
            cd_a,
            "CMD_TLBI_NH_ASID VMID=0 ASID=1 + CMD_SYNC",
        )
    ]
    assert report.at.initiator == "dma sid=0x2"
    assert "(ASID 1)" in report.message


def test_stage2_fields_changed_without_tlbi_of_the_vmid() -> None:
    """An S2-only stream's S2TTB moves to another table (one store, CFGI_STE + CMD_SYNC) but the VMID's
    TLB entries are not invalidated: the next DMA translates through the old table's entry."""
    h, sanitizer = sanitized_harness()
    frames = [h.buffer(), h.buffer()]
    tables = [h.s2_table(), h.s2_table()]
    for table, frame in zip(tables, frames, strict=True):
        map_pages(table, VA, frame, K4)
    address = make_valid(h, SID, h.ste_s2(tables[0], vmid=3))
    ep = DmaEndpoint("dev", h.smmu, SID)
    assert ep.read(VA, 8).ok
    h.write_u64(address + 24, to_words(h.ste_s2(tables[1], vmid=3))[3])
    h.cfgi_ste(SID)
    assert ep.read(VA, 8).ok
    (report,) = sanitizer.reports
    assert summary([report]) == [
        (
            Check.STALE_USE,
            f"TLB entry S2 el1 VMID=3 IPA {VA:#x}+0x1000 -> {frames[0]:#x}",
            address + 24,
            "CMD_TLBI_S12_VMALL VMID=3 + CMD_SYNC",
        )
    ]


# ---- check 2: hitless updates ---------------------------------------------------------------------------


def test_ste_s1_to_s2_with_a_sync_between_two_used_words_is_not_hitless() -> None:
    h, sanitizer = sanitized_harness()
    s1_stream(h)
    ep = DmaEndpoint("dev", h.smmu, SID)
    assert ep.read(VA, 8).ok
    address = h.ste_address(SID)
    s2 = h.s2_table()
    target = to_words(h.ste_s2(s2, vmid=3))
    h.write_u64(address + 16, target[2])  # S2VMID (used by stage 1 too) and the VTCR fields
    h.write_u64(address + 24, target[3])  # S2TTB
    h.cfgi_ste(SID)  # the SMMU may now hold stage 1 tagged with VMID 3: neither old nor new
    h.write_u64(address, target[0])  # Config = stage 2
    h.cfgi_ste(SID)
    (report,) = sanitizer.reports
    assert summary([report]) == [
        (
            Check.NOT_HITLESS,
            f"STE sid={SID:#x} @{address:#x}",
            address + 16,
            "one used word changed per sync, or an update through V=0",
        )
    ]
    assert report.at.what == pretty_command(build_command(Opcode.CFGI_STE, SID=SID, LEAF=1))
    assert "left before any translation used it" in report.message


def test_illegal_intermediate_state() -> None:
    """Stage 1 -> stage 2 with Config written first: until words 2-3 follow, the SMMU may fetch a
    stage-2 STE without its stage-2 fields (S2AA64=0: ILLEGAL)."""
    h, sanitizer = sanitized_harness()
    s1_stream(h)
    address = h.ste_address(SID)
    target = to_words(h.ste_s2(h.s2_table(), vmid=3))
    h.write_u64(address, target[0])
    h.write_u64(address + 16, target[2])
    h.write_u64(address + 24, target[3])
    h.cfgi_ste(SID)
    (report,) = sanitizer.reports
    assert summary([report]) == [
        (
            Check.ILLEGAL_INTERMEDIATE,
            f"STE sid={SID:#x} @{address:#x}",
            address,
            "one used word changed per sync, or an update through V=0",
        )
    ]
    assert "ILLEGAL (S2AA64=0" in report.message


def test_a_whole_ste_copied_over_a_live_invalid_one_is_not_atomic() -> None:
    """A 64-byte copy is not single-copy atomic: word 0 (V=1, Config=stage 2) may land before the
    stage-2 fields, so the SMMU may fetch an ILLEGAL STE."""
    h, sanitizer = sanitized_harness()
    address = h.write_ste(SID, h.ste_s2(h.s2_table(), vmid=3))
    h.cfgi_ste(SID)
    (report,) = sanitizer.reports
    assert summary([report]) == [
        (
            Check.ILLEGAL_INTERMEDIATE,
            f"STE sid={SID:#x} @{address:#x}",
            address,
            "one used word changed per sync, or an update through V=0",
        )
    ]
    assert report.writer.what == "64-byte write"


def test_an_update_never_synced_is_judged_at_the_end() -> None:
    h, sanitizer = sanitized_harness()
    s1_stream(h)
    address = h.ste_address(SID)
    target = to_words(h.ste_s2(h.s2_table(), vmid=3))
    h.write_u64(address + 16, target[2])
    h.write_u64(address, target[0])  # no CFGI ever follows
    assert sanitizer.reports == []
    (report,) = sanitizer.finish()
    assert summary([report]) == [
        (
            Check.NOT_HITLESS,
            f"STE sid={SID:#x} @{address:#x}",
            address + 16,
            "one used word changed per sync, or an update through V=0",
        )
    ]
    assert (report.at.initiator, report.at.what) == ("end of run", "no CFGI since")


def test_break_before_make_is_not_reported() -> None:
    h, sanitizer = sanitized_harness()
    s1_stream(h)
    ep = DmaEndpoint("dev", h.smmu, SID)
    assert ep.read(VA, 8).ok
    address = h.ste_address(SID)
    target = to_words(h.ste_s2(h.s2_table(), vmid=3))
    h.write_u64(address, 0)
    h.cfgi_ste(SID)
    for index in (1, 2, 3):
        h.write_u64(address + 8 * index, target[index])
    h.cfgi_ste(SID)
    h.write_u64(address, target[0])
    h.cfgi_ste(SID)
    assert sanitizer.finish() == []


def test_cd_ttb_and_asid_changed_in_one_window_is_not_hitless() -> None:
    h, sanitizer = sanitized_harness()
    _, _, cd = s1_stream(h)
    ep = DmaEndpoint("dev", h.smmu, SID)
    assert ep.read(VA, 8).ok
    words = to_words(h.cd(h.s1_table(), asid=7))
    h.write_u64(cd + 8, words[1])  # TTB0 of a new table, still under ASID 1: neither CD
    h.write_u64(cd, words[0])
    h.cfgi_cd(SID)
    (report,) = sanitizer.reports
    assert summary([report]) == [
        (
            Check.NOT_HITLESS,
            f"CD sid={SID:#x} ssid=0x0 @{cd:#x}",
            cd + 8,
            "one used word changed per sync, or an update through V=0",
        )
    ]


# ---- check 3: registers ---------------------------------------------------------------------------------


def test_strtab_base_written_while_smmuen() -> None:
    h, sanitizer = sanitized_harness()
    h.write_reg(Reg.STRTAB_BASE, STRTAB_BASE.ADDR.insert_address(h.alloc(STE_SIZE << 8, STE_SIZE << 8)))
    (report,) = sanitizer.reports
    assert summary([report]) == [(Check.GUARDED_WRITE, "STRTAB_BASE", SMMU_BASE + Reg.STRTAB_BASE, "")]
    assert report.message == "written while SMMUEN (or its ACK) is set"


def test_cmdq_prod_written_before_cmdqen_ack() -> None:
    h, sanitizer = sanitized_harness(init=False)
    base = h.alloc(CMD_SIZE << 4, CMD_SIZE << 4)
    h.write_reg(Reg.CMDQ_BASE, CMDQ_BASE.encode(LOG2SIZE=4) | base)
    h.write_reg(Reg.CMDQ_PROD, 0)
    h.write_reg(Reg.CMDQ_CONS, 0)
    h.write_reg(Reg.CR0, CR0.encode(CMDQEN=1))  # no wait for CR0ACK.CMDQEN
    enable = sanitizer.location("", 0).seq  # the CR0 write is the last thing before this point
    h.write_mem(base, build_command(Opcode.SYNC).to_bytes(CMD_SIZE, "little"))
    h.write_reg(Reg.CMDQ_PROD, 1)
    (report,) = sanitizer.reports
    assert summary([report]) == [(Check.BEFORE_ACK, "CMDQ_PROD", SMMU_BASE + Reg.CMDQ_PROD, "")]
    assert report.at.address == SMMU_BASE + Reg.CR0 and report.at.seq <= enable
    assert "CMDQEN change to 1 is not acknowledged" in report.message


def test_cmdq_prod_moved_backwards() -> None:
    h, sanitizer = sanitized_harness()
    h.submit(build_command(Opcode.SYNC))
    prod = h.read_reg(Reg.CMDQ_PROD)
    h.write_reg(Reg.CMDQ_PROD, prod - 1)
    assert summary(sanitizer.reports) == [(Check.QUEUE_INDEX, "CMDQ_PROD", SMMU_BASE + Reg.CMDQ_PROD, "")]
    assert sanitizer.reports[0].message == f"moved backwards ({prod:#x} -> {prod - 1:#x})"


def test_queue_indexes_past_full_past_prod_and_above_the_index() -> None:
    h, sanitizer = sanitized_harness()
    log2 = h.cmdq_log2
    prod = h.read_reg(Reg.CMDQ_PROD)
    h.write_reg(Reg.CMDQ_PROD, prod | 2 << log2)  # the same index, and a bit above it
    h.write_reg(Reg.CMDQ_PROD, prod + 2)  # two commands published (not consumed: no time passes)
    h.write_reg(Reg.CMDQ_PROD, (prod + 2 + (1 << log2) - 1) % (2 << log2))  # one more than fits
    h.write_reg(Reg.EVENTQ_CONS, 1)  # nothing was written to the event queue
    assert [(r.check, r.structure, r.message.split(" (")[0]) for r in sanitizer.reports] == [
        (Check.QUEUE_INDEX, "CMDQ_PROD", f"{prod | 2 << log2:#x} sets bits above the {log2 + 1}-bit index"),
        (Check.QUEUE_INDEX, "CMDQ_PROD", "moved past full"),
        (Check.QUEUE_INDEX, "EVENTQ_CONS", "moved past PROD"),
    ]


def test_dma_right_after_smmuen_without_ack() -> None:
    h, sanitizer = sanitized_harness()
    h.write_ste(SID, h.ste_abort())
    h.cfgi_ste(SID)
    h.write_reg(Reg.CR0, h.cr0() & ~CR0.SMMUEN.in_place_mask)  # SMMUEN 1 -> 0, not acknowledged
    ep = DmaEndpoint("dev", h.smmu, SID)
    ep.write(h.buffer(), b"x")
    (report,) = sanitizer.reports
    assert summary([report]) == [(Check.BEFORE_ACK, "CR0.SMMUEN", SMMU_BASE + Reg.CR0, "")]
    assert report.at.initiator == f"dma sid={SID:#x}"


def _gbpa_twice(h: SmmuHarness) -> None:
    h.write_reg(Reg.GBPA, GBPA.UPDATE.in_place_mask)
    h.write_reg(Reg.GBPA, GBPA.UPDATE.in_place_mask | GBPA.ABORT.in_place_mask)


def _cr0_twice(h: SmmuHarness) -> None:
    h.write_reg(Reg.CR0, h.cr0() & ~CR0.EVENTQEN.in_place_mask)
    h.write_reg(Reg.CR0, h.cr0() & ~CR0.EVENTQEN.in_place_mask & ~CR0.SMMUEN.in_place_mask)


def _irq_ctrl_twice(h: SmmuHarness) -> None:
    h.write_reg(Reg.IRQ_CTRL, IRQ_CTRL.GERROR_IRQEN.in_place_mask)
    h.write_reg(Reg.IRQ_CTRL, 0)


def _irq_cfg_while_enabled(h: SmmuHarness) -> None:
    h.write_reg(Reg.IRQ_CTRL, IRQ_CTRL.EVENTQ_IRQEN.in_place_mask)
    h.poll(lambda: h.read_reg(Reg.IRQ_CTRLACK) != 0, "IRQ_CTRLACK")
    h.write_reg(Reg.EVENTQ_IRQ_CFG0, 0x4000)


def _dma_before_gbpa_update(h: SmmuHarness) -> None:
    h.write_reg(Reg.GBPA, GBPA.UPDATE.in_place_mask | GBPA.ABORT.in_place_mask)
    DmaEndpoint("dev", h.smmu, SID).write(h.buffer(), b"x")


REGISTER_MISUSE = {
    "GBPA rewritten while its update is pending": (
        True,
        _gbpa_twice,
        Check.GUARDED_WRITE,
        "GBPA",
        "written while the update written at seq",
    ),
    "GBPA written without UPDATE": (
        True,
        lambda h: h.write_reg(Reg.GBPA, 0),
        Check.GUARDED_WRITE,
        "GBPA",
        "written with UPDATE=0",
    ),
    "CR0 rewritten before CR0ACK": (True, _cr0_twice, Check.BEFORE_ACK, "CR0", "written (0x8) before CR0ACK"),
    "IRQ_CTRL rewritten before IRQ_CTRLACK": (
        True,
        _irq_ctrl_twice,
        Check.BEFORE_ACK,
        "IRQ_CTRL",
        "written (0x0) before IRQ_CTRLACK",
    ),
    "IRQ_CFG0 written while its IRQ is enabled": (
        True,
        _irq_cfg_while_enabled,
        Check.GUARDED_WRITE,
        "EVENTQ_IRQ_CFG0",
        "written while its IRQ_CTRL",
    ),
    "CR1 queue fields written while a queue is enabled": (
        True,
        lambda h: h.write_reg(Reg.CR1, CR1.QUEUE_SH.insert(3)),
        Check.GUARDED_WRITE,
        "CR1.QUEUE_*",
        "written",
    ),
    "CMDQ_BASE written while CMDQEN": (
        True,
        lambda h: h.write_reg(Reg.CMDQ_BASE, h.cmdq_base),
        Check.GUARDED_WRITE,
        "CMDQ_BASE",
        "written",
    ),
    "CMDQ_CONS written while CMDQEN": (
        True,
        lambda h: h.write_reg(Reg.CMDQ_CONS, 0),
        Check.GUARDED_WRITE,
        "CMDQ_CONS",
        "written",
    ),
    "EVENTQ_PROD written while EVENTQEN": (
        True,
        lambda h: h.write_reg(Reg.EVENTQ_PROD, 0),
        Check.GUARDED_WRITE,
        "EVENTQ_PROD",
        "written",
    ),
    "DMA bypassing while a GBPA update is pending": (
        False,
        _dma_before_gbpa_update,
        Check.BEFORE_ACK,
        "GBPA",
        "a DMA bypassed the disabled SMMU",
    ),
}


@pytest.mark.parametrize("case", list(REGISTER_MISUSE))
def test_register_misuse(case: str) -> None:
    enabled, misuse, check, structure, message = REGISTER_MISUSE[case]
    machine = make_machine()
    sanitizer = Sanitizer(machine.bus, machine.smmu.trace, [machine.smmu])
    h = SmmuHarness(machine).init(enable=enabled)
    assert sanitizer.reports == []
    misuse(h)
    (report,) = sanitizer.reports
    assert (report.check, report.structure) == (check, structure)
    assert report.message.startswith(message), report.message


# ---- check 4: double fetch ----------------------------------------------------------------------------


class FetchingHandler:
    """A hyp data-abort handler that, on a host CMDQ_PROD write, reads the host's queue entry to
    check it and (when ``twice``) again to use it."""

    def __init__(self, rig: PkvmRig, twice: bool) -> None:
        self.rig = rig
        self.twice = twice

    def handle_host_dabt(self, address: int, size: int, is_write: bool, value: int) -> int | None:
        if address != SMMU_BASE + Reg.CMDQ_PROD:
            return None
        cpu = self.rig.pkvm.hyp_cpu
        checked = cpu.read_bytes(HOSTQ, CMD_SIZE)
        assert isinstance(checked, bytes)
        if self.twice:
            cpu.read_bytes(HOSTQ, CMD_SIZE)
        return 0


@pytest.mark.parametrize("twice", [True, False])
def test_hyp_handler_double_fetching_a_host_queue_entry(twice: bool) -> None:
    rig = make_rig()
    sanitizer = Sanitizer(rig.bus, rig.trace, [rig.smmu], host_pages=rig.pkvm.mem_protect)
    rig.pkvm.host_stage2.add_data_abort_handler(FetchingHandler(rig, twice), first=True)
    assert rig.host_cpu.write_bytes(HOSTQ, build_command(Opcode.SYNC).to_bytes(CMD_SIZE, "little")) is None
    assert rig.host_write(Reg.CMDQ_PROD, 1) is None
    if not twice:
        assert sanitizer.reports == []
        return
    (report,) = sanitizer.reports
    assert summary([report]) == [
        (
            Check.DOUBLE_FETCH,
            f"host memory {HOSTQ:#x}+0x10 (owned)",
            HOSTQ,
            "one copy of host memory per trap, checked and used from the copy",
        )
    ]
    assert report.writer.initiator == "hyp" and report.at.initiator == "host"
    assert report.at.address == SMMU_BASE + Reg.CMDQ_PROD and report.at.what == "write smmu0.CMDQ_PROD"
    assert report.writer.what == f"16-byte read; in the trap at seq {report.at.seq}"


# ---- the pKVM system (v4) -----------------------------------------------------------------------------


def pkvm_rig() -> tuple[PkvmRig, Sanitizer]:
    """The pKVM system as tests/hyp/smmuv3 assembles it, sanitized from before pKVM's init."""
    rig = make_rig(finalise=False)
    sanitizer = Sanitizer(rig.bus, rig.trace, [rig.smmu], host_pages=rig.pkvm.mem_protect)
    assert rig.pkvm.init() == 0 and rig.pkvm.finalise() == 0
    return rig, sanitizer


def l1_double_fetches(reports: Sequence[SanitizerReport]) -> list[int]:
    """The host L1STD addresses of v4's known double fetch (see the test below)."""
    return [r.writer.address for r in reports if r.check is Check.DOUBLE_FETCH]


def test_v4_reshadow_reads_the_host_l1_descriptor_twice() -> None:
    """A finding: on a CFGI_STE for a SID whose L2 table the hyp has not shadowed yet,
    ``reshadow_ste`` reads the host's L1 descriptor to find the host STE, then ``_shadow_l2`` reads
    it again to share and pin the host L2 table. A host that rewrites the descriptor between the
    two reads makes the hyp pin one table and copy the STE out of another (unshared, unpinned)."""
    rig, sanitizer = pkvm_rig()
    queue = HostQueue(rig)
    table = HostStreamTable(rig, queue)
    table.set_l2(0, HOST_L2)
    table.enable()
    table.write_ste(0x10, STE.encode(V=1, CONFIG=0b100))
    (report,) = sanitizer.reports
    host_l1 = STRTAB_BASE.ADDR.get_address(rig.hyp.host_ste_base)
    assert summary([report]) == [
        (
            Check.DOUBLE_FETCH,
            f"host memory {host_l1:#x}+0x8 (shared-owned)",
            host_l1,
            "one copy of host memory per trap, checked and used from the copy",
        )
    ]
    assert report.at.what == "write smmu0.CMDQ_PROD"
    table.write_ste(0x11, STE.encode(V=1, CONFIG=0b100))  # the L2 is shadowed now: one read
    assert len(sanitizer.reports) == 1


def test_pkvm_host_driver_and_dma_rely_on_nothing_else() -> None:
    """The host's arm-smmu-v3 driver probing the emulated SMMU; stage-1 domains with DMA, unmap and
    TLBI; a master moved between stage 1 and identity with DMA in between: the only reports are
    v4's L1 descriptor double fetch, once for each L2 table the hyp shadows."""
    rig, sanitizer = pkvm_rig()
    assert rig.probe_host() == 0 and rig.ops is not None
    for sid in (0x10, 0x345):
        domain, dev, ep = stage1_master(rig, sid)
        assert domain.map_pages(VA, BUF, PAGE_SIZE, 2, RW) == (2 * PAGE_SIZE, 0)
        assert ep.write(VA + 0x10, b"data").ok and ep.read(VA + 0x10, 4).data == b"data"
        gather = IotlbGather()
        assert domain.unmap_pages(VA, PAGE_SIZE, 1, gather) == PAGE_SIZE
        domain.iotlb_sync(gather)
        assert not ep.write(VA, b"gone").ok
        assert ep.write(VA + PAGE_SIZE, b"kept").ok
        assert rig.ops.identity_domain is not None and rig.ops.identity_domain.attach_dev(dev) == 0
        assert ep.write(BUF, b"identity").ok
        assert domain.attach_dev(dev) == 0
        assert ep.write(VA + PAGE_SIZE, b"again").ok
    reports = sanitizer.finish()
    assert [r.check for r in reports] == [Check.DOUBLE_FETCH] * 2
    host_l1 = STRTAB_BASE.ADDR.get_address(rig.hyp.host_ste_base)
    assert sorted(r.writer.address for r in reports) == [host_l1 + 8 * index for index in (0, 3)]


@pytest.mark.parametrize("first", ["identity", "stage 1"])
def test_v4_shadow_ste_goes_through_an_illegal_state_when_a_master_is_blocked(first: str) -> None:
    """A finding: ``install_shadow_ste`` writes words 1-7 of the live shadow STE, syncs (CFGI_ALL),
    then word 0. Moving a master from a domain that uses stage 2 (identity: S2-only; stage 1:
    nested) to blocked (abort, whose words 2-3 are zero) leaves, synced, an STE that still says
    stage 2 with no stage-2 fields: ILLEGAL (C_BAD_STE for its DMA) instead of the old or the new
    configuration."""
    rig, sanitizer = pkvm_rig()
    assert rig.probe_host() == 0 and rig.ops is not None
    assert rig.ops.identity_domain is not None and rig.ops.blocked_domain is not None
    if first == "identity":
        dev = rig.add_master("ep20", [0x20])
        ep = DmaEndpoint("ep20", rig.smmu, 0x20)
        assert rig.ops.identity_domain.attach_dev(dev) == 0
    else:
        domain, dev, ep = stage1_master(rig, 0x20)
        assert domain.map_pages(VA, BUF, PAGE_SIZE, 1, RW) == (PAGE_SIZE, 0)
    assert ep.write(BUF if first == "identity" else VA, b"before").ok
    before = len(sanitizer.reports)
    assert rig.ops.blocked_domain.attach_dev(dev) == 0
    assert not ep.write(BUF, b"after").ok
    (report,) = sanitizer.finish()[before:]
    shadow = rig.hyp._ste_ptr(0x20, rig.hyp.strtab_base)
    assert shadow is not None
    assert summary([report]) == [
        (
            Check.ILLEGAL_INTERMEDIATE,
            f"STE sid=0x20 @{shadow:#x}",
            shadow + 16,  # word 2 zeroed: S2AA64=0 while Config still selects stage 2
            "one used word changed per sync, or an update through V=0",
        )
    ]
    assert report.writer.initiator == "hyp" and "in the trap at seq" in report.writer.what
    assert report.at.what == pretty_command(cfgi_all())
    assert "ILLEGAL (S2AA64=0" in report.message


def stage1_master(rig: PkvmRig, sid: int) -> tuple[ArmSmmuDomain, FakeDev, DmaEndpoint]:
    assert rig.ops is not None
    dev = rig.add_master(f"ep{sid:x}", [sid])
    domain = rig.ops.domain_alloc_paging(dev)
    assert isinstance(domain, ArmSmmuDomain) and domain.attach_dev(dev) == 0
    return domain, dev, DmaEndpoint(f"ep{sid:x}", rig.smmu, sid)
