"""guest layer of pkvm-smmu (see DESIGN.md): protected VMs and the memory donated to them."""

from pkvm_smmu.guest.vm import ProtectedVm

__all__ = ["ProtectedVm"]
