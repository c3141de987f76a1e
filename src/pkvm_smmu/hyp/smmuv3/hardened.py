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
- Shadow STE writes (finding 6): Linux's entry-update algorithm (``smmu_lib.entry``), so every
  synced intermediate state is the old or the new STE, or V=0.
- The trap's work (finding 8): a PROD more than a queue ahead of the emulated CONS is refused, one
  trap handles at most 128 host commands (the host's CMDQ_CONS reads, which it polls while it
  waits, continue the batch), and copying stops when the shadow queue stays full.
- The hyp's invalidation path (finding 9): the hyp owns CR0.CMDQEN (the host's bit is emulated),
  accepts only the commands this SMMU implements, acknowledges command errors itself as
  ``arm_smmu_cmdq_skip_err`` does (GERROR.CMDQ_ERR and GERRORN.CMDQ_ERR are its own), and an
  invalidation that does not complete fences the SMMU: SMMUEN stays 0 at the hardware, so GBPA's
  abort applies to every stream and no stale cache entry is used again.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from pkvm_smmu.arch.commands import Opcode, cfgi_all
from pkvm_smmu.arch.queues import q_used
from pkvm_smmu.arch.registers import CR0, EVENTQ_BASE, GERROR, IDR0, Reg, StallModel
from pkvm_smmu.arch.strtab import L1STD, STE, STE_SIZE, Eats, SteConfig
from pkvm_smmu.hyp.contracts import HOST, PageState
from pkvm_smmu.hyp.smmuv3.cmdq import wait_for
from pkvm_smmu.hyp.smmuv3.policy import (
    POLICIES,
    STRTAB_SPLIT,
    CmdAction,
    CommandVerdict,
    IdentityS2,
    ShadowHow,
    SmmuContext,
    V4Policy,
)
from pkvm_smmu.machine.memory import PAGE_SHIFT, PAGE_SIZE
from pkvm_smmu.smmu_lib.entry import SteWriterOps, ste_used, write_entry

_L2PTR_MASK = ((1 << 52) - 1) & ~0x3F
_L2_SIZE = STE_SIZE << STRTAB_SPLIT
_ATSCHK = CR0.ATSCHK.in_place_mask
_CMDQEN = CR0.CMDQEN.in_place_mask
_SMMUEN = CR0.SMMUEN.in_place_mask
_CMDQ_ERR = GERROR.CMDQ_ERR.in_place_mask
# Commands every SMMU implements; the rest need a feature (IHI 0070 §4: CERROR_ILL without it).
_ALWAYS_IMPLEMENTED = frozenset(
    {
        Opcode.PREFETCH_CONFIG,
        Opcode.PREFETCH_ADDR,
        Opcode.CFGI_STE,
        Opcode.CFGI_STE_RANGE,
        Opcode.TLBI_NSNH_ALL,
        Opcode.SYNC,
    }
)
_STAGE1 = frozenset(
    {
        Opcode.CFGI_CD,
        Opcode.CFGI_CD_ALL,
        Opcode.TLBI_NH_ALL,
        Opcode.TLBI_NH_ASID,
        Opcode.TLBI_NH_VA,
        Opcode.TLBI_NH_VAA,
    }
)
_STAGE2 = frozenset({Opcode.TLBI_S12_VMALL, Opcode.TLBI_S2_IPA})
_STALLS = frozenset({Opcode.RESUME, Opcode.STALL_TERM})
_MSI_ADDRESS_REGISTERS = frozenset(
    {int(Reg.GERROR_IRQ_CFG0), int(Reg.EVENTQ_IRQ_CFG0), int(Reg.PRIQ_IRQ_CFG0)}
)
_QUEUE_BASES = {
    int(Reg.EVENTQ_BASE): ("evtq", 32, CR0.EVENTQEN),
    int(Reg.PRIQ_BASE): ("priq", 16, CR0.PRIQEN),
}


@dataclass
class _Smmu:
    """What the hardened rules keep per SMMU."""

    implemented: frozenset[int]
    fenced: bool = False
    queues: dict[str, Any] = field(default_factory=dict)  # event/PRI queues shared and pinned


def implemented_opcodes(idr0: int) -> frozenset[int]:
    """The command opcodes an SMMU with this IDR0 executes (the others are CERROR_ILL)."""
    opcodes = set(_ALWAYS_IMPLEMENTED)
    if IDR0.S1P.get(idr0):
        opcodes |= _STAGE1
    if IDR0.S2P.get(idr0):
        opcodes |= _STAGE2
    if IDR0.ATS.get(idr0):
        opcodes.add(Opcode.ATC_INV)
    if IDR0.PRI.get(idr0):
        opcodes.add(Opcode.PRI_RESP)
    if IDR0.STALL_MODEL.get(idr0) != StallModel.TERMINATE:
        opcodes |= _STALLS
    return frozenset(opcodes)


class HardenedPolicy(V4Policy):
    """v4 plus the fixes of docs/findings.md."""

    name = "hardened"
    bounded_cmdq_traps = True
    recovers_cmdq_errors = True
    # Linux submits at most CMDQ_BATCH_ENTRIES (64) commands and a CMD_SYNC per PROD write.
    cmdq_batch_per_trap = 128

    def __init__(self) -> None:
        self._smmus: dict[str, _Smmu] = {}

    def _state(self, smmu: SmmuContext) -> _Smmu:
        state = self._smmus.get(smmu.name)
        if state is None:
            state = self._smmus[smmu.name] = _Smmu(implemented_opcodes(_hyp(smmu)._hw_read(Reg.IDR0, 4)))
        return state

    # -- finding 5 ------------------------------------------------------------------------------------------
    def takeover(self, smmu: SmmuContext) -> None:
        _hyp(smmu).iommu.mem_protect.strict_mmio_checks = True

    # -- findings 1 and 9: CR0 bits the hyp owns ---------------------------------------------------------
    def _owned_cr0(self, smmu: SmmuContext) -> int:
        return _ATSCHK | _CMDQEN | (_SMMUEN if self._state(smmu).fenced else 0)

    def cr0_hardware(self, smmu: SmmuContext, host_cr0: int) -> int:
        value = host_cr0 | _ATSCHK
        if _hyp(smmu).cmdq is not None:
            value |= _CMDQEN  # the shadow queue runs whatever the host writes
        if self._state(smmu).fenced:
            value &= ~_SMMUEN
        return value

    def register_read(self, smmu: SmmuContext, offset: int, size: int, value: int) -> int:
        hyp = _hyp(smmu)
        if offset in (int(Reg.CR0), int(Reg.CR0ACK)):
            # The host polls CR0ACK for the value it wrote: it sees its own bits where the hyp
            # owns the hardware's.
            owned = self._owned_cr0(smmu)
            return value & ~owned | hyp.cr0 & owned
        if offset == int(Reg.GERROR):
            return value & ~_CMDQ_ERR | hyp._hw_read(Reg.GERRORN, 4) & _CMDQ_ERR
        return value

    # -- finding 8: the work of one trap -----------------------------------------------------------------
    def cmdq_prod_write(self, smmu: SmmuContext, prod: int, cons: int, log2size: int) -> bool:
        if q_used(prod, cons, log2size) > 1 << log2size:
            smmu.warn("CMDQ_PROD more than a queue ahead of CONS: refused", prod=prod, cons=cons)
            return False
        return True

    # -- finding 9: commands and invalidations ----------------------------------------------------------
    def filter_command(self, smmu: SmmuContext, command: int) -> CommandVerdict:
        opcode = command & 0xFF
        if opcode not in self._state(smmu).implemented:
            smmu.warn("command this SMMU does not implement: dropped", opcode=opcode)
            return CommandVerdict(CmdAction.DROP, (), "not implemented")
        return super().filter_command(smmu, command)

    def invalidation_failed(self, smmu: SmmuContext, what: str) -> None:
        state = self._state(smmu)
        smmu.warn(f"{what} did not complete: SMMU fenced", already=state.fenced)
        if state.fenced:
            return
        state.fenced = True
        hyp = _hyp(smmu)
        hyp._hw_write(Reg.CR0, 4, self.cr0_hardware(smmu, hyp.cr0))
        if wait_for(hyp, lambda: not hyp._hw_read(Reg.CR0ACK, 4) & _SMMUEN):
            smmu.warn("SMMUEN did not clear")

    # -- finding 6: the shadow STE write order ------------------------------------------------------------
    def install_shadow_ste(self, smmu: SmmuContext, ste_pa: int, target: int) -> None:
        hyp = _hyp(smmu)
        data = hyp._read_mem(ste_pa, STE_SIZE)  # the hyp's own shadow entry
        if data is None:
            return
        current = list(STE.to_words(STE.from_bytes(data)))
        # Bits the configuration ignores are not written: the algorithm moves only used bits.
        target_words = STE.to_words(target & ste_used(target))
        write_entry(_ShadowSteWriter(self, smmu, ste_pa), current, target_words)

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
        # The SMMU ignores the base while the queue is enabled or not yet acknowledged as off.
        if (hyp.cr0 | hyp._hw_read(Reg.CR0ACK, 4)) & enable.in_place_mask:
            smmu.warn(f"{what} base written while enabled", value=value)
            return None
        log2 = min(EVENTQ_BASE.LOG2SIZE.get(value), 19)
        start = EVENTQ_BASE.ADDR.get_address(value)
        size = entry_size << log2
        pinned = self._state(smmu).queues
        old = pinned.get(what)
        if old is not None and (old.start, old.size) == (start, size):
            return value
        # The SMMU ignores address bits below the queue's size: a misaligned base is really the
        # aligned one below it, which is not what would be checked.
        if start & (size - 1) or not _host_owned(hyp, start, size):
            # Dropped: the SMMU keeps the old base, so the old queue stays pinned.
            smmu.warn(f"{what} base is not host-owned memory: dropped", value=value)
            return None
        shared = hyp._share(what, start, size)
        if not shared.usable:
            hyp._unshare(shared)
            return None
        if old is not None:
            hyp._unshare(old)  # only once the SMMU is given the new base
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


class _ShadowSteWriter(SteWriterOps):
    """Writes a live shadow STE; a sync is the hyp's CFGI_ALL + CMD_SYNC."""

    def __init__(self, policy: HardenedPolicy, smmu: SmmuContext, ste_pa: int) -> None:
        self.policy = policy
        self.smmu = smmu
        self.ste_pa = ste_pa

    def write_qword(self, index: int, value: int) -> None:
        self.smmu.write_u64(self.ste_pa + 8 * index, value)

    def sync(self) -> None:
        if self.smmu.send_cmd(cfgi_all()):
            self.policy.invalidation_failed(self.smmu, "CFGI_ALL for a shadow STE")


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


__all__ = ["HardenedPolicy", "implemented_opcodes"]

POLICIES["hardened"] = HardenedPolicy
