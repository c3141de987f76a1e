"""The identity stage-2 (v4 patches 10, 26, 27): its configuration, the snapshot of host ownership
(memory at PAGE_SIZE with IOMMU_CACHE, MMIO with blocks, what the host does not own left out), and
its updates on every ownership change, TLBs invalidated and synchronised before the change returns,
so that no device reaches a page once it has left the host, cached translations included."""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import pytest

from pkvm_smmu.arch.strtab import STE, SteConfig
from pkvm_smmu.arch.vmsa import S2_LEAF, S2Ap, S2MemAttr
from pkvm_smmu.hyp.iommu import IommuCaps, KvmIommu, host_accessible_runs, identity_config
from pkvm_smmu.hyp.smmuv3 import SmmuDescription, SmmuV3HypDriver
from pkvm_smmu.machine.devices import DmaEndpoint
from pkvm_smmu.machine.smmu import SmmuFeatures, SmmuV3
from pkvm_smmu.pgtable.prot import Prot

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "smmuv3"))
from hyp_smmu_rig import BUF, RAM_BASE, RAM_SIZE, SMMU_BASE, PkvmRig, make_rig

SZ_2M = 1 << 21
SZ_1G = 1 << 30
ALL_4K = (1 << 12) | (1 << 21) | (1 << 30)
SID = 0x10
IOVA = 0x1000_0000


def leaf_at(r: PkvmRig, address: int) -> Any:
    idmap = r.iommu.idmap
    assert idmap is not None
    leaves = list(idmap.table.walk_leaves(address, address + 1))
    return leaves[0] if leaves else None


def mapped(r: PkvmRig, address: int) -> bool:
    idmap = r.iommu.idmap
    assert idmap is not None
    return idmap.table.iova_to_phys(address) == address


# -- configuration ---------------------------------------------------------------------------------


def test_config_is_the_intersection_of_every_smmu() -> None:
    config = identity_config(
        [
            IommuCaps("a", 44, 44, ALL_4K | (1 << 16) | (1 << 29), True),
            IommuCaps("b", 40, 40, ALL_4K, False),
        ]
    )
    assert config is not None
    assert (config.ias, config.oas, config.coherent_walk) == (40, 40, False)
    assert config.pgsize_bitmap == ALL_4K  # 64K sizes dropped: the granule is PAGE_SIZE
    only_4k_2m = identity_config([IommuCaps("a", 48, 48, (1 << 12) | (1 << 21), True)])
    assert only_4k_2m is not None and only_4k_2m.pgsize_bitmap == (1 << 12) | (1 << 21)
    defaults = identity_config([IommuCaps("a", 52, 52, ALL_4K | (1 << 42), True)])
    assert defaults is not None and (defaults.ias, defaults.oas) == (48, 48)  # starting from 48


def test_page_size_is_required() -> None:
    assert identity_config([IommuCaps("a", 48, 48, (1 << 16) | (1 << 29), True)]) is None


def test_smmu_without_4k_fails_pkvm_init() -> None:
    r = make_rig(SmmuFeatures(granules=frozenset({65536})))
    assert r.init_result == -errno.EINVAL and r.pkvm.state == "failed"


def test_host_accessible_runs() -> None:
    runs = host_accessible_runs(
        1 << 32,
        memory=[(0x8000_0000, 0xC000_0000)],
        holes=[(0x0900_0000, 0x0902_0000), (0x8010_0000, 0x8010_2000), (0x8010_1000, 0x8010_3000)],
    )
    assert runs == [
        (0, 0x0900_0000, True),
        (0x0902_0000, 0x8000_0000, True),
        (0x8000_0000, 0x8010_0000, False),
        (0x8010_3000, 0xC000_0000, False),
        (0xC000_0000, 1 << 32, True),
    ]


# -- the snapshot ----------------------------------------------------------------------------------


@pytest.fixture
def r() -> PkvmRig:
    rig = make_rig()
    rig.sink.clear()
    return rig


def test_memory_is_mapped_rw_cacheable_at_page_size(r: PkvmRig) -> None:
    idmap = r.iommu.idmap
    assert idmap is not None
    carveout = r.pkvm.carveout
    assert carveout is not None
    runs = list(idmap.table.walk_runs(RAM_BASE, RAM_BASE + RAM_SIZE))
    assert {run.pgsize for run in runs} == {4096}
    assert sum(run.size for run in runs) == RAM_SIZE - carveout.size - 0x110000  # less the shadows
    leaf = leaf_at(r, BUF)
    assert leaf.level == 3 and leaf.size == 4096
    assert S2_LEAF.MEMATTR.get(leaf.desc) == S2MemAttr.NORMAL_WB and S2_LEAF.S2AP.get(leaf.desc) == S2Ap.RW


def test_mmio_is_mapped_with_the_largest_blocks(r: PkvmRig) -> None:
    low = leaf_at(r, 0x4000_0000)
    assert low.size == SZ_1G and S2_LEAF.MEMATTR.get(low.desc) == S2MemAttr.DEVICE_nGnRE
    assert leaf_at(r, 0xC000_0000).size == SZ_1G  # above RAM
    assert leaf_at(r, 0x1_0000_0000_0000 - SZ_1G).size == SZ_1G  # up to the 48-bit limit
    assert leaf_at(r, 0x0800_0000).size == SZ_2M  # the 1 GiB around the SMMU is split
    assert leaf_at(r, 0x08FF_F000).size == SZ_2M  # the SMMU starts on a 2 MiB boundary
    assert leaf_at(r, SMMU_BASE + 0x20000).size == 4096  # and ends 128 KiB into one
    assert leaf_at(r, SMMU_BASE + 0x20_0000).size == SZ_2M


def test_pages_the_host_does_not_own_are_left_out(r: PkvmRig) -> None:
    carveout = r.pkvm.carveout
    assert carveout is not None
    for address in (carveout.base, carveout.base + carveout.size - 4096, SMMU_BASE, SMMU_BASE + 0x1F000):
        assert not mapped(r, address)
    assert not mapped(r, r.hyp.strtab_base) and r.hyp.cmdq is not None and not mapped(r, r.hyp.cmdq.base)
    assert mapped(r, carveout.base - 4096) and mapped(r, SMMU_BASE - 4096)


def test_table_pages_come_from_the_iommu_pool(r: PkvmRig) -> None:
    idmap = r.iommu.idmap
    pool = r.pkvm.iommu_pool
    assert idmap is not None and pool is not None
    pages = idmap.table.table_pages()
    assert len(pages) == idmap.table.pages_allocated > 512  # 512 L1 tables for 256 TiB of MMIO
    assert all(pool.contains(pa) for pa in pages)


def test_build_is_traced() -> None:
    r = make_rig()
    (build,) = r.events("hyp.iommu", "idmap.build")
    idmap = r.iommu.idmap
    assert idmap is not None
    assert build.fields["pages"] == idmap.table.pages_allocated
    assert build.fields["entries"] == idmap.leaf_entries() > (RAM_SIZE >> 12) // 2
    allocs = r.events("hyp.iommu", "pool.alloc")
    assert allocs[-1].fields["in_use"] == r.iommu.pool.pages_in_use


def test_a_pool_too_small_fails_init_cleanly() -> None:
    class Stingy(SmmuV3HypDriver):
        def pool_pages(self, iommu: KvmIommu) -> int:
            return 40

    r = make_rig(finalise=False)
    r.pkvm.iommu_driver = KvmIommu(r.pkvm, Stingy([SmmuDescription("smmu0", SMMU_BASE, 0x20000)]))
    assert r.pkvm.init() == 0
    assert r.pkvm.finalise() == -errno.ENOMEM
    assert r.pkvm.state == "failed" and r.events("hyp.iommu", "pool.exhausted")


def test_a_64gib_host() -> None:
    r = make_rig(ram_size=64 << 30)
    assert r.init_result == 0
    idmap = r.iommu.idmap
    carveout = r.pkvm.carveout
    assert idmap is not None and carveout is not None
    runs = list(idmap.table.walk_runs(RAM_BASE, RAM_BASE + (64 << 30)))
    assert {run.pgsize for run in runs} == {4096}
    assert sum(run.entries for run in runs) == ((64 << 30) - carveout.size - 0x110000) >> 12


# -- updates ---------------------------------------------------------------------------------------


def test_donation_unmaps_and_invalidates_before_returning(r: PkvmRig) -> None:
    pfn = BUF >> 12
    assert r.pkvm.mem_protect.host_donate_hyp(pfn, 2) == 0
    assert not mapped(r, BUF) and not mapped(r, BUF + 4096) and mapped(r, BUF + 8192)
    kinds = [(e.component, e.kind) for e in r.sink.events]
    consumed = [e.fields["command"] for e in r.sink.events if e.component == r.smmu.name and e.kind == "cmd"]
    assert [c.split("(")[0] for c in consumed] == [
        "CMD_TLBI_S2_IPA",
        "CMD_SYNC",
        "CMD_TLBI_NH_ALL",
        "CMD_SYNC",
    ]
    # VMID 0; (NUM + 1) << SCALE = 2 pages
    assert "VMID" not in consumed[0] and "SCALE=1" in consumed[0] and "NUM" not in consumed[0]
    assert "LEAF=1" in consumed[0]
    assert "ADDR=0x82000000" in consumed[0] and "VMID" not in consumed[2]
    # All of it happened inside the transition: the ownership event is emitted as it returns.
    assert kinds.index(("hyp", "ownership")) > max(
        i for i, k in enumerate(kinds) if k == (r.smmu.name, "cmd")
    )
    (inv,) = r.events("hyp.iommu", "idmap.invalidate")
    assert inv.fields == {"start": BUF, "size": 8192, "leaf": True}


def test_regaining_a_page_maps_it_again(r: PkvmRig) -> None:
    mp = r.pkvm.mem_protect
    assert mp.host_donate_hyp(BUF >> 12, 1) == 0
    assert mp.hyp_donate_host(BUF >> 12, 1) == 0
    assert mapped(r, BUF)
    assert S2_LEAF.MEMATTR.get(leaf_at(r, BUF).desc) == S2MemAttr.NORMAL_WB
    assert len(r.events("hyp.iommu", "idmap.invalidate")) == 1  # only the loss invalidates


def test_guest_donation_and_relinquish(r: PkvmRig) -> None:
    mp = r.pkvm.mem_protect
    assert mp.init_vm(1) == 0
    assert mp.host_donate_guest(1, BUF >> 12, 0x10) == 0
    assert not mapped(r, BUF)
    assert mp.guest_relinquish_to_host(1, 0x10) == 0
    assert mapped(r, BUF)


def test_range_invalidation_needs_ril() -> None:
    for ril, expected in ((True, 1), (False, 16)):
        r = make_rig(SmmuFeatures(ril=ril))
        r.sink.clear()
        assert r.pkvm.mem_protect.host_donate_hyp(BUF >> 12, 16) == 0
        s2 = [c for c in r.consumed() if c.startswith("CMD_TLBI_S2_IPA")]
        assert len(s2) == expected
        if ril:
            assert "SCALE=4" in s2[0] and "TG=G4K" in s2[0] and "TTL=3" in s2[0]


def test_every_smmu_is_invalidated() -> None:
    r = make_rig(finalise=False)
    second = SmmuV3("smmu1", r.bus, r.clock, SmmuFeatures(), 0x0A00_0000, trace=r.trace)
    driver = SmmuV3HypDriver(
        [SmmuDescription("smmu0", SMMU_BASE, 0x20000), SmmuDescription("smmu1", 0x0A00_0000, 0x20000)]
    )
    r.pkvm.iommu_driver = r.iommu = KvmIommu(r.pkvm, driver)
    r.driver = driver
    assert r.pkvm.init() == 0 and r.pkvm.finalise() == 0
    r.sink.clear()
    assert r.pkvm.mem_protect.host_donate_hyp(BUF >> 12, 1) == 0
    for smmu in (r.smmu, second):
        cmds = [e.fields["opcode"] for e in r.events(smmu.name, "cmd")]
        assert cmds == ["TLBI_S2_IPA", "SYNC", "TLBI_NH_ALL", "SYNC"]


def test_permission_change_on_a_mapped_page(r: PkvmRig) -> None:
    idmap = r.iommu.idmap
    assert idmap is not None
    idmap.host_access_changed(BUF >> 12, 1, Prot.READ, False)
    assert S2_LEAF.S2AP.get(leaf_at(r, BUF).desc) == S2Ap.RO
    assert len(r.events("hyp.iommu", "idmap.invalidate")) == 1


def test_mmio_inside_a_block_cannot_be_unmapped(r: PkvmRig) -> None:
    """Blocks are never split: MMIO taken from the host after boot stays mapped (v4: MMIO is never
    donated at run time)."""
    assert r.pkvm.mem_protect.host_donate_hyp_mmio(0x4000_0000 >> 12) == 0
    assert mapped(r, 0x4000_0000)
    assert r.warnings() == ["identity map: some memory was not unmapped"]


def test_posted_initialized_flag_disables_updates() -> None:
    r = make_rig(finalise=False)
    r.pkvm.iommu_driver = r.iommu = KvmIommu(r.pkvm, r.driver, idmap_flag_as_posted=True)
    assert r.pkvm.init() == 0 and r.pkvm.finalise() == 0
    assert not r.iommu.idmap_initialized
    assert r.pkvm.mem_protect.host_donate_hyp(BUF >> 12, 1) == 0
    assert mapped(r, BUF)  # the posted `!!ret` leaves the donated page reachable


# -- what a device can reach -------------------------------------------------------------------------


def identity_master(r: PkvmRig) -> DmaEndpoint:
    assert r.probe_host() == 0 and r.ops is not None and r.ops.identity_domain is not None
    dev = r.add_master("ep0", [SID])
    assert r.ops.identity_domain.attach_dev(dev) == 0
    assert STE.CONFIG.get(r.shadow_ste(SID)) == SteConfig.S2_TRANS
    return DmaEndpoint("ep0", r.smmu, SID)


def test_bypass_dma_reaches_host_memory_but_not_a_donated_page(r: PkvmRig) -> None:
    ep = identity_master(r)
    assert ep.write(BUF + 8, b"host").ok and r.ram(BUF + 8, 4) == b"host"
    assert not ep.write(r.hyp.strtab_base, b"x").ok  # hyp memory, never mapped
    assert r.pkvm.mem_protect.host_donate_hyp(BUF >> 12, 1) == 0
    assert not ep.write(BUF + 8, b"evil").ok and r.ram(BUF + 8, 4) == b"host"
    assert not ep.read(BUF, 8).ok
    assert ep.write(BUF + 4096, b"next").ok  # the neighbour is still the host's


def test_cached_translation_is_invalidated_by_the_donation(r: PkvmRig) -> None:
    ep = identity_master(r)
    assert ep.read(BUF, 8).ok
    assert any(e.input_base <= BUF < e.input_base + e.size for e in r.smmu.tlb.entries())
    assert r.pkvm.mem_protect.host_donate_hyp(BUF >> 12, 1) == 0
    assert not any(e.input_base <= BUF < e.input_base + e.size for e in r.smmu.tlb.entries())
    assert not ep.write(BUF, b"stale").ok


def test_without_the_invalidation_the_cached_translation_would_be_used(
    r: PkvmRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the test above: the SMMU really caches, so the TLBIs are what protect."""
    ep = identity_master(r)
    assert ep.read(BUF, 8).ok
    monkeypatch.setattr(r.iommu.idmap, "_invalidate", lambda *args: None)
    assert r.pkvm.mem_protect.host_donate_hyp(BUF >> 12, 1) == 0
    assert ep.write(BUF, b"stale").ok  # reached hyp memory


def test_nested_translation_cached_before_the_donation(r: PkvmRig) -> None:
    assert r.probe_host() == 0 and r.ops is not None
    dev = r.add_master("ep0", [SID])
    dom = r.ops.domain_alloc_paging(dev)
    assert not isinstance(dom, int) and dom.attach_dev(dev) == 0
    assert dom.map_pages(IOVA, BUF, 4096, 1, Prot.READ | Prot.WRITE | Prot.CACHE) == (4096, 0)
    ep = DmaEndpoint("ep0", r.smmu, SID)
    assert ep.write(IOVA + 4, b"s1+s2").ok and r.ram(BUF + 4, 5) == b"s1+s2"
    assert any(e.kind.name == "NESTED" for e in r.smmu.tlb.entries())
    assert r.pkvm.mem_protect.host_donate_hyp(BUF >> 12, 1) == 0
    assert not ep.write(IOVA + 4, b"evil!").ok and r.ram(BUF + 4, 5) == b"s1+s2"
