"""The adversary's vocabulary: JSON round trips, clear errors for bad JSON, every action applied
with arbitrary arguments without an exception escaping, targets found in the host's state, host
accesses through the CPU port, and a generator that is a function of its seed."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pkvm_smmu.arch.registers import GBPA, Reg
from pkvm_smmu.verify.adversary import (
    ACTIONS,
    Action,
    ActionFormatError,
    ActionGenerator,
    Advance,
    Dma,
    MemWrite,
    RegRead,
    RegWrite,
    SpecError,
    SystemSpec,
    action_from_json,
    apply,
    build_system,
    resolve,
    resolve_spec,
)
from pkvm_smmu.verify.adversary.strategies import actions
from pkvm_smmu.verify.fuzz import Runner

FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True, database=None)


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner(SystemSpec(), step_timeout=60)


@pytest.fixture
def system():  # type: ignore[no-untyped-def]
    s = build_system(SystemSpec())
    yield s
    s.close()


# -- JSON ------------------------------------------------------------------------------------------------


@FAST
@given(actions())
def test_every_action_survives_a_json_round_trip(action: Action) -> None:
    text = json.dumps(action.to_json())
    assert action_from_json(json.loads(text)) == action
    assert action.describe().startswith(action.KIND)


def test_the_vocabulary_covers_every_kind_of_host_action() -> None:
    assert set(ACTIONS) == {
        "reg-read", "reg-write", "mem-write", "command", "hypercall", "donate", "dma", "attach",
        "dma-map", "dma-unmap", "iommu-map", "iommu-unmap", "advance",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"kind": "teleport"}, "kind", "unknown action 'teleport'"),
        ({"kind": "reg-write", "value": "lots"}, "value", "expected an integer"),
        ({"kind": "reg-write", "value": True}, "value", "expected an integer"),
        ({"kind": "command", "sync": 1}, "sync", "expected true or false"),
        ({"kind": "hypercall", "args": "0x1"}, "args", "expected a list"),
        ({"kind": "dma", "ssid": "x"}, "ssid", "expected an integer"),
        ({"kind": "reg-read", "colour": 3}, "", "has no field 'colour'"),
        ([1, 2], "", "an action is a JSON object"),
    ],
)
def test_bad_action_json_names_the_field(data: object, field: str, message: str) -> None:
    with pytest.raises(ActionFormatError) as caught:
        action_from_json(data)
    assert caught.value.field == field
    assert message in str(caught.value)


def test_hex_strings_and_ints_both_read() -> None:
    action = action_from_json({"kind": "reg-write", "offset": "0x44", "size": 4, "value": 16})
    assert action == RegWrite(0, 0x44, 4, 16)
    assert action.to_json()["offset"] == "0x44"


def test_bad_specs_name_the_option() -> None:
    with pytest.raises(SpecError, match="policy: unknown policy 'nope'"):
        resolve_spec(SystemSpec(policy="nope"))
    with pytest.raises(SpecError, match="nothing to attack"):
        resolve_spec(SystemSpec(design="native"))
    with pytest.raises(SpecError) as caught:
        resolve_spec(SystemSpec(boot_variant="three-drivers"))
    assert caught.value.option == "boot-variant"
    assert resolve_spec(SystemSpec()).boot_variant == "late-register"
    assert resolve_spec(SystemSpec(design="pv-identity")).boot_variant == "three-drivers"


# -- applying --------------------------------------------------------------------------------------------


@settings(FAST, max_examples=40)
@given(st.lists(actions(), min_size=1, max_size=3))
def test_arbitrary_actions_apply_without_an_exception_escaping(runner: Runner, script: list[Action]) -> None:
    outcome = runner.run_actions(script)
    assert not outcome.hung
    crashes = [f for f in outcome.findings if f.kind == "crash"]
    assert crashes == [], "\n".join(crashes[0].details)
    assert len(outcome.results) == len(script)


def test_out_of_domain_arguments_are_refused_not_raised(system) -> None:  # type: ignore[no-untyped-def]
    assert apply(system, RegRead(0, int(Reg.CR0), 3)).startswith("invalid: a CPU access is 1, 2, 4 or 8")
    assert apply(system, MemWrite("raw", 0, -8, 8, 1)).startswith("invalid: address")
    assert apply(system, MemWrite("nowhere", 0, 0, 8, 1)) == "invalid: unknown target 'nowhere'"
    assert apply(system, Dma(0, -1, None, 0, 8)).startswith("invalid: StreamID")
    assert apply(system, Advance(-5)).startswith("invalid")


def test_targets_are_the_host_drivers_structures(system) -> None:  # type: ignore[no-untyped-def]
    smmu = system.host.smmus[0]
    assert resolve(system, "cmdq", 0) == smmu.cmdq.q.base_dma
    assert resolve(system, "strtab", 0) == smmu.strtab_cfg.strtab_dma
    assert resolve(system, "ste", 0x10) == smmu.ste_addr(0x10)
    assert resolve(system, "ste", 0x7FFF_FFFF) is None
    assert resolve(system, "buffer", 1) == system.adv.buffers[1]
    hyp = system.hyp_driver.smmus[0]
    assert resolve(system, "shadow-strtab", 0) == hyp.strtab_base
    foreign = resolve(system, "foreign", 0)
    assert foreign is not None and not system.mem_protect.host_can_access(foreign >> 12)


def test_host_stores_go_through_the_cpu_port(system) -> None:  # type: ignore[no-untyped-def]
    assert apply(system, MemWrite("shadow-strtab", 0, 0, 8, 0)).startswith("fault (stage-2 fault")
    assert apply(system, MemWrite("buffer", 0, 0, 8, 0x1234)).startswith("stored at")
    # GBPA traps to the hyp, which records the host's value and leaves the SMMU aborting.
    assert apply(system, RegWrite(0, int(Reg.GBPA), 4, 0)) == "done"
    assert GBPA.ABORT.get(system.smmus[0].gbpa)
    assert apply(system, RegRead(0, int(Reg.GBPA), 4)) == "read 0x0"


def test_any_streamid_through_the_generic_endpoint(system) -> None:  # type: ignore[no-untyped-def]
    result = apply(system, Dma(0, 0xFFFF_FFFF, None, 0x4000_0000, 8, True))
    assert result.startswith("generic-sid0xffffffff: abort")
    result = apply(system, Dma(0, 0x10, None, 0x1000, 8, False, "ats-request"))
    assert result.startswith("dma-engine@00:02.0: ATS")


def test_the_generator_is_a_function_of_its_seed() -> None:
    def burst(seed: int) -> list[Action]:
        s = build_system(SystemSpec())
        try:
            generator = ActionGenerator(s, random.Random(seed))
            out: list[Action] = []
            for _ in range(30):
                for action in generator.next():
                    out.append(action)
                    apply(s, action)
            return out
        finally:
            s.close()

    first = burst(5)
    assert first == burst(5)
    assert first != burst(6)
    assert len({type(a) for a in first}) >= 5
