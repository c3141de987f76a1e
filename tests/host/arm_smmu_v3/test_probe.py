"""Probe and reset against the SmmuV3 model: register state afterwards, IDR adaptation, failures."""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from pkvm_smmu.arch.registers import (
    CMDQ_BASE,
    CR0,
    CR1,
    CR2,
    EVENTQ_BASE,
    GBPA,
    IRQ_CTRL,
    STRTAB_BASE,
    STRTAB_BASE_CFG,
    QueueCacheability,
    Reg,
    Shareability,
    StrtabFmt,
)
from pkvm_smmu.arch.strtab import L1STD, STE, SteConfig
from pkvm_smmu.host.arm_smmu_v3.device import ArmSmmuDevice, ArmSmmuParams
from pkvm_smmu.host.arm_smmu_v3.features import ARM_SMMU_POLL_TIMEOUT_US, STRTAB_SPLIT, Feat, Opt
from pkvm_smmu.machine.smmu import SmmuFeatures, SmmuOptions

sys.path.insert(0, os.path.dirname(__file__))
from armsmmu_rig import SMMU_BASE, FakeDev, make_rig


def small(**kw: object) -> SmmuFeatures:
    args: dict[str, Any] = {"cmdq_log2_max": 8, "eventq_log2_max": 7, **kw}
    return SmmuFeatures(**args)


def test_reset_leaves_the_smmu_enabled_with_the_tables_programmed() -> None:
    r = make_rig()
    d = r.dev
    enables = CR0.encode(SMMUEN=1, EVENTQEN=1, CMDQEN=1, ATSCHK=1)
    assert r.reg(Reg.CR0) == enables
    assert r.reg(Reg.CR0ACK) == enables
    assert GBPA.ABORT.get(r.reg(Reg.GBPA)) == 1 and not GBPA.UPDATE.get(r.reg(Reg.GBPA))
    base = r.reg(Reg.STRTAB_BASE, 8)
    assert STRTAB_BASE.ADDR.get_address(base) == d.strtab_cfg.strtab_dma and STRTAB_BASE.RA.get(base)
    cfg = r.reg(Reg.STRTAB_BASE_CFG)
    # 16-bit SIDs: two levels, 256-STE leaves, 256 L1 descriptors.
    assert STRTAB_BASE_CFG.FMT.get(cfg) == StrtabFmt.TWO_LEVEL
    assert STRTAB_BASE_CFG.LOG2SIZE.get(cfg) == 16 and STRTAB_BASE_CFG.SPLIT.get(cfg) == STRTAB_SPLIT
    assert d.strtab_cfg.num_l1_ents == 256
    cmdq = r.reg(Reg.CMDQ_BASE, 8)
    assert CMDQ_BASE.LOG2SIZE.get(cmdq) == 8 and CMDQ_BASE.RA.get(cmdq)
    assert CMDQ_BASE.ADDR.get_address(cmdq) == d.cmdq.q.base_dma  # type: ignore[union-attr]
    assert EVENTQ_BASE.LOG2SIZE.get(r.reg(Reg.EVENTQ_BASE, 8)) == 7
    cr1 = r.reg(Reg.CR1)
    assert CR1.QUEUE_SH.get(cr1) == Shareability.ISH and CR1.TABLE_OC.get(cr1) == QueueCacheability.WB
    # PTM is written too; without BTM the model keeps it RES0.
    assert CR2.RECINVSID.get(r.reg(Reg.CR2)) == 1 and CR2.E2H.get(r.reg(Reg.CR2)) == 0
    assert r.reg(Reg.IRQ_CTRLACK) == IRQ_CTRL.encode(EVENTQ_IRQEN=1, GERROR_IRQEN=1)
    # CFGI_ALL, TLBI_EL2_ALL (HYP), TLBI_NSNH_ALL were each followed by a CMD_SYNC and consumed.
    issued = [e.fields["command"].split("(")[0] for e in r.events("cmdq.issue")]
    assert issued == ["CMD_CFGI_STE_RANGE", "CMD_SYNC", "CMD_TLBI_EL2_ALL", "CMD_SYNC", "CMD_TLBI_NSNH_ALL",
                      "CMD_SYNC"]  # fmt: skip
    assert r.reg(Reg.CMDQ_CONS) == r.reg(Reg.CMDQ_PROD) == 6


def test_features_follow_the_id_registers() -> None:
    d = make_rig().dev
    want = Feat.TRANS_S1 | Feat.TRANS_S2 | Feat.TWO_LVL_STRTAB | Feat.TWO_LVL_CDTAB | Feat.ATS | Feat.MSI
    want |= Feat.SEV | Feat.HYP | Feat.RANGE_INV | Feat.NESTING | Feat.COHERENCY | Feat.TT_LE
    assert d.features & want == want
    assert not d.features & (Feat.STALLS | Feat.E2H | Feat.PRI)
    assert d.options & Opt.MSIPOLL
    assert (d.ias, d.oas, d.asid_bits, d.vmid_bits, d.sid_bits, d.ssid_bits) == (48, 48, 16, 16, 16, 20)
    assert d.pgsize_bitmap == (1 << 12) | (1 << 21) | (1 << 30) | (1 << 14) | (1 << 25) | (1 << 16) | (
        1 << 29
    )


def test_kvm_like_idr0_without_msi_s2_hyp_vmid16() -> None:
    """What pKVM shows the host: S1 only, no MSI (so CS=SEV and CONS polling), no HYP, 8-bit VMIDs."""
    r = make_rig(small(stage2=False, msi=False, hyp=False, vmid16=False))
    d = r.dev
    assert not d.features & (Feat.TRANS_S2 | Feat.MSI | Feat.HYP | Feat.NESTING)
    assert not d.options & Opt.MSIPOLL and d.vmid_bits == 8
    issued = [e.fields["command"] for e in r.events("cmdq.issue")]
    assert not any("EL2_ALL" in c for c in issued)
    assert all("CS=SEV" in c for c in issued if c.startswith("CMD_SYNC"))


def test_small_sid_space_uses_a_linear_table_filled_with_abort() -> None:
    r = make_rig(small(sid_bits=6))
    d = r.dev
    assert not d.features & Feat.TWO_LVL_STRTAB
    cfg = r.reg(Reg.STRTAB_BASE_CFG)
    assert STRTAB_BASE_CFG.FMT.get(cfg) == StrtabFmt.LINEAR and STRTAB_BASE_CFG.LOG2SIZE.get(cfg) == 6
    for sid in (0, 17, 63):
        ste = r.ste(sid)
        assert STE.V.get(ste) and STE.CONFIG.get(ste) == SteConfig.ABORT


def test_disable_bypass_false_gives_bypass_stes_and_gbpa() -> None:
    r = make_rig(small(sid_bits=6), params=ArmSmmuParams(disable_bypass=False))
    assert STE.CONFIG.get(r.ste(5)) == SteConfig.BYPASS
    assert not GBPA.ABORT.get(r.reg(Reg.GBPA))


def test_l2_stream_table_allocated_on_demand() -> None:
    r = make_rig()
    d = r.dev
    assert d.strtab_cfg.l2 == {}
    r.add_master("pci0", [0x0102])
    l2 = d.strtab_cfg.l2[1]
    desc = r.cpu.read(d.strtab_cfg.strtab_dma + 8, 8)
    assert isinstance(desc, int)
    assert L1STD.SPAN.get(desc) == STRTAB_SPLIT + 1 and L1STD.L2PTR.get_address(desc) == l2
    assert STE.CONFIG.get(r.ste(0x0102)) == SteConfig.ABORT
    # An SID beyond the table is refused.
    assert r.ops is not None
    assert r.ops.probe_device(FakeDev("far", [1 << 16])) == -errno.ERANGE


class PatchedIdr:
    """A CPU port that reads back doctored ID registers (the model cannot build an SMMU
    without translation stages)."""

    def __init__(self, cpu: Any, patches: dict[int, int]) -> None:
        self.cpu = cpu
        self.patches = patches

    def read(self, address: int, size: int) -> Any:
        if address in self.patches:
            return self.patches[address]
        return self.cpu.read(address, size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cpu, name)


def test_new_l2_table_is_visible_even_after_a_stray_access_cached_its_l1std() -> None:
    """DMA from a SID before its master probes caches an invalid L1STD; publishing the L2 table
    must invalidate it (CFGI_STE, Leaf=0) or the SID stays C_BAD_STREAMID."""
    from pkvm_smmu.machine.devices import DmaEndpoint

    r = make_rig()
    ep = DmaEndpoint("early", r.smmu, 0x345)
    assert not ep.write(0x8200_0000, b"a").ok
    dev = r.add_master("early", [0x345])
    assert r.ops is not None and r.ops.identity_domain is not None
    assert r.ops.identity_domain.attach_dev(dev) == 0
    assert ep.write(0x8200_0000, b"a").ok
    assert any(e.fields["command"].startswith("CMD_CFGI_STE(") and "LEAF" not in e.fields["command"]
               for e in r.events("cmdq.issue"))  # fmt: skip


def test_no_translation_stage_fails_probe() -> None:
    r = make_rig(probe=False)
    idr0 = r.reg(Reg.IDR0) & ~0b11  # neither S1P nor S2P
    cpu = PatchedIdr(r.cpu, {SMMU_BASE + Reg.IDR0: idr0})
    d = ArmSmmuDevice(cpu, r.mm, SMMU_BASE, 0x20000, name="nostage", trace=r.trace)  # type: ignore[arg-type]
    assert d.probe() == -errno.ENXIO
    assert any(
        "no translation support" in e.fields.get("message", "") for e in r.sink.events if e.kind == "err"
    )
    assert not r.smmu.regs.cr0ack  # nothing was enabled


def test_presets_fail_probe() -> None:
    r = make_rig(probe=False)
    idr1 = r.reg(Reg.IDR1) | (1 << 30)  # TABLES_PRESET
    cpu = PatchedIdr(r.cpu, {SMMU_BASE + Reg.IDR1: idr1})
    d = ArmSmmuDevice(cpu, r.mm, SMMU_BASE, 0x20000, name="preset", trace=r.trace)  # type: ignore[arg-type]
    assert d.probe() == -errno.ENXIO


def test_tiny_command_queue_fails_probe() -> None:
    r = make_rig(small(cmdq_log2_max=6), probe=False)
    assert r.dev.probe() == -errno.ENXIO


def test_region_too_small_fails_probe() -> None:
    r = make_rig(probe=False)
    d = ArmSmmuDevice(r.cpu, r.mm, SMMU_BASE, 0x10000, name="short")
    assert d.probe() == -errno.EINVAL


def test_cr0ack_that_never_updates_times_out() -> None:
    """An SMMU whose register updates take longer than ARM_SMMU_POLL_TIMEOUT_US."""
    r = make_rig(options=SmmuOptions(register_update_ns=10 * 1_000_000_000), probe=False)
    start = r.clock.now_us
    assert r.dev.probe() == -errno.ETIMEDOUT
    waited = r.clock.now_us - start
    assert ARM_SMMU_POLL_TIMEOUT_US <= waited < 2 * ARM_SMMU_POLL_TIMEOUT_US + 100
    assert not r.smmu.smmu_enabled


def test_out_of_memory_fails_probe() -> None:
    r = make_rig(probe=False)
    r.mm.fail_after = 1  # the command queue only
    assert r.dev.probe() == -errno.ENOMEM


def test_cpu_fault_is_an_error_not_an_exception() -> None:
    r = make_rig(probe=False)

    class Refuse:
        def handle(self, address: int, size: int, is_write: bool, value: int) -> object:
            from pkvm_smmu.machine.cpu import CpuFault

            if SMMU_BASE <= address < SMMU_BASE + 0x20000 and is_write:
                return CpuFault(address, True, "stage-2 permission fault")
            return None

        def allows_bulk(self, address: int, length: int, is_write: bool) -> bool:
            return True

    r.cpu.stage2 = Refuse()  # type: ignore[assignment]
    assert r.dev.probe() == -errno.EIO
    assert any(e.fields.get("access") == "writel" for e in r.events("err"))


def test_reset_from_an_enabled_smmu() -> None:
    """Probing an SMMU something already enabled: GBPA abort first, then disable and reprogram."""
    r = make_rig()
    d2 = ArmSmmuDevice(r.cpu, r.mm, SMMU_BASE, 0x20000, name="again", trace=r.trace)
    assert d2.probe() == 0
    assert any("currently enabled" in e.fields.get("message", "") for e in r.sink.events if e.kind == "warn")
    assert r.smmu.smmu_enabled
