"""verify layer of pkvm-smmu (see DESIGN.md)."""
