"""The boot-time isolation check: after each initcall (and at the points a workload asks), can any
DMA-capable device reach memory the host does not own, and did the host program an SMMU before the
hyp took it over?

It looks at the hardware and the hyp's state the way a verifier would, without touching either:
register values, the SMMUs' cached configuration and TLB entries, stream tables read straight from
RAM, page ownership, the identity stage-2. No transaction is issued, so checking changes nothing.
Each check is reported on the trace bus (``isolation``/``check``); reports read it from there.

A check is *protected* when pKVM has promised isolation: protected mode was asked for and pKVM has
not failed. Before pKVM takes the SMMUs over the only thing to get wrong is the host enabling one;
afterwards every SMMU must be the hyp's, walking the hyp's stream table, and every device's stream
must be aborted or translated by the identity stage-2 (VMID 0), which must map only host pages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pkvm_smmu.arch.registers import CR0, GBPA, STRTAB_BASE, STRTAB_BASE_CFG, Reg, StrtabFmt
from pkvm_smmu.arch.strtab import L1STD, STE, STE_SIZE, SteConfig
from pkvm_smmu.machine.memory import PAGE_SHIFT
from pkvm_smmu.trace import TraceEvent

if TYPE_CHECKING:
    from pkvm_smmu.hyp.iommu import KvmIommu
    from pkvm_smmu.hyp.pkvm import Pkvm
    from pkvm_smmu.hyp.smmuv3 import HypSmmuV3
    from pkvm_smmu.machine.platform import Machine
    from pkvm_smmu.machine.smmu import SmmuV3

COMPONENT = "isolation"
_ENABLES = CR0.SMMUEN.in_place_mask | CR0.CMDQEN.in_place_mask


@dataclass(frozen=True)
class IsolationCheck:
    after: str  # the initcall ("device_initcall kvm_arm_init") or workload step it follows
    protected: bool  # pKVM promised isolation at this point
    violations: tuple[str, ...] = ()
    note: str = ""  # why nothing is promised ("pKVM off", "pKVM failed")

    @property
    def ok(self) -> bool:
        return not self.violations

    @classmethod
    def from_event(cls, event: TraceEvent) -> IsolationCheck:
        f = event.fields
        return cls(
            str(f["after"]), bool(f["protected"]), tuple(f.get("violations", ())), str(f.get("note", ""))
        )


class IsolationOracle:
    """A trace sink that checks isolation after each initcall (attach it last)."""

    def __init__(
        self,
        machine: Machine,
        pkvm: Pkvm,
        requested: bool,
        iommu: Callable[[], KvmIommu | None],
    ) -> None:
        self.machine = machine
        self.pkvm = pkvm
        self.requested = requested
        self._iommu = iommu
        self.checks: list[IsolationCheck] = []

    def __call__(self, event: TraceEvent) -> None:
        if event.component == "driver_core" and event.kind == "initcall":
            self.check(f"{event.fields.get('level')} {event.fields.get('fn')}")

    # -- the check --------------------------------------------------------------------------------
    def check(self, after: str) -> IsolationCheck:
        state = self.pkvm.state
        if not self.requested:
            result = IsolationCheck(after, False, note="pKVM off")
        elif state == "failed":
            result = IsolationCheck(after, False, note=f"pKVM failed ({self.pkvm.failure})")
        elif state != "finalised":
            result = IsolationCheck(after, True, tuple(self._before_takeover()))
        else:
            result = IsolationCheck(after, True, tuple(self._after_takeover()))
        self.checks.append(result)
        trace = self.machine.trace
        if trace.enabled:
            trace.emit(
                COMPONENT,
                "check",
                after=after,
                protected=result.protected,
                ok=result.ok,
                violations=list(result.violations),
                note=result.note,
            )
        return result

    def _before_takeover(self) -> Iterable[str]:
        for smmu in self.machine.smmus.values():
            cr0 = smmu.regs.read(Reg.CR0)
            if cr0 & _ENABLES:
                yield f"{smmu.name}: programmed by the host before the hyp took it over (CR0={cr0:#x})"

    def _after_takeover(self) -> Iterable[str]:
        iommu = self._iommu()
        hyp_smmus: list[HypSmmuV3] = list(getattr(iommu.ops, "smmus", ())) if iommu is not None else []
        mp = self.pkvm.mem_protect
        foreign = [
            (pfn << PAGE_SHIFT, (pfn + n) << PAGE_SHIFT, str(owner))
            for pfn, n, owner in mp.non_host_owned_ranges()
        ]
        idmap = iommu.idmap if iommu is not None else None
        for path, smmu in self.machine.smmus.items():
            hyp = next((h for h in hyp_smmus if h.base == smmu.base and h.taken_over), None)
            if hyp is None:
                yield f"{smmu.name}: not taken over by the hyp"
                continue
            if smmu.smmu_enabled:
                base = STRTAB_BASE.ADDR.get_address(smmu.strtab_base)
                if base != hyp.strtab_base:
                    yield (
                        f"{smmu.name}: walks a stream table the hyp does not control ({base:#x}, "
                        f"the hyp's shadow is at {hyp.strtab_base:#x})"
                    )
                else:
                    root = idmap.root if idmap is not None else None
                    yield from self._streams(path, smmu, root)
            elif not GBPA.ABORT.get(smmu.gbpa):
                yield f"{smmu.name}: disabled with GBPA in bypass"
            yield from self._tlb(smmu, foreign)
        if idmap is not None:
            for start, end, owner in foreign:
                for run in idmap.table.walk_runs(start, end):
                    yield f"identity stage-2 maps {owner} memory at {max(start, run.iova):#x}"
                    break

    def _streams(self, path: str, smmu: SmmuV3, root: int | None) -> Iterable[str]:
        cached = {cfg.sid: cfg for cfg in smmu.config_cache.cached_streams()}
        sids = sorted(
            {
                d.stream_id
                for d in self.machine.dma_devices.values()
                if d.smmu == path and d.stream_id is not None
            }
        )
        for sid in sids:
            config: SteConfig
            cfg = cached.get(sid)
            if cfg is not None:
                if cfg.illegal is not None or cfg.config == SteConfig.ABORT:
                    continue
                config, s2 = cfg.config, cfg.s2
                ttb = cfg.s2_walk.ttb if cfg.s2_walk is not None else None
                vmid, where = cfg.vmid, "cached"
            else:
                ste = self._read_ste(smmu, sid)
                if ste is None or not STE.V.get(ste) or STE.CONFIG.get(ste) < SteConfig.BYPASS:
                    continue
                config = SteConfig(STE.CONFIG.get(ste))
                s2 = config in (SteConfig.S2_TRANS, SteConfig.NESTED)
                ttb, vmid, where = STE.S2TTB.get_address(ste), STE.S2VMID.get(ste), "in memory"
            if not s2:
                yield f"{smmu.name}: SID {sid:#x} {config.name} without the identity stage-2 ({where})"
            elif ttb != root or vmid != 0:
                yield f"{smmu.name}: SID {sid:#x} stage 2 is not the identity map (S2TTB={ttb}, VMID={vmid})"

    def _read_ste(self, smmu: SmmuV3, sid: int) -> int | None:
        ram = self.machine.bus.ram
        base = STRTAB_BASE.ADDR.get_address(smmu.strtab_base)
        cfg = smmu.strtab_base_cfg
        if sid >> STRTAB_BASE_CFG.LOG2SIZE.get(cfg):
            return None
        if STRTAB_BASE_CFG.FMT.get(cfg) == StrtabFmt.TWO_LEVEL:
            split = STRTAB_BASE_CFG.SPLIT.get(cfg)
            desc = ram.read_int(base + 8 * (sid >> split), 8)
            span = L1STD.SPAN.get(desc)
            index = sid & ((1 << split) - 1)
            if not span or index >> (span - 1):
                return None
            address = L1STD.L2PTR.get_address(desc) + index * STE_SIZE
        else:
            address = base + sid * STE_SIZE
        return STE.from_bytes(ram.read(address, STE_SIZE))

    @staticmethod
    def _tlb(smmu: SmmuV3, foreign: list[tuple[int, int, str]]) -> Iterable[str]:
        for entry in smmu.tlb.entries():
            lo, hi = entry.output_base, entry.output_base + entry.size
            for start, end, owner in foreign:
                if lo < end and start < hi:
                    yield f"{smmu.name}: a cached translation of {entry.input_base:#x} reaches {owner} memory"
                    break


__all__ = ["COMPONENT", "IsolationCheck", "IsolationOracle"]
