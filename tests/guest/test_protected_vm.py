"""Protected VMs: donated memory is the guest's alone until it is given back or reclaimed."""

from __future__ import annotations

from errno import EINVAL, EPERM

from pkvm_smmu.guest import ProtectedVm
from pkvm_smmu.hyp.contracts import HOST, KvmPgtableProt, PageState, guest
from pkvm_smmu.hyp.pkvm import Pkvm
from pkvm_smmu.machine.bus import HOST_CPU, HYP_CPU, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.cpu import CpuFault, CpuPort
from pkvm_smmu.pgtable.prot import Prot
from pkvm_smmu.trace import TraceBus

RAM_BASE = 0x4000_0000
PFN = (RAM_BASE >> 12) + 0x200
GFN = 0x80


def boot() -> tuple[Pkvm, CpuPort]:
    bus = SystemBus()
    bus.add_ram(RAM_BASE, 64 << 20)
    clock = Clock()
    pkvm = Pkvm(bus, clock, TraceBus(), CpuPort(bus, clock, HYP_CPU))
    host = CpuPort(bus, clock, HOST_CPU)
    pkvm.attach_host_cpu(host)
    assert pkvm.init() == 0 and pkvm.finalise() == 0
    return pkvm, host


def new_vm(pkvm: Pkvm, pgd_pfn: int = PFN - 1) -> ProtectedVm:
    handle = pkvm.hvc("__pkvm_init_vm", pgd_pfn, 1)
    assert handle > 0
    return ProtectedVm(handle, pkvm)


def test_donated_memory_is_the_guests_and_unreachable_by_the_host() -> None:
    pkvm, host = boot()
    vm = new_vm(pkvm)
    assert host.write(PFN << 12, 8, 0x1111) is None
    assert vm.donate(PFN, GFN) == 0
    assert vm.memory == {GFN: PFN} == vm.owned_pages()
    assert vm.read(GFN << 12, 8) == 0x1111  # donation moves the page, it does not clear it
    assert vm.write((GFN << 12) + 0xFF8, 8, 0x5EC7E7) is None
    assert isinstance(host.read((PFN << 12) + 0xFF8, 8), CpuFault)
    assert isinstance(host.write(PFN << 12, 8, 0), CpuFault)
    assert isinstance(host.read_bytes(PFN << 12, 16), CpuFault)
    assert vm.read(GFN << 12, 8) == 0x1111  # the host's refused store changed nothing
    assert vm.donate(PFN, GFN + 1) == -EPERM  # the host cannot give it twice


def test_guest_accesses_outside_its_memory_fault() -> None:
    pkvm, _ = boot()
    vm = new_vm(pkvm)
    assert vm.donate(PFN, GFN) == 0
    fault = vm.read((GFN + 1) << 12, 4)
    assert isinstance(fault, CpuFault) and "not mapped" in fault.reason
    # A store straddling into an unmapped page writes nothing at all.
    assert isinstance(vm.write((GFN << 12) + 0xFFC, 8, -1), CpuFault)
    assert vm.read((GFN << 12) + 0xFFC, 4) == 0


def test_guest_access_spanning_two_donated_pages() -> None:
    pkvm, _ = boot()
    vm = new_vm(pkvm)
    assert vm.donate(PFN + 5, GFN) == 0
    assert vm.donate(PFN + 2, GFN + 1) == 0  # not contiguous in PA
    assert vm.write((GFN << 12) + 0xFFC, 8, 0x8877665544332211) is None
    assert vm.read((GFN << 12) + 0xFFC, 8) == 0x8877665544332211
    assert pkvm.bus.ram.read_int(((PFN + 2) << 12), 4) == 0x88776655


def test_borrowed_pages_follow_the_shared_permissions() -> None:
    pkvm, host = boot()
    handle = pkvm.hvc("__pkvm_init_vm", PFN - 1, 0)
    vm = ProtectedVm(handle, pkvm)
    assert pkvm.hvc("__pkvm_host_share_guest", PFN, GFN, handle, int(KvmPgtableProt.R)) == 0
    assert host.write(PFN << 12, 8, 42) is None  # shared: the host keeps access
    assert vm.read(GFN << 12, 8) == 42
    assert isinstance(vm.write(GFN << 12, 8, 1), CpuFault)
    assert vm.relinquish(GFN) == -EPERM  # borrowed, not the guest's to give
    assert vm.donate(PFN + 1, GFN + 1) == -EINVAL  # only protected VMs take donations


def test_relinquished_page_is_reachable_again_only_once_returned() -> None:
    pkvm, host = boot()
    vm = new_vm(pkvm)
    assert vm.donate(PFN, GFN) == 0
    assert vm.write(GFN << 12, 8, 0x5EC7E7) is None
    seen: list[tuple[Prot, bool, object]] = []

    class Watcher:
        def host_access_changed(self, pfn: int, nr_pages: int, prot: Prot, is_mmio: bool) -> None:
            # At the moment the host gets the page back the guest has let go and the page is clear.
            seen.append((prot, GFN in vm.memory, pkvm.bus.ram.read_int(pfn << 12, 8)))

    pkvm.mem_protect.add_host_ownership_listener(Watcher())
    assert isinstance(host.read(PFN << 12, 8), CpuFault)
    assert vm.relinquish(GFN) == 0
    assert seen == [(Prot.READ | Prot.WRITE, False, 0)]
    assert host.read(PFN << 12, 8) == 0  # poisoned, never the guest's secret
    assert isinstance(vm.read(GFN << 12, 8), CpuFault)
    assert vm.relinquish(GFN) == 0  # nothing mapped there any more: a no-op
    assert pkvm.mem_protect.owner_of(PFN) == HOST


def test_teardown_makes_pages_reclaimable_one_by_one() -> None:
    pkvm, host = boot()
    vm = new_vm(pkvm)
    for i in range(3):
        assert vm.donate(PFN + i, GFN + i) == 0
        assert vm.write((GFN + i) << 12, 8, 0xAB + i) is None
    assert pkvm.hvc("__pkvm_host_reclaim_page", PFN) == -EPERM  # the guest is alive
    assert vm.teardown() == 0
    assert not vm.alive and vm.memory == {}
    # Torn down is not returned: still unreachable until reclaimed.
    assert pkvm.mem_protect.owner_of(PFN + 1) == guest(vm.vm_id)
    assert isinstance(host.read((PFN + 1) << 12, 8), CpuFault)
    assert pkvm.hvc("__pkvm_host_reclaim_page", PFN + 1) == 0
    assert host.read((PFN + 1) << 12, 8) == 0
    assert isinstance(host.read(PFN << 12, 8), CpuFault)
    assert pkvm.mem_protect.host_state(PFN + 2) is PageState.NOPAGE
    for i in (0, 2):
        assert pkvm.hvc("__pkvm_host_reclaim_page", PFN + i) == 0
    assert all(host.read((PFN + i) << 12, 8) == 0 for i in range(3))
    assert host.read((PFN - 1) << 12, 8) == 0  # the VM's own page came back at teardown
    assert vm.teardown() != 0
