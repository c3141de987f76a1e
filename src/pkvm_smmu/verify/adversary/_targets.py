"""Where the adversary's named targets are (``TARGETS``): found in the host kernel's, the hyp's and
the machine's state at the moment an action runs. Reading them changes nothing."""

from __future__ import annotations

from typing import Any

from pkvm_smmu.arch.registers import STRTAB_BASE_CFG, StrtabFmt
from pkvm_smmu.arch.strtab import STE_SIZE
from pkvm_smmu.machine.memory import PAGE_SHIFT
from pkvm_smmu.verify.adversary._system import System

STRTAB_SPLIT = 8  # the host driver's L2 tables cover 256 StreamIDs


def host_smmus(system: System) -> list[Any]:
    """The host driver's SMMU devices (arm-smmu-v3), in probe order; none under the PV designs."""
    return list(getattr(system.host, "smmus", ()) or ())


def hyp_smmus(system: System) -> list[Any]:
    return list(getattr(system.hyp_driver, "smmus", ()) or ())


def host_l2_tables(system: System) -> list[int]:
    tables: list[int] = []
    for smmu in host_smmus(system):
        l2 = smmu.strtab_cfg.l2
        tables.extend(l2[index] for index in sorted(l2))
    return tables


def host_masters(system: System) -> list[Any]:
    masters: list[Any] = []
    seen: set[int] = set()
    for smmu in host_smmus(system):
        for sid in sorted(smmu.streams):
            master = smmu.streams[sid]
            if id(master) not in seen:
                seen.add(id(master))
                masters.append(master)
    return masters


def host_cd_tables(system: System) -> list[int]:
    return [m.cd_table.cdtab_dma for m in host_masters(system) if m.cd_table.cdtab_dma]


def host_page_tables(system: System) -> list[int]:
    """Root tables of the paging domains devices are attached to, then of the adversary's own."""
    roots: list[int] = []
    domains = [system.host.domain_of(dev) for dev in system.devices] + system.adv.domains
    for domain in domains:
        pgtbl = getattr(domain, "pgtbl", None)
        root = getattr(pgtbl, "root", None)
        if isinstance(root, int) and root not in roots:
            roots.append(root)
    return roots


def host_ste_address(system: System, sid: int) -> int | None:
    """Where the host driver keeps the STE of ``sid`` (the first SMMU whose table has it)."""
    for smmu in host_smmus(system):
        cfg = smmu.strtab_cfg
        if not cfg.strtab_dma or not smmu.sid_in_range(sid):
            continue
        if STRTAB_BASE_CFG.FMT.get(cfg.strtab_base_cfg) == StrtabFmt.LINEAR:
            return int(cfg.strtab_dma) + sid * STE_SIZE
        l2 = cfg.l2.get(sid >> STRTAB_SPLIT)
        if l2 is not None:
            return int(l2) + (sid & ((1 << STRTAB_SPLIT) - 1)) * STE_SIZE
    return None


def foreign_runs(system: System) -> list[tuple[int, int, str]]:
    """Memory the host may not access: (address, size, owner), in address order."""
    return [
        (pfn << PAGE_SHIFT, count << PAGE_SHIFT, str(owner))
        for pfn, count, owner in system.mem_protect.non_host_owned_ranges()
    ]


def _pick(items: list[int], index: int) -> int | None:
    return items[index % len(items)] if items else None


def resolve(system: System, target: str, index: int) -> int | None:
    """The base address of ``target``/``index`` now, or None if there is no such thing."""
    if target == "raw":
        return 0
    if target in ("cmdq", "evtq", "priq", "strtab"):
        smmus = host_smmus(system)
        if not smmus:
            return None
        smmu = smmus[index % len(smmus)]
        if target == "strtab":
            return int(smmu.strtab_cfg.strtab_dma) or None
        queue = smmu.cmdq.q if target == "cmdq" and smmu.cmdq is not None else getattr(smmu, target)
        return int(queue.base_dma) if queue is not None else None
    if target == "l2":
        return _pick(host_l2_tables(system), index)
    if target == "ste":
        return host_ste_address(system, index) if index >= 0 else None
    if target == "cd":
        return _pick(host_cd_tables(system), index)
    if target == "pgtable":
        return _pick(host_page_tables(system), index)
    if target == "buffer":
        return _pick(system.adv.buffers, index)
    if target == "foreign":
        return _pick([start for start, _, _ in foreign_runs(system)], index)
    if target in ("shadow-strtab", "shadow-cmdq"):
        smmus = hyp_smmus(system)
        if not smmus:
            return None
        hyp = smmus[index % len(smmus)]
        if target == "shadow-strtab":
            return int(getattr(hyp, "strtab_base", 0)) or None
        cmdq = getattr(hyp, "cmdq", None)
        return int(cmdq.base) if cmdq is not None else None
    if target == "smmu-mmio":
        return _pick([smmu.base for smmu in system.smmus], index)
    if target == "msi":
        return _pick(system.doorbells, index)
    if target == "mapping":
        return _pick([m.paddr for m in system.adv.mappings], index)
    return None


__all__ = [
    "foreign_runs",
    "host_cd_tables",
    "host_l2_tables",
    "host_masters",
    "host_page_tables",
    "host_smmus",
    "host_ste_address",
    "hyp_smmus",
    "resolve",
]
