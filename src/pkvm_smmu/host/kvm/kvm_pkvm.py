"""``asm/kvm_pkvm.h``: how big the hyp's carveout must be. Linux compiles these into both the host
(``kvm_hyp_reserve``) and the hyp; the host's copy lives here."""

from __future__ import annotations

from pkvm_smmu.host.mm import PAGE_SHIFT, PAGE_SIZE

PTRS_PER_PTE = 512
PGTABLE_LEVELS = 4
SZ_1G = 1 << 30
STRUCT_HYP_PAGE_SIZE = 8  # sizeof(struct hyp_page)
KVM_MAX_PVMS = 255


def hyp_pgtable_max_pages(nr_pages: int) -> int:
    """Table pages to map ``nr_pages`` at page granularity, worst case."""
    total = 0
    for _ in range(PGTABLE_LEVELS):
        nr_pages = -(-nr_pages // PTRS_PER_PTE)
        total += nr_pages
    return total


def host_s2_pgtable_pages(ram_pages: list[int]) -> int:
    return sum(hyp_pgtable_max_pages(p) for p in ram_pages) + 16 + hyp_pgtable_max_pages(SZ_1G >> PAGE_SHIFT)


def hyp_s1_pgtable_pages(ram_pages: list[int]) -> int:
    return sum(hyp_pgtable_max_pages(p) for p in ram_pages) + hyp_pgtable_max_pages(SZ_1G >> PAGE_SHIFT)


def hyp_vmemmap_pages(ram_pages: list[int]) -> int:
    return -(-sum(p * STRUCT_HYP_PAGE_SIZE for p in ram_pages) // PAGE_SIZE)


def hyp_vm_table_pages() -> int:
    return -(-(KVM_MAX_PVMS * 8) // PAGE_SIZE)


__all__ = [
    "host_s2_pgtable_pages",
    "hyp_pgtable_max_pages",
    "hyp_s1_pgtable_pages",
    "hyp_vm_table_pages",
    "hyp_vmemmap_pages",
]
