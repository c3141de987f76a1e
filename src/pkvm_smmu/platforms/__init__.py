"""Device trees shipped with the package. ``default_platform()`` is the embedded default: 4 GiB
of RAM, a GICv3 + ITS, one SMMUv3, a PCIe ECAM bridge with DMA endpoints and one platform DMA
engine behind the SMMU (see ``default.dts``)."""

from __future__ import annotations

from importlib import resources

from pkvm_smmu.devicetree import DeviceTree, load_devicetree_string

DEFAULT = "default"


def platform_names() -> list[str]:
    """Names of the shipped trees (file names without ``.dts``)."""
    folder = resources.files(__package__)
    return sorted(item.name[: -len(".dts")] for item in folder.iterdir() if item.name.endswith(".dts"))


def platform_source(name: str = DEFAULT) -> str:
    """The DTS text of a shipped tree; KeyError naming the choices when there is none."""
    item = resources.files(__package__) / f"{name}.dts"
    if not item.is_file():
        raise KeyError(f"no shipped platform '{name}' (have: {', '.join(platform_names())})")
    return item.read_text(encoding="utf-8")


def load_platform(name: str = DEFAULT) -> DeviceTree:
    return load_devicetree_string(platform_source(name), f"{__package__}/{name}.dts")


def default_platform() -> DeviceTree:
    return load_platform(DEFAULT)
