"""The ``hardened`` policy: v4 with a fix for every violation the verification tools found
(docs/findings.md). Each override names the finding it closes.

- ATS (finding 1): CR0.ATSCHK stays set whatever the host writes; a host EATS=TRANS becomes
  S1CHK when the shadow STE is nested (Translated traffic still goes through the identity stage 2)
  and 0 otherwise.
- NESTED host STEs (finding 2): treated as stage 1, nested under the hyp's identity stage 2 (the
  host's stage-2 fields are overwritten like any other's).
- L1 descriptors (finding 3): a CFGI_STE is shadowed only if the host's L1 descriptor still points
  at the L2 table the hyp shared and pinned; a first L2 must be host-owned memory. The descriptor
  is read once per trap (v4 reads it twice, a double fetch).
- EVENTQ_BASE/PRIQ_BASE (finding 4): emulated; a base is accepted only if the whole queue is
  host-owned memory, which is then shared and pinned until the base changes. The *_IRQ_CFG0 MSI
  address registers are not written (IDR0.MSI is already hidden from the host).
- MMIO donation (finding 5): ``strict_mmio_checks`` on, the v5 checks Will asked for.
"""

from __future__ import annotations

import errno
from typing import Any

from pkvm_smmu.arch.registers import CR0, EVENTQ_BASE, Reg
from pkvm_smmu.arch.strtab import L1STD, STE, STE_SIZE, Eats, SteConfig
from pkvm_smmu.hyp.contracts import HOST, PageState
from pkvm_smmu.hyp.smmuv3.policy import (
    POLICIES,
    STRTAB_SPLIT,
    IdentityS2,
    ShadowHow,
    SmmuContext,
    V4Policy,
)
from pkvm_smmu.machine.memory import PAGE_SHIFT, PAGE_SIZE

_L2PTR_MASK = ((1 << 52) - 1) & ~0x3F
_L2_SIZE = STE_SIZE << STRTAB_SPLIT
_ATSCHK = CR0.ATSCHK.in_place_mask
_MSI_ADDRESS_REGISTERS = frozenset(
    {int(Reg.GERROR_IRQ_CFG0), int(Reg.EVENTQ_IRQ_CFG0), int(Reg.PRIQ_IRQ_CFG0)}
)
_QUEUE_BASES = {
    int(Reg.EVENTQ_BASE): ("evtq", 32, CR0.EVENTQEN),
    int(Reg.PRIQ_BASE): ("priq", 16, CR0.PRIQEN),
}


class HardenedPolicy(V4Policy):
    """v4 plus the fixes of docs/findings.md."""

    name = "hardened"

    # -- finding 5 ------------------------------------------------------------------------------------------
    def takeover(self, smmu: SmmuContext) -> None:
        _hyp(smmu).iommu.mem_protect.strict_mmio_checks = True

    # -- finding 1: ATSCHK ----------------------------------------------------------------------------------
    def cr0_write(self, smmu: SmmuContext, value: int) -> int:
        _hyp(smmu).__dict__["host_cr0_atschk"] = value & _ATSCHK
        return value | _ATSCHK

    def register_read(self, smmu: SmmuContext, offset: int, size: int, value: int) -> int:
        # The host polls CR0ACK for the value it wrote: show it its own ATSCHK, not the forced one.
        if offset in (int(Reg.CR0), int(Reg.CR0ACK)):
            return value & ~_ATSCHK | _hyp(smmu).__dict__.get("host_cr0_atschk", 0)
        return value

    # -- finding 4: queue bases and MSI addresses -------------------------------------------------------
    def passthrough_write(self, smmu: SmmuContext, offset: int, size: int, value: int) -> int | None:
        if offset in _MSI_ADDRESS_REGISTERS:
            smmu.warn("MSI address register write dropped", offset=offset, value=value)
            return None
        queue = _QUEUE_BASES.get(offset)
        if queue is None:
            return value
        what, entry_size, enable = queue
        hyp = _hyp(smmu)
        if hyp.cr0 & enable.in_place_mask:
            smmu.warn(f"{what} base written while enabled", value=value)
            return None
        log2 = min(EVENTQ_BASE.LOG2SIZE.get(value), 19)
        start = EVENTQ_BASE.ADDR.get_address(value)
        pinned: dict[str, Any] = hyp.__dict__.setdefault("hardened_queues", {})
        old = pinned.pop(what, None)
        if old is not None:
            hyp._unshare(old)
        size = entry_size << log2
        # The SMMU ignores address bits below the queue's size: a misaligned base is really the
        # aligned one below it, which is not what would be checked.
        if start & (size - 1) or not _host_owned(hyp, start, size):
            smmu.warn(f"{what} base is not host-owned memory: dropped", value=value)
            return None
        shared = hyp._share(what, start, size)
        if not shared.usable:
            hyp._unshare(shared)
            return None
        pinned[what] = shared
        return value

    # -- findings 1 and 2: the shadow STE ------------------------------------------------------------------
    def transform_ste(self, smmu: SmmuContext, host_ste: int, s2: IdentityS2) -> tuple[int, ShadowHow]:
        if STE.V.get(host_ste) and STE.CONFIG.get(host_ste) == SteConfig.NESTED:
            host_ste = STE.CONFIG.set(host_ste, SteConfig.S1_TRANS)  # nested under the identity
        ste, how = super().transform_ste(smmu, host_ste, s2)
        if how is ShadowHow.NESTED:
            eats = Eats.S1CHK if STE.EATS.get(ste) in (Eats.TRANS, Eats.S1CHK) else Eats.ABT
        else:
            eats = Eats.ABT
        return STE.EATS.set(ste, eats), how

    # -- finding 3: L1 descriptors ---------------------------------------------------------------------
    def cfgi_ste(self, smmu: SmmuContext, sid: int, leaf: bool) -> None:
        if not leaf:
            smmu.warn("CFGI_STE with Leaf=0 not shadowed", sid=sid)
            return
        hyp = _hyp(smmu)
        if not hyp.two_level:
            smmu.reshadow_ste(sid)
            return
        shared = hyp.host_strtab
        idmap = hyp.iommu.idmap
        if shared is None or not shared.usable or idmap is None:
            smmu.warn("host stream table not shared: STE not shadowed", sid=sid)
            return
        index = sid >> STRTAB_SPLIT
        if index >= hyp.num_l1_ents:
            smmu.warn("SID beyond the stream table", sid=sid)
            return
        desc = hyp._read_u64(shared.start + index * 8)  # the one read of the host's descriptor
        if desc is None or not L1STD.SPAN.get(desc):
            smmu.warn("host STE not found", sid=sid)
            return
        host_l2 = desc & _L2PTR_MASK
        pinned = hyp.host_l2.get(index)
        if pinned is not None:
            if not pinned.usable or pinned.start != host_l2:
                smmu.warn("host L1 descriptor repointed: STE not shadowed", sid=sid, desc=desc)
                return
        else:
            if not _host_owned(hyp, host_l2, _L2_SIZE):
                smmu.warn("host L2 table is not host-owned memory: STE not shadowed", sid=sid, desc=desc)
                return
            if self._shadow_l2(hyp, index, host_l2):
                return
        hyp_ptr = hyp._ste_ptr(sid, hyp.strtab_base)
        if hyp_ptr is None:
            smmu.warn("no shadow L2 table", sid=sid)
            return
        host_ptr = host_l2 + (sid & ((1 << STRTAB_SPLIT) - 1)) * STE_SIZE
        data = hyp._read_mem(host_ptr, STE_SIZE)
        if data is None:
            return
        target, how = self.transform_ste(
            smmu, STE.from_bytes(data), IdentityS2(idmap.vtcr_fields(), idmap.root)
        )
        self.install_shadow_ste(smmu, hyp_ptr, target)
        if hyp.trace.enabled:
            hyp.trace.emit(
                "hyp.smmuv3", "ste.shadow", smmu=hyp.name, sid=sid, how=how.value, ste=STE.pretty(target)
            )

    @staticmethod
    def _shadow_l2(hyp: Any, index: int, host_l2: int) -> int:
        """v4's shadow L2 allocation, with the host L2 taken from the descriptor already read."""
        shared = hyp._share("l2", host_l2, _L2_SIZE)
        if not shared.usable:
            hyp._unshare(shared)
            hyp.warn("host L2 table not shared: STE not shadowed", index=index)
            return -errno.EPERM
        l2 = hyp.iommu.pool.alloc_pages(_L2_SIZE // PAGE_SIZE)
        if l2 is None:
            hyp._unshare(shared)
            return -errno.ENOMEM
        hyp.host_l2[index] = shared
        hyp.write_u64(hyp.strtab_base + index * 8, L1STD.encode(SPAN=STRTAB_SPLIT + 1) | l2)
        return 0


def _hyp(smmu: SmmuContext) -> Any:
    """The hyp's SMMU object behind the policy's context (``HypSmmuV3``): the fixes need its
    sharing helpers and shadow state, which the narrow context does not expose."""
    return smmu


def _host_owned(hyp: Any, start: int, size: int) -> bool:
    """Is ``[start, start + size)`` RAM the host owns outright (so the hyp may share and pin it)?"""
    mp = hyp.iommu.mem_protect
    if size <= 0 or not hyp.iommu.bus.is_ram(start, size):
        return False
    for pfn in range(start >> PAGE_SHIFT, (start + size + PAGE_SIZE - 1) >> PAGE_SHIFT):
        if mp.owner_of(pfn) != HOST or mp.host_state(pfn) not in (PageState.OWNED, PageState.SHARED_OWNED):
            return False
        if (
            mp.host_state(pfn) is PageState.SHARED_OWNED
            and mp.hyp_state(pfn) is not PageState.SHARED_BORROWED
        ):
            return False  # shared with a guest
    return True


__all__ = ["HardenedPolicy"]

POLICIES["hardened"] = HardenedPolicy
