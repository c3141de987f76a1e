"""Whatever software writes (any register offset, size and value, any queue memory, any command)
and however time passes, the SMMU model never raises (DESIGN.md rule 3)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pkvm_smmu.arch.commands import Opcode
from pkvm_smmu.arch.registers import CMDQ_CONS, CR0, EVENTQ_PROD, GERROR, REG_SIZE, Reg
from pkvm_smmu.machine.bus import HYP_CPU, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.irq import InterruptController, MsiDoorbell
from pkvm_smmu.machine.smmu import SmmuFeatures, SmmuOptions, SmmuV3
from pkvm_smmu.trace import RecordingSink, TraceBus

BASE = 0x1000_0000
RAM = 0x8000_0000
RAM_SIZE = 0x1_0000
DOORBELL = 0x2000_0000

_OFFSETS = sorted({int(r) for r in Reg} | {int(r) + 4 for r in Reg if REG_SIZE[r] == 8})
_CONTROL = [Reg.CR0, Reg.IRQ_CTRL, Reg.GERRORN, Reg.CMDQ_PROD, Reg.EVENTQ_CONS, Reg.GBPA]
_BASES = [Reg.CMDQ_BASE, Reg.EVENTQ_BASE, Reg.STRTAB_BASE, Reg.GERROR_IRQ_CFG0, Reg.EVENTQ_IRQ_CFG0]

offsets = st.one_of(st.sampled_from(_OFFSETS), st.integers(0, 0x1FFFF), st.integers(-16, 1 << 20))
sizes = st.sampled_from([1, 2, 4, 8])
u64 = st.integers(0, (1 << 64) - 1)
ram_address = st.integers(RAM, RAM + RAM_SIZE - 1)
opcodes = st.one_of(st.sampled_from([int(op) for op in Opcode]), st.integers(0, 0xFF))

ops = st.one_of(
    st.tuples(st.just("bus-write"), offsets, sizes, u64),
    st.tuples(st.just("raw-write"), offsets, st.integers(-1, 16), st.integers(-(1 << 70), 1 << 70)),
    st.tuples(st.just("read"), offsets, st.integers(-1, 16)),
    # control registers with values that often enable things
    st.tuples(st.just("control"), st.sampled_from(_CONTROL), st.integers(0, 0x1F) | u64),
    # bases pointing into RAM, with small queues
    st.tuples(st.just("base"), st.sampled_from(_BASES), ram_address, st.integers(0, 5)),
    st.tuples(st.just("memory"), ram_address, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("command"), opcodes, st.integers(0, (1 << 120) - 1)),
    st.tuples(st.just("push"), st.lists(st.tuples(opcodes, st.integers(0, (1 << 120) - 1)), max_size=6)),
    st.tuples(st.just("ack"), st.integers(0, 0x7FF)),
    st.tuples(st.just("event"), st.integers(-(1 << 260), 1 << 260)),
    st.tuples(st.just("advance"), st.integers(0, 5000)),
)


def _machine(features: SmmuFeatures, options: SmmuOptions) -> tuple[SmmuV3, RecordingSink]:
    bus = SystemBus()
    bus.add_ram(RAM, RAM_SIZE)
    clock = Clock()
    irq = InterruptController()
    MsiDoorbell(irq).map(bus, DOORBELL)
    trace = TraceBus(lambda: clock.now_ns)
    sink = trace.attach(RecordingSink())
    return SmmuV3("smmu0", bus, clock, features, BASE, trace=trace, irq=irq, options=options), sink


def _apply(smmu: SmmuV3, op: tuple[Any, ...]) -> None:
    bus = smmu.bus
    kind = op[0]
    if kind == "bus-write":
        _, offset, size, value = op
        bus.write(HYP_CPU, BASE + offset, size, value & ((1 << (8 * size)) - 1))
    elif kind == "raw-write":
        _, offset, size, value = op
        smmu.mmio_write(offset, size, value, HYP_CPU)
    elif kind == "read":
        _, offset, size = op
        assert isinstance(smmu.mmio_read(offset, size, HYP_CPU), int)
    elif kind == "control":
        _, reg, value = op
        bus.write(HYP_CPU, BASE + reg, 4, value & 0xFFFF_FFFF)
    elif kind == "base":
        _, reg, address, log2size = op
        bus.write(HYP_CPU, BASE + reg, 8, (address & ~0x1F) | log2size)
    elif kind == "memory":
        _, address, data = op
        bus.write_bytes(HYP_CPU, address, data[: RAM + RAM_SIZE - address])
    elif kind == "command":
        _, opcode, rest = op
        smmu.executor.execute(opcode | rest << 8)
        smmu.executor.complete()
    elif kind == "push":
        # software submits commands the way a driver does: entries at PROD, then a PROD write
        regs = smmu.regs
        qs = regs.queue_log2size(Reg.CMDQ_BASE)
        base = regs.queue_address(Reg.CMDQ_BASE, 16)
        prod = regs.read(Reg.CMDQ_PROD)
        for opcode, rest in op[1]:
            slot = prod & ((1 << qs) - 1)
            bus.write_bytes(HYP_CPU, base + 16 * slot, (opcode | rest << 8).to_bytes(16, "little"))
            prod = (prod + 1) & ((2 << qs) - 1)
        bus.write(HYP_CPU, BASE + Reg.CMDQ_PROD, 4, prod)
    elif kind == "ack":
        gerror = smmu.regs.read(Reg.GERROR)
        bus.write(HYP_CPU, BASE + Reg.GERRORN, 4, gerror ^ (op[1] & ~smmu.regs.gerror_active_bits))
    elif kind == "event":
        smmu.record_event(op[1])
    else:
        smmu.clock.advance(op[1])


def _init(smmu: SmmuV3, msi_to_ram: bool) -> None:
    """A driver-like bring-up: queues in RAM, MSIs configured, everything enabled."""
    bus = smmu.bus
    msi = RAM + 0x3000 if msi_to_ram else DOORBELL + MsiDoorbell.TRANSLATER
    for reg, size, value in [
        (Reg.CMDQ_BASE, 8, RAM | 3),
        (Reg.EVENTQ_BASE, 8, (RAM + 0x1000) | 2),
        (Reg.STRTAB_BASE, 8, RAM + 0x2000),
        (Reg.STRTAB_BASE_CFG, 4, 4),
        (Reg.GERROR_IRQ_CFG0, 8, msi),
        (Reg.GERROR_IRQ_CFG1, 4, 1),
        (Reg.EVENTQ_IRQ_CFG0, 8, msi),
        (Reg.EVENTQ_IRQ_CFG1, 4, 2),
        (Reg.IRQ_CTRL, 4, 0x7),
        (Reg.CR0, 4, CR0.encode(SMMUEN=1, EVENTQEN=1, CMDQEN=1)),
    ]:
        bus.write(HYP_CPU, BASE + reg, size, value)
    smmu.clock.advance(1000)


def _check_invariants(smmu: SmmuV3) -> None:
    regs = smmu.regs
    assert regs.gerror & ~GERROR.DEFINED_MASK == 0
    cmdq_mask = (2 << regs.queue_log2size(Reg.CMDQ_BASE)) - 1
    assert CMDQ_CONS.RD.get(regs.read(Reg.CMDQ_CONS)) & ~cmdq_mask == 0
    evtq_mask = (2 << regs.queue_log2size(Reg.EVENTQ_BASE)) - 1
    assert EVENTQ_PROD.WR.get(regs.read(Reg.EVENTQ_PROD)) & ~evtq_mask == 0
    assert smmu.smmu_enabled == bool(CR0.SMMUEN.get(regs.read(Reg.CR0ACK)))


@settings(max_examples=200)
@given(st.lists(ops, max_size=60), st.sampled_from([None, True, False]))
def test_random_programming_never_raises(program: list[tuple[Any, ...]], init: bool | None) -> None:
    smmu, _ = _machine(SmmuFeatures(), SmmuOptions())
    if init is not None:
        _init(smmu, msi_to_ram=init)
    for op in program:
        _apply(smmu, op)
        _check_invariants(smmu)
    smmu.clock.advance(100_000)
    _check_invariants(smmu)


@settings(max_examples=100)
@given(
    st.lists(ops, max_size=40),
    st.builds(
        SmmuFeatures,
        stage1=st.just(True),
        stage2=st.booleans(),
        msi=st.booleans(),
        ats=st.booleans(),
        hyp=st.booleans(),
        ril=st.booleans(),
        vmid16=st.booleans(),
        sev=st.booleans(),
        stall_model=st.sampled_from([0, 1, 2]),
        priq_log2_max=st.sampled_from([0, 4]),
        cmdq_log2_max=st.integers(0, 19),
        eventq_log2_max=st.integers(0, 19),
        oas_bits=st.sampled_from([32, 40, 48, 52]),
    ),
    st.builds(
        SmmuOptions,
        register_update_ns=st.integers(0, 300),
        command_ns=st.integers(0, 100),
        page1_alias_page0=st.booleans(),
        wired_irqs=st.booleans(),
    ),
)
def test_random_programming_never_raises_on_any_configuration(
    program: list[tuple[Any, ...]], features: SmmuFeatures, options: SmmuOptions
) -> None:
    smmu, _ = _machine(features, options)
    _init(smmu, msi_to_ram=False)
    for op in program:
        _apply(smmu, op)
    smmu.clock.advance(100_000)
    _check_invariants(smmu)


@settings(max_examples=100)
@given(
    st.binary(min_size=16 * 8, max_size=16 * 8),
    st.integers(0, 3),
    st.integers(0, 0xF),
    st.integers(0, 1 << 16),
)
def test_random_command_queue_contents_never_raise(
    queue: bytes, log2size: int, prod: int, advance: int
) -> None:
    smmu, sink = _machine(SmmuFeatures(), SmmuOptions())
    bus = smmu.bus
    bus.write_bytes(HYP_CPU, RAM, queue)
    bus.write(HYP_CPU, BASE + Reg.CMDQ_BASE, 8, RAM | log2size)
    bus.write(HYP_CPU, BASE + Reg.CR0, 4, CR0.encode(SMMUEN=1, CMDQEN=1))
    bus.write(HYP_CPU, BASE + Reg.CMDQ_PROD, 4, prod)
    for _ in range(4):
        smmu.clock.advance(advance)
        gerror = bus.read(HYP_CPU, BASE + Reg.GERROR, 4)
        assert isinstance(gerror, int)
        bus.write(HYP_CPU, BASE + Reg.GERRORN, 4, gerror)  # acknowledge and carry on
    smmu.clock.advance(10_000)
    _check_invariants(smmu)
    assert sink.select(kind="cmd") or prod & ((2 << log2size) - 1) == 0 or advance < 50
