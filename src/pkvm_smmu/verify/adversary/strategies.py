"""Hypothesis strategies for the adversary's actions (needs the ``test`` extra).

``actions()`` draws any action of the vocabulary with arguments from the whole of their types
(huge, negative, unknown names included) mixed with the values that matter (register offsets,
sizes a CPU can make, targets, StreamIDs of the default platform); ``apply`` must carry every one
of them out or refuse it, never raise. ``aimed(system)`` wraps ``ActionGenerator`` for bursts aimed
at a live system.

One exception to "any value": ``RegWrite`` never draws CMDQ_PROD at random, because a PROD far from
CONS makes the hyp copy up to 2^19 queue entries in one trap (a minute of wall-clock time per
example); ``ActionGenerator`` writes PROD near the host driver's own index instead.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from pkvm_smmu.arch.commands import Opcode, build_command, cfgi_all
from pkvm_smmu.arch.registers import Reg
from pkvm_smmu.verify.adversary._actions import (
    DIRECTIONS,
    DMA_MODES,
    DOMAIN_KINDS,
    DONATIONS,
    TARGETS,
    Action,
    Advance,
    Attach,
    Command,
    Dma,
    DmaMap,
    DmaUnmap,
    Donate,
    Hypercall,
    IommuMap,
    IommuUnmap,
    MemWrite,
    RegRead,
    RegWrite,
)
from pkvm_smmu.verify.adversary._generate import ActionGenerator
from pkvm_smmu.verify.adversary._system import System

HYPERCALL_NAMES = (
    "__pkvm_host_share_hyp",
    "__pkvm_host_unshare_hyp",
    "__pkvm_host_reclaim_page",
    "__pkvm_host_donate_guest",
    "__pkvm_host_share_guest",
    "__pkvm_host_unshare_guest",
    "__pkvm_init_vm",
    "__pkvm_teardown_vm",
    "kvm_iommu_register_driver",
    "__pkvm_init",
    "__pkvm_prot_finalize",
)
_EDGES = (0, 1, 2, 3, 4, 7, 8, 16, 64, 0xFFF, 0x1000, 0x1001, 1 << 31, 1 << 32, (1 << 48) - 1, 1 << 52,
          (1 << 63), (1 << 64) - 1, 1 << 64, -1, -4096)  # fmt: skip
_SIDS = (0x8, 0x10, 0x18, 0x100, 0xFF, 0x1FF, 1 << 16, (1 << 32) - 1)
_ADDRESSES = (0x4000_0000, 0x4010_0000, 0x0905_0000, 0x0905_0044, 0x13F00_0000, 0x1_3FFF_F000, 0x1_0000_0000)
REGISTER_OFFSETS = tuple(int(r) for r in Reg if r is not Reg.CMDQ_PROD)

any_int: st.SearchStrategy[int] = st.one_of(
    st.sampled_from(_EDGES), st.integers(), st.integers(min_value=-(1 << 70), max_value=1 << 70)
)
sizes = st.one_of(st.sampled_from((1, 2, 4, 8)), any_int)
addresses = st.one_of(st.sampled_from(_ADDRESSES), any_int)


def _names(options: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(options), st.text(max_size=8))


def _command() -> st.SearchStrategy[int]:
    def build(opcode: Opcode, sid: int) -> int:
        if opcode in (Opcode.CFGI_STE, Opcode.CFGI_CD):
            return build_command(opcode, SID=sid)
        return build_command(opcode)

    opcodes = (Opcode.CFGI_STE, Opcode.CFGI_CD, Opcode.TLBI_NSNH_ALL, Opcode.TLBI_NH_ALL, Opcode.SYNC)
    sane = st.builds(build, st.sampled_from(opcodes), st.sampled_from(_SIDS[:6]))
    return st.one_of(sane, st.just(cfgi_all()), any_int)


def actions(hypercall_names: tuple[str, ...] = HYPERCALL_NAMES) -> st.SearchStrategy[Action]:
    """Any action, with any arguments."""
    smmu = st.one_of(st.just(0), any_int)
    offsets = st.one_of(st.sampled_from(REGISTER_OFFSETS), any_int)
    targets = _names(tuple(TARGETS))
    small = st.one_of(st.integers(min_value=0, max_value=16), any_int)
    return st.one_of(
        st.builds(RegRead, smmu=smmu, offset=offsets, size=sizes),
        st.builds(RegWrite, smmu=smmu, offset=offsets, size=sizes, value=any_int),
        st.builds(MemWrite, target=targets, index=small, offset=any_int, size=sizes, value=any_int),
        st.builds(Command, smmu=smmu, command=_command(), sync=st.booleans()),
        st.builds(Hypercall, name=_names(hypercall_names), args=st.lists(any_int, max_size=7).map(tuple)),
        st.builds(Donate, how=_names(tuple(DONATIONS)), target=targets, index=small, offset=any_int),
        st.builds(
            Dma,
            smmu=smmu,
            sid=st.one_of(st.sampled_from(_SIDS), any_int),
            ssid=st.one_of(st.none(), any_int),
            address=addresses,
            size=st.one_of(st.sampled_from((0, 1, 8, 4096, 4097)), any_int),
            write=st.booleans(),
            mode=_names(tuple(DMA_MODES)),
        ),
        st.builds(Attach, device=small, domain=_names(tuple(DOMAIN_KINDS))),
        st.builds(
            DmaMap,
            device=small,
            target=targets,
            index=small,
            offset=any_int,
            size=st.one_of(st.just(4096), any_int),
            direction=_names(DIRECTIONS),
        ),
        st.builds(DmaUnmap, slot=any_int),
        st.builds(
            IommuMap,
            device=small,
            iova=addresses,
            target=targets,
            index=small,
            offset=any_int,
            size=st.one_of(st.just(4096), any_int),
            prot=any_int,
        ),
        st.builds(IommuUnmap, device=small, iova=addresses, size=st.one_of(st.just(4096), any_int)),
        st.builds(Advance, ns=st.one_of(st.sampled_from((0, 1000, 10**7, 10**7 + 1)), any_int)),
    )


def aimed(system: System) -> st.SearchStrategy[list[Action]]:
    """Bursts from an ``ActionGenerator`` over ``system``, driven by a Hypothesis random."""

    def burst(rng: Any) -> list[Action]:
        return ActionGenerator(system, rng).next()

    return st.randoms(use_true_random=False).map(burst)


__all__ = ["HYPERCALL_NAMES", "REGISTER_OFFSETS", "actions", "aimed", "any_int"]
