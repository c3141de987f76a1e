"""One SMMUv3 owned by the hyp (v4 patches 16-25, 28): take-over, the emulated programming
interface the host sees, the shadow command queue and the shadow stream table.

The hyp reaches the SMMU and memory through its EL2 CPU port (no stage-2). The host reaches this
object only through data aborts on the SMMU's donated MMIO pages (``handle_dabt``); every rule
about what a host access may do is asked of the policy (``policy.py``).

Choices where the series is ambiguous (collected into docs/pkvm-model.md):

- The hyp's shadow command queue holds 4096 entries (64 KiB) as posted, capped at IDR1.CMDQS so
  that hyp and SMMU agree on where the queue wraps. The host queue's LOG2SIZE, read from its
  CMDQ_BASE, is capped at IDR1.CMDQS too (the host read the same IDR1).
- The posted probe assigns ``features = idr0 features``, dropping the DT's coherency flag; the model
  keeps it (the kernel's probe ORs), so the identity walk is coherent when every SMMU is.
- Sharing the host's queue or tables stops at the first page that cannot be shared (each failure is
  a WARN, a hyp panic in production), and the hyp does not use a queue or table it could not share
  and pin: commands are then not consumed, STEs not shadowed.
- A linear shadow stream table larger than the region the host set aside fails the take-over
  (-EINVAL); the posted code would index past it.
- If a shadow L2 table cannot be allocated the STE is not shadowed (the posted code WARNs then
  dereferences NULL).
- The host L2 tables are reached through the host's L1 descriptor as it is at each CFGI_STE; only
  the first L2 seen for an L1 index is shared and pinned (Linux never changes L1 pointers).
- The shared host stream table is unshared on SMMUEN 1->0 using the range shared at enable (the
  posted code recomputes it from STRTAB_BASE/CFG as they are at disable).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pkvm_smmu.arch.commands import CMD_SIZE, Opcode, build_command, cfgi_all, pretty_command
from pkvm_smmu.arch.queues import q_empty, q_inc, q_slot
from pkvm_smmu.arch.registers import (
    CMDQ_BASE,
    CMDQ_CONS,
    CR0,
    GBPA,
    IDR0,
    IDR1,
    IDR3,
    IDR5,
    OAS_BITS,
    STRTAB_BASE,
    STRTAB_BASE_CFG,
    Reg,
    StrtabFmt,
)
from pkvm_smmu.arch.strtab import L1STD, STE, STE_SIZE
from pkvm_smmu.hyp.contracts import PAGE_HYP, PAGE_HYP_NC
from pkvm_smmu.hyp.iommu.idmap import IommuCaps
from pkvm_smmu.hyp.smmuv3.cmdq import HypCmdq, tlbi_s2_ipa_commands, wait_for
from pkvm_smmu.hyp.smmuv3.policy import STRTAB_SPLIT, IdentityS2, RegAccess, RegisterRule, V4Policy
from pkvm_smmu.machine.cpu import CpuFault
from pkvm_smmu.machine.memory import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from pkvm_smmu.hyp.iommu.core import KvmIommu

COMPONENT = "hyp.smmuv3"
SZ_128K = 0x20000
SMMU_KVM_CMDQ_LOG2 = 12  # SMMU_KVM_CMDQ_ORDER 4: 64 KiB of 16-byte commands
SMMU_KVM_CMDQ_SIZE = CMD_SIZE << SMMU_KVM_CMDQ_LOG2
STRTAB_MAX_L1_ENTRIES = 1 << 17  # a 1 MiB L1 table
SMMU_KVM_STRTAB_SIZE = STRTAB_MAX_L1_ENTRIES * 8
STRTAB_L2_SIZE = STE_SIZE << STRTAB_SPLIT
_CMDQEN = CR0.CMDQEN.in_place_mask
_SMMUEN = CR0.SMMUEN.in_place_mask
_IDR1_PRESETS = (
    IDR1.TABLES_PRESET.in_place_mask
    | IDR1.QUEUES_PRESET.in_place_mask
    | IDR1.REL.in_place_mask
    | IDR1.ECMDQ.in_place_mask
)
_L2PTR_MASK = ((1 << 52) - 1) & ~0x3F  # STRTAB_L1_DESC_L2PTR_MASK
_CONS_ERR = CMDQ_CONS.ERR.in_place_mask
_REG_NAMES = {int(reg): reg.name for reg in Reg}


@dataclass(frozen=True)
class SmmuDescription:
    """One entry of the array the host kernel builds from the device tree and hands over before its
    own driver touches the hardware (patches 16, 20, 23): the MMIO resource (at least 128 KiB), the
    ``dma-coherent`` property, and the zeroed memory it set aside for the hyp's shadow command queue
    (64 KiB) and shadow stream table (1 MiB). Without those addresses the hyp takes the shadows from
    the IOMMU pool instead (a model convenience, counted in ``pool_pages``)."""

    name: str
    mmio_base: int
    mmio_size: int
    coherent: bool = True
    cmdq_pa: int | None = None
    cmdq_size: int = SMMU_KVM_CMDQ_SIZE
    strtab_pa: int | None = None
    strtab_size: int = SMMU_KVM_STRTAB_SIZE


@dataclass(frozen=True)
class SmmuStructures:
    """Memory the SMMU accesses for the hyp's own purposes, as ``(pa, size, what)`` ranges:
    ``reads`` (shadow stream table and its L2 tables, shadow command queue, identity stage-2
    tables) and ``writes`` (none in v4: no queue of the hyp's is written by the SMMU)."""

    reads: tuple[tuple[int, int, str], ...] = ()
    writes: tuple[tuple[int, int, str], ...] = ()


class HypSpinLock:
    """``hyp_spinlock_t``. The model is single-threaded; taking a lock the hyp already holds is a
    deadlock in pKVM and a ``RuntimeError`` here."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.held = False

    def __enter__(self) -> HypSpinLock:
        if self.held:
            raise RuntimeError(f"hyp spinlock {self.name} taken recursively (a deadlock in pKVM)")
        self.held = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.held = False


@dataclass
class SharedRange:
    """Host memory the hyp shared and pinned: ``[start, start + size)``."""

    what: str
    start: int
    size: int
    pfns: list[int] = field(default_factory=list)
    pinned: bool = False

    @property
    def usable(self) -> bool:
        return self.pinned


class HypSmmuV3:
    """``struct hyp_arm_smmu_v3_device``: the trusted description, what the probe found, and the
    state of the emulation."""

    def __init__(self, desc: SmmuDescription, iommu: KvmIommu, policy: V4Policy) -> None:
        self.desc = desc
        self.name = desc.name
        self.iommu = iommu
        self.policy = policy
        self.cpu = iommu.cpu
        self.trace = iommu.trace
        self.base = desc.mmio_base
        self.lock = HypSpinLock(desc.name)
        # mini-probe
        self.coherent = desc.coherent
        self.stage1 = self.stage2 = False
        self.two_level = False
        self.sev = False
        self.range_inv = False
        self._sid_bits = 0
        self.cmdqs = 0
        self.pgsize_bitmap = 0
        self.oas = 0
        self.ias = 0
        # shadow structures
        self.cmdq: HypCmdq | None = None
        self.strtab_base = 0
        self.strtab_cfg = 0
        self.num_l1_ents = 0
        self.num_ents = 0
        self._pool_allocs: list[tuple[int, int]] = []
        self._mmio_donated: list[int] = []
        # the host's view (emulated registers)
        self.cr0 = 0
        self.host_cmdq_base = 0
        self.host_prod = 0
        self.host_cons = 0
        self.host_cmdq_shift = 0
        self.host_ste_base = 0
        self.host_ste_cfg = 0
        self.gbpa = 0
        self.host_cmdq: SharedRange | None = None
        self.host_strtab: SharedRange | None = None
        self.host_l2: dict[int, SharedRange] = {}
        self.taken_over = False
        self._emulated = {
            int(Reg.CR0): self._emulate_cr0,
            int(Reg.CR1): self._emulate_cr1,
            int(Reg.GBPA): self._emulate_gbpa,
            int(Reg.CMDQ_BASE): self._emulate_cmdq_base,
            int(Reg.CMDQ_PROD): self._emulate_cmdq_prod,
            int(Reg.CMDQ_CONS): self._emulate_cmdq_cons,
            int(Reg.STRTAB_BASE): self._emulate_strtab_base,
            int(Reg.STRTAB_BASE_CFG): self._emulate_strtab_base_cfg,
        }

    # -- SmmuContext ------------------------------------------------------------------------------
    @property
    def cmdq_enabled(self) -> bool:
        return bool(self.cr0 & _CMDQEN)

    @property
    def smmu_enabled(self) -> bool:
        return bool(self.cr0 & _SMMUEN)

    @property
    def two_level_strtab(self) -> bool:
        return self.two_level

    @property
    def sid_bits(self) -> int:
        return self._sid_bits

    def warn(self, message: str, **fields: Any) -> None:
        self.iommu.warn(message, COMPONENT, smmu=self.name, **fields)

    def write_u64(self, pa: int, value: int) -> None:
        fault = self.cpu.write(pa, 8, value)
        if fault is not None:
            self.warn("hyp store aborted", address=pa, reason=fault.reason)

    def send_cmd(self, command: int) -> int:
        if self.cmdq is None:
            return -errno.ENODEV
        return self.cmdq.send_cmd(command)

    # -- HypSmmuIo --------------------------------------------------------------------------------
    def read_reg(self, reg: Reg, size: int = 4) -> int:
        return self._hw_read(int(reg), size)

    def write_reg(self, reg: Reg, value: int, size: int = 4) -> None:
        self._hw_write(int(reg), size, value)

    def write_mem(self, pa: int, data: bytes) -> None:
        fault = self.cpu.write_bytes(pa, data)
        if fault is not None:
            self.warn("hyp store aborted", address=pa, reason=fault.reason)

    def now_ns(self) -> int:
        return self.cpu.clock.now_ns

    def poll_until(
        self, condition: Callable[[], bool], deadline_ns: int, first_step_ns: int, max_step_ns: int
    ) -> bool:
        return self.cpu.clock.poll_backoff(condition, deadline_ns, first_step_ns, max_step_ns)

    def trace_command(self, command: int, origin: str) -> None:
        if origin == "hyp" and self.trace.enabled:
            self.trace.emit(COMPONENT, "cmd.hyp", smmu=self.name, opcode=_opcode_name(command))

    def _hw_read(self, offset: int, size: int) -> int:
        value = self.cpu.read(self.base + offset, size)
        if isinstance(value, CpuFault):
            self.warn("SMMU register read aborted", offset=offset, size=size, reason=value.reason)
            return 0
        return value

    def _hw_write(self, offset: int, size: int, value: int) -> None:
        fault = self.cpu.write(self.base + offset, size, value & ((1 << (8 * size)) - 1))
        if fault is not None:
            self.warn("SMMU register write aborted", offset=offset, size=size, reason=fault.reason)

    def _read_mem(self, pa: int, length: int) -> bytes | None:
        data = self.cpu.read_bytes(pa, length)
        if isinstance(data, CpuFault):
            self.warn("hyp load aborted", address=pa, reason=data.reason)
            return None
        return data

    def _read_u64(self, pa: int) -> int | None:
        data = self._read_mem(pa, 8)
        return None if data is None else int.from_bytes(data, "little")

    # -- take-over (patches 17, 18, 20, 23, 25) ---------------------------------------------------------
    def init_device(self) -> int:
        """``smmu_init_device``: MMIO donated to the hyp, mini-probe, shadow queue and stream table,
        GBPA forced to abort. On failure the MMIO pages go back to the host."""
        desc = self.desc
        self.policy.takeover(self)
        if (desc.mmio_base | desc.mmio_size) & (PAGE_SIZE - 1) or desc.mmio_size < SZ_128K:
            return self._emit_init(-errno.EINVAL, "bad MMIO resource")
        mp = self.iommu.mem_protect
        for pfn in range(desc.mmio_base >> PAGE_SHIFT, (desc.mmio_base + desc.mmio_size) >> PAGE_SHIFT):
            ret = mp.host_donate_hyp_mmio(pfn)
            if ret:
                self.warn("MMIO donation failed", pfn=pfn, error=ret)
                self.deinit_device()
                return self._emit_init(ret, "MMIO donation failed")
            self._mmio_donated.append(pfn)
        for step in (self._probe, self._init_cmdq, self._init_strtab, self._abort_gbpa, self._enable_cmdq):
            ret = step()
            if ret:
                self.deinit_device()
                return self._emit_init(ret, step.__name__.lstrip("_"))
        self.taken_over = True
        return self._emit_init(0, "")

    def _emit_init(self, ret: int, step: str) -> int:
        if self.trace.enabled:
            self.trace.emit(
                COMPONENT,
                "init",
                smmu=self.name,
                result=ret,
                failed_step=step,
                two_level=self.two_level,
                sid_bits=self._sid_bits,
                oas=self.oas,
            )
        return ret

    def deinit_device(self) -> None:
        """``smmu_deinit_device``: the MMIO pages back to the host (and the pool pages back)."""
        mp = self.iommu.mem_protect
        for pfn in self._mmio_donated:
            ret = mp.hyp_donate_host_mmio(pfn)
            if ret:
                self.warn("MMIO return failed", pfn=pfn, error=ret)
        self._mmio_donated = []
        for pa, pages in self._pool_allocs:
            self.iommu.pool.free_pages(pa, pages)
        self._pool_allocs = []
        self.cmdq = None
        self.taken_over = False

    def _probe(self) -> int:
        """``smmu_probe``: both stages required, no presets, then SIDSIZE, page sizes and OAS."""
        idr0 = self._hw_read(Reg.IDR0, 4)
        self.stage1 = bool(IDR0.S1P.get(idr0))
        self.stage2 = bool(IDR0.S2P.get(idr0))
        # Errata of some MMU-600/700 parts prevent nesting; they cannot be told apart here.
        if not (self.stage1 and self.stage2):
            return -errno.ENXIO
        self.two_level = IDR0.ST_LEVEL.get(idr0) == 1
        self.sev = bool(IDR0.SEV.get(idr0))
        idr1 = self._hw_read(Reg.IDR1, 4)
        if idr1 & _IDR1_PRESETS:
            return -errno.EINVAL
        self._sid_bits = IDR1.SIDSIZE.get(idr1)
        self.cmdqs = IDR1.CMDQS.get(idr1)
        if self._sid_bits <= STRTAB_SPLIT:
            self.two_level = False  # follows the kernel
        self.range_inv = bool(IDR3.RIL.get(self._hw_read(Reg.IDR3, 4)))
        idr5 = self._hw_read(Reg.IDR5, 4)
        bitmap = 0
        if IDR5.GRAN64K.get(idr5):
            bitmap |= (1 << 16) | (1 << 29)
        if IDR5.GRAN16K.get(idr5):
            bitmap |= (1 << 14) | (1 << 25)
        if IDR5.GRAN4K.get(idr5):
            bitmap |= (1 << 12) | (1 << 21) | (1 << 30)
        oas = OAS_BITS.get(IDR5.OAS.get(idr5), 0)
        if oas > 52:
            oas = 0  # no encoding the driver knows
        if oas == 52:
            bitmap |= 1 << 42
        self.oas = oas or 48
        self.pgsize_bitmap = bitmap
        self.ias = min(64, self.oas)
        return 0

    def _shadow_memory(self, pa: int | None, size: int, need: int, what: str) -> int | None:
        """The host's allocation donated to the hyp, or pages from the IOMMU pool."""
        if pa is not None:
            if need > size:
                self.warn(f"shadow {what} does not fit the memory set aside", need=need, size=size)
                return None
            prot = PAGE_HYP if self.coherent else PAGE_HYP_NC
            pages = -(-size // PAGE_SIZE)
            ret = self.iommu.mem_protect.host_donate_hyp(pa >> PAGE_SHIFT, pages, prot)
            if ret:
                self.warn(f"shadow {what} donation failed", pa=pa, error=ret)
                return None
            self._zero(pa, size)
            return pa
        pages = 1 << max(0, (-(-need // PAGE_SIZE) - 1).bit_length())
        allocated = self.iommu.pool.alloc_pages(pages)
        if allocated is None:
            self.warn(f"no pool memory for the shadow {what}", pages=pages)
            return None
        self._pool_allocs.append((allocated, pages))
        return allocated

    def _zero(self, pa: int, size: int) -> None:
        self.write_mem(pa, bytes(size))

    def _init_cmdq(self) -> int:
        """``smmu_init_cmdq``: the shadow queue programmed into CMDQ_BASE/PROD/CONS."""
        log2 = min(SMMU_KVM_CMDQ_LOG2, self.cmdqs)
        base = self._shadow_memory(self.desc.cmdq_pa, self.desc.cmdq_size, CMD_SIZE << log2, "command queue")
        if base is None:
            return -errno.ENOMEM
        self.cmdq = HypCmdq(self, base, log2, skip_errors=self.policy.recovers_cmdq_errors)
        self._hw_write(Reg.CMDQ_PROD, 4, 0)
        self._hw_write(Reg.CMDQ_CONS, 4, 0)
        self._hw_write(Reg.CMDQ_BASE, 8, self.cmdq.q_base)
        return 0

    def _init_strtab(self) -> int:
        """``smmu_init_strtab``: the shadow stream table, 2-level with STRTAB_SPLIT or linear."""
        if self.two_level:
            last_sid_idx = ((1 << self._sid_bits) - 1) >> STRTAB_SPLIT
            self.num_l1_ents = min(last_sid_idx + 1, STRTAB_MAX_L1_ENTRIES)
            need = self.num_l1_ents * 8
            cfg = STRTAB_BASE_CFG.encode(
                FMT=StrtabFmt.TWO_LEVEL,
                LOG2SIZE=self.num_l1_ents.bit_length() - 1 + STRTAB_SPLIT,
                SPLIT=STRTAB_SPLIT,
            )
        else:
            self.num_ents = 1 << self._sid_bits
            need = self.num_ents * STE_SIZE
            cfg = STRTAB_BASE_CFG.encode(FMT=StrtabFmt.LINEAR, LOG2SIZE=self._sid_bits)
        base = self._shadow_memory(self.desc.strtab_pa, self.desc.strtab_size, need, "stream table")
        if base is None:
            return -errno.ENOMEM if self.desc.strtab_pa is None else -errno.EINVAL
        self.strtab_base = base
        self.strtab_cfg = cfg
        self._hw_write(
            Reg.STRTAB_BASE, 8, STRTAB_BASE.ADDR.insert_address(base) | STRTAB_BASE.RA.in_place_mask
        )
        self._hw_write(Reg.STRTAB_BASE_CFG, 4, cfg)
        return 0

    def _abort_gbpa(self) -> int:
        """``smmu_abort_gbpa``: GBPA = ABORT|UPDATE, then wait until it reads ABORT."""
        abort = GBPA.ABORT.in_place_mask
        self._hw_write(Reg.GBPA, 4, abort | GBPA.UPDATE.in_place_mask)
        return wait_for(self, lambda: self._hw_read(Reg.GBPA, 4) == abort)

    def _enable_cmdq(self) -> int:
        """The hyp's queue enabled, then CFGI_ALL + TLBI_NSNH_ALL + CMD_SYNC (policy permitting).
        SMMUEN is left to the host's (emulated) CR0 writes; CMDQEN is ORed into whatever CR0 holds,
        so an SMMU the host already enabled (the ``naive`` boot) is not turned off."""
        if not self.policy.takeover_enables_cmdq or self.cmdq is None:
            return 0
        cr0 = self._hw_read(Reg.CR0, 4) | _CMDQEN
        self._hw_write(Reg.CR0, 4, cr0)
        ret = wait_for(self, lambda: bool(self._hw_read(Reg.CR0ACK, 4) & _CMDQEN))
        if ret:
            return ret
        for command in (cfgi_all(), build_command(Opcode.TLBI_NSNH_ALL)):
            ret = self.cmdq.add_cmd(command)
            if ret:
                return ret
        return self.cmdq.sync()

    # -- what the hyp declares to an isolation checker ---------------------------------------------
    def smmu_structures(self) -> SmmuStructures:
        """The hyp's own structures this SMMU reads (nothing before the take-over completed)."""
        if not self.taken_over:
            return SmmuStructures()
        reads: list[tuple[int, int, str]] = []
        if self.strtab_base:
            size = self.num_l1_ents * 8 if self.two_level else self.num_ents * STE_SIZE
            reads.append((self.strtab_base, size, "shadow stream table"))
        if self.cmdq is not None:
            reads.append((self.cmdq.base, CMD_SIZE << self.cmdq.log2size, "shadow command queue"))
        # Shadow L2 stream tables and identity stage-2 tables come from the IOMMU pool.
        reads.extend(self.iommu.pool_extent())
        return SmmuStructures(tuple(reads))

    # -- what the identity stage-2 needs ----------------------------------------------------------------
    def caps(self) -> IommuCaps:
        return IommuCaps(self.name, self.ias, self.oas, self.pgsize_bitmap, self.coherent)

    def tlb_inv_identity(self, iova: int, size: int, granule: int, leaf: bool) -> None:
        """``smmu_tlb_inv_range`` on this SMMU: a range TLBI_S2_IPA for VMID 0 + CMD_SYNC, then
        TLBI_NH_ALL for VMID 0 + CMD_SYNC (nested entries are tagged with the stage-1 address)."""
        idmap = self.iommu.idmap
        if self.cmdq is None or idmap is None:
            return
        with self.lock:
            bitmap = idmap.config.pgsize_bitmap
            for command in tlbi_s2_ipa_commands(iova, size, granule, leaf, bitmap, self.range_inv):
                if self.cmdq.add_cmd(command):
                    self.warn("TLBI_S2_IPA not queued", iova=iova)
            if self.cmdq.sync():
                self.policy.invalidation_failed(self, f"TLBI_S2_IPA [{iova:#x}, +{size:#x})")
            if self.cmdq.send_cmd(build_command(Opcode.TLBI_NH_ALL, VMID=0)):
                self.policy.invalidation_failed(self, f"TLBI_NH_ALL after [{iova:#x}, +{size:#x})")

    # -- MMIO emulation (patch 19) -----------------------------------------------------------------------
    def contains(self, address: int) -> bool:
        return self.base <= address < self.base + self.desc.mmio_size

    def handle_dabt(self, offset: int, size: int, is_write: bool, value: int) -> int:
        """``smmu_dabt_device``: one host access at ``offset``; the value read (0 for a write)."""
        with self.lock:
            rule = self.policy.register_access(offset, size, is_write)
            result = self._access(rule, offset, size, is_write, value) & ((1 << (8 * size)) - 1)
            if self.trace.enabled:
                self.trace.emit(
                    COMPONENT,
                    "trap",
                    smmu=self.name,
                    reg=_REG_NAMES.get(offset, f"{offset:#x}"),
                    offset=offset,
                    size=size,
                    direction="write" if is_write else "read",
                    value=value if is_write else result,
                    access=rule.access.value,
                )
            return 0 if is_write else result

    def _access(self, rule: RegisterRule, offset: int, size: int, is_write: bool, value: int) -> int:
        reg = _REG_NAMES.get(offset, f"{offset:#x}")
        if rule.size is not None and size != rule.size:
            self.warn("register access of the wrong size dropped", reg=reg, size=size)
            return 0
        if rule.access is RegAccess.DROP:
            self.warn("register access dropped", reg=reg, size=size, write=is_write)
            return 0
        if rule.access is RegAccess.READ_ONLY:
            if is_write:
                self.warn("write to a read-only register dropped", reg=reg, value=value)
                return 0
            return self.policy.register_read(self, offset, size, self._hw_read(offset, size) & rule.read_mask)
        if rule.access is RegAccess.PASS:
            if is_write:
                allowed = self.policy.passthrough_write(self, offset, size, value)
                if allowed is not None:
                    self._hw_write(offset, size, allowed)
                return 0
            return self.policy.register_read(self, offset, size, self._hw_read(offset, size))
        handler = self._emulated.get(offset)
        if handler is None:
            self.warn("no emulation for register", reg=reg)
            return 0
        return handler(size, is_write, value)

    def _emulate_cr0(self, size: int, is_write: bool, value: int) -> int:
        if not is_write:
            return self.policy.register_read(self, int(Reg.CR0), size, self._hw_read(Reg.CR0, size))
        value = self.policy.cr0_write(self, value)
        old, self.cr0 = self.cr0, value
        changed = old ^ value
        if changed & _CMDQEN and value & _CMDQEN:
            self._cmdq_enable()
        elif changed & _CMDQEN:
            self._cmdq_disable()
        if changed & _SMMUEN and value & _SMMUEN:
            self._smmu_enable()
        elif changed & _SMMUEN:
            self._smmu_disable()
        self._hw_write(Reg.CR0, size, self.policy.cr0_hardware(self, value))
        return 0

    def _emulate_cr1(self, size: int, is_write: bool, value: int) -> int:
        if not is_write:
            return self._hw_read(Reg.CR1, size)
        allowed = self.policy.cr1_write(self, value)
        if allowed is not None:
            self._hw_write(Reg.CR1, size, allowed)
        return 0

    def _emulate_gbpa(self, size: int, is_write: bool, value: int) -> int:
        if is_write:
            self.gbpa = self.policy.gbpa_write(self, value)
            return 0
        return self.gbpa

    # -- command queue emulation (patches 20, 22) -------------------------------------------------------
    def _emulate_cmdq_base(self, size: int, is_write: bool, value: int) -> int:
        if not is_write:
            return self.host_cmdq_base
        if self.policy.cmdq_base_write(self, value):
            self.host_cmdq_base = value
        return 0

    def _emulate_cmdq_prod(self, size: int, is_write: bool, value: int) -> int:
        if not is_write:
            return self.host_prod
        if not self.policy.cmdq_prod_write(self, value, self.host_cons, self.host_cmdq_shift):
            return 0
        self.host_prod = value
        self._emulate_cmdq_insert()
        return 0

    def _emulate_cmdq_cons(self, size: int, is_write: bool, value: int) -> int:
        if is_write:
            if self.policy.cmdq_cons_write(self, value):
                self.host_cons = value
            return 0
        if self.policy.cmdq_batch_per_trap is not None and not q_empty(
            self.host_prod, self.host_cons, self.host_cmdq_shift
        ):
            self._emulate_cmdq_insert()  # the host waits on CONS: one more batch of its commands
        # Errors reach the host through the real CONS.ERR.
        return self.host_cons | (self._hw_read(Reg.CMDQ_CONS, 4) & _CONS_ERR)

    def _cmdq_enable(self) -> None:
        """CMDQEN 0->1: the host's queue shared with and pinned by the hyp."""
        log2 = min(CMDQ_BASE.LOG2SIZE.get(self.host_cmdq_base), self.cmdqs)
        self.host_cmdq_shift = log2
        start = CMDQ_BASE.ADDR.get_address(self.host_cmdq_base)
        self.host_cmdq = self._share("cmdq", start, CMD_SIZE << log2)

    def _cmdq_disable(self) -> None:
        if self.host_cmdq is not None:
            self._unshare(self.host_cmdq)
            self.host_cmdq = None

    def _emulate_cmdq_insert(self) -> None:
        """``smmu_emulate_cmdq_insert``: every host command between the emulated CONS and the new
        PROD is copied out of host memory once, filtered, and placed in the shadow queue; then the
        hyp waits until the SMMU has consumed everything."""
        cmdq = self.cmdq
        if not self.cmdq_enabled or cmdq is None:
            return
        shared = self.host_cmdq
        if shared is None or not shared.usable:
            self.warn("host command queue not shared: commands not consumed")
            return
        shift = self.host_cmdq_shift
        base = shared.start
        trace = self.trace
        budget = self.policy.cmdq_batch_per_trap
        while not q_empty(self.host_prod, self.host_cons, shift):
            if budget is not None:
                if budget <= 0:
                    break  # the rest on the host's next CMDQ_CONS read or PROD write
                budget -= 1
            if wait_for(self, lambda: not cmdq.full()):
                self.warn("shadow command queue full")
                if self.policy.bounded_cmdq_traps:
                    break  # the rest waits for the host's next CMDQ_PROD write (or CONS read)
            data = self._read_mem(base + q_slot(self.host_cons, shift) * CMD_SIZE, CMD_SIZE)
            if data is None:
                break
            command = int.from_bytes(data, "little")  # the one copy: no TOCTOU
            if trace.enabled:
                trace.emit(COMPONENT, "cmd.seen", smmu=self.name, opcode=_opcode_name(command))
            verdict = self.policy.filter_command(self, command)
            for index, issued in enumerate(verdict.commands):
                if index and wait_for(self, lambda: not cmdq.full()):  # a variant may add commands
                    self.warn("shadow command queue full")
                    if self.policy.bounded_cmdq_traps:
                        break
                cmdq.add_cmd_raw(issued)
            if trace.enabled:
                trace.emit(
                    COMPONENT,
                    f"cmd.{verdict.action.value}",
                    smmu=self.name,
                    opcode=_opcode_name(command),
                    reason=verdict.reason,
                    command=pretty_command(command),
                )
            self.host_cons = q_inc(self.host_cons, 1, shift)
        if wait_for(self, cmdq.empty):
            self.warn("SMMU did not consume the shadow command queue", cons=self._hw_read(Reg.CMDQ_CONS, 4))

    # -- stream table emulation (patches 23, 24, 28) ---------------------------------------------------
    def _emulate_strtab_base(self, size: int, is_write: bool, value: int) -> int:
        if not is_write:
            return self.host_ste_base
        if self.policy.strtab_write(self, Reg.STRTAB_BASE, value):
            self.host_ste_base = value
        return 0

    def _emulate_strtab_base_cfg(self, size: int, is_write: bool, value: int) -> int:
        if not is_write:
            return self.host_ste_cfg
        if self.policy.strtab_write(self, Reg.STRTAB_BASE_CFG, value):
            self.host_ste_cfg = value
        return 0

    def _host_strtab_size(self) -> int:
        log2size = STRTAB_BASE_CFG.LOG2SIZE.get(self.host_ste_cfg)
        if self.two_level:
            return (1 << max(0, log2size - STRTAB_BASE_CFG.SPLIT.get(self.host_ste_cfg))) * 8
        return (1 << log2size) * STE_SIZE

    def _smmu_enable(self) -> None:
        """SMMUEN 0->1: the host's format validated, its L1 (or linear) table shared and pinned."""
        base = STRTAB_BASE.ADDR.get_address(self.host_ste_base)
        if not self.policy.validate_strtab(self, base, self.host_ste_cfg):
            return
        self.host_strtab = self._share("strtab", base, self._host_strtab_size())

    def _smmu_disable(self) -> None:
        if self.host_strtab is not None:
            self._unshare(self.host_strtab)
            self.host_strtab = None

    def _ste_ptr(self, sid: int, strtab: int) -> int | None:
        """``smmu_get_step_for_sid`` on ``strtab`` (the host's or the shadow), with the shadow's
        geometry; None when there is no L2 table for the SID."""
        if self.two_level:
            index = sid >> STRTAB_SPLIT
            if index >= self.num_l1_ents:
                self.warn("SID beyond the stream table", sid=sid)
                return None
            desc = self._read_u64(strtab + index * 8)
            if desc is None or not L1STD.SPAN.get(desc):
                return None
            return (desc & _L2PTR_MASK) + (sid & ((1 << STRTAB_SPLIT) - 1)) * STE_SIZE
        if sid >= self.num_ents:
            self.warn("SID beyond the stream table", sid=sid)
            return None
        return strtab + sid * STE_SIZE

    def _shadow_l2(self, sid: int) -> int:
        """``smmu_shadow_l2_strtab``: a shadow L2 table from the pool, its L1 descriptor, and the
        host's L2 shared and pinned (never unshared: Linux never clears L1 pointers)."""
        index = sid >> STRTAB_SPLIT
        l2 = self.iommu.pool.alloc_pages(STRTAB_L2_SIZE // PAGE_SIZE)
        if l2 is None:
            return -errno.ENOMEM
        self.write_u64(self.strtab_base + index * 8, L1STD.encode(SPAN=STRTAB_SPLIT + 1) | l2)
        host_base = STRTAB_BASE.ADDR.get_address(self.host_ste_base)
        host_desc = self._read_u64(host_base + index * 8) or 0
        host_l2 = host_desc & _L2PTR_MASK
        self.host_l2[index] = self._share("l2", host_l2, STRTAB_L2_SIZE)
        if self.trace.enabled:
            self.trace.emit(COMPONENT, "strtab.l2", smmu=self.name, index=index, shadow=l2, host=host_l2)
        return 0

    def reshadow_ste(self, sid: int) -> None:
        """``smmu_reshadow_ste``: copy the host's STE for ``sid``, transform it (policy) and install
        it in the shadow stream table."""
        shared = self.host_strtab
        idmap = self.iommu.idmap
        if shared is None or not shared.usable or idmap is None:
            self.warn("host stream table not shared: STE not shadowed", sid=sid)
            return
        host_ptr = self._ste_ptr(sid, shared.start)
        if host_ptr is None:
            self.warn("host STE not found", sid=sid)
            return
        hyp_ptr = self._ste_ptr(sid, self.strtab_base)
        if hyp_ptr is None:
            # A valid host STE and no shadow L2: a new L1 descriptor was installed.
            ret = self._shadow_l2(sid) if self.two_level else -errno.EINVAL
            hyp_ptr = self._ste_ptr(sid, self.strtab_base) if not ret else None
            if hyp_ptr is None:
                self.warn("no shadow L2 table", sid=sid, error=ret)
                return
        data = self._read_mem(host_ptr, STE_SIZE)
        if data is None:
            return
        host_ste = STE.from_bytes(data)
        s2 = IdentityS2(idmap.vtcr_fields(), idmap.root)
        target, how = self.policy.transform_ste(self, host_ste, s2)
        self.policy.install_shadow_ste(self, hyp_ptr, target)
        if self.trace.enabled:
            self.trace.emit(
                COMPONENT, "ste.shadow", smmu=self.name, sid=sid, how=how.value, ste=STE.pretty(target)
            )

    # -- sharing host memory ----------------------------------------------------------------------------
    def _share(self, what: str, start: int, size: int) -> SharedRange:
        """``smmu_share_pages``: each page shared with the hyp, then the range pinned."""
        shared = SharedRange(what, start, size)
        mp = self.iommu.mem_protect
        end = start + max(size, 1)
        for pfn in range(start >> PAGE_SHIFT, (end + PAGE_SIZE - 1) >> PAGE_SHIFT):
            ret = mp.host_share_hyp(pfn)
            if ret:
                self.warn(f"host {what} page not shared", pfn=pfn, error=ret)
                break
            shared.pfns.append(pfn)
        else:
            ret = mp.hyp_pin_shared_mem(start, end)
            if ret:
                self.warn(f"host {what} not pinned", start=start, error=ret)
            shared.pinned = not ret
        if self.trace.enabled:
            self.trace.emit(
                COMPONENT, "share", smmu=self.name, what=what, start=start, size=size, ok=shared.usable
            )
        return shared

    def _unshare(self, shared: SharedRange) -> None:
        """``smmu_unshare_pages``."""
        mp = self.iommu.mem_protect
        if shared.pinned:
            ret = mp.hyp_unpin_shared_mem(shared.start, shared.start + max(shared.size, 1))
            if ret:
                self.warn(f"host {shared.what} not unpinned", error=ret)
        for pfn in shared.pfns:
            ret = mp.host_unshare_hyp(pfn)
            if ret:
                self.warn(f"host {shared.what} page not unshared", pfn=pfn, error=ret)
        if self.trace.enabled:
            self.trace.emit(COMPONENT, "unshare", smmu=self.name, what=shared.what, start=shared.start)


def _opcode_name(command: int) -> str:
    opcode = command & 0xFF
    return _OPCODE_NAMES.get(opcode) or f"{opcode:#04x}"


_OPCODE_NAMES = {int(op): op.name for op in Opcode}


__all__ = [
    "SMMU_KVM_CMDQ_SIZE",
    "SMMU_KVM_STRTAB_SIZE",
    "HypSmmuV3",
    "HypSpinLock",
    "SharedRange",
    "SmmuDescription",
    "SmmuStructures",
]
