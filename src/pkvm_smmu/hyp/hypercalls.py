"""The host's hypercall interface (``handle_host_hcall``): every argument is an untrusted register.

A call names a hypercall and passes 64-bit register values. Before a handler runs, each argument is
checked against the hypercall's argument spec (an int in u64 range, and the kind's own range: a pfn
inside the PA range, a page-aligned address, a prot within RWX...); a malformed call returns -EINVAL
and an unknown name ``SMCCC_RET_NOT_SUPPORTED``, as pKVM answers unknown function ids. Nothing a host
passes makes ``hvc`` raise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from errno import EINVAL
from typing import TYPE_CHECKING

from pkvm_smmu.hyp.contracts import KVM_PGTABLE_PROT_RWX
from pkvm_smmu.machine.memory import PAGE_MASK, PAGE_SHIFT
from pkvm_smmu.trace import TraceBus

if TYPE_CHECKING:
    from pkvm_smmu.hyp.mem_protect import MemProtect

SMCCC_RET_NOT_SUPPORTED = -1  # what pKVM returns for an unknown host function id
U64_MAX = (1 << 64) - 1


class Arg(Enum):
    """What a hypercall argument register holds, and so how it is validated."""

    U64 = "u64"  # any register value
    PFN = "pfn"  # a physical frame number inside the PA range
    GFN = "gfn"  # a guest frame number inside the IPA range
    NR_PAGES = "nr_pages"  # 1 .. number of frames in the PA range
    PAGE_ADDR = "page_addr"  # a page-aligned physical address inside the PA range
    HANDLE = "handle"  # a VM handle (looked up by the handler)
    PROT = "prot"  # kvm_pgtable_prot, within RWX
    BOOL = "bool"  # 0 or 1


Handler = Callable[..., int]


class HypercallInterface:
    """``hvc(name, *args)``: validate, dispatch, trace. Later designs add hypercalls with
    ``register_hypercall`` (e.g. the paravirtual IOMMU's map/unmap)."""

    def __init__(self, mem_protect: MemProtect, trace: TraceBus) -> None:
        self.mem_protect = mem_protect
        self.trace = trace
        self._calls: dict[str, tuple[Handler, tuple[Arg, ...]]] = {}

    def register_hypercall(self, name: str, handler: Handler, arg_spec: Sequence[Arg]) -> None:
        if name in self._calls:
            raise ValueError(f"hypercall {name} is already registered")
        self._calls[name] = (handler, tuple(arg_spec))

    def unregister_hypercall(self, name: str) -> None:
        self._calls.pop(name, None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._calls)

    def arg_spec(self, name: str) -> tuple[Arg, ...] | None:
        entry = self._calls.get(name)
        return entry[1] if entry is not None else None

    def hvc(self, name: str, *args: int) -> int:
        entry = self._calls.get(name) if isinstance(name, str) else None
        if entry is None:
            result = SMCCC_RET_NOT_SUPPORTED
        else:
            handler, spec = entry
            result = self._validate(spec, args)
            if result == 0:
                result = handler(*args)
        if self.trace.enabled:
            self.trace.emit(
                "hyp", "hypercall", name=str(name), args=[_loggable(arg) for arg in args], result=result
            )
        return result

    # -- validation -----------------------------------------------------------------------------
    def _validate(self, spec: tuple[Arg, ...], args: tuple[object, ...]) -> int:
        if len(args) != len(spec):
            return -EINVAL
        for kind, value in zip(spec, args, strict=True):
            if not self._valid(kind, value):
                return -EINVAL
        return 0

    def _valid(self, kind: Arg, value: object) -> bool:
        # bool is an int subclass but never a register value the host can pass
        if type(value) is not int or not 0 <= value <= U64_MAX:
            return False
        max_pfn = self.mem_protect.max_pfn
        if kind is Arg.PFN or kind is Arg.GFN:
            return value < max_pfn
        if kind is Arg.NR_PAGES:
            return 0 < value <= max_pfn
        if kind is Arg.PAGE_ADDR:
            return not value & PAGE_MASK and value >> PAGE_SHIFT < max_pfn
        if kind is Arg.PROT:
            return not value & ~int(KVM_PGTABLE_PROT_RWX)
        if kind is Arg.BOOL:
            return value in (0, 1)
        return True


def _loggable(value: object) -> object:
    return value if isinstance(value, int) else repr(value)
