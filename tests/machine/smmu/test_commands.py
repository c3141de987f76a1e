"""Command execution: every CERROR_ILL case, dispatch of CFGI/TLBI/ATC_INV with the right
arguments, range TLBI sizes, ATC_INV completion through CMD_SYNC (IHI 0070 §4)."""

from __future__ import annotations

from typing import Any

import pytest

from pkvm_smmu.arch.commands import Opcode, build_command
from pkvm_smmu.arch.registers import CMDQ_BASE, CMDQ_CONS, CR0, CmdqError, Reg
from pkvm_smmu.machine.bus import HYP_CPU, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.smmu import SmmuFeatures, SmmuOptions, SmmuV3
from pkvm_smmu.trace import RecordingSink

BASE = 0x1000_0000
RAM = 0x8000_0000

NONE, ILL = CmdqError.NONE, CmdqError.ILL


class Recorder:
    """Records every method call made on it (a stand-in for the TLB and the configuration cache)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> None:
            self.calls.append((name, args))

        return call


class Endpoint:
    def __init__(self, completes: bool = True) -> None:
        self.completes = completes
        self.calls: list[tuple[int | None, int, int]] = []

    def atc_invalidate(self, ssid: int | None, address: int, size: int) -> bool:
        self.calls.append((ssid, address, size))
        return self.completes


def make(features: SmmuFeatures | None = None, enabled: bool = True) -> SmmuV3:
    bus = SystemBus()
    bus.add_ram(RAM, 1 << 20)
    clock = Clock()
    smmu = SmmuV3("smmu0", bus, clock, features or SmmuFeatures(), BASE, options=SmmuOptions())
    smmu.tlb = Recorder()  # type: ignore[assignment]
    smmu.config_cache = Recorder()  # type: ignore[assignment]
    if enabled:
        bus.write(HYP_CPU, BASE + Reg.CR0, 4, CR0.encode(SMMUEN=1))
        clock.advance(1000)
    return smmu


def calls(smmu: SmmuV3, part: str) -> list[tuple[str, tuple[Any, ...]]]:
    recorder = getattr(smmu, part)
    assert isinstance(recorder, Recorder)
    return recorder.calls


# ---- CERROR_ILL -----------------------------------------------------------------------------------

RESERVED = [
    0x00,
    0x08,
    0x0A,
    0x14,
    0x19,
    0x1B,
    0x24,
    0x29,
    0x2B,
    0x31,
    0x42,
    0x47,
    0x61,
    0x74,
    0x80,
    0x8F,
    0x90,
    0xFF,
]


@pytest.mark.parametrize("opcode", RESERVED)
def test_reserved_and_impdef_opcodes_are_illegal(opcode: int) -> None:
    assert make().executor.execute(opcode | 0xABCD << 32) is ILL


@pytest.mark.parametrize(
    "opcode",
    [
        Opcode.TLBI_EL3_ALL,
        Opcode.TLBI_EL3_VA,
        Opcode.TLBI_S_EL2_ALL,
        Opcode.TLBI_S_EL2_ASID,
        Opcode.TLBI_S_EL2_VA,
        Opcode.TLBI_S_EL2_VAA,
        Opcode.TLBI_S_S12_VMALL,
        Opcode.TLBI_S_S2_IPA,
        Opcode.TLBI_SNH_ALL,
    ],
)
def test_secure_only_commands_are_illegal_on_the_non_secure_queue(opcode: Opcode) -> None:
    assert make().executor.execute(build_command(opcode)) is ILL


@pytest.mark.parametrize(
    "opcode",
    [
        Opcode.PREFETCH_CONFIG,
        Opcode.PREFETCH_ADDR,
        Opcode.CFGI_STE,
        Opcode.CFGI_STE_RANGE,
        Opcode.CFGI_CD,
        Opcode.CFGI_CD_ALL,
        Opcode.RESUME,
        Opcode.STALL_TERM,
    ],
)
def test_ssec_set_is_illegal(opcode: Opcode) -> None:
    smmu = make(SmmuFeatures(stall_model=0))
    assert smmu.executor.execute(build_command(opcode)) is NONE
    assert smmu.executor.execute(build_command(opcode, SSEC=1)) is ILL


@pytest.mark.parametrize(
    "opcode", [Opcode.TLBI_EL2_ALL, Opcode.TLBI_EL2_ASID, Opcode.TLBI_EL2_VA, Opcode.TLBI_EL2_VAA]
)
def test_el2_tlbi_needs_hyp(opcode: Opcode) -> None:
    assert make(SmmuFeatures(hyp=True)).executor.execute(build_command(opcode)) is NONE
    assert make(SmmuFeatures(hyp=False)).executor.execute(build_command(opcode)) is ILL


@pytest.mark.parametrize("opcode", [Opcode.TLBI_S12_VMALL, Opcode.TLBI_S2_IPA])
def test_stage2_commands_need_stage2(opcode: Opcode) -> None:
    assert make(SmmuFeatures(stage2=True)).executor.execute(build_command(opcode)) is NONE
    assert make(SmmuFeatures(stage2=False)).executor.execute(build_command(opcode)) is ILL


@pytest.mark.parametrize(
    "opcode",
    [
        Opcode.CFGI_CD,
        Opcode.CFGI_CD_ALL,
        Opcode.TLBI_NH_ALL,
        Opcode.TLBI_NH_ASID,
        Opcode.TLBI_NH_VA,
        Opcode.TLBI_NH_VAA,
        Opcode.TLBI_EL2_ALL,
        Opcode.TLBI_EL2_VA,
    ],
)
def test_stage1_commands_need_stage1(opcode: Opcode) -> None:
    assert make(SmmuFeatures(stage1=False)).executor.execute(build_command(opcode)) is ILL


def test_commands_valid_on_any_stage_configuration() -> None:
    for features in (SmmuFeatures(stage1=False), SmmuFeatures(stage2=False)):
        smmu = make(features)
        for opcode in (Opcode.TLBI_NSNH_ALL, Opcode.CFGI_STE, Opcode.CFGI_STE_RANGE, Opcode.SYNC):
            assert smmu.executor.execute(build_command(opcode)) is NONE


def test_atc_inv_needs_ats_and_pri_resp_needs_pri() -> None:
    assert make(SmmuFeatures(ats=False)).executor.execute(build_command(Opcode.ATC_INV)) is ILL
    assert make(SmmuFeatures(priq_log2_max=0)).executor.execute(build_command(Opcode.PRI_RESP)) is ILL
    with_pri = make(SmmuFeatures(priq_log2_max=8))
    assert with_pri.executor.execute(build_command(Opcode.PRI_RESP, RESP=2)) is NONE
    assert with_pri.executor.execute(build_command(Opcode.PRI_RESP, RESP=3)) is ILL


@pytest.mark.parametrize("opcode", [Opcode.RESUME, Opcode.STALL_TERM])
def test_stall_commands_are_illegal_without_the_stall_model(opcode: Opcode) -> None:
    assert make(SmmuFeatures(stall_model=0b01)).executor.execute(build_command(opcode)) is ILL
    assert make(SmmuFeatures(stall_model=0b00)).executor.execute(build_command(opcode)) is NONE


@pytest.mark.parametrize("opcode", [Opcode.CFGI_VMS_PIDM, Opcode.DPTI_ALL, Opcode.DPTI_PA])
def test_commands_of_unimplemented_mpam_and_dpt_are_illegal(opcode: Opcode) -> None:
    assert make().executor.execute(build_command(opcode)) is ILL


def test_cmd_sync_cs_reserved_is_illegal() -> None:
    smmu = make()
    for cs in (0, 1, 2):
        assert smmu.executor.execute(build_command(Opcode.SYNC, CS=cs)) is NONE
    assert smmu.executor.execute(build_command(Opcode.SYNC, CS=3)) is ILL


@pytest.mark.parametrize(
    "opcode",
    [Opcode.TLBI_NH_VA, Opcode.TLBI_NH_VAA, Opcode.TLBI_EL2_VA, Opcode.TLBI_EL2_VAA, Opcode.TLBI_S2_IPA],
)
def test_range_tlbi_with_granule_but_no_range_and_no_ttl_is_illegal(opcode: Opcode) -> None:
    smmu = make()
    assert smmu.executor.execute(build_command(opcode, TG=1)) is ILL
    assert smmu.executor.execute(build_command(opcode, TG=1, TTL=3)) is NONE
    assert smmu.executor.execute(build_command(opcode, TG=1, NUM=1)) is NONE
    assert smmu.executor.execute(build_command(opcode, TG=1, SCALE=1)) is NONE
    # TTL=1 with a 16K granule is reserved without IDR5.DS and treated as TTL=0
    assert smmu.executor.execute(build_command(opcode, TG=2, TTL=1)) is ILL
    assert calls(smmu, "tlb") and all(args[-1] in (0, 3) for _, args in calls(smmu, "tlb"))


def test_range_fields_are_ignored_without_ril() -> None:
    smmu = make(SmmuFeatures(ril=False))
    assert smmu.executor.execute(build_command(Opcode.TLBI_NH_VA, TG=1, ADDR=0x5000, NUM=3)) is NONE
    assert calls(smmu, "tlb") == [("invalidate_nh_va", (0, 0, 0x5000, 0, False, 0))]


# ---- dispatch -------------------------------------------------------------------------------------


def test_cfgi_dispatch() -> None:
    smmu = make()
    ex = smmu.executor
    ex.execute(build_command(Opcode.CFGI_STE, SID=0x42, LEAF=1))
    ex.execute(build_command(Opcode.CFGI_STE, SID=0x43))
    ex.execute(build_command(Opcode.CFGI_STE_RANGE, SID=0x100, RANGE=5))
    ex.execute(build_command(Opcode.CFGI_STE_RANGE, SID=0x100, RANGE=31))
    ex.execute(build_command(Opcode.CFGI_CD, SID=7, SSID=0x123, LEAF=1))
    ex.execute(build_command(Opcode.CFGI_CD_ALL, SID=9))
    ex.execute(build_command(Opcode.PREFETCH_CONFIG, SID=5, SSV=1, SSID=3))
    ex.execute(build_command(Opcode.PREFETCH_CONFIG, SID=6, SSID=3))
    assert calls(smmu, "config_cache") == [
        ("invalidate_ste", (0x42, True)),
        ("invalidate_ste", (0x43, False)),
        ("invalidate_ste_range", (0x100, 5)),
        ("invalidate_all", ()),
        ("invalidate_cd", (7, 0x123, True)),
        ("invalidate_cd_all", (9,)),
        ("prefetch", (5, 3)),
        ("prefetch", (6, None)),
    ]
    assert calls(smmu, "tlb") == []  # configuration invalidation never touches the TLB


def test_prefetch_config_is_a_no_op_while_smmu_disabled_but_cfgi_still_works() -> None:
    smmu = make(enabled=False)
    assert smmu.executor.execute(build_command(Opcode.PREFETCH_CONFIG, SID=5)) is NONE
    smmu.executor.execute(build_command(Opcode.CFGI_STE, SID=5))
    assert calls(smmu, "config_cache") == [("invalidate_ste", (5, False))]


def test_tlbi_dispatch() -> None:
    smmu = make()
    ex = smmu.executor
    va = 0xFFFF_8000_1234_5000
    ipa = 0x00F0_1234_5000
    ex.execute(build_command(Opcode.TLBI_NH_ALL, VMID=0x1234))
    ex.execute(build_command(Opcode.TLBI_NH_ASID, VMID=3, ASID=0xBEEF))
    ex.execute(build_command(Opcode.TLBI_NH_VA, VMID=3, ASID=4, ADDR=va, LEAF=1))
    ex.execute(build_command(Opcode.TLBI_NH_VAA, VMID=3, ADDR=va))
    ex.execute(build_command(Opcode.TLBI_EL2_ALL))
    ex.execute(build_command(Opcode.TLBI_EL2_ASID, ASID=5))
    ex.execute(build_command(Opcode.TLBI_EL2_VA, ASID=5, ADDR=va, LEAF=1))
    ex.execute(build_command(Opcode.TLBI_EL2_VAA, ADDR=va))
    ex.execute(build_command(Opcode.TLBI_S12_VMALL, VMID=8))
    ex.execute(build_command(Opcode.TLBI_S2_IPA, VMID=8, ADDR=ipa, LEAF=1))
    ex.execute(build_command(Opcode.TLBI_NSNH_ALL))
    assert calls(smmu, "tlb") == [
        ("invalidate_nh_all", (0x1234,)),
        ("invalidate_nh_asid", (3, 0xBEEF)),
        ("invalidate_nh_va", (3, 4, va, 0, True, 0)),
        ("invalidate_nh_vaa", (3, va, 0, False, 0)),
        ("invalidate_el2_all", ()),
        ("invalidate_el2_asid", (5,)),
        ("invalidate_el2_va", (5, va, 0, True, 0)),
        ("invalidate_el2_vaa", (va, 0, False, 0)),
        ("invalidate_s12_vmall", (8,)),
        ("invalidate_s2_ipa", (8, ipa, 0, True, 0)),
        ("invalidate_nsnh_all", ()),
    ]
    assert calls(smmu, "config_cache") == []


@pytest.mark.parametrize(
    ("tg", "num", "scale", "ttl", "size"),
    [
        (1, 0, 0, 3, 4096),  # one 4K granule with a level hint
        (1, 3, 2, 0, 4 * 4 * 4096),
        (2, 31, 1, 2, 32 * 2 * 16384),
        (3, 0, 0, 3, 65536),
        (3, 1, 31, 0, 2 * (1 << 31) * 65536),
    ],
)
def test_range_tlbi_size(tg: int, num: int, scale: int, ttl: int, size: int) -> None:
    smmu = make()
    command = build_command(
        Opcode.TLBI_S2_IPA, VMID=1, ADDR=0x4000_0000, TG=tg, NUM=num, SCALE=scale, TTL=ttl
    )
    assert smmu.executor.execute(command) is NONE
    assert calls(smmu, "tlb") == [("invalidate_s2_ipa", (1, 0x4000_0000, size, False, ttl))]


def test_scale_bit_25_is_res0_without_ds() -> None:
    smmu = make()
    smmu.executor.execute(build_command(Opcode.TLBI_NH_VAA, TG=1, NUM=0, SCALE=0x21))
    assert calls(smmu, "tlb") == [("invalidate_nh_vaa", (0, 0, 2 * 4096, False, 0))]


def test_8bit_vmid_and_asid_and_stage1_only_vmid() -> None:
    smmu = make(SmmuFeatures(vmid16=False, asid16=False))
    smmu.executor.execute(build_command(Opcode.TLBI_NH_ASID, VMID=0x1234, ASID=0x5678))
    assert calls(smmu, "tlb") == [("invalidate_nh_asid", (0x34, 0x78))]
    s1_only = make(SmmuFeatures(stage2=False))
    s1_only.executor.execute(build_command(Opcode.TLBI_NH_ALL, VMID=0x77))
    assert calls(s1_only, "tlb") == [("invalidate_nh_all", (0,))]  # VMID is RES0 without stage 2


# ---- ATC invalidation -----------------------------------------------------------------------------


def test_atc_inv_reaches_the_endpoint_with_an_aligned_span() -> None:
    smmu = make()
    endpoint = Endpoint()
    smmu.ats_endpoints[0x10] = endpoint
    ex = smmu.executor
    ex.execute(build_command(Opcode.ATC_INV, SID=0x10, ADDR=0x1234_5000, SIZE=0))
    ex.execute(build_command(Opcode.ATC_INV, SID=0x10, ADDR=0x1234_5000, SIZE=4, SSV=1, SSID=9))
    ex.execute(build_command(Opcode.ATC_INV, SID=0x10, ADDR=0x1234_5000, SIZE=52))
    ex.execute(build_command(Opcode.ATC_INV, SID=0x11, SIZE=0))  # no endpoint there: nothing to do
    assert endpoint.calls == [
        (None, 0x1234_5000, 4096),
        (9, 0x1234_0000, 16 * 4096),
        (None, 0, 1 << 64),
    ]


def test_atc_inv_size_above_52_is_illegal_and_smmuen_0_ignores_it() -> None:
    smmu = make()
    endpoint = Endpoint()
    smmu.ats_endpoints[1] = endpoint
    assert smmu.executor.execute(build_command(Opcode.ATC_INV, SID=1, SIZE=53)) is ILL
    disabled = make(enabled=False)
    disabled.ats_endpoints[1] = endpoint
    assert disabled.executor.execute(build_command(Opcode.ATC_INV, SID=1)) is NONE
    assert endpoint.calls == []


def test_atc_inv_without_completion_fails_the_next_sync_on_the_queue() -> None:
    smmu = make()
    bus, clock = smmu.bus, smmu.clock
    smmu.ats_endpoints[1] = Endpoint(completes=False)
    queue = RAM
    commands = [
        build_command(Opcode.ATC_INV, SID=1),
        build_command(Opcode.SYNC, CS=1, MSIADDR=RAM + 0x1000, MSIDATA=1),
        build_command(Opcode.SYNC),
    ]
    for slot, command in enumerate(commands):
        bus.write_bytes(HYP_CPU, queue + 16 * slot, command.to_bytes(16, "little"))
    bus.write(HYP_CPU, BASE + Reg.CMDQ_BASE, 8, CMDQ_BASE.encode(ADDR=queue >> 5, LOG2SIZE=3))
    bus.write(HYP_CPU, BASE + Reg.CR0, 4, CR0.encode(SMMUEN=1, CMDQEN=1))
    bus.write(HYP_CPU, BASE + Reg.CMDQ_PROD, 4, 3)
    clock.advance(10_000)
    cons = bus.read(HYP_CPU, BASE + Reg.CMDQ_CONS, 4)
    assert isinstance(cons, int)
    assert CMDQ_CONS.RD.get(cons) == 1  # CONS stays on the CMD_SYNC
    assert CMDQ_CONS.ERR.get(cons) == CmdqError.ATC_INV_SYNC
    assert bus.read(HYP_CPU, RAM + 0x1000, 4) == 0  # no completion signal
    gerror = bus.read(HYP_CPU, BASE + Reg.GERROR, 4)
    assert isinstance(gerror, int)
    bus.write(HYP_CPU, BASE + Reg.GERRORN, 4, gerror)  # retry the SYNC, as Linux does
    clock.advance(10_000)
    cons = bus.read(HYP_CPU, BASE + Reg.CMDQ_CONS, 4)
    assert isinstance(cons, int) and CMDQ_CONS.RD.get(cons) == 3
    assert bus.read(HYP_CPU, RAM + 0x1000, 4) == 1


# ---- tracing --------------------------------------------------------------------------------------


def test_each_command_is_traced_with_its_error() -> None:
    smmu = make()
    sink = smmu.trace.attach(RecordingSink())
    smmu.executor.execute(build_command(Opcode.CFGI_STE, SID=3))
    smmu.executor.execute(0x19)
    events = sink.select(component="smmu0", kind="cmd")
    assert [(e.fields["opcode"], e.fields["error"]) for e in events] == [
        ("CFGI_STE", "NONE"),
        ("0x19", "ILL"),
    ]
    assert "SID=0x3" in events[0].fields["command"] or "SID=3" in events[0].fields["command"]


def test_prefetch_config_ssv_without_substreams_behaves_as_ssv_0() -> None:
    smmu = make(SmmuFeatures(ssid_bits=0))
    smmu.executor.execute(build_command(Opcode.PREFETCH_CONFIG, SID=5, SSV=1, SSID=3))
    assert calls(smmu, "config_cache") == [("prefetch", (5, None))]


def test_disabling_the_smmu_invalidates_nothing() -> None:
    smmu = make()
    smmu.bus.write(HYP_CPU, BASE + Reg.CR0, 4, 0)
    smmu.clock.advance(1000)
    assert not smmu.smmu_enabled
    assert calls(smmu, "config_cache") == [] and calls(smmu, "tlb") == []


def test_the_device_builds_its_configuration_cache_tlb_and_translator() -> None:
    from pkvm_smmu.machine.smmu.config import ConfigCache
    from pkvm_smmu.machine.smmu.tlb import Tlb
    from pkvm_smmu.machine.smmu.translate import Translator

    smmu = SmmuV3("smmu1", SystemBus(), Clock(), SmmuFeatures(), BASE, options=SmmuOptions(tlb_capacity=4))
    assert isinstance(smmu.config_cache, ConfigCache)
    assert isinstance(smmu.tlb, Tlb)
    assert isinstance(smmu.translator, Translator)
