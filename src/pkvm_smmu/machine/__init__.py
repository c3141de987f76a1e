"""machine layer of pkvm-smmu (see DESIGN.md)."""
