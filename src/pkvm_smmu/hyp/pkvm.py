"""pKVM's initialisation and its host-facing services.

Boot order, as in Linux:

1. ``kvm_iommu_register_driver`` (the one hyp IOMMU driver, v4 patch 09), early;
2. ``kvm_hyp_reserve`` (``setup_arch``): the hyp carveout taken from the top of RAM, sized from what
   pKVM needs plus what the IOMMU driver asks for (patch 11);
3. ``init`` (``__pkvm_init``): the carveout is donated to the hyp and split into pools;
4. ``finalise`` (``__pkvm_init_finalise``): CNTFRQ checked (patch 03), ``kvm_iommu_init`` runs the
   driver's ``init``, and the host stage-2 is installed on the host's CPU port: from then on the host
   is deprivileged.

A failure at any step leaves the host stage-2 uninstalled (pKVM disabled, the host runs natively) and
is recorded in ``failure``.
"""

from __future__ import annotations

from dataclasses import dataclass
from errno import EBUSY, EINVAL, ENODEV, ENOENT, ENOMEM, EPERM
from typing import Literal

from pkvm_smmu.hyp.contracts import DataAbortHandler, KvmIommuDriver, KvmPgtableProt
from pkvm_smmu.hyp.host_stage2 import HostStage2
from pkvm_smmu.hyp.hypercalls import Arg, HypercallInterface
from pkvm_smmu.hyp.mem_protect import MemProtect
from pkvm_smmu.hyp.pool import HypPool
from pkvm_smmu.machine.bus import HYP_CPU, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.cpu import CpuPort
from pkvm_smmu.machine.memory import PAGE_SHIFT, PAGE_SIZE
from pkvm_smmu.trace import TraceBus

PTRS_PER_PTE = 512
PGTABLE_LEVELS = 4  # 4 KiB granule, 48-bit: levels 0..3
PMD_SIZE = 2 << 20
SZ_1G = 1 << 30
STRUCT_HYP_PAGE_SIZE = 8  # sizeof(struct hyp_page)
KVM_MAX_PVMS = 255
HANDLE_OFFSET = 0x1000  # pKVM's first VM handle
SMMUV3_L2_STE_PAGES = 500  # v4 patch 14: pages for L2 stream tables on top of the identity stage-2
CNTFRQ_MIN_HZ = 1_000_000  # v4 patch 03

State = Literal["off", "reserved", "initialised", "finalised", "failed"]


def hyp_pgtable_max_pages(nr_pages: int) -> int:
    """``__hyp_pgtable_max_pages``: table pages to map ``nr_pages`` at page granularity, worst case."""
    total = 0
    for _ in range(PGTABLE_LEVELS):
        nr_pages = -(-nr_pages // PTRS_PER_PTE)
        total += nr_pages
    return total


def host_s2_pgtable_pages(ram_pages: list[int]) -> int:
    """``host_s2_pgtable_pages``: every memory region at page granularity, 16 pages of slack for
    concatenated PGDs, and 1 GiB worth of MMIO mappings."""
    res = sum(hyp_pgtable_max_pages(pages) for pages in ram_pages) + 16
    return res + hyp_pgtable_max_pages(SZ_1G >> PAGE_SHIFT)


def hyp_s1_pgtable_pages(ram_pages: list[int]) -> int:
    """``hyp_s1_pgtable_pages``: the hyp's linear map of memory plus 1 GiB of private mappings."""
    res = sum(hyp_pgtable_max_pages(pages) for pages in ram_pages)
    return res + hyp_pgtable_max_pages(SZ_1G >> PAGE_SHIFT)


def hyp_vmemmap_pages(ram_pages: list[int]) -> int:
    """One ``struct hyp_page`` per page of memory."""
    return -(-sum(pages * STRUCT_HYP_PAGE_SIZE for pages in ram_pages) // PAGE_SIZE)


def hyp_vm_table_pages() -> int:
    return -(-(KVM_MAX_PVMS * 8) // PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class Carveout:
    """The hyp's memory (``hyp_mem_base``/``hyp_mem_size``) and how it is split."""

    base_pfn: int
    nr_pages: int
    hyp_pages: int  # pKVM's own needs (page tables, vmemmap, VM table) and the 2 MiB rounding
    iommu_pages: int  # kvm_iommu_pages()

    @property
    def base(self) -> int:
        return self.base_pfn << PAGE_SHIFT

    @property
    def size(self) -> int:
        return self.nr_pages << PAGE_SHIFT


@dataclass(slots=True)
class _VmRecord:
    handle: int
    protected: bool
    pgd_pfn: int


class Pkvm:
    """The hypervisor: page ownership, host stage-2, pools, IOMMU driver hook and hypercalls."""

    def __init__(
        self,
        bus: SystemBus,
        clock: Clock,
        trace: TraceBus,
        hyp_cpu: CpuPort,
        *,
        pa_bits: int = 48,
        cntfrq_hz: int = 100_000_000,
        strict_mmio_checks: bool = False,
    ) -> None:
        self.bus = bus
        self.clock = clock
        self.trace = trace
        self.hyp_cpu = hyp_cpu
        self.cntfrq_hz = cntfrq_hz
        self.mem_protect = MemProtect(bus, trace, pa_bits=pa_bits, strict_mmio_checks=strict_mmio_checks)
        self.host_stage2 = HostStage2(self.mem_protect, trace)
        self.hypercalls = HypercallInterface(self.mem_protect, trace)
        self.state: State = "off"
        self.failure: int = 0
        self.carveout: Carveout | None = None
        self.hyp_pool: HypPool | None = None
        self.iommu_pool: HypPool | None = None
        self.iommu_driver: KvmIommuDriver | None = None
        self.host_cpu_port: CpuPort | None = None
        self._vms: dict[int, _VmRecord] = {}
        self._register_host_hypercalls()

    @property
    def protected_mode_initialized(self) -> bool:
        return self.state == "finalised"

    def time_get_us(self) -> float:
        """``pkvm_time_get`` (v4 patch 03): microseconds on the modeled clock."""
        return self.clock.now_us

    def hvc(self, name: str, *args: int) -> int:
        return self.hypercalls.hvc(name, *args)

    def _emit(self, kind: str, **fields: object) -> None:
        if self.trace.enabled:
            self.trace.emit("hyp", kind, **fields)

    # -- IOMMU driver (patch 09) ----------------------------------------------------------------
    def kvm_iommu_register_driver(self, driver: KvmIommuDriver) -> int:
        """Exactly one driver (-EBUSY for a second), and only before ``__pkvm_init`` (-EPERM)."""
        if self.iommu_driver is not None:
            ret = -EBUSY
        elif self.state not in ("off", "reserved"):
            ret = -EPERM
        else:
            self.iommu_driver = driver
            ret = 0
        self._emit("init", step="kvm_iommu_register_driver", driver=type(driver).__name__, result=ret)
        return ret

    # -- carveout (patch 11) --------------------------------------------------------------------
    def kvm_hyp_reserve(self) -> int:
        """Reserve the carveout at the top of RAM, top-down as ``memblock_phys_alloc`` does: first
        2 MiB aligned and rounded up to 2 MiB (the slack is the hyp's), else page aligned. Returns 0
        or -ENOMEM."""
        if self.carveout is not None:
            return 0
        ram_pages = [region.size >> PAGE_SHIFT for region in self.bus.ram_regions()]
        hyp_pages = (
            hyp_s1_pgtable_pages(ram_pages)
            + host_s2_pgtable_pages(ram_pages)
            + hyp_vm_table_pages()
            + hyp_vmemmap_pages(ram_pages)
        )
        iommu_pages = max(0, self.iommu_driver.kvm_iommu_pages()) if self.iommu_driver is not None else 0
        size = (hyp_pages + iommu_pages) << PAGE_SHIFT
        pmd_size = -(-size // PMD_SIZE) * PMD_SIZE
        base = self._top_down_alloc(pmd_size, PMD_SIZE)
        if base is not None:
            size = pmd_size
        else:
            base = self._top_down_alloc(size, PAGE_SIZE)
        if base is None:
            ret = -ENOMEM
        else:
            nr_pages = size >> PAGE_SHIFT
            self.carveout = Carveout(base >> PAGE_SHIFT, nr_pages, nr_pages - iommu_pages, iommu_pages)
            self.state = "reserved"
            ret = 0
        self._emit(
            "init",
            step="kvm_hyp_reserve",
            pages=size >> PAGE_SHIFT,
            iommu_pages=iommu_pages,
            base=base,
            result=ret,
        )
        return ret

    def _top_down_alloc(self, size: int, align: int) -> int | None:
        for region in sorted(self.bus.ram_regions(), key=lambda r: r.base, reverse=True):
            base = (region.end - size) & ~(align - 1)
            if base >= region.base:
                return base
        return None

    # -- __pkvm_init / __pkvm_init_finalise -----------------------------------------------------
    def init(self) -> int:
        """``__pkvm_init``: the carveout becomes the hyp's and is split into its pools."""
        if self.state not in ("off", "reserved"):
            return -EPERM
        ret = self.kvm_hyp_reserve()
        if not ret:
            assert self.carveout is not None
            ret = self.mem_protect.host_donate_hyp(self.carveout.base_pfn, self.carveout.nr_pages)
        if ret:
            return self._fail("__pkvm_init", ret)
        carveout = self.carveout
        assert carveout is not None
        ram = self.bus.ram
        self.hyp_pool = HypPool(carveout.base_pfn, carveout.hyp_pages, ram=ram, name="hyp", trace=self.trace)
        if carveout.iommu_pages:
            self.iommu_pool = HypPool(
                carveout.base_pfn + carveout.hyp_pages,
                carveout.iommu_pages,
                ram=ram,
                name="iommu",
                trace=self.trace,
            )
        self.state = "initialised"
        self._emit("init", step="__pkvm_init", base_pfn=carveout.base_pfn, pages=carveout.nr_pages, result=0)
        return 0

    def finalise(self) -> int:
        """``__pkvm_init_finalise``: fails with -ENODEV on a CNTFRQ of 0 or below 1 MHz, or with the
        IOMMU driver's error; on success deprivileges the host."""
        if self.state != "initialised":
            return -EPERM
        if self.cntfrq_hz < CNTFRQ_MIN_HZ:
            return self._fail("__pkvm_init_finalise", -ENODEV, cntfrq_hz=self.cntfrq_hz)
        ret = self.kvm_iommu_init()
        if ret:
            return self._fail("kvm_iommu_init", ret)
        self.state = "finalised"
        if self.host_cpu_port is not None:
            self.install_host_stage2(self.host_cpu_port)
        self._emit("init", step="__pkvm_init_finalise", result=0)
        return 0

    def kvm_iommu_init(self) -> int:
        driver = self.iommu_driver
        if driver is None:
            return 0
        ret = driver.init()
        if ret:
            return ret
        handler = getattr(driver, "handle_host_dabt", None)
        if callable(handler):
            self.host_stage2.add_data_abort_handler(driver, first=True)  # type: ignore[arg-type]
        self._emit("init", step="kvm_iommu_init", result=0)
        return 0

    def _fail(self, step: str, ret: int, **fields: object) -> int:
        self.state = "failed"
        self.failure = ret
        self._emit("init", step=step, result=ret, **fields)
        return ret

    # -- the host's CPU port --------------------------------------------------------------------
    def attach_host_cpu(self, port: CpuPort) -> None:
        """The port the host stage-2 goes on at finalise (installed at once if already finalised)."""
        self.host_cpu_port = port
        if self.protected_mode_initialized:
            self.install_host_stage2(port)

    def install_host_stage2(self, port: CpuPort | None = None) -> None:
        port = port if port is not None else self.host_cpu_port
        if port is None:
            raise ValueError("no host CPU port to install the host stage-2 on")
        self.host_cpu_port = port
        port.stage2 = self.host_stage2
        self._emit("init", step="host_stage2_installed")

    def uninstall_host_stage2(self) -> None:
        if self.host_cpu_port is not None and self.host_cpu_port.stage2 is self.host_stage2:
            self.host_cpu_port.stage2 = None
            self._emit("init", step="host_stage2_uninstalled")

    def add_data_abort_handler(self, handler: DataAbortHandler) -> None:
        self.host_stage2.add_data_abort_handler(handler)

    # -- VMs ------------------------------------------------------------------------------------
    def init_vm(self, pgd_pfn: int, protected: bool = True) -> int:
        """``__pkvm_init_vm``: the host donates one page for the VM's hyp state and stage-2 PGD; the
        result is the VM's handle, or -ENOMEM when the VM table is full, or the donation's error."""
        handle = next(
            (HANDLE_OFFSET + i for i in range(KVM_MAX_PVMS) if HANDLE_OFFSET + i not in self._vms), None
        )
        if handle is None:
            return -ENOMEM
        ret = self.mem_protect.host_donate_hyp(pgd_pfn, 1)
        if ret:
            return ret
        ret = self.mem_protect.init_vm(handle, protected)
        if ret:
            self.mem_protect.hyp_donate_host(pgd_pfn, 1)
            return ret
        self._vms[handle] = _VmRecord(handle, protected, pgd_pfn)
        return handle

    def teardown_vm(self, handle: int) -> int:
        """``__pkvm_teardown_vm``: the guest's pages become reclaimable; the VM's own page is zeroed and
        given back to the host."""
        record = self._vms.get(handle)
        if record is None:
            return -ENOENT
        ret = self.mem_protect.teardown_vm(handle)
        if ret:
            return ret
        del self._vms[handle]
        self.bus.write_bytes(HYP_CPU, record.pgd_pfn << PAGE_SHIFT, bytes(PAGE_SIZE))
        self.mem_protect.hyp_donate_host(record.pgd_pfn, 1)
        return 0

    def vm_handles(self) -> tuple[int, ...]:
        return tuple(self._vms)

    # -- host hypercalls ------------------------------------------------------------------------
    def _register_host_hypercalls(self) -> None:
        mp = self.mem_protect
        register = self.hypercalls.register_hypercall
        register("__pkvm_host_share_hyp", mp.host_share_hyp, (Arg.PFN,))
        register("__pkvm_host_unshare_hyp", mp.host_unshare_hyp, (Arg.PFN,))
        register("__pkvm_host_reclaim_page", mp.host_reclaim_page, (Arg.PFN,))
        register("__pkvm_host_donate_guest", self._hvc_donate_guest, (Arg.PFN, Arg.GFN, Arg.HANDLE))
        register("__pkvm_host_share_guest", self._hvc_share_guest, (Arg.PFN, Arg.GFN, Arg.HANDLE, Arg.PROT))
        register("__pkvm_host_unshare_guest", self._hvc_unshare_guest, (Arg.GFN, Arg.HANDLE))
        register("__pkvm_init_vm", self._hvc_init_vm, (Arg.PFN, Arg.BOOL))
        register("__pkvm_teardown_vm", self.teardown_vm, (Arg.HANDLE,))

    def _hvc_donate_guest(self, pfn: int, gfn: int, handle: int) -> int:
        # Only protected VMs take donations; the others get shares (pKVM's handlers: -EINVAL).
        record = self._vms.get(handle)
        if record is None or not record.protected:
            return -EINVAL
        return self.mem_protect.host_donate_guest(handle, pfn, gfn)

    def _hvc_share_guest(self, pfn: int, gfn: int, handle: int, prot: int) -> int:
        record = self._vms.get(handle)
        if record is None or record.protected:
            return -EINVAL
        return self.mem_protect.host_share_guest(handle, pfn, gfn, KvmPgtableProt(prot))

    def _hvc_unshare_guest(self, gfn: int, handle: int) -> int:
        record = self._vms.get(handle)
        if record is None or record.protected:
            return -EINVAL
        return self.mem_protect.host_unshare_guest(handle, gfn)

    def _hvc_init_vm(self, pgd_pfn: int, protected: int) -> int:
        return self.init_vm(pgd_pfn, bool(protected))
