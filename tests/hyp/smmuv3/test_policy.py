"""The policy axis: ``v4`` by name, variants as small subclasses the driver uses unchanged."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

from pkvm_smmu.arch.commands import Opcode, build_command
from pkvm_smmu.arch.registers import Reg
from pkvm_smmu.arch.strtab import STE, SteConfig
from pkvm_smmu.hyp.smmuv3 import (
    POLICIES,
    CmdAction,
    CommandVerdict,
    IdentityS2,
    RegAccess,
    RegisterRule,
    ShadowHow,
    SmmuContext,
    V4Policy,
    make_policy,
)

sys.path.insert(0, os.path.dirname(__file__))
from hyp_smmu_rig import HOST_L2, HostQueue, HostStreamTable, make_rig


def test_v4_is_registered_by_name() -> None:
    assert POLICIES["v4"] is V4Policy
    assert isinstance(make_policy("v4"), V4Policy)
    with pytest.raises(KeyError, match=r"known: .*v4"):
        make_policy("nope")
    assert make_rig(policy="v4").driver.policy.name == "v4"


class Hardened(V4Policy):
    """What the verification work might write: a few overrides, nothing else."""

    name = "hardened"

    def register_access(self, offset: int, size: int, is_write: bool) -> RegisterRule:
        if offset == Reg.EVENTQ_BASE:
            return RegisterRule(RegAccess.DROP)
        return super().register_access(offset, size, is_write)

    def filter_command(self, smmu: SmmuContext, command: int) -> CommandVerdict:
        if command & 0xFF == Opcode.TLBI_S2_IPA:
            return CommandVerdict(CmdAction.DROP, (), "not the host's to invalidate")
        return super().filter_command(smmu, command)

    def transform_ste(self, smmu: SmmuContext, host_ste: int, s2: IdentityS2) -> tuple[int, ShadowHow]:
        if STE.V.get(host_ste) and STE.CONFIG.get(host_ste) == SteConfig.NESTED:
            return STE.encode(V=1, CONFIG=SteConfig.ABORT), ShadowHow.ABORT
        return super().transform_ste(smmu, host_ste, s2)


def test_a_variant_is_a_small_subclass() -> None:
    r = make_rig(policy=Hardened())
    r.sink.clear()
    r.host_write(Reg.EVENTQ_BASE, 0x8800_0000, 8)
    assert r.hw_reg(Reg.EVENTQ_BASE, 8) == 0
    q = HostQueue(r)
    q.submit(build_command(Opcode.TLBI_S2_IPA, VMID=0, ADDR=0x8000_0000), build_command(Opcode.SYNC))
    assert [c.split("(")[0] for c in r.consumed()] == ["CMD_SYNC"]
    table = HostStreamTable(r, q)
    table.set_l2(0, HOST_L2)
    table.enable()
    table.write_ste(0x20, STE.encode(V=1, CONFIG=SteConfig.NESTED) | STE.S2TTB.insert_address(0x8900_0000))
    assert STE.CONFIG.get(r.shadow_ste(0x20)) == SteConfig.ABORT
    table.write_ste(0x21, STE.encode(V=1, CONFIG=SteConfig.BYPASS))  # the rest is v4's
    assert STE.CONFIG.get(r.shadow_ste(0x21)) == SteConfig.S2_TRANS


def test_policy_methods_get_the_smmu_context() -> None:
    calls: list[tuple[str, Any]] = []

    class Recording(V4Policy):
        def gbpa_write(self, smmu: SmmuContext, value: int) -> int:
            calls.append((smmu.name, smmu.smmu_enabled))
            return super().gbpa_write(smmu, value)

    r = make_rig(policy=Recording())
    r.host_write(Reg.GBPA, 1 << 31 | 1 << 20)
    assert calls == [("smmu0", False)]
    assert r.host_read(Reg.GBPA) == 1 << 20
