"""pv-identity at the hyp: take-over without emulation, every STE ABORT until attached, the two
hypercalls (validation, CFGI_STE + SYNC before returning), DMA through the identity stage-2, events
drained by the hyp, and a host that cannot reach the SMMU registers."""

from __future__ import annotations

import errno
import os
import sys

import pytest

from pkvm_smmu.arch.pv_iommu_abi import HVC_ATTACH_BLOCKING, HVC_ATTACH_IDENTITY, HVC_CAPS, Caps
from pkvm_smmu.arch.registers import CR0, Reg
from pkvm_smmu.arch.strtab import STE, SteConfig
from pkvm_smmu.hyp.hypercalls import SMCCC_RET_NOT_SUPPORTED
from pkvm_smmu.hyp.pv import PvIdentityIommu
from pkvm_smmu.machine.cpu import CpuFault
from pkvm_smmu.machine.smmu import SmmuFeatures

sys.path.insert(0, os.path.dirname(__file__))
from pv_rig import BUF, SMMU_BASE, SMMU_SIZE, PvRig, identity_rig, make_pv_rig

SID = 0x10


@pytest.fixture
def r() -> PvRig:
    return identity_rig()


def test_take_over_enables_the_smmu_with_the_hyps_own_queues(r: PvRig) -> None:
    cr0 = r.smmu.regs.read(Reg.CR0ACK)
    assert cr0 & CR0.SMMUEN.in_place_mask and cr0 & CR0.EVENTQEN.in_place_mask
    assert r.hvc(HVC_CAPS, 0, 0) == Caps.IDENTITY | Caps.BLOCKING
    assert r.hyp.two_level and r.hyp.sid_bits == 16


def test_the_host_cannot_touch_the_smmu_registers(r: PvRig) -> None:
    for offset in (Reg.IDR0, Reg.CR0, Reg.CMDQ_PROD, Reg.STRTAB_BASE, Reg.GBPA, Reg.EVENTQ_PROD):
        assert isinstance(r.host_cpu.read(SMMU_BASE + offset, 4), CpuFault)
        assert isinstance(r.host_cpu.write(SMMU_BASE + offset, 4, 0), CpuFault)
    # Nothing was emulated: no trap was handled for the host.
    assert not r.events("hyp.smmuv3", "trap")
    assert r.smmu.regs.read(Reg.CR0ACK) & CR0.SMMUEN.in_place_mask


def test_dma_aborts_until_attached_then_identity(r: PvRig) -> None:
    ep = r.endpoint(SID)
    assert r.host_write(BUF, b"hello") is None
    assert not ep.read(BUF, 5).ok  # no L2 table yet: the invalid L1 descriptor aborts it
    assert r.hvc(HVC_ATTACH_BLOCKING, 0, SID) == 0
    ste = r.hyp.read_ste(SID)
    assert ste is not None and STE.CONFIG.get(ste) == SteConfig.ABORT
    assert not ep.read(BUF, 5).ok
    assert r.hvc(HVC_ATTACH_IDENTITY, 0, SID) == 0
    ste = r.hyp.read_ste(SID)
    idmap = r.pv.iommu.idmap
    assert ste is not None and idmap is not None
    assert STE.CONFIG.get(ste) == SteConfig.S2_TRANS and STE.S2VMID.get(ste) == 0
    assert STE.S2TTB.get_address(ste) == idmap.root
    result = ep.read(BUF, 5)
    assert result.ok and result.data == b"hello"
    # Every other StreamID of the L2 table stays ABORT.
    other = r.hyp.read_ste(SID + 1)
    assert other is not None and STE.CONFIG.get(other) == SteConfig.ABORT
    assert r.hvc(HVC_ATTACH_BLOCKING, 0, SID) == 0
    assert not ep.read(BUF, 5).ok  # the CFGI_STE took effect before the hypercall returned


def test_identity_cannot_reach_what_the_host_gave_away(r: PvRig) -> None:
    assert r.hvc(HVC_ATTACH_IDENTITY, 0, SID) == 0
    ep = r.endpoint(SID)
    assert ep.read(BUF, 8).ok
    assert r.pkvm.mem_protect.host_donate_hyp(BUF >> 12, 1) == 0
    assert not ep.read(BUF, 8).ok


def test_each_attach_ends_with_cfgi_ste_and_sync(r: PvRig) -> None:
    before = len(r.events("smmu0", "cmd"))
    assert r.hvc(HVC_ATTACH_IDENTITY, 0, SID) == 0
    opcodes = [e.fields["opcode"] for e in r.events("smmu0", "cmd")[before:]]
    assert opcodes[-2:] == ["CFGI_STE", "SYNC"]
    install = r.events("hyp.pv", "ste.install")[-1].fields
    assert (install["old"], install["new"], install["why"]) == ("abort", "s2", "attach_identity")


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        (HVC_ATTACH_IDENTITY, (1, SID), -errno.ENODEV),  # no second SMMU
        (HVC_ATTACH_IDENTITY, ((1 << 64) - 1, SID), -errno.ENODEV),
        (HVC_ATTACH_IDENTITY, (0, 1 << 16), -errno.EINVAL),  # beyond SIDSIZE
        (HVC_ATTACH_IDENTITY, (0, (1 << 64) - 1), -errno.EINVAL),
        (HVC_ATTACH_IDENTITY, (0, -1), -errno.EINVAL),  # not a register value
        (HVC_ATTACH_IDENTITY, (0, 1 << 64), -errno.EINVAL),
        (HVC_ATTACH_IDENTITY, (0,), -errno.EINVAL),  # wrong number of arguments
        (HVC_ATTACH_IDENTITY, (0, SID, 0), -errno.EINVAL),
        (HVC_ATTACH_IDENTITY, (0, SID), 0),
        (HVC_ATTACH_BLOCKING, (2, SID), -errno.ENODEV),
        (HVC_ATTACH_BLOCKING, (0, 1 << 16), -errno.EINVAL),
        (HVC_ATTACH_BLOCKING, (0, True), -errno.EINVAL),
        (HVC_ATTACH_BLOCKING, (0, (1 << 16) - 1), 0),  # the last StreamID
        (HVC_CAPS, (1, 0), -errno.ENODEV),
        (HVC_CAPS, (0, 3), -errno.EINVAL),
        ("__pkvm_host_iommu_map_pages", (1, 0, 0, 4096, 1, 3), SMCCC_RET_NOT_SUPPORTED),
    ],
)
def test_hypercall_arguments_are_validated(r: PvRig, name: str, args: tuple[int, ...], expected: int) -> None:
    assert r.hvc(name, *args) == expected


def test_before_pkvm_is_up_the_hypercalls_say_no_device() -> None:
    r = make_pv_rig(PvIdentityIommu, finalise=False)
    assert r.hvc(HVC_ATTACH_IDENTITY, 0, SID) == -errno.ENODEV
    assert r.hvc(HVC_CAPS, 0, 0) == -errno.ENODEV


def test_the_smmu_array_is_frozen_once_taken_over(r: PvRig) -> None:
    assert r.pv.register_smmu("late", 0x0A00_0000, SMMU_SIZE) == -errno.EPERM
    fresh = make_pv_rig(PvIdentityIommu, finalise=False)
    assert fresh.pv.register_smmu("again", SMMU_BASE, SMMU_SIZE) == -errno.EEXIST
    assert fresh.pv.register_smmu("small", 0x0A00_0000, 0x1000) == -errno.EINVAL
    assert fresh.pv.register_smmu("odd", 0x0A00_0800, SMMU_SIZE) == -errno.EINVAL


def test_an_smmu_without_stage2_fails_pkvm_init() -> None:
    r = make_pv_rig(PvIdentityIommu, features=SmmuFeatures(stage2=False))
    assert r.init_result == -errno.ENXIO
    assert r.pkvm.state == "failed"


def test_events_are_drained_and_traced_by_the_hyp(r: PvRig) -> None:
    # A bad StreamID (beyond SIDSIZE is impossible for the endpoint; an unattached one records
    # C_BAD_STE through the invalid L1 descriptor).
    assert not r.endpoint(0x4000).read(BUF, 4).ok
    r.pv.poll_events()
    events = r.events("hyp.pv", "evtq.event")
    assert events and events[-1].fields["sid"] == 0x4000
    assert r.hyp.events == len(events)


def test_linear_stream_table_starts_all_abort() -> None:
    r = make_pv_rig(PvIdentityIommu, features=SmmuFeatures(two_level_strtab=False, sid_bits=6))
    assert r.init_result == 0 and not r.hyp.two_level
    for sid in (0, 17, 63):
        ste = r.hyp.read_ste(sid)
        assert ste is not None and STE.V.get(ste) and STE.CONFIG.get(ste) == SteConfig.ABORT
    assert r.hvc(HVC_ATTACH_IDENTITY, 0, 64) == -errno.EINVAL
    assert r.hvc(HVC_ATTACH_IDENTITY, 0, 63) == 0
    assert r.host_write(BUF, b"x") is None
    assert r.endpoint(63).read(BUF, 1).ok
    assert not r.endpoint(62).read(BUF, 1).ok


def test_pv_identity_is_registered_as_a_design() -> None:
    from pkvm_smmu.hyp.pv import PV_DESIGNS

    assert PV_DESIGNS["pv-identity"] is PvIdentityIommu
