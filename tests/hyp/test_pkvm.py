"""pKVM initialisation (carveout, pools, IOMMU driver registration, finalise) and the host's
hypercall interface (validation, errnos, never an exception)."""

from __future__ import annotations

from errno import EBUSY, EINVAL, ENODEV, ENOENT, ENOMEM, EPERM
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkvm_smmu.host.hw import Hvc
from pkvm_smmu.hyp.contracts import HOST, HYP, KvmPgtableProt, PageState, guest
from pkvm_smmu.hyp.hypercalls import SMCCC_RET_NOT_SUPPORTED, Arg
from pkvm_smmu.hyp.pkvm import (
    HANDLE_OFFSET,
    KVM_MAX_PVMS,
    Pkvm,
    host_s2_pgtable_pages,
    hyp_pgtable_max_pages,
)
from pkvm_smmu.hyp.pool import HypPool
from pkvm_smmu.machine.bus import HOST_CPU, HYP_CPU, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.cpu import CpuFault, CpuPort
from pkvm_smmu.machine.memory import Ram
from pkvm_smmu.trace import RecordingSink, TraceBus, TraceEvent

RAM_BASE = 0x4000_0000
RAM_SIZE = 256 << 20
RAM_END = RAM_BASE + RAM_SIZE
P = (RAM_BASE >> 12) + 0x100  # a host page
MAX_PFN = 1 << (48 - 12)


class Driver:
    def __init__(self, pages: int = 0, result: int = 0) -> None:
        self.pages = pages
        self.result = result
        self.inits = 0

    def kvm_iommu_pages(self) -> int:
        return self.pages

    def init(self) -> int:
        self.inits += 1
        return self.result


def make_pkvm(
    ram_size: int = RAM_SIZE, cntfrq_hz: int = 100_000_000
) -> tuple[Pkvm, CpuPort, list[TraceEvent]]:
    bus = SystemBus()
    bus.add_ram(RAM_BASE, ram_size)
    clock = Clock()
    trace = TraceBus(lambda: clock.now_ns)
    events = trace.attach(RecordingSink()).events
    pkvm = Pkvm(bus, clock, trace, CpuPort(bus, clock, HYP_CPU), cntfrq_hz=cntfrq_hz)
    host = CpuPort(bus, clock, HOST_CPU)
    pkvm.attach_host_cpu(host)
    return pkvm, host, events


# -- sizing -------------------------------------------------------------------------------------
def test_pgtable_sizing_matches_pkvm_arithmetic() -> None:
    # 256 MiB = 65536 pages: 128 + 1 + 1 + 1 table pages at page granularity.
    assert hyp_pgtable_max_pages(65536) == 131
    assert hyp_pgtable_max_pages(1) == 4
    # 1 GiB of MMIO = 262144 pages: 512 + 1 + 1 + 1; plus 16 for concatenated PGDs.
    assert host_s2_pgtable_pages([65536]) == 131 + 16 + 515


def test_carveout_sized_from_pkvm_and_the_iommu_driver_and_taken_from_the_top() -> None:
    pkvm, _, _ = make_pkvm()
    driver = Driver(pages=662 + 500)  # host_s2_pgtable_pages() + 500, as patch 14 asks
    assert pkvm.kvm_iommu_register_driver(driver) == 0
    assert pkvm.kvm_hyp_reserve() == 0
    carveout = pkvm.carveout
    assert carveout is not None
    # hyp s1 646 + host s2 662 + VM table 1 + vmemmap 128 (8 bytes per page) = 1437, plus the
    # driver's 1162: 2599 pages, rounded up to 2 MiB (3072 pages), the slack going to the hyp.
    assert carveout.iommu_pages == 1162
    assert carveout.nr_pages == 3072
    assert carveout.hyp_pages == 3072 - 1162
    assert carveout.base == RAM_END - (12 << 20) == 0x4F40_0000


def test_carveout_falls_back_to_page_alignment_and_fails_when_ram_is_too_small() -> None:
    # 5 MiB = 1280 pages: pKVM needs 521 + 537 + 1 + 3 = 1062 pages, whose 2 MiB rounding (6 MiB)
    # does not fit, so the carveout is exactly 1062 pages, page aligned, at the top.
    pkvm, _, _ = make_pkvm(ram_size=5 << 20)
    assert pkvm.kvm_hyp_reserve() == 0
    assert pkvm.carveout is not None
    assert pkvm.carveout.nr_pages == 1062
    assert pkvm.carveout.base == RAM_BASE + (5 << 20) - 1062 * 4096
    tiny, _, _ = make_pkvm(ram_size=64 << 10)
    assert tiny.kvm_hyp_reserve() == -ENOMEM
    assert tiny.init() == -ENOMEM
    assert tiny.state == "failed"


# -- init / finalise ----------------------------------------------------------------------------
def test_init_donates_the_carveout_and_builds_the_pools() -> None:
    pkvm, host, _ = make_pkvm()
    assert pkvm.kvm_iommu_register_driver(Driver(pages=40)) == 0
    assert pkvm.init() == 0
    c = pkvm.carveout
    assert c is not None and pkvm.hyp_pool is not None and pkvm.iommu_pool is not None
    mp = pkvm.mem_protect
    assert list(mp.non_host_owned_ranges()) == [(c.base_pfn, c.nr_pages, HYP)]
    assert mp.hyp_state(c.base_pfn + c.nr_pages - 1) is PageState.OWNED
    assert (pkvm.hyp_pool.base_pfn, pkvm.hyp_pool.nr_pages) == (c.base_pfn, c.hyp_pages)
    assert (pkvm.iommu_pool.base_pfn, pkvm.iommu_pool.nr_pages) == (c.base_pfn + c.hyp_pages, 40)
    assert host.stage2 is None  # not deprivileged before finalise
    assert pkvm.init() == -EPERM


def test_finalise_runs_the_driver_and_deprivileges_the_host() -> None:
    pkvm, host, events = make_pkvm()
    driver = Driver()
    assert pkvm.kvm_iommu_register_driver(driver) == 0
    assert pkvm.finalise() == -EPERM  # before __pkvm_init
    assert driver.inits == 0
    assert pkvm.init() == 0
    assert pkvm.finalise() == 0
    assert driver.inits == 1
    assert pkvm.protected_mode_initialized and host.stage2 is pkvm.host_stage2
    assert pkvm.finalise() == -EPERM
    steps = [e.fields["step"] for e in events if e.kind == "init"]
    assert steps == [
        "kvm_iommu_register_driver",
        "kvm_hyp_reserve",
        "__pkvm_init",
        "kvm_iommu_init",
        "host_stage2_installed",
        "__pkvm_init_finalise",
    ]


@pytest.mark.parametrize(
    ("cntfrq_hz", "result"), [(0, -ENODEV), (999_999, -ENODEV), (1_000_000, 0), (62_500_000, 0)]
)
def test_finalise_checks_cntfrq(cntfrq_hz: int, result: int) -> None:
    pkvm, host, _ = make_pkvm(cntfrq_hz=cntfrq_hz)
    driver = Driver()
    assert pkvm.kvm_iommu_register_driver(driver) == 0
    assert pkvm.init() == 0
    assert pkvm.finalise() == result
    assert (host.stage2 is not None) == (result == 0)
    assert driver.inits == (1 if result == 0 else 0)  # checked before the IOMMU driver runs


def test_driver_init_failure_fails_kvm_init() -> None:
    pkvm, host, _ = make_pkvm()
    assert pkvm.kvm_iommu_register_driver(Driver(result=-ENOMEM)) == 0
    assert pkvm.init() == 0
    assert pkvm.finalise() == -ENOMEM
    assert pkvm.state == "failed" and pkvm.failure == -ENOMEM and host.stage2 is None


def test_exactly_one_driver_registered_before_init() -> None:
    pkvm, _, _ = make_pkvm()
    first = Driver()
    assert pkvm.kvm_iommu_register_driver(first) == 0
    assert pkvm.kvm_iommu_register_driver(Driver()) == -EBUSY
    assert pkvm.iommu_driver is first
    late, _, _ = make_pkvm()
    assert late.init() == 0
    assert late.kvm_iommu_register_driver(Driver()) == -EPERM
    assert late.iommu_driver is None
    assert late.finalise() == 0  # no IOMMU driver is allowed


def test_time_is_the_modeled_clock() -> None:
    pkvm, _, _ = make_pkvm()
    pkvm.clock.advance(2_500)
    assert pkvm.time_get_us() == 2.5


# -- pools --------------------------------------------------------------------------------------
def test_pool_allocations_are_aligned_zeroed_and_exhaust_to_none() -> None:
    ram = Ram()
    base = 0x1000
    ram.write(base << 12, b"\xff" * (8 << 12))
    pool = HypPool(base, 8, ram=ram)
    four = pool.alloc_pages(4)
    assert four is not None and four == base << 12 and ram.read(four, 4 << 12) == bytes(4 << 12)
    three = pool.alloc_pages(3)
    assert three == (base + 4) << 12
    one = pool.alloc_page()
    assert one == (base + 7) << 12  # the page left over from the three-page allocation
    assert pool.alloc_page() is None and pool.used_pages == 8
    assert pool.alloc_pages(0) is None
    for i in range(4):
        pool.free_page(four + i * 4096)  # split blocks are freed one page at a time
    assert pool.alloc_pages(4) == four  # buddies merged back
    with pytest.raises(ValueError):
        pool.free_page(one + 4096)  # not allocated
    pool.free_pages(three, 3)
    pool.free_page(one)
    pool.free_pages(four, 4)
    assert pool.free_page_count == 8 and pool.alloc_pages(8) == base << 12


# -- hypercalls ---------------------------------------------------------------------------------
Booted = tuple[Pkvm, CpuPort, list[TraceEvent]]


@pytest.fixture
def booted() -> Booted:
    pkvm, host, events = make_pkvm()
    assert pkvm.init() == 0 and pkvm.finalise() == 0
    return pkvm, host, events


def _pvm(pkvm: Pkvm, pgd: int = P + 50) -> int:
    handle = pkvm.hvc("__pkvm_init_vm", pgd, 1)
    assert handle >= HANDLE_OFFSET
    return handle


def _npvm(pkvm: Pkvm, pgd: int = P + 51) -> int:
    handle = pkvm.hvc("__pkvm_init_vm", pgd, 0)
    assert handle >= HANDLE_OFFSET
    return handle


RWX = int(KvmPgtableProt.R | KvmPgtableProt.W | KvmPgtableProt.X)
NAMES = [
    "__pkvm_host_share_hyp",
    "__pkvm_host_unshare_hyp",
    "__pkvm_host_donate_guest",
    "__pkvm_host_share_guest",
    "__pkvm_host_unshare_guest",
    "__pkvm_host_reclaim_page",
    "__pkvm_init_vm",
    "__pkvm_teardown_vm",
]

MALFORMED = [
    ("__pkvm_host_share_hyp", (), -EINVAL),  # too few
    ("__pkvm_host_share_hyp", (P, 0), -EINVAL),  # too many
    ("__pkvm_host_share_hyp", (-1,), -EINVAL),
    ("__pkvm_host_share_hyp", (1 << 64,), -EINVAL),  # does not fit a register
    ("__pkvm_host_share_hyp", (MAX_PFN,), -EINVAL),  # beyond the PA range
    ("__pkvm_host_share_hyp", ((1 << 64) - 1,), -EINVAL),
    ("__pkvm_host_share_hyp", ("1",), -EINVAL),
    ("__pkvm_host_share_hyp", (1.0,), -EINVAL),
    ("__pkvm_host_share_hyp", (True,), -EINVAL),
    ("__pkvm_host_share_hyp", (None,), -EINVAL),
    ("__pkvm_host_share_hyp", (0x1000,), -EPERM),  # well-formed, but a hole: not memory
    ("__pkvm_host_unshare_hyp", (-5,), -EINVAL),
    ("__pkvm_host_unshare_hyp", (P,), -EPERM),  # well-formed, not shared
    ("__pkvm_host_reclaim_page", (MAX_PFN + 1,), -EINVAL),
    ("__pkvm_host_reclaim_page", (P,), 0),  # the host's already
    ("__pkvm_host_donate_guest", (P, 0x10), -EINVAL),
    ("__pkvm_host_donate_guest", (P, MAX_PFN, "pvm"), -EINVAL),
    ("__pkvm_host_donate_guest", (P, 0x10, 0x4242), -EINVAL),  # no such VM
    ("__pkvm_host_donate_guest", (P, 0x10, "npvm"), -EINVAL),  # not a protected VM
    ("__pkvm_host_share_guest", (P, 0x10, "npvm", RWX | 8), -EINVAL),  # prot beyond RWX
    ("__pkvm_host_share_guest", (P, 0x10, "npvm", -1), -EINVAL),
    ("__pkvm_host_share_guest", (P, 0x10, "pvm", RWX), -EINVAL),  # protected VMs get donations
    ("__pkvm_host_share_guest", (P, -0x10, "npvm", RWX), -EINVAL),
    ("__pkvm_host_unshare_guest", (0x10, "npvm"), -ENOENT),  # well-formed, nothing shared there
    ("__pkvm_host_unshare_guest", (0x10, "pvm"), -EINVAL),
    ("__pkvm_host_unshare_guest", (0x10,), -EINVAL),
    ("__pkvm_init_vm", (P, 2), -EINVAL),  # protected is 0 or 1
    ("__pkvm_init_vm", (P + 50, 1), -EPERM),  # the page is the other VM's already
    ("__pkvm_init_vm", (MAX_PFN, 1), -EINVAL),
    ("__pkvm_teardown_vm", (0x4242,), -ENOENT),
    ("__pkvm_teardown_vm", (-1,), -EINVAL),
    ("__pkvm_host_share_everything", (P,), SMCCC_RET_NOT_SUPPORTED),
    ("", (), SMCCC_RET_NOT_SUPPORTED),
]


@pytest.mark.parametrize(("name", "args", "result"), MALFORMED, ids=[f"{m[0]}{m[1]}" for m in MALFORMED])
def test_malformed_hypercalls(booted: Booted, name: str, args: tuple[object, ...], result: int) -> None:
    pkvm, _, events = booted
    handles = {"pvm": _pvm(pkvm), "npvm": _npvm(pkvm)}
    before = list(pkvm.mem_protect.non_host_owned_ranges())
    events.clear()
    real_args = tuple(handles.get(a, a) if isinstance(a, str) and a in handles else a for a in args)
    assert pkvm.hvc(name, *cast(tuple[int, ...], real_args)) == result
    if result:
        assert list(pkvm.mem_protect.non_host_owned_ranges()) == before
    assert [(e.kind, e.fields["name"], e.fields["result"]) for e in events if e.kind == "hypercall"] == [
        ("hypercall", name, result)
    ]


def test_pkvm_is_the_hosts_hvc(booted: Booted) -> None:
    pkvm, _, _ = booted
    hvc: Hvc = pkvm  # what the host kernel is handed
    assert hvc.hvc("__pkvm_host_share_hyp", P) == 0
    assert pkvm.mem_protect.host_state(P) is PageState.SHARED_OWNED


def test_unknown_name_that_is_not_a_string(booted: Booted) -> None:
    pkvm, _, _ = booted
    assert pkvm.hvc(cast(str, 42), 1) == SMCCC_RET_NOT_SUPPORTED


def test_well_formed_hypercalls_do_what_they_say(booted: Booted) -> None:
    pkvm, host, _ = booted
    mp = pkvm.mem_protect
    assert pkvm.hvc("__pkvm_host_share_hyp", P) == 0
    assert mp.host_state(P) is PageState.SHARED_OWNED
    assert pkvm.hvc("__pkvm_host_unshare_hyp", P) == 0
    pvm, npvm = _pvm(pkvm), _npvm(pkvm)
    assert mp.owner_of(P + 50) == HYP  # the VM's own page went to the hyp
    assert pkvm.hvc("__pkvm_host_donate_guest", P + 1, 0x10, pvm) == 0
    assert mp.owner_of(P + 1) == guest(pvm)
    assert pkvm.hvc("__pkvm_host_share_guest", P + 2, 0x10, npvm, RWX) == 0
    assert mp.guest_state(npvm, 0x10) is PageState.SHARED_BORROWED
    assert pkvm.hvc("__pkvm_host_unshare_guest", 0x10, npvm) == 0
    assert pkvm.hvc("__pkvm_host_reclaim_page", P + 1) == -EPERM
    assert pkvm.hvc("__pkvm_teardown_vm", pvm) == 0
    assert mp.owner_of(P + 50) == HOST  # given back, zeroed
    assert pkvm.hvc("__pkvm_host_reclaim_page", P + 1) == 0
    assert pkvm.hvc("__pkvm_teardown_vm", pvm) == -ENOENT
    assert host.read((P + 1) << 12, 8) == 0


def test_vm_table_fills_up(booted: Booted) -> None:
    pkvm, _, _ = booted
    handles = [pkvm.hvc("__pkvm_init_vm", P + i, 1) for i in range(KVM_MAX_PVMS)]
    assert handles == list(range(HANDLE_OFFSET, HANDLE_OFFSET + KVM_MAX_PVMS))
    assert pkvm.hvc("__pkvm_init_vm", P + KVM_MAX_PVMS, 1) == -ENOMEM
    assert pkvm.mem_protect.host_state(P + KVM_MAX_PVMS) is PageState.OWNED  # nothing donated
    assert pkvm.hvc("__pkvm_teardown_vm", HANDLE_OFFSET + 3) == 0
    assert pkvm.hvc("__pkvm_init_vm", P + KVM_MAX_PVMS, 1) == HANDLE_OFFSET + 3  # slot reused


def test_registered_hypercall_gets_validated_arguments(booted: Booted) -> None:
    pkvm, _, events = booted
    calls: list[tuple[int, ...]] = []

    def iommu_map(iova: int, pa: int, nr_pages: int, prot: int) -> int:
        calls.append((iova, pa, nr_pages, prot))
        return 0

    spec = (Arg.U64, Arg.PAGE_ADDR, Arg.NR_PAGES, Arg.PROT)
    pkvm.hypercalls.register_hypercall("__pkvm_iommu_map", iommu_map, spec)
    assert pkvm.hypercalls.arg_spec("__pkvm_iommu_map") == spec
    assert pkvm.hvc("__pkvm_iommu_map", 0x1000, RAM_BASE + 0x10, 1, 3) == -EINVAL  # unaligned
    assert pkvm.hvc("__pkvm_iommu_map", 0x1000, MAX_PFN << 12, 1, 3) == -EINVAL
    assert pkvm.hvc("__pkvm_iommu_map", 0x1000, RAM_BASE, 0, 3) == -EINVAL
    assert pkvm.hvc("__pkvm_iommu_map", 0x1000, RAM_BASE, MAX_PFN + 1, 3) == -EINVAL
    assert calls == []
    assert pkvm.hvc("__pkvm_iommu_map", 0xFFFF_FFFF_FFFF_F000, RAM_BASE, 2, 3) == 0
    assert calls == [(0xFFFF_FFFF_FFFF_F000, RAM_BASE, 2, 3)]
    assert events[-1].fields == {
        "name": "__pkvm_iommu_map",
        "args": [0xFFFF_FFFF_FFFF_F000, RAM_BASE, 2, 3],
        "result": 0,
    }
    with pytest.raises(ValueError):
        pkvm.hypercalls.register_hypercall("__pkvm_iommu_map", iommu_map, spec)
    pkvm.hypercalls.unregister_hypercall("__pkvm_iommu_map")
    assert pkvm.hvc("__pkvm_iommu_map", 0, RAM_BASE, 1, 3) == SMCCC_RET_NOT_SUPPORTED


def _check_invariants(pkvm: Pkvm) -> None:
    mp = pkvm.mem_protect
    for first, count, owner in mp.non_host_owned_ranges():
        for pfn in range(first, first + count):
            assert mp.host_state(pfn) is PageState.NOPAGE
            if owner == HYP:
                assert mp.hyp_state(pfn) is PageState.OWNED
    for handle in pkvm.vm_handles():
        for pte in mp.guest_pages(handle).values():
            if pte.state is PageState.OWNED:
                assert mp.owner_of(pte.pfn) == guest(handle)
            else:
                assert mp.host_state(pte.pfn) is PageState.SHARED_OWNED
                assert mp.share_guest_count(pte.pfn) >= 1


_PAGES = st.integers(min_value=(RAM_BASE >> 12) + 0xF0, max_value=(RAM_BASE >> 12) + 0x110)
_REG = st.one_of(
    _PAGES,
    st.integers(min_value=0, max_value=0x20),
    st.sampled_from([HANDLE_OFFSET, HANDLE_OFFSET + 1, HANDLE_OFFSET + 2]),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
)
_CALL = st.tuples(
    st.one_of(st.sampled_from(NAMES), st.text(max_size=8)),
    st.lists(_REG, max_size=5),
)


@given(calls=st.lists(_CALL, max_size=40))
def test_random_hypercalls_never_raise_and_keep_the_state_consistent(
    calls: list[tuple[str, list[int]]],
) -> None:
    pkvm, host, _ = make_pkvm(ram_size=64 << 20)
    assert pkvm.init() == 0 and pkvm.finalise() == 0
    for name, args in calls:
        result = pkvm.hvc(name, *args)
        assert isinstance(result, int)
        assert result == SMCCC_RET_NOT_SUPPORTED or result <= 0 or result >= HANDLE_OFFSET
    _check_invariants(pkvm)
    for pfn in range((RAM_BASE >> 12) + 0xF0, (RAM_BASE >> 12) + 0x111):
        reachable = not isinstance(host.read(pfn << 12, 8), CpuFault)
        assert reachable == pkvm.mem_protect.host_can_access(pfn)
