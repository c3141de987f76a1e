"""The hyp's command queue on one SMMU (v4 patches 20-21, 27): the shadow queue the SMMU consumes.

Host commands are copied in one by one (``add_cmd_raw``, after the filter); the hyp's own commands
go through ``add_cmd``/``sync``/``send_cmd``. Completion is the queue draining (CONS catching up
with PROD), polled on the modeled clock until ``ARM_SMMU_POLL_TIMEOUT_US``: the hyp hides MSIs, so
no CMD_SYNC ever writes back into a queue. Like the posted ``smmu_add_cmd_raw``, every command
is published with its own PROD write, so the SMMU starts on it at once.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Protocol

from pkvm_smmu.arch.commands import CMD_SIZE, Opcode, SyncCs, build_command
from pkvm_smmu.arch.queues import q_empty, q_full, q_inc, q_slot
from pkvm_smmu.arch.registers import CMDQ_CONS, GERROR, CmdqError, Reg, Shareability

ARM_SMMU_POLL_TIMEOUT_US = 1_000_000
ARM_SMMU_MEMATTR_OIWB = 0xF
CMDQ_TLBI_RANGE_NUM_MAX = 31
_FIRST_STEP_NS = 50
_MAX_STEP_NS = 64_000
_CMDQ_ERR = GERROR.CMDQ_ERR.in_place_mask


class HypSmmuIo(Protocol):
    """The EL2 view of one SMMU the queue needs: registers, memory and time."""

    def read_reg(self, reg: Reg, size: int = 4) -> int: ...

    def write_reg(self, reg: Reg, value: int, size: int = 4) -> None: ...

    def write_mem(self, pa: int, data: bytes) -> None: ...

    def now_ns(self) -> int: ...

    def poll_until(
        self, condition: Callable[[], bool], deadline_ns: int, first_step_ns: int, max_step_ns: int
    ) -> bool:
        """``condition()`` held at a poll before ``deadline_ns`` (``Clock.poll_backoff``)."""
        ...

    def trace_command(self, command: int, origin: str) -> None: ...

    def warn(self, message: str, **fields: object) -> None: ...


def sync_command() -> int:
    """CMD_SYNC as ``arm_smmu_cmdq_build_cmd`` builds it without an MSI address: SIG_SEV."""
    return build_command(Opcode.SYNC, CS=SyncCs.SEV, MSH=Shareability.ISH, MSIATTR=ARM_SMMU_MEMATTR_OIWB)


def wait_for(io: HypSmmuIo, condition: Callable[[], bool], timeout_us: int = ARM_SMMU_POLL_TIMEOUT_US) -> int:
    """``smmu_wait``/``smmu_wait_event``: 0 once ``condition()`` holds, -ETIMEDOUT after the timeout
    of modeled time. The poll interval backs off (WFE wake-ups are not modeled separately); that
    only changes when the condition is seen to hold, not the deadline."""
    deadline = io.now_ns() + timeout_us * 1000
    return 0 if io.poll_until(condition, deadline, _FIRST_STEP_NS, _MAX_STEP_NS) else -errno.ETIMEDOUT


class HypCmdq:
    """``smmu->cmdq``: the queue as the SMMU sees it, owned by the hyp."""

    def __init__(self, io: HypSmmuIo, base: int, log2size: int, skip_errors: bool = False) -> None:
        self.io = io
        self.base = base
        self.log2size = log2size
        self.prod = 0
        # The hyp acknowledges command errors itself (not in v4: the queue stays stopped).
        self.skip_errors = skip_errors
        self.errors_skipped = 0

    @property
    def entries(self) -> int:
        return 1 << self.log2size

    @property
    def q_base(self) -> int:
        """CMDQ_BASE as the hyp programs it: address and LOG2SIZE (no RA, as posted)."""
        return self.base | self.log2size

    def _cons(self) -> int:
        if self.skip_errors:
            self.skip_error()
        return CMDQ_CONS.RD.get(self.io.read_reg(Reg.CMDQ_CONS))

    def skip_error(self) -> bool:
        """``arm_smmu_cmdq_skip_err`` by the hyp: when GERROR.CMDQ_ERR is active, replace an
        illegal command at CONS with a CMD_SYNC (an aborted fetch or a failed ATC invalidation is
        retried as it stands), then acknowledge the error so the SMMU resumes from CONS."""
        gerrorn = self.io.read_reg(Reg.GERRORN)
        if not (self.io.read_reg(Reg.GERROR) ^ gerrorn) & _CMDQ_ERR:
            return False
        cons = self.io.read_reg(Reg.CMDQ_CONS)
        error = CMDQ_CONS.ERR.get(cons)
        if error not in (CmdqError.ABT, CmdqError.ATC_INV_SYNC):
            slot = q_slot(CMDQ_CONS.RD.get(cons), self.log2size)
            self.io.write_mem(self.base + slot * CMD_SIZE, sync_command().to_bytes(CMD_SIZE, "little"))
        self.io.write_reg(Reg.GERRORN, gerrorn ^ _CMDQ_ERR)
        self.errors_skipped += 1
        self.io.warn("command queue error acknowledged", error=error, cons=cons)
        return True

    def full(self) -> bool:
        return q_full(self.prod, self._cons(), self.log2size)

    def empty(self) -> bool:
        return q_empty(self.prod, self._cons(), self.log2size)

    def add_cmd_raw(self, command: int, origin: str = "host") -> None:
        """Copy one command in and publish it (the caller made sure there is room)."""
        slot = q_slot(self.prod, self.log2size)
        self.io.write_mem(self.base + slot * CMD_SIZE, command.to_bytes(CMD_SIZE, "little"))
        self.prod = q_inc(self.prod, 1, self.log2size)
        self.io.write_reg(Reg.CMDQ_PROD, self.prod)
        self.io.trace_command(command, origin)

    def add_cmd(self, command: int) -> int:
        """One command of the hyp's own, once there is room; 0 or -ETIMEDOUT."""
        ret = wait_for(self.io, lambda: not self.full())
        if ret:
            return ret
        self.add_cmd_raw(command, "hyp")
        return 0

    def sync(self) -> int:
        ret = self.add_cmd(sync_command())
        return ret or wait_for(self.io, self.empty)

    def send_cmd(self, command: int) -> int:
        return self.add_cmd(command) or self.sync()


def tlbi_s2_ipa_commands(
    iova: int, size: int, granule: int, leaf: bool, pgsize_bitmap: int, range_inv: bool, vmid: int = 0
) -> list[int]:
    """The TLBI_S2_IPA commands covering ``[iova, iova + size)`` (``arm_smmu_tlb_inv_build``).

    With range invalidation each command covers (NUM + 1) << SCALE leaf pages, taking 5 bits of the
    remaining page count per command, TTL naming the level of ``granule`` for leaf invalidations;
    without it, one command per ``granule``.
    """
    if size <= 0:
        return []
    end = iova + size
    fields: dict[str, int] = {"VMID": vmid, "LEAF": int(leaf)}
    tg = num_pages = 0
    step = granule
    if range_inv:
        tg = (pgsize_bitmap & -pgsize_bitmap).bit_length() - 1  # log2 of the leaf page size
        num_pages = size >> tg
        fields["TG"] = (tg - 10) // 2  # 12/14/16 -> 1/2/3
        if leaf:
            fields["TTL"] = 4 - ((granule.bit_length() - 1 - 3) // (tg - 3))
        elif num_pages & CMDQ_TLBI_RANGE_NUM_MAX == 1:
            num_pages += 1  # SCALE = NUM = 0 with TTL = 0 is reserved: one page more
    commands: list[int] = []
    while iova < end:
        command_fields = dict(fields)
        if range_inv:
            if not num_pages:
                break
            scale = (num_pages & -num_pages).bit_length() - 1
            num = (num_pages >> scale) & CMDQ_TLBI_RANGE_NUM_MAX
            command_fields["SCALE"] = scale
            command_fields["NUM"] = num - 1
            step = num << (scale + tg)
            num_pages -= num << scale
        command_fields["ADDR"] = iova & ~0xFFF
        commands.append(build_command(Opcode.TLBI_S2_IPA, **command_fields))
        iova += step
    return commands


__all__ = [
    "ARM_SMMU_POLL_TIMEOUT_US",
    "HypCmdq",
    "HypSmmuIo",
    "sync_command",
    "tlbi_s2_ipa_commands",
    "wait_for",
]
