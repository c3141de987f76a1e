"""``apply(system, action)``: carry one action out on a ``System`` and say what happened.

Host actions go through the host's EL1 CPU port (so a store to a donated page faults and a store
to the SMMU's registers traps to the hyp), through its hypercall instruction, or through the host
kernel's own driver code; device actions through the machine's endpoints. An argument outside what
the hardware can express (a 3-byte load, a negative address) is refused with an "invalid" result
and changes nothing; every other argument is carried out, whatever it is.

``apply`` itself never catches exceptions: one escaping from the model or the hyp is a finding,
which the campaign runner records (``pkvm_smmu.verify.fuzz``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pkvm_smmu.host.arm_smmu_v3.mmio import HwFault
from pkvm_smmu.host.iommu import DmaDirection, dma_map_single, dma_mapping_error, dma_unmap_single
from pkvm_smmu.machine.cpu import CpuFault
from pkvm_smmu.machine.devices.endpoint import DmaResult
from pkvm_smmu.machine.memory import PAGE_SHIFT
from pkvm_smmu.machine.smmu.translate import AtsResponse
from pkvm_smmu.verify.adversary._actions import (
    ACCESS_SIZES,
    DMA_MODES,
    DOMAIN_KINDS,
    DONATIONS,
    TARGETS,
    U64_MAX,
    Action,
    Advance,
    Attach,
    Command,
    Dma,
    DmaMap,
    DmaUnmap,
    Donate,
    Hypercall,
    IommuMap,
    IommuUnmap,
    MemWrite,
    RegRead,
    RegWrite,
)
from pkvm_smmu.verify.adversary._system import DmaMapping, System
from pkvm_smmu.verify.adversary._targets import host_smmus, resolve

MAX_DMA_BYTES = 1 << 16
MAX_MAP_BYTES = 4 << 20  # iommu_map/dma_map sizes: 1024 pages at most, so a step stays cheap
MAX_MEM_WRITE = 64
MAX_ADVANCE_NS = 10_000_000  # a stopped queue makes the host take a GERROR storm: 10 ms ~ 7 s of simulation
MAX_SID = (1 << 32) - 1
MAX_SSID = (1 << 20) - 1
MASK128 = (1 << 128) - 1
PATTERN = bytes(range(0xA0, 0xB0))
_DIRECTIONS = {
    "bidirectional": DmaDirection.BIDIRECTIONAL,
    "to-device": DmaDirection.TO_DEVICE,
    "from-device": DmaDirection.FROM_DEVICE,
}
PROT_RW = 0b110  # KVM_PGTABLE_PROT_R | W, for pages shared with an unprotected VM


def _fault(result: object) -> str:
    return f"fault ({result.reason})" if isinstance(result, CpuFault) else f"fault ({result!r})"


def _address(system: System, target: str, index: int, offset: int) -> int | str:
    """The address ``target``/``index`` + ``offset``, or why there is none."""
    if target not in TARGETS:
        return f"invalid: unknown target {target!r}"
    base = resolve(system, target, index)
    if base is None:
        return f"no {target} #{index}"
    address = base + offset
    if not 0 <= address <= U64_MAX:
        return f"invalid: address {address:#x} outside 64 bits"
    return address


def _pattern(size: int) -> bytes:
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


# -- registers and memory ------------------------------------------------------------------------------


def _smmu_address(system: System, smmu: int, offset: int, size: int) -> int | str:
    if size not in ACCESS_SIZES:
        return f"invalid: a CPU access is 1, 2, 4 or 8 bytes, not {size}"
    if not system.smmus:
        return "no SMMU on this platform"
    address = system.smmus[smmu % len(system.smmus)].base + offset
    if not 0 <= address <= U64_MAX - size + 1:
        return f"invalid: address {address:#x} outside 64 bits"
    return address


def _reg_read(system: System, action: RegRead) -> str:
    address = _smmu_address(system, action.smmu, action.offset, action.size)
    if isinstance(address, str):
        return address
    value = system.machine.host_cpu().read(address, action.size)
    return _fault(value) if isinstance(value, CpuFault) else f"read {value:#x}"


def _reg_write(system: System, action: RegWrite) -> str:
    address = _smmu_address(system, action.smmu, action.offset, action.size)
    if isinstance(address, str):
        return address
    value = action.value & ((1 << (8 * action.size)) - 1)
    fault = system.machine.host_cpu().write(address, action.size, value)
    return _fault(fault) if fault is not None else "done"


def _mem_write(system: System, action: MemWrite) -> str:
    if not 1 <= action.size <= MAX_MEM_WRITE:
        return f"invalid: a store of 1 to {MAX_MEM_WRITE} bytes, not {action.size}"
    address = _address(system, action.target, action.index, action.offset)
    if isinstance(address, str):
        return address
    if address + action.size - 1 > U64_MAX:
        return "invalid: the store crosses the top of the address space"
    value = action.value & ((1 << (8 * action.size)) - 1)
    cpu = system.machine.host_cpu()
    if action.size in ACCESS_SIZES:
        fault = cpu.write(address, action.size, value)
    else:
        fault = cpu.write_bytes(address, value.to_bytes(action.size, "little"))
    return _fault(fault) if fault is not None else f"stored at {address:#x}"


def _command(system: System, action: Command) -> str:
    smmus = host_smmus(system)
    if not smmus:
        return "no host command queue (the host drives no SMMU)"
    smmu = smmus[action.smmu % len(smmus)]
    if smmu.cmdq is None:
        return "no host command queue (not probed)"
    try:
        ret = smmu.cmdq.issue_cmdlist([action.command & MASK128], action.sync)
    except HwFault as fault:
        return f"fault ({fault})"
    return f"= {ret}"


# -- hypercalls and ownership ------------------------------------------------------------------------------


def _hypercall(system: System, action: Hypercall) -> str:
    return f"= {system.hvc(action.name, *action.args)}"


def _vm(system: System, protected: bool) -> int | str:
    """The adversary's VM of that kind, created on first use with a fresh host page as its state."""
    adv = system.adv
    handle = adv.vms.get(protected)
    if handle is not None:
        return handle
    page = system.host.mm.alloc_zeroed_pages(1)
    if page is None:
        return "no host page for a VM"
    handle = system.hvc("__pkvm_init_vm", int(page) >> PAGE_SHIFT, int(protected))
    if handle < 0:
        return f"__pkvm_init_vm = {handle}"
    adv.vms[protected] = handle
    return handle


def _donate(system: System, action: Donate) -> str:
    how = action.how
    if how not in DONATIONS:
        return f"invalid: unknown donation {how!r}"
    adv = system.adv
    if how == "teardown":
        results = [f"{handle:#x}: {system.hvc('__pkvm_teardown_vm', handle)}" for handle in adv.vms.values()]
        adv.vms.clear()
        adv.shared_gfns.clear()
        return "teardown " + (", ".join(results) or "(no VM)")
    address = _address(system, action.target, action.index, action.offset)
    if isinstance(address, str):
        return address
    pfn = address >> PAGE_SHIFT
    if how == "share-hyp":
        return f"pfn {pfn:#x}: {system.hvc('__pkvm_host_share_hyp', pfn)}"
    if how == "unshare-hyp":
        return f"pfn {pfn:#x}: {system.hvc('__pkvm_host_unshare_hyp', pfn)}"
    if how == "reclaim":
        return f"pfn {pfn:#x}: {system.hvc('__pkvm_host_reclaim_page', pfn)}"
    if how == "vm-state":
        handle = system.hvc("__pkvm_init_vm", pfn, 1)
        if handle >= 0 and True not in adv.vms:
            adv.vms[True] = handle
        return f"pfn {pfn:#x}: VM {handle:#x}" if handle >= 0 else f"pfn {pfn:#x}: {handle}"
    if how == "unshare-guest":
        shared = adv.shared_gfns.get(pfn)
        if shared is None:
            return f"pfn {pfn:#x}: not shared with a VM"
        handle, gfn = shared
        ret = system.hvc("__pkvm_host_unshare_guest", gfn, handle)
        if not ret:
            del adv.shared_gfns[pfn]
        return f"pfn {pfn:#x}: {ret}"
    vm = _vm(system, how == "donate-guest")
    if isinstance(vm, str):
        return vm
    gfn = adv.next_gfn
    adv.next_gfn += 1
    if how == "donate-guest":
        return f"pfn {pfn:#x} -> gfn {gfn:#x}: {system.hvc('__pkvm_host_donate_guest', pfn, gfn, vm)}"
    ret = system.hvc("__pkvm_host_share_guest", pfn, gfn, vm, PROT_RW)
    if not ret:
        adv.shared_gfns[pfn] = (vm, gfn)
    return f"pfn {pfn:#x} -> gfn {gfn:#x}: {ret}"


# -- devices -------------------------------------------------------------------------------------------------


def _dma_text(result: DmaResult | AtsResponse) -> str:
    if isinstance(result, AtsResponse):
        text = f"ATS {result.status.name}"
        if result.status.name == "SUCCESS":
            rights = ("R" if result.readable else "") + ("W" if result.writable else "")
            text += f" -> {result.output_address:#x} {rights or '-'}"
        return text
    if result.ok:
        return f"ok ({result.outcome.value})"
    failure = result.failure.value if result.failure is not None else "failed"
    return f"{failure} at {result.address:#x}" + (" (event recorded)" if result.event is not None else "")


def _dma(system: System, action: Dma) -> str:
    if action.mode not in DMA_MODES:
        return f"invalid: unknown DMA mode {action.mode!r}"
    if not 0 <= action.sid <= MAX_SID:
        return f"invalid: StreamID {action.sid:#x} outside 32 bits"
    if action.ssid is not None and not 0 <= action.ssid <= MAX_SSID:
        return f"invalid: SubstreamID {action.ssid:#x} outside 20 bits"
    if not 0 <= action.size <= MAX_DMA_BYTES:
        return f"invalid: DMA size {action.size} (0 to {MAX_DMA_BYTES})"
    if not 0 <= action.address <= U64_MAX:
        return f"invalid: address {action.address:#x} outside 64 bits"
    if not system.smmus:
        return "no SMMU on this platform"
    endpoint = system.endpoint(action.smmu, action.sid)
    data = _pattern(action.size)
    ssid = action.ssid
    result: DmaResult | AtsResponse
    if action.mode == "untranslated":
        if action.write:
            result = endpoint.write(action.address, data, ssid=ssid)
        else:
            result = endpoint.read(action.address, action.size, ssid=ssid)
    elif action.mode == "ats-request":
        result = endpoint.ats_translate(action.address, ssid, action.write)
    elif action.mode == "ats":
        if action.write:
            result = endpoint.ats_write(action.address, data, ssid=ssid)
        else:
            result = endpoint.ats_read(action.address, action.size, ssid=ssid)
    else:
        payload = data if action.write else None
        result = endpoint.issue_translated(action.address, action.size, data=payload, ssid=ssid)
    return f"{endpoint.name}: {_dma_text(result)}"


# -- the host kernel's driver operations ---------------------------------------------------------------------


def _device(system: System, index: int) -> Any:
    return system.devices[index % len(system.devices)] if system.devices else None


def _attach(system: System, action: Attach) -> str:
    if action.domain not in DOMAIN_KINDS:
        return f"invalid: unknown domain kind {action.domain!r}"
    dev = _device(system, action.device)
    if dev is None:
        return "no device behind an IOMMU"
    iommu = system.host.iommu
    group = iommu.iommu_group_get(dev)
    ops = iommu.dev_iommu_ops(dev)
    if group is None or ops is None:
        return f"{dev.name}: no IOMMU group"
    domain: Any
    if action.domain == "default":
        domain = group.default_domain
    elif action.domain == "paging":
        domain = iommu.iommu_paging_domain_alloc(dev)
        if isinstance(domain, int):
            return f"{dev.name}: domain alloc = {domain}"
        system.adv.domains.append(domain)
    else:
        domain = getattr(ops, f"{action.domain}_domain", None)
    if domain is None:
        return f"{dev.name}: no {action.domain} domain"
    return f"{dev.name} -> {iommu.domain_label(domain)}: {iommu.iommu_group_replace_domain(group, domain)}"


def _dma_map(system: System, action: DmaMap) -> str:
    direction = _DIRECTIONS.get(action.direction)
    if direction is None:
        return f"invalid: unknown direction {action.direction!r}"
    if not 1 <= action.size <= MAX_MAP_BYTES:
        return f"invalid: size {action.size} (1 to {MAX_MAP_BYTES})"
    dev = _device(system, action.device)
    if dev is None:
        return "no device behind an IOMMU"
    paddr = _address(system, action.target, action.index, action.offset)
    if isinstance(paddr, str):
        return paddr
    dma = dma_map_single(dev, paddr, action.size, direction)
    if dma_mapping_error(dev, dma):
        return f"{dev.name}: {paddr:#x} not mapped (DMA_MAPPING_ERROR)"
    system.adv.mappings.append(DmaMapping(action.device, dma, paddr, action.size, action.direction))
    return f"{dev.name}: {paddr:#x} at IOVA {dma:#x} (mapping #{len(system.adv.mappings) - 1})"


def _dma_unmap(system: System, action: DmaUnmap) -> str:
    mappings = system.adv.mappings
    if not mappings:
        return "nothing mapped"
    mapping = mappings.pop(action.slot % len(mappings))
    dev = _device(system, mapping.device)
    dma_unmap_single(dev, mapping.dma, mapping.size, _DIRECTIONS[mapping.direction])
    return f"{dev.name}: IOVA {mapping.dma:#x} unmapped"


def _paging_domain(system: System, index: int) -> tuple[Any, Any] | str:
    dev = _device(system, index)
    if dev is None:
        return "no device behind an IOMMU"
    domain = system.host.domain_of(dev)
    if domain is None or not domain.type.is_paging:
        return f"{dev.name}: not attached to a paging domain"
    return dev, domain


def _range_ok(iova: int, size: int) -> str | None:
    if not 1 <= size <= MAX_MAP_BYTES:
        return f"invalid: size {size} (1 to {MAX_MAP_BYTES})"
    if not 0 <= iova <= U64_MAX - size + 1:
        return f"invalid: IOVA range at {iova:#x} outside 64 bits"
    return None


def _iommu_map(system: System, action: IommuMap) -> str:
    bad = _range_ok(action.iova, action.size)
    if bad is not None:
        return bad
    found = _paging_domain(system, action.device)
    if isinstance(found, str):
        return found
    dev, domain = found
    paddr = _address(system, action.target, action.index, action.offset)
    if isinstance(paddr, str):
        return paddr
    ret = system.host.iommu.iommu_map(domain, action.iova, paddr, action.size, action.prot & 0x3F)
    return f"{dev.name}: IOVA {action.iova:#x} -> {paddr:#x}: {ret}"


def _iommu_unmap(system: System, action: IommuUnmap) -> str:
    bad = _range_ok(action.iova, action.size)
    if bad is not None:
        return bad
    found = _paging_domain(system, action.device)
    if isinstance(found, str):
        return found
    dev, domain = found
    unmapped = system.host.iommu.iommu_unmap(domain, action.iova, action.size)
    return f"{dev.name}: {unmapped} bytes unmapped at IOVA {action.iova:#x}"


def _advance(system: System, action: Advance) -> str:
    if not 0 <= action.ns <= MAX_ADVANCE_NS:
        return f"invalid: {action.ns} ns (0 to {MAX_ADVANCE_NS})"
    system.machine.clock.advance(action.ns)
    system.host.run_timers()
    return f"now {system.machine.clock.now_ns} ns"


_APPLY: dict[type[Action], Callable[[System, Any], str]] = {
    RegRead: _reg_read,
    RegWrite: _reg_write,
    MemWrite: _mem_write,
    Command: _command,
    Hypercall: _hypercall,
    Donate: _donate,
    Dma: _dma,
    Attach: _attach,
    DmaMap: _dma_map,
    DmaUnmap: _dma_unmap,
    IommuMap: _iommu_map,
    IommuUnmap: _iommu_unmap,
    Advance: _advance,
}


def apply(system: System, action: Action) -> str:
    """Carry ``action`` out on ``system``; a short text saying what happened."""
    handler = _APPLY.get(type(action))
    if handler is None:
        return f"invalid: {type(action).__name__} is not an action of the vocabulary"
    return handler(system, action)


__all__ = ["MAX_DMA_BYTES", "MAX_MAP_BYTES", "apply"]
