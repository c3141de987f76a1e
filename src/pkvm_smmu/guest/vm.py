"""A protected VM as the guest sees it: the memory the host donated, reached through its stage-2.

The VM itself is created by the host (``__pkvm_init_vm`` returns its handle, the ``vm_id`` here). The
guest's loads and stores go through the guest stage-2 that the hypervisor keeps: a gfn the guest does
not own or borrow faults, a borrowed page is writable only if it was shared writable. Pages the guest
gives back (``relinquish``) are poisoned and returned to the host by the hypervisor.
"""

from __future__ import annotations

from pkvm_smmu.hyp.contracts import KvmPgtableProt, PageState
from pkvm_smmu.hyp.pkvm import Pkvm
from pkvm_smmu.machine.bus import ExternalAbort, Initiator, InitiatorKind
from pkvm_smmu.machine.cpu import CpuFault
from pkvm_smmu.machine.memory import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE


class ProtectedVm:
    def __init__(self, vm_id: int, pkvm: Pkvm) -> None:
        self.vm_id = vm_id
        self.pkvm = pkvm
        self.initiator = Initiator(InitiatorKind.CPU_EL1, f"guest{vm_id:#x}")

    @property
    def alive(self) -> bool:
        return self.pkvm.mem_protect.vm_exists(self.vm_id)

    @property
    def memory(self) -> dict[int, int]:
        """gfn -> pfn for every page the guest owns or borrows."""
        return {gfn: pte.pfn for gfn, pte in self.pkvm.mem_protect.guest_pages(self.vm_id).items()}

    def owned_pages(self) -> dict[int, int]:
        pages = self.pkvm.mem_protect.guest_pages(self.vm_id)
        return {gfn: pte.pfn for gfn, pte in pages.items() if pte.state is PageState.OWNED}

    # -- what the host does to the VM (host hypercalls) -----------------------------------------
    def donate(self, pfn: int, gfn: int) -> int:
        """The host gives the guest a page (``__pkvm_host_donate_guest``)."""
        return self.pkvm.hvc("__pkvm_host_donate_guest", pfn, gfn, self.vm_id)

    def teardown(self) -> int:
        """The host destroys the VM (``__pkvm_teardown_vm``); its pages become reclaimable."""
        return self.pkvm.hvc("__pkvm_teardown_vm", self.vm_id)

    # -- what the guest does ----------------------------------------------------------------------
    def relinquish(self, gfn: int) -> int:
        """The guest gives a page back to the host (``__pkvm_guest_relinquish_to_host``)."""
        return self.pkvm.mem_protect.guest_relinquish_to_host(self.vm_id, gfn)

    def read(self, ipa: int, size: int) -> int | CpuFault:
        data = self.read_bytes(ipa, size)
        return data if isinstance(data, CpuFault) else int.from_bytes(data, "little")

    def write(self, ipa: int, size: int, value: int) -> CpuFault | None:
        return self.write_bytes(ipa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def read_bytes(self, ipa: int, length: int) -> bytes | CpuFault:
        out = bytearray()
        for address, chunk in self._chunks(ipa, length):
            pa = self._translate(address, False)
            if isinstance(pa, CpuFault):
                return pa
            data = self.pkvm.bus.read_bytes(self.initiator, pa, chunk)
            if isinstance(data, ExternalAbort):
                return CpuFault(address, False, data.reason)
            out += data
        return bytes(out)

    def write_bytes(self, ipa: int, data: bytes) -> CpuFault | None:
        # Translate every page first so that a faulting store writes nothing.
        chunks = list(self._chunks(ipa, len(data)))
        targets: list[int] = []
        for address, _ in chunks:
            pa = self._translate(address, True)
            if isinstance(pa, CpuFault):
                return pa
            targets.append(pa)
        offset = 0
        for pa, (address, chunk) in zip(targets, chunks, strict=True):
            err = self.pkvm.bus.write_bytes(self.initiator, pa, data[offset : offset + chunk])
            if err is not None:
                return CpuFault(address, True, err.reason)
            offset += chunk
        return None

    @staticmethod
    def _chunks(ipa: int, length: int) -> list[tuple[int, int]]:
        chunks = []
        while length > 0:
            chunk = min(length, PAGE_SIZE - (ipa & PAGE_MASK))
            chunks.append((ipa, chunk))
            ipa += chunk
            length -= chunk
        return chunks

    def _translate(self, ipa: int, is_write: bool) -> int | CpuFault:
        pte = self.pkvm.mem_protect.guest_pte(self.vm_id, ipa >> PAGE_SHIFT)
        if pte is None:
            return CpuFault(ipa, is_write, f"guest stage-2 fault: gfn {ipa >> PAGE_SHIFT:#x} not mapped")
        needed = KvmPgtableProt.W if is_write else KvmPgtableProt.R
        if not pte.prot & needed:
            return CpuFault(ipa, is_write, f"guest stage-2 permission fault at gfn {ipa >> PAGE_SHIFT:#x}")
        return (pte.pfn << PAGE_SHIFT) | (ipa & PAGE_MASK)
