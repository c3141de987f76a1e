"""Queues and command submission (``arm_smmu_cmdq_issue_cmdlist`` and friends).

Commands are written into the host-allocated queue memory, PROD is advanced with one register
write, and a CMD_SYNC is waited for on the modeled clock (``ARM_SMMU_POLL_TIMEOUT_US``):

- with MSI polling (IDR0.MSI on a coherent SMMU) the CMD_SYNC is CS=SIG_IRQ with MSIADDR at its
  own queue slot and MSIDATA = the slot index, and completion is the SMMU's MSI write landing
  there (pKVM hides IDR0.MSI exactly so that no CMD_SYNC writes into the command queue);
- otherwise CS=SIG_SEV and completion is CMDQ_CONS moving past the CMD_SYNC.

Also here: batches (``arm_smmu_cmdq_batch``), range TLBI construction
(``arm_smmu_tlb_inv_range`` with IDR3.RIL: TG/SCALE/NUM/TTL chunks; without it one command per
granule) and ATC_INV construction (``arm_smmu_atc_inv_to_cmd``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pkvm_smmu.arch.commands import CMD_SIZE, Opcode, SyncCs, build_command, pretty_command
from pkvm_smmu.arch.registers import CMDQ_CONS, Shareability
from pkvm_smmu.host.arm_smmu_v3.features import (
    ARM_SMMU_POLL_SPIN_COUNT,
    ARM_SMMU_POLL_TIMEOUT_US,
    ATC_INV_SIZE_ALL,
    CMDQ_BATCH_ENTRIES,
    CMDQ_TLBI_RANGE_NUM_MAX,
    IOMMU_NO_PASID,
    Opt,
)
from pkvm_smmu.host.arm_smmu_v3.mmio import Mmio
from pkvm_smmu.trace.bus import TraceBus

ARM_SMMU_MEMATTR_OIWB = 0xF
Q_OVERFLOW_FLAG = 1 << 31


@dataclass
class Queue:
    """``arm_smmu_queue``: the memory, the PROD/CONS register addresses and the shadow indices."""

    base_dma: int
    max_n_shift: int
    ent_size: int
    prod_reg: int  # absolute addresses of the PROD/CONS registers
    cons_reg: int
    prod: int = 0  # llq.prod / llq.cons, with the overflow flag kept in bit 31
    cons: int = 0
    q_base: int = 0  # value for the *_BASE register

    # Q_IDX / Q_WRP / Q_OVF
    def idx(self, p: int) -> int:
        return p & ((1 << self.max_n_shift) - 1)

    def wrp(self, p: int) -> int:
        return p & (1 << self.max_n_shift)

    @staticmethod
    def ovf(p: int) -> int:
        return p & Q_OVERFLOW_FLAG

    def entry_addr(self, p: int) -> int:
        return self.base_dma + self.idx(p) * self.ent_size

    @property
    def nents(self) -> int:
        return 1 << self.max_n_shift

    @property
    def size_bytes(self) -> int:
        return self.nents * self.ent_size

    def has_space(self, n: int) -> bool:
        prod, cons = self.idx(self.prod), self.idx(self.cons)
        same_wrap = self.wrp(self.prod) == self.wrp(self.cons)
        space = self.nents - (prod - cons) if same_wrap else cons - prod
        return space >= n

    def full(self) -> bool:
        return self.idx(self.prod) == self.idx(self.cons) and self.wrp(self.prod) != self.wrp(self.cons)

    def empty(self) -> bool:
        return self.idx(self.prod) == self.idx(self.cons) and self.wrp(self.prod) == self.wrp(self.cons)

    def consumed(self, cons: int, prod: int) -> bool:
        """``queue_consumed``: has ``cons`` moved past the entry at ``prod``?"""
        if self.wrp(cons) == self.wrp(prod):
            return self.idx(cons) > self.idx(prod)
        return self.idx(cons) <= self.idx(prod)

    def inc_prod_n(self, p: int, n: int) -> int:
        value = (self.wrp(p) | self.idx(p)) + n
        return self.ovf(p) | self.wrp(value) | self.idx(value)

    def inc_cons(self) -> None:
        self.cons = self.inc_prod_n(self.cons, 1)


# -- command construction -------------------------------------------------------------------------


def build_sync_cmd(msiaddr: int = 0, msidata: int = 0) -> int:
    """CMD_SYNC as ``arm_smmu_cmdq_build_cmd`` makes it: SIG_IRQ with an MSI address, else SIG_SEV."""
    cs = SyncCs.IRQ if msiaddr else SyncCs.SEV
    fields = {"CS": cs, "MSH": Shareability.ISH, "MSIATTR": ARM_SMMU_MEMATTR_OIWB}
    if msiaddr:
        fields.update(MSIADDR=msiaddr, MSIDATA=msidata)
    return build_command(Opcode.SYNC, **fields)


def tlb_inv_range_cmds(
    opcode: Opcode,
    iova: int,
    size: int,
    granule: int,
    leaf: bool,
    pgsize_bitmap: int,
    range_inv: bool,
    **ids: int,
) -> list[int]:
    """The TLBI commands covering ``[iova, iova + size)`` (``__arm_smmu_tlb_inv_range``).

    ``ids`` are ASID/VMID. With RIL, each command covers NUM+1 (NUM up to 31) times 2^SCALE
    leaf pages, taking 5 bits of the remaining page count per command; TTL names the level of
    ``granule`` for leaf invalidations. Without RIL, one command per ``granule``.
    """
    if not size:
        return []
    end = iova + size
    cmds: list[int] = []
    extra: dict[str, int] = {"LEAF": int(leaf)}
    num_pages = 0
    tg = 0
    inv_range = granule
    if range_inv:
        tg = (pgsize_bitmap & -pgsize_bitmap).bit_length() - 1  # the leaf page size (log2)
        num_pages = size >> tg
        extra["TG"] = (tg - 10) // 2  # 12/14/16 -> 1/2/3
        if leaf:
            extra["TTL"] = 4 - ((granule.bit_length() - 1 - 3) // (tg - 3))
        elif (num_pages & CMDQ_TLBI_RANGE_NUM_MAX) == 1:
            # Avoid SCALE=NUM=0 with TTL=0 (reserved): invalidate one page more.
            num_pages += 1
    while iova < end:
        fields = dict(ids, **extra)
        if range_inv:
            scale = (num_pages & -num_pages).bit_length() - 1
            num = (num_pages >> scale) & CMDQ_TLBI_RANGE_NUM_MAX
            fields["SCALE"] = scale
            fields["NUM"] = num - 1
            inv_range = num << (scale + tg)
            num_pages -= num << scale
        fields["ADDR"] = iova & ~0xFFF
        cmds.append(build_command(opcode, **fields))
        iova += inv_range
    return cmds


def atc_inv_cmd(sid: int, ssid: int, iova: int, size: int) -> int:
    """CMD_ATC_INV covering ``[iova, iova + size)`` rounded out to a naturally aligned power of two
    of 4 KiB pages (``arm_smmu_atc_inv_to_cmd``); ``size`` 0 invalidates everything."""
    fields: dict[str, int] = {"SID": sid}
    if ssid != IOMMU_NO_PASID:
        fields.update(SSV=1, SSID=ssid)
    if not size:
        fields["SIZE"] = ATC_INV_SIZE_ALL
        return build_command(Opcode.ATC_INV, **fields)
    page_start = iova >> 12
    page_end = (iova + size - 1) >> 12
    log2_span = (page_start ^ page_end).bit_length()
    page_start &= ~((1 << log2_span) - 1)
    fields.update(SIZE=log2_span, ADDR=page_start << 12)
    return build_command(Opcode.ATC_INV, **fields)


# -- submission ---------------------------------------------------------------------------------


class CommandQueue:
    """``arm_smmu_cmdq``. One CPU issues at a time in the model, so no owner/valid-map dance:
    commands are written, PROD is published with one write, and a CMD_SYNC is waited for."""

    def __init__(
        self,
        mmio: Mmio,
        q: Queue,
        options: Callable[[], Opt],
        trace: TraceBus,
        component: str,
    ) -> None:
        self.mmio = mmio
        self.q = q
        self._options = options
        self.trace = trace
        self.component = component

    def _refresh_cons(self) -> int:
        cons = self.mmio.readl(self.q.cons_reg)
        self.q.cons = CMDQ_CONS.RD.get(cons)
        return cons

    def _wait_for_space(self, n: int) -> int:
        q = self.q
        if q.has_space(n):
            return 0

        def space() -> bool:
            self._refresh_cons()
            return q.has_space(n)

        ret = self.mmio.poll_timeout(space, ARM_SMMU_POLL_TIMEOUT_US)
        if ret:
            self._log("cmdq.timeout", why="CMDQ timeout", prod=q.prod, cons=q.cons)
        return ret

    def _write_entries(self, cmds: Sequence[int], prod: int) -> None:
        q = self.q
        # Contiguous runs go in one store (the queue wraps at most once).
        i = 0
        while i < len(cmds):
            slot = q.idx(q.inc_prod_n(prod, i))
            run = min(len(cmds) - i, q.nents - slot)
            data = b"".join(c.to_bytes(CMD_SIZE, "little") for c in cmds[i : i + run])
            self.mmio.write_mem(q.base_dma + slot * CMD_SIZE, data)
            i += run

    def issue_cmdlist(self, cmds: Sequence[int], sync: bool) -> int:
        """0, or ``-ETIMEDOUT`` when the queue stays full or the CMD_SYNC does not complete."""
        q = self.q
        n = len(cmds)
        if not n and not sync:
            return 0
        ret = self._wait_for_space(n + int(sync))
        if ret:
            return ret
        prod = q.prod
        todo = list(cmds)
        sync_prod = q.inc_prod_n(prod, n)
        msipoll = bool(self._options() & Opt.MSIPOLL)
        if sync:
            slot = q.idx(sync_prod)
            if msipoll:
                todo.append(build_sync_cmd(q.base_dma + slot * CMD_SIZE, slot))
            else:
                todo.append(build_sync_cmd())
        self._write_entries(todo, prod)
        q.prod = q.inc_prod_n(prod, len(todo))
        if self.trace.enabled:
            for c in todo:
                self.trace.emit(self.component, "cmdq.issue", command=pretty_command(c))
        # Publish: the stores above are ordered before the PROD write (dma_wmb in Linux).
        self.mmio.writel(q.prod, q.prod_reg)
        if not sync:
            return 0
        ret = self._poll_until_msi(sync_prod) if msipoll else self._poll_until_consumed(sync_prod)
        if ret:
            cons = self.mmio.readl(q.cons_reg)
            hw_prod = self.mmio.readl(q.prod_reg)
            self._log("cmdq.sync_timeout", at=sync_prod, hwprod=hw_prod, hwcons=cons)
        return ret

    def _poll_until_msi(self, sync_prod: int) -> int:
        """The SMMU writes MSIDATA (the slot index) over the first word of the CMD_SYNC."""
        q = self.q
        address = q.entry_addr(sync_prod)
        slot = q.idx(sync_prod)
        ret = self.mmio.poll_timeout(lambda: self.mmio.read_u32(address) == slot, ARM_SMMU_POLL_TIMEOUT_US)
        # The SYNC's completion means everything before it was consumed too.
        q.cons = q.prod if ret else q.inc_prod_n(sync_prod, 1)
        return ret

    def _poll_until_consumed(self, sync_prod: int) -> int:
        q = self.q
        spins = [0]

        def consumed() -> bool:
            self._refresh_cons()
            spins[0] += 1
            return q.consumed(q.cons, sync_prod)

        # Linux spins ARM_SMMU_POLL_SPIN_COUNT times (or WFEs with SEV) before backing off.
        for _ in range(ARM_SMMU_POLL_SPIN_COUNT):
            if consumed():
                return 0
        return self.mmio.poll_timeout(consumed, ARM_SMMU_POLL_TIMEOUT_US)

    def _log(self, kind: str, **fields: object) -> None:
        if self.trace.enabled:
            self.trace.emit(self.component, kind, **fields)

    # -- convenience --------------------------------------------------------------------------
    def issue_cmd(self, cmd: int) -> int:
        return self.issue_cmdlist([cmd], False)

    def issue_cmd_with_sync(self, cmd: int) -> int:
        return self.issue_cmdlist([cmd], True)

    def sync(self) -> int:
        return self.issue_cmdlist([], True)

    def batch(self) -> CmdqBatch:
        return CmdqBatch(self)


class CmdqBatch:
    """``arm_smmu_cmdq_batch``: commands gathered and issued with one CMD_SYNC at submit."""

    def __init__(self, cmdq: CommandQueue) -> None:
        self.cmdq = cmdq
        self.cmds: list[int] = []
        self.ret = 0

    def add(self, cmd: int) -> None:
        opts = self.cmdq._options()
        if len(self.cmds) == CMDQ_BATCH_ENTRIES - 1 and opts & Opt.CMDQ_FORCE_SYNC:
            self.ret = self.cmdq.issue_cmdlist(self.cmds, True) or self.ret
            self.cmds = []
        if len(self.cmds) == CMDQ_BATCH_ENTRIES:
            self.ret = self.cmdq.issue_cmdlist(self.cmds, False) or self.ret
            self.cmds = []
        self.cmds.append(cmd)

    def submit(self) -> int:
        ret = self.cmdq.issue_cmdlist(self.cmds, True)
        self.cmds = []
        return ret or self.ret

    def __len__(self) -> int:
        return len(self.cmds)


__all__ = [
    "ARM_SMMU_MEMATTR_OIWB",
    "Q_OVERFLOW_FLAG",
    "CmdqBatch",
    "CommandQueue",
    "Queue",
    "atc_inv_cmd",
    "build_sync_cmd",
    "tlb_inv_range_cmds",
]
