"""Event queue, PRI queue and global-error handling (``arm_smmu_evtq_thread``,
``arm_smmu_priq_thread``, ``arm_smmu_gerror_handler``, ``arm_smmu_cmdq_skip_err``).

Every event record is decoded and reported on the trace bus with all the fields its type
defines; nothing is kept in the driver."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from pkvm_smmu.arch.commands import CMD_SIZE, Opcode, PriResp, build_command, pretty_command
from pkvm_smmu.arch.events import EVENT_SIZE, PRI_RECORD, PRI_SIZE, EventType, decode_event
from pkvm_smmu.arch.registers import CMDQ_CONS, GERROR, CmdqError, Reg
from pkvm_smmu.host.arm_smmu_v3.queue import Queue, build_sync_cmd

if TYPE_CHECKING:
    from pkvm_smmu.host.arm_smmu_v3.device import ArmSmmuDevice

GERROR_ERR_MASK = 0x1FD  # CMDQ_ERR, EVTQ/PRIQ_ABT, the MSI aborts, SFM_ERR

_CERROR_STR = {
    CmdqError.NONE: "No error",
    CmdqError.ILL: "Illegal command",
    CmdqError.ABT: "Abort on command fetch",
    CmdqError.ATC_INV_SYNC: "ATC invalidate timeout",
}


def queue_remove_raw(smmu: ArmSmmuDevice, q: Queue) -> bytes | None:
    """Take the entry at CONS (None when the shadow indices say empty) and publish the new CONS."""
    if q.empty():
        return None
    raw = smmu.mmio.read_mem(q.entry_addr(q.cons), q.ent_size)
    q.inc_cons()
    smmu.mmio.writel(q.cons, q.cons_reg)
    return raw


def queue_sync_prod_in(smmu: ArmSmmuDevice, q: Queue) -> int:
    """Read PROD; -EOVERFLOW when its overflow flag toggled since we last looked."""
    prod = smmu.mmio.readl(q.prod_reg)
    ret = -errno.EOVERFLOW if Queue.ovf(prod) != Queue.ovf(q.prod) else 0
    q.prod = prod
    return ret


def queue_sync_cons_ovf(smmu: ArmSmmuDevice, q: Queue) -> None:
    """Acknowledge an overflow: copy PROD.OVFLG into CONS.OVACKFLG."""
    if Queue.ovf(q.prod) == Queue.ovf(q.cons):
        return
    q.cons = Queue.ovf(q.prod) | q.wrp(q.cons) | q.idx(q.cons)
    smmu.mmio.writel(q.cons, q.cons_reg)


def report_event(smmu: ArmSmmuDevice, raw: bytes) -> None:
    """``arm_smmu_decode_event`` + ``arm_smmu_dump_event``: one trace event with every field."""
    record = int.from_bytes(raw, "little")
    etype, fields = decode_event(record)
    sid = fields.get("SID", 0)
    master = smmu.streams.get(sid)
    client = master.dev_name if master is not None else "(unassigned sid)"
    name = etype.name if isinstance(etype, EventType) else f"UNKNOWN({etype:#x})"
    smmu.emit(
        "evtq.event",
        event=name,
        id=int(etype),
        client=client,
        raw=[int.from_bytes(raw[i : i + 8], "little") for i in range(0, EVENT_SIZE, 8)],
        **{k.lower(): int(v) for k, v in fields.items()},
    )


def evtq_thread(smmu: ArmSmmuDevice) -> bool:
    """Drain the event queue, then acknowledge any overflow."""
    q = smmu.evtq
    if q is None:
        return False
    handled = False
    while True:
        while (raw := queue_remove_raw(smmu, q)) is not None:
            handled = True
            report_event(smmu, raw)
        # Nothing to do about lost records but to say so.
        if queue_sync_prod_in(smmu, q) == -errno.EOVERFLOW:
            smmu.dev_err("EVTQ overflow detected -- events lost")
            handled = True
        if q.empty():
            break
    queue_sync_cons_ovf(smmu, q)
    return handled


def priq_thread(smmu: ArmSmmuDevice) -> bool:
    """Page requests are not supported: log each and deny the last of each group."""
    q = smmu.priq
    if q is None or smmu.cmdq is None:
        return False
    handled = False
    while True:
        while (raw := queue_remove_raw(smmu, q)) is not None:
            handled = True
            rec = int.from_bytes(raw[:PRI_SIZE], "little")
            ssv = PRI_RECORD.SSV.get(rec)
            sid, ssid = PRI_RECORD.SID.get(rec), PRI_RECORD.SSID.get(rec) if ssv else 0
            grpid, last = PRI_RECORD.PRGINDEX.get(rec), PRI_RECORD.LAST.get(rec)
            smmu.emit(
                "priq.request",
                sid=sid,
                ssid=ssid,
                grpid=grpid,
                last=last,
                addr=PRI_RECORD.ADDR.get_address(rec),
            )
            if last:
                resp = build_command(
                    Opcode.PRI_RESP, SSV=ssv, SSID=ssid, SID=sid, PRGINDEX=grpid, RESP=PriResp.FAILURE
                )
                smmu.cmdq.issue_cmd(resp)
        if queue_sync_prod_in(smmu, q) == -errno.EOVERFLOW:
            smmu.dev_err("PRIQ overflow detected -- requests lost")
        if q.empty():
            break
    queue_sync_cons_ovf(smmu, q)
    return handled


def cmdq_skip_err(smmu: ArmSmmuDevice) -> None:
    """Recover a stopped command queue: replace an illegal command by a CMD_SYNC in place; retry
    a fetch abort; leave a CMD_SYNC that hit an ATC invalidation timeout to be re-executed."""
    assert smmu.cmdq is not None
    q = smmu.cmdq.q
    cons = smmu.mmio.readl(q.cons_reg)
    idx = CMDQ_CONS.ERR.get(cons)
    try:
        err = CmdqError(idx)
    except ValueError:
        err = None
    smmu.dev_err("CMDQ error", cons=cons, error=_CERROR_STR[err] if err is not None else "Unknown")
    if err is CmdqError.ABT:
        smmu.dev_err("retrying command fetch")
        return
    if err in (CmdqError.NONE, CmdqError.ATC_INV_SYNC):
        # ATC_INV_SYNC: CONS is still on the CMD_SYNC; acknowledging re-runs it.
        return
    address = q.entry_addr(CMDQ_CONS.RD.get(cons))
    bad = int.from_bytes(smmu.mmio.read_mem(address, CMD_SIZE), "little")
    smmu.dev_err("skipping command in error state", command=pretty_command(bad), raw=bad)
    smmu.mmio.write_mem(address, build_sync_cmd().to_bytes(CMD_SIZE, "little"))


def gerror_handler(smmu: ArmSmmuDevice) -> bool:
    """Handle the errors GERROR and GERRORN disagree on, then acknowledge them all."""
    gerror = smmu.readl(Reg.GERROR)
    gerrorn = smmu.readl(Reg.GERRORN)
    active = gerror ^ gerrorn
    if not active & GERROR_ERR_MASK:
        return False  # not ours
    smmu.dev_warn("unexpected global error reported, this could be serious", active=GERROR.pretty(active))
    if active & GERROR.SFM_ERR.in_place_mask:
        smmu.dev_err("device has entered Service Failure Mode!")
        smmu.device_disable()
    for bit, message in (
        (GERROR.MSI_GERROR_ABT_ERR, "GERROR MSI write aborted"),
        (GERROR.MSI_PRIQ_ABT_ERR, "PRIQ MSI write aborted"),
        (GERROR.MSI_EVENTQ_ABT_ERR, "EVTQ MSI write aborted"),
        (GERROR.MSI_CMDQ_ABT_ERR, "CMDQ MSI write aborted"),
    ):
        if active & bit.in_place_mask:
            smmu.dev_warn(message)
    if active & GERROR.PRIQ_ABT_ERR.in_place_mask:
        smmu.dev_err("PRIQ write aborted -- events may have been lost")
    if active & GERROR.EVENTQ_ABT_ERR.in_place_mask:
        smmu.dev_err("EVTQ write aborted -- events may have been lost")
    if active & GERROR.CMDQ_ERR.in_place_mask:
        cmdq_skip_err(smmu)
    smmu.writel(gerror, Reg.GERRORN)
    return True


__all__ = [
    "GERROR_ERR_MASK",
    "cmdq_skip_err",
    "evtq_thread",
    "gerror_handler",
    "priq_thread",
    "queue_remove_raw",
    "queue_sync_cons_ovf",
    "queue_sync_prod_in",
    "report_event",
]
