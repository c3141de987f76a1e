"""The DMA API for endpoint drivers (Linux ``kernel/dma/mapping.c``, ``direct.c``, ``dma-iommu.c``).

A device's ``dma_ops`` decide how an address becomes a DMA address:

- no IOMMU, or an IDENTITY default domain: dma-direct, the DMA address is the physical address
  (checked against the device's DMA mask; there is no bounce buffering);
- a DMA default domain (strict): an IOVA is allocated and mapped; unmap invalidates the IOTLB
  (``iotlb_sync``) before the IOVA can be reused;
- a DMA_FQ default domain (lazy): unmap clears the PTEs but the IOVA, and the table pages the
  unmap freed, wait in a flush queue until ``flush_iotlb_all`` ran, which happens when the queue
  is full or ``fq_timeout_ms`` after the first entry was queued (the modeled clock);
- a BLOCKED default domain: nothing can be mapped.

Every operation reports on the trace bus (``host.iommu``, kinds ``dma.*``).
"""

from __future__ import annotations

import errno
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple

from pkvm_smmu.host.iommu.iova import IovaDomain
from pkvm_smmu.host.iommu.ops import DomainType, IommuCap, IommuDomain, ResvType
from pkvm_smmu.pgtable.gather import IotlbGather
from pkvm_smmu.pgtable.prot import Prot

if TYPE_CHECKING:
    from pkvm_smmu.host.iommu.core import IommuCore

DMA_MAPPING_ERROR = (1 << 64) - 1
PAGE_SIZE = 4096
DEFAULT_DMA_MASK = (1 << 32) - 1  # what a device gets until its driver sets a wider one
DEFAULT_MAX_SEG_SIZE = 1 << 16  # dma_get_max_seg_size() without dma_parms
DEFAULT_SEG_BOUNDARY = (1 << 32) - 1
# Below this many pages IOVA lengths are rounded up to a power of two (IOVA_RANGE_CACHE_MAX_SIZE).
_ROUND_POW2_BELOW = 1 << 5


def dma_bit_mask(bits: int) -> int:
    return (1 << bits) - 1


class DmaDirection(Enum):
    BIDIRECTIONAL = 0
    TO_DEVICE = 1
    FROM_DEVICE = 2
    NONE = 3


@dataclass
class ScatterEntry:
    """One scatterlist entry: a physically contiguous buffer; ``dma_address``/``dma_length`` are
    filled by ``dma_map_sg`` (only the first ``count`` entries carry DMA segments)."""

    paddr: int
    length: int
    dma_address: int = DMA_MAPPING_ERROR
    dma_length: int = 0


def dma_info_to_prot(direction: DmaDirection, coherent: bool) -> Prot:
    prot = Prot.CACHE if coherent else Prot.NONE
    if direction is DmaDirection.BIDIRECTIONAL:
        return prot | Prot.READ | Prot.WRITE
    if direction is DmaDirection.TO_DEVICE:
        return prot | Prot.READ
    if direction is DmaDirection.FROM_DEVICE:
        return prot | Prot.WRITE
    return Prot.NONE


# -- masks --------------------------------------------------------------------------------------------


def dma_get_mask(dev: Any) -> int:
    mask = getattr(dev, "dma_mask", None)
    return mask if isinstance(mask, int) and mask > 0 else DEFAULT_DMA_MASK


def dma_get_coherent_mask(dev: Any) -> int:
    mask = getattr(dev, "coherent_dma_mask", None)
    return mask if isinstance(mask, int) and mask > 0 else DEFAULT_DMA_MASK


def _set_attr(dev: Any, name: str, value: int) -> int:
    if value <= 0:
        return -errno.EIO
    try:
        setattr(dev, name, value)
    except AttributeError:
        return -errno.EIO
    return 0


def dma_set_mask(dev: Any, mask: int) -> int:
    return _set_attr(dev, "dma_mask", mask)


def dma_set_coherent_mask(dev: Any, mask: int) -> int:
    return _set_attr(dev, "coherent_dma_mask", mask)


def dma_set_mask_and_coherent(dev: Any, mask: int) -> int:
    return dma_set_mask(dev, mask) or dma_set_coherent_mask(dev, mask)


def _bus_limit(dev: Any, mask: int) -> int:
    limit = getattr(dev, "bus_dma_limit", 0)
    return min(mask, limit) if isinstance(limit, int) and limit > 0 else mask


# -- the API endpoint drivers call ------------------------------------------------------------------


def dma_map_single(dev: Any, paddr: int, size: int, direction: DmaDirection) -> int:
    """The DMA address for ``[paddr, paddr + size)``, or ``DMA_MAPPING_ERROR``."""
    ops = getattr(dev, "dma_ops", None)
    if ops is None:
        return _direct_addr(dev, paddr, size, dma_get_mask(dev))
    result: int = ops.map_page(dev, paddr, size, direction)
    return result


def dma_unmap_single(dev: Any, dma_addr: int, size: int, direction: DmaDirection) -> None:
    ops = getattr(dev, "dma_ops", None)
    if ops is not None:
        ops.unmap_page(dev, dma_addr, size, direction)


def dma_mapping_error(dev: Any, dma_addr: int) -> bool:
    return dma_addr == DMA_MAPPING_ERROR


def dma_map_sg(dev: Any, sg: list[ScatterEntry], direction: DmaDirection) -> int:
    """Map a scatterlist; the number of DMA segments (entries may merge), 0 on failure."""
    ops = getattr(dev, "dma_ops", None)
    if ops is None:
        return DmaDirectOps.map_sg_direct(dev, sg)
    count: int = ops.map_sg(dev, sg, direction)
    return count


def dma_unmap_sg(dev: Any, sg: list[ScatterEntry], direction: DmaDirection) -> None:
    ops = getattr(dev, "dma_ops", None)
    if ops is not None:
        ops.unmap_sg(dev, sg, direction)


def dma_alloc_coherent(dev: Any, size: int) -> tuple[int, int] | None:
    """Zeroed memory both the CPU and the device can use: ``(cpu_pa, dma_addr)``, or None."""
    ops = getattr(dev, "dma_ops", None)
    if ops is None:
        return None
    result: tuple[int, int] | None = ops.alloc(dev, size)
    return result


def dma_free_coherent(dev: Any, size: int, cpu_pa: int, dma_addr: int) -> None:
    ops = getattr(dev, "dma_ops", None)
    if ops is not None:
        ops.free(dev, size, cpu_pa, dma_addr)


def _direct_addr(dev: Any, paddr: int, size: int, mask: int) -> int:
    if size <= 0 or paddr < 0 or paddr + size - 1 > _bus_limit(dev, mask):
        return DMA_MAPPING_ERROR
    return paddr


def _page_align(size: int) -> int:
    return -(-size // PAGE_SIZE) * PAGE_SIZE


# -- dma-direct -----------------------------------------------------------------------------------------


class DmaDirectOps:
    """DMA address = physical address. Used without an IOMMU and behind an identity domain."""

    def __init__(self, core: IommuCore) -> None:
        self.core = core

    def _emit(self, kind: str, dev: Any, **fields: Any) -> None:
        if self.core.trace.enabled:
            self.core.trace.emit("host.iommu", kind, dev=_name(dev), mode="direct", **fields)

    def map_page(self, dev: Any, paddr: int, size: int, direction: DmaDirection) -> int:
        if direction is DmaDirection.NONE:
            self._emit("dma.map", dev, paddr=paddr, size=size, dma=None, error="direction")
            return DMA_MAPPING_ERROR
        dma = _direct_addr(dev, paddr, size, dma_get_mask(dev))
        if dma == DMA_MAPPING_ERROR:
            # No swiotlb in the model: an address beyond the mask cannot be bounced.
            self._emit("dma.map", dev, paddr=paddr, size=size, dma=None, error="beyond DMA mask")
        else:
            self._emit("dma.map", dev, paddr=paddr, size=size, dma=dma)
        return dma

    def unmap_page(self, dev: Any, dma_addr: int, size: int, direction: DmaDirection) -> None:
        self._emit("dma.unmap", dev, dma=dma_addr, size=size)

    @staticmethod
    def map_sg_direct(dev: Any, sg: list[ScatterEntry]) -> int:
        mask = dma_get_mask(dev)
        for entry in sg:
            dma = _direct_addr(dev, entry.paddr, entry.length, mask)
            if dma == DMA_MAPPING_ERROR:
                return 0
            entry.dma_address, entry.dma_length = dma, entry.length
        return len(sg)

    def map_sg(self, dev: Any, sg: list[ScatterEntry], direction: DmaDirection) -> int:
        count = 0 if direction is DmaDirection.NONE or not sg else self.map_sg_direct(dev, sg)
        self._emit("dma.map_sg", dev, nents=len(sg), count=count)
        return count

    def unmap_sg(self, dev: Any, sg: list[ScatterEntry], direction: DmaDirection) -> None:
        self._emit("dma.unmap_sg", dev, nents=len(sg))

    def alloc(self, dev: Any, size: int) -> tuple[int, int] | None:
        mm = self.core.mm
        limit = _bus_limit(dev, dma_get_coherent_mask(dev))
        pa = mm.dma_alloc_coherent(size, limit=limit) if mm is not None and size > 0 else None
        self._emit("dma.alloc", dev, size=size, paddr=pa, dma=pa)
        return None if pa is None else (pa, pa)

    def free(self, dev: Any, size: int, cpu_pa: int, dma_addr: int) -> None:
        mm = self.core.mm
        if mm is not None:
            mm.dma_free_coherent(cpu_pa, size)
        self._emit("dma.free", dev, size=size, paddr=cpu_pa, dma=dma_addr)


def _name(dev: Any) -> str:
    name = getattr(dev, "name", None)
    return str(name) if name is not None else repr(dev)


# -- dma-iommu --------------------------------------------------------------------------------------------


class _FqEntry(NamedTuple):
    pfn: int
    pages: int
    counter: int  # flush_start_cnt when queued: freeable once a flush that started later finished
    gather: IotlbGather


class IommuDmaCookie:
    """The DMA API's state for one DMA/DMA_FQ domain (Linux ``struct iommu_dma_cookie``): its IOVA
    space and, in lazy mode, the flush queue."""

    def __init__(self, core: IommuCore, domain: IommuDomain) -> None:
        self.core = core
        self.domain = domain
        granule = domain.pgsize_bitmap & -domain.pgsize_bitmap
        self.iovad = IovaDomain(granule, start_pfn=1)
        self.fq: deque[_FqEntry] | None = None
        self.fq_size = core.policy.fq_size
        self.fq_timeout_us = core.policy.fq_timeout_ms * 1000.0
        self.fq_deadline_us: float | None = None  # the armed fq_timer
        self.flush_start_cnt = 0
        self.flush_finish_cnt = 0
        self.reserved_devs: set[int] = set()

    @property
    def label(self) -> str:
        return self.core.domain_label(self.domain)

    def init_fq(self) -> None:
        if self.fq is None:
            self.fq = deque()

    def put(self) -> None:
        """The domain is being freed: drop the queue (its IOVAs die with the IOVA space)."""
        if self in self.core.dma_cookies:
            self.core.dma_cookies.remove(self)
        self.fq = None
        self.fq_deadline_us = None

    # -- flush queue (queue_iova, fq_flush_iotlb, fq_flush_timeout) -----------------------------------
    def queue_iova(self, pfn: int, pages: int, gather: IotlbGather) -> None:
        fq = self.fq
        assert fq is not None
        self._free_flushed()
        if len(fq) >= self.fq_size - 1:  # a ring of fq_size slots holds fq_size - 1 entries
            self.flush("full")
        fq.append(_FqEntry(pfn, pages, self.flush_start_cnt, gather))
        self.core.emit(
            "dma.fq_queue", domain=self.label, iova=pfn << self.iovad.shift, pages=pages, depth=len(fq)
        )
        if self.fq_deadline_us is None:
            self.fq_deadline_us = self.core.now_us() + self.fq_timeout_us
            schedule = getattr(self.core.kernel, "schedule_delayed_work", None)
            if schedule is not None:  # a real timer; DMA API calls also check the deadline
                schedule(f"iommu_dma_fq_timer:{self.label}", self.check_timer, int(self.fq_timeout_us * 1000))

    def flush(self, reason: str) -> None:
        self.flush_start_cnt += 1
        self.core.emit("dma.fq_flush", domain=self.label, reason=reason, entries=len(self.fq or ()))
        self.core.iommu_flush_iotlb_all(self.domain)
        self.flush_finish_cnt += 1
        self._free_flushed()

    def _free_flushed(self) -> None:
        fq = self.fq
        while fq and fq[0].counter < self.flush_finish_cnt:
            entry = fq.popleft()
            self.iovad.free_iova(entry.pfn)
            if entry.gather.freed_tables:
                self.core.call_driver(self.domain.free_gathered_tables, entry.gather)

    def check_timer(self) -> None:
        deadline = self.fq_deadline_us
        if deadline is not None and self.core.now_us() >= deadline:
            self.fq_deadline_us = None
            self.flush("timer")

    # -- IOVA (iommu_dma_alloc_iova / iommu_dma_free_iova) -------------------------------------------
    def alloc_iova(self, dev: Any, size: int, dma_limit: int) -> int:
        """IOVA for ``size`` bytes (granule multiple) at or below ``dma_limit``; 0 when exhausted."""
        iovad = self.iovad
        shift = iovad.shift
        length = size >> shift
        if length < _ROUND_POW2_BELOW:
            length = 1 << (length - 1).bit_length()
        dma_limit = _bus_limit(dev, dma_limit)
        if self.domain.aperture_end:
            dma_limit = min(dma_limit, self.domain.aperture_end)
        state = self.core.dev_iommu(dev)
        if dma_limit > DEFAULT_DMA_MASK and state is not None and state.pci_32bit_workaround:
            # Try to give PCI devices a single-address-cycle (32-bit) address first.
            iova = iovad.alloc_iova(length, DEFAULT_DMA_MASK >> shift)
            if iova is not None:
                return iova.pfn_lo << shift
            state.pci_32bit_workaround = False
            self.core.emit("dma.iova_32bit_exhausted", dev=_name(dev))
        iova = iovad.alloc_iova(length, dma_limit >> shift)
        return 0 if iova is None else iova.pfn_lo << shift

    def free_iova(self, iova: int, size: int, gather: IotlbGather | None) -> None:
        pfn = iova >> self.iovad.shift
        if gather is not None and self.fq is not None:
            self.queue_iova(pfn, size >> self.iovad.shift, gather)
        elif not self.iovad.free_iova(pfn):
            self.core.emit(
                "warn", domain=self.label, message="free of an IOVA that is not allocated", iova=iova
            )


def iommu_dma_init_domain(core: IommuCore, domain: IommuDomain, dev: Any) -> int:
    """Give a DMA domain its cookie, reserve ``dev``'s reserved regions in its IOVA space, and set
    up the flush queue for DMA_FQ (which falls back to strict DMA when the IOMMU does not
    advertise cheap deferred flushing)."""
    granule = domain.pgsize_bitmap & -domain.pgsize_bitmap
    if not granule:
        return -errno.EINVAL
    cookie = domain.iova_cookie
    if cookie is None:
        cookie = domain.iova_cookie = IommuDmaCookie(core, domain)
        core.dma_cookies.append(cookie)
    elif not isinstance(cookie, IommuDmaCookie) or cookie.iovad.granule != granule:
        return -errno.EFAULT
    state = core.dev_iommu(dev)
    if state is not None and id(dev) not in cookie.reserved_devs:
        cookie.reserved_devs.add(id(dev))
        iovad = cookie.iovad
        for region in state.resv_regions:
            if region.type is ResvType.SW_MSI or region.length <= 0:
                continue  # the DMA layer allocates MSI doorbell IOVAs itself
            lo = iovad.iova_pfn(region.start)
            hi = iovad.iova_pfn(region.start + region.length - 1)
            if not iovad.reserve_iova(lo, hi):
                core.emit("warn", dev=_name(dev), message="reserved region overlaps a live IOVA")
    if domain.type is DomainType.DMA_FQ:
        if core.capable(dev, IommuCap.DEFERRED_FLUSH):
            cookie.init_fq()
        else:
            domain.type = DomainType.DMA
            core.emit("warn", dev=_name(dev), message="no deferred flush: DMA_FQ domain runs strict")
    return 0


class IommuDmaOps:
    """DMA ops for a device behind an IOMMU; the behaviour follows its group's default domain."""

    def __init__(self, core: IommuCore) -> None:
        self.core = core

    def _emit(self, kind: str, dev: Any, **fields: Any) -> None:
        if self.core.trace.enabled:
            self.core.trace.emit("host.iommu", kind, dev=_name(dev), **fields)

    def _domain(self, dev: Any) -> tuple[IommuDomain | None, IommuDmaCookie | None]:
        """The DMA domain and its cookie; (domain, None) for identity, (None, None) for none."""
        self.core.run_timers()
        domain = self.core.iommu_get_dma_domain(dev)
        if domain is None:
            return None, None
        cookie = domain.iova_cookie
        return domain, cookie if isinstance(cookie, IommuDmaCookie) else None

    def _direct(self) -> DmaDirectOps:
        return self.core.direct_ops()

    # -- map / unmap single ----------------------------------------------------------------------------
    def map_page(self, dev: Any, paddr: int, size: int, direction: DmaDirection) -> int:
        domain, cookie = self._domain(dev)
        if domain is not None and domain.type is DomainType.IDENTITY:
            return self._direct().map_page(dev, paddr, size, direction)
        prot = dma_info_to_prot(direction, bool(getattr(dev, "dma_coherent", False)))
        if domain is None or cookie is None or not prot or size <= 0:
            self._emit(
                "dma.map", dev, mode=_mode(domain), paddr=paddr, size=size, dma=None, error="cannot map"
            )
            return DMA_MAPPING_ERROR
        dma = self._iommu_map(dev, domain, cookie, paddr, size, prot, dma_get_mask(dev))
        self._emit("dma.map", dev, mode=_mode(domain), paddr=paddr, size=size, dma=_or_none(dma))
        return dma

    def _iommu_map(
        self,
        dev: Any,
        domain: IommuDomain,
        cookie: IommuDmaCookie,
        paddr: int,
        size: int,
        prot: Prot,
        mask: int,
    ) -> int:
        iovad = cookie.iovad
        offset = iovad.iova_offset(paddr)
        size = iovad.iova_align(size + offset)
        iova = cookie.alloc_iova(dev, size, mask)
        if not iova:
            self._emit("dma.iova_exhausted", dev, size=size, mask=mask)
            return DMA_MAPPING_ERROR
        if self.core.iommu_map(domain, iova, paddr - offset, size, prot):
            cookie.free_iova(iova, size, None)
            return DMA_MAPPING_ERROR
        return iova + offset

    def unmap_page(self, dev: Any, dma_addr: int, size: int, direction: DmaDirection) -> None:
        domain, cookie = self._domain(dev)
        if domain is not None and domain.type is DomainType.IDENTITY:
            self._direct().unmap_page(dev, dma_addr, size, direction)
            return
        if domain is None or cookie is None:
            return
        self._iommu_unmap(dev, domain, cookie, dma_addr, size)
        self._emit("dma.unmap", dev, mode=_mode(domain), dma=dma_addr, size=size)

    def _iommu_unmap(
        self, dev: Any, domain: IommuDomain, cookie: IommuDmaCookie, dma_addr: int, size: int
    ) -> None:
        iovad = cookie.iovad
        offset = iovad.iova_offset(dma_addr)
        iova = dma_addr - offset
        size = iovad.iova_align(size + offset)
        gather = IotlbGather()
        queued = cookie.fq is not None
        unmapped = self.core.iommu_unmap_fast(domain, iova, size, gather)
        if unmapped != size:
            self.core.emit(
                "warn", dev=_name(dev), message="unmapped less than was mapped", iova=iova, size=size
            )
        if not queued:
            self.core.iommu_iotlb_sync(domain, gather)
        cookie.free_iova(iova, size, gather if queued else None)

    # -- scatterlists ------------------------------------------------------------------------------------
    def map_sg(self, dev: Any, sg: list[ScatterEntry], direction: DmaDirection) -> int:
        domain, cookie = self._domain(dev)
        if domain is not None and domain.type is DomainType.IDENTITY:
            return self._direct().map_sg(dev, sg, direction)
        prot = dma_info_to_prot(direction, bool(getattr(dev, "dma_coherent", False)))
        if domain is None or cookie is None or not prot or not sg:
            self._emit("dma.map_sg", dev, mode=_mode(domain), nents=len(sg), count=0)
            return 0
        iovad = cookie.iovad
        slots: list[tuple[int, int, int]] = []  # (offset in first granule, aligned length, aligned paddr)
        total = 0
        for entry in sg:
            if entry.length <= 0:
                self._emit("dma.map_sg", dev, mode=_mode(domain), nents=len(sg), count=0)
                return 0
            offset = iovad.iova_offset(entry.paddr)
            aligned = iovad.iova_align(entry.length + offset)
            slots.append((offset, aligned, entry.paddr - offset))
            total += aligned
        iova = cookie.alloc_iova(dev, total, dma_get_mask(dev))
        if not iova:
            self._emit("dma.iova_exhausted", dev, size=total)
            return 0
        cursor = iova
        for _offset, aligned, base in slots:
            if self.core.iommu_map(domain, cursor, base, aligned, prot):
                if cursor > iova:
                    self._unmap_range(domain, cookie, iova, cursor - iova)
                cookie.free_iova(iova, total, None)
                self._emit("dma.map_sg", dev, mode=_mode(domain), nents=len(sg), count=0)
                return 0
            cursor += aligned
        count = self._finalise_sg(dev, sg, slots, iova)
        self._emit("dma.map_sg", dev, mode=_mode(domain), nents=len(sg), count=count, dma=iova, size=total)
        return count

    def _unmap_range(self, domain: IommuDomain, cookie: IommuDmaCookie, iova: int, size: int) -> None:
        gather = IotlbGather()
        self.core.iommu_unmap_fast(domain, iova, size, gather)
        self.core.iommu_iotlb_sync(domain, gather)

    @staticmethod
    def _finalise_sg(dev: Any, sg: list[ScatterEntry], slots: list[tuple[int, int, int]], iova: int) -> int:
        """Merge entries into as few DMA segments as IOVA contiguity, the maximum segment size and
        the segment boundary allow (Linux ``__finalise_sg``)."""
        max_len = getattr(dev, "dma_max_seg_size", None) or DEFAULT_MAX_SEG_SIZE
        seg_mask = getattr(dev, "dma_seg_boundary", None) or DEFAULT_SEG_BOUNDARY
        for entry in sg:
            entry.dma_address, entry.dma_length = DMA_MAPPING_ERROR, 0
        count = 0
        cur = -1
        cur_len = 0
        dma_addr = iova
        for entry, (offset, aligned, _base) in zip(sg, slots, strict=True):
            if cur_len and not offset and dma_addr & seg_mask and max_len - cur_len >= entry.length:
                cur_len += entry.length
            else:
                cur += 1
                count += 1
                cur_len = entry.length
                sg[cur].dma_address = dma_addr + offset
            sg[cur].dma_length = cur_len
            dma_addr += aligned
            if entry.length + offset < aligned:
                cur_len = 0  # this entry ends inside its last granule: nothing may follow it
        return count

    def unmap_sg(self, dev: Any, sg: list[ScatterEntry], direction: DmaDirection) -> None:
        domain, cookie = self._domain(dev)
        if domain is not None and domain.type is DomainType.IDENTITY:
            self._direct().unmap_sg(dev, sg, direction)
            return
        if domain is None or cookie is None or not sg or sg[0].dma_address == DMA_MAPPING_ERROR:
            return
        start = sg[0].dma_address
        end = start
        for entry in sg:
            if not entry.dma_length:
                break
            end = entry.dma_address + entry.dma_length
        self._iommu_unmap(dev, domain, cookie, start, end - start)
        self._emit("dma.unmap_sg", dev, mode=_mode(domain), dma=start, size=end - start)

    # -- coherent allocations -----------------------------------------------------------------------------
    def alloc(self, dev: Any, size: int) -> tuple[int, int] | None:
        domain, cookie = self._domain(dev)
        if domain is not None and domain.type is DomainType.IDENTITY:
            return self._direct().alloc(dev, size)
        mm = self.core.mm
        if domain is None or cookie is None or mm is None or size <= 0:
            self._emit("dma.alloc", dev, mode=_mode(domain), size=size, paddr=None, dma=None)
            return None
        size = _page_align(size)
        pa = mm.dma_alloc_coherent(size)
        if pa is None:
            self._emit("dma.alloc", dev, mode=_mode(domain), size=size, paddr=None, dma=None)
            return None
        prot = dma_info_to_prot(DmaDirection.BIDIRECTIONAL, bool(getattr(dev, "dma_coherent", False)))
        dma = self._iommu_map(dev, domain, cookie, pa, size, prot, dma_get_coherent_mask(dev))
        if dma == DMA_MAPPING_ERROR:
            mm.dma_free_coherent(pa, size)
            self._emit("dma.alloc", dev, mode=_mode(domain), size=size, paddr=None, dma=None)
            return None
        self._emit("dma.alloc", dev, mode=_mode(domain), size=size, paddr=pa, dma=dma)
        return pa, dma

    def free(self, dev: Any, size: int, cpu_pa: int, dma_addr: int) -> None:
        domain, cookie = self._domain(dev)
        if domain is not None and domain.type is DomainType.IDENTITY:
            self._direct().free(dev, size, cpu_pa, dma_addr)
            return
        size = _page_align(size)
        if domain is not None and cookie is not None:
            self._iommu_unmap(dev, domain, cookie, dma_addr, size)
        if self.core.mm is not None:
            self.core.mm.dma_free_coherent(cpu_pa, size)
        self._emit("dma.free", dev, mode=_mode(domain), size=size, paddr=cpu_pa, dma=dma_addr)


def _mode(domain: IommuDomain | None) -> str:
    return "none" if domain is None else domain.type.value


def _or_none(dma: int) -> int | None:
    return None if dma == DMA_MAPPING_ERROR else dma
