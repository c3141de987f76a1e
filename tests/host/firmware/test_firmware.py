"""The kernel's reading of the tree: populated devices, resources, of_iommu specs, fw_devlink."""

from __future__ import annotations

from pathlib import Path

import pytest

from pkvm_smmu.devicetree import Bdf, PciSpace, load_devicetree, load_devicetree_string
from pkvm_smmu.host.firmware import (
    IRQ_TYPE_EDGE_RISING,
    IRQ_TYPE_LEVEL_HIGH,
    Firmware,
    FwNode,
    ResourceType,
    all_fwnode_links,
    iommu_fwnodes,
    of_fwnode_links,
    of_iommu_specs,
    of_pci_iommu_specs,
    of_platform_populate,
    pci_host_bridge_descs,
    pci_intx,
    smmu_descs,
)
from pkvm_smmu.platforms import default_platform

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.fixture
def fw() -> Firmware:
    return Firmware(default_platform())


def test_fwnodes_are_hashable_handles_keyed_by_path(fw: Firmware) -> None:
    smmu = fw.fwnode("/iommu@9050000")
    assert smmu is fw.fwnode("&smmu")
    assert smmu == FwNode("/iommu@9050000", "whatever") and len({smmu, fw.fwnode("&smmu")}) == 1
    assert smmu.compatible == ("arm,smmu-v3",) and smmu.name == "iommu@9050000"
    assert smmu.full_name == "/iommu@9050000" and fw.node(smmu).path == smmu.path


def test_memory_of_the_default_platform(fw: Firmware) -> None:
    (ram,) = fw.memory()
    assert (ram.base, ram.size, ram.fwnode.path) == (0x4000_0000, 4 << 30, "/memory@40000000")


def test_of_platform_populate_describes_devices_with_resources(fw: Firmware) -> None:
    devices = {d.name: d for d in of_platform_populate(fw)}
    # The GIC is an irqchip (no device); cpus/memory/chosen have no compatible.
    assert set(devices) == {"psci", "9050000.iommu", "a000000.dma", "3f000000.pcie"}
    smmu = devices["9050000.iommu"]
    assert smmu.fwnode == fw.fwnode("&smmu") and smmu.dma_coherent and smmu.parent is None
    mem = smmu.mem()
    assert mem is not None and (mem.type, mem.start, mem.size, mem.end) == (
        ResourceType.MEM, 0x0905_0000, 0x20000, 0x0906_FFFF,
    )  # fmt: skip
    gerror = smmu.irq_byname("gerror")
    assert gerror is not None
    assert (gerror.start, gerror.line, gerror.flags) == (109, "intid:109", IRQ_TYPE_EDGE_RISING)
    assert [r.name for r in smmu.irqs()] == ["eventq", "gerror", "cmdq-sync"]
    assert devices["a000000.dma"].irqs()[0].line == "intid:112"


def test_populate_recurses_into_simple_bus_only() -> None:
    text = """/dts-v1/;
/ { #address-cells = <1>; #size-cells = <1>;
    soc { compatible = "simple-bus"; #address-cells = <1>; #size-cells = <1>; ranges;
        uart@1000 { compatible = "arm,pl011", "arm,primecell"; reg = <0x1000 0x100>; };
        off@2000 { compatible = "x,y"; reg = <0x2000 0x100>; status = "disabled"; };
        nested { compatible = "x,mfd"; sub { compatible = "x,sub"; }; };
    };
    other { compatible = "x,dev"; child { compatible = "x,child"; }; };
};"""
    fw = Firmware(load_devicetree_string(text, "bus.dts"))
    devices = {d.name: d for d in of_platform_populate(fw)}
    assert set(devices) == {"soc", "1000.uart", "soc:nested", "other"}
    assert devices["1000.uart"].bus == "amba" and devices["1000.uart"].parent == fw.fwnode("/soc")


def test_smmu_description_for_the_driver() -> None:
    fw = Firmware(load_devicetree(FIXTURES / "fvp-style.dts"))
    (smmu,) = smmu_descs(fw)
    assert (smmu.base, smmu.size, smmu.dma_coherent) == (0x2B40_0000, 0x10_0000, True)
    assert sorted(smmu.irqs) == ["cmdq-sync", "eventq", "gerror", "priq"]
    assert smmu.irqs["gerror"].start == 32 + 79
    assert smmu.msi_parent == fw.fwnode("&its") and smmu.msi_device_id == 0x10000
    assert smmu.options == frozenset()


def test_pci_host_bridge_description(fw: Firmware) -> None:
    (bridge,) = pci_host_bridge_descs(fw)
    assert (bridge.ecam_base, bridge.ecam_size, bridge.bus_range, bridge.domain) == (
        0x3F00_0000, 0x100_0000, (0, 15), 0,
    )  # fmt: skip
    (window,) = bridge.windows
    assert (window.space, window.cpu_address, window.size) == (PciSpace.MEM32, 0x1000_0000, 0x2EFF_0000)
    assert bridge.has_iommu_map and bridge.msi_parent == fw.fwnode("&its")
    assert bridge.ecam_offset(Bdf(1, 2, 3), 0x10) == 1 << 20 | (2 << 3 | 3) << 12 | 0x10
    intx = pci_intx(fw, bridge.fwnode, Bdf(0, 2, 0), 1)
    assert intx is not None and (intx.line, intx.flags) == ("intid:37", IRQ_TYPE_LEVEL_HIGH)
    assert pci_intx(fw, bridge.fwnode, Bdf(0, 3, 0), 2).line == "intid:35"  # type: ignore[union-attr]


# -- of_iommu --------------------------------------------------------------------------------------------


def test_platform_iommus_to_spec(fw: Firmware) -> None:
    (spec,) = of_iommu_specs(fw, fw.fwnode("/dma@a000000"))
    assert (spec.fwnode, spec.args, spec.available) == (fw.fwnode("&smmu"), (0x100,), True)
    assert of_iommu_specs(fw, fw.fwnode("&smmu")) == []


MASKED = """/dts-v1/;
/ { #address-cells = <2>; #size-cells = <2>;
    smmu: iommu@2b400000 { compatible = "arm,smmu-v3"; reg = <0 0x2b400000 0 0x20000>; #iommu-cells = <1>; };
    off: iommu@2c000000 { compatible = "arm,smmu-v3"; reg = <0 0x2c000000 0 0x20000>; #iommu-cells = <1>;
        status = "disabled"; };
    pcie@40000000 { compatible = "pci-host-ecam-generic"; device_type = "pci";
        reg = <0 0x40000000 0 0x1000000>; #address-cells = <3>; #size-cells = <2>;
        iommu-map-mask = <0xfff8>;
        iommu-map = <0x000 &smmu 0x1000 0x100>, <0x100 &off 0x0 0x100>; };
    dev@1000 { compatible = "x,dev"; reg = <0 0x1000 0 0x100>; iommus = <&smmu 7>, <&smmu 9>; };
};"""


@pytest.mark.parametrize(
    ("bdf", "iommu", "sid", "available"),
    [
        (Bdf(0, 0, 0), "/iommu@2b400000", 0x1000, True),
        (Bdf(0, 3, 5), "/iommu@2b400000", 0x1018, True),  # function bits masked away
        (Bdf(1, 4, 0), "/iommu@2c000000", 0x20, False),  # mapped to a disabled SMMU
        (Bdf(2, 0, 0), None, None, None),  # no entry: no IOMMU
    ],
)
def test_pci_rid_through_iommu_map(
    bdf: Bdf, iommu: str | None, sid: int | None, available: bool | None
) -> None:
    fw = Firmware(load_devicetree_string(MASKED, "masked.dts"))
    specs = of_pci_iommu_specs(fw, fw.fwnode("/pcie@40000000"), bdf)
    if iommu is None:
        assert specs == []
    else:
        (spec,) = specs
        assert (spec.fwnode.path, spec.args, spec.available) == (iommu, (sid,), available)
    assert of_pci_iommu_specs(fw, fw.fwnode("/pcie@40000000"), bdf.rid) == specs


def test_several_iommus_entries_are_all_reported() -> None:
    fw = Firmware(load_devicetree_string(MASKED, "masked.dts"))
    specs = of_iommu_specs(fw, fw.fwnode("/dev@1000"))
    assert [s.args for s in specs] == [(7,), (9,)]
    assert {n.path for n in iommu_fwnodes(fw)} == {"/iommu@2b400000", "/iommu@2c000000"}


def test_bridge_without_iommu_map_has_no_iommu() -> None:
    fw = Firmware(load_devicetree_string(MASKED.replace("iommu-map", "x-iommu-map"), "nomap.dts"))
    assert of_pci_iommu_specs(fw, fw.fwnode("/pcie@40000000"), Bdf(0, 1, 0)) == []


# -- fw_devlink ------------------------------------------------------------------------------------------


def test_fw_devlink_dependencies_on_the_iommu(fw: Firmware) -> None:
    dma = {link.supplier.path: link for link in of_fwnode_links(fw, fw.fwnode("/dma@a000000"))}
    assert dma["/iommu@9050000"].property == "iommus" and dma["/iommu@9050000"].populated
    assert not dma["/interrupt-controller@8000000"].populated  # an irqchip never gets a device
    bridge = {link.supplier.path: link.property for link in of_fwnode_links(fw, fw.fwnode("/pcie@3f000000"))}
    assert bridge["/iommu@9050000"] == "iommu-map"
    assert bridge["/interrupt-controller@8000000/msi-controller@8080000"] == "msi-map"
    smmu = fw.fwnode("&smmu")
    consumers_of_smmu = {link.consumer.path for link in all_fwnode_links(fw) if link.supplier == smmu}
    assert consumers_of_smmu == {"/dma@a000000", "/pcie@3f000000"}


def test_fw_devlink_uses_the_compatible_ancestor_and_skips_parents() -> None:
    text = """/dts-v1/;
/ { #address-cells = <1>; #size-cells = <1>;
    clk: clock-controller { compatible = "x,clk"; #clock-cells = <1>;
        inner: sub { #clock-cells = <0>; }; };
    bus { compatible = "simple-bus"; #address-cells = <1>; #size-cells = <1>; ranges; #clock-cells = <0>;
        dev { compatible = "x,dev"; clocks = <&inner>, <&clk 3>; gpios = <&bus_parent 1>; }; };
    bus_parent: gpio { compatible = "x,gpio"; #gpio-cells = <1>; };
    parentdep { compatible = "x,p"; #clock-cells = <0>;
        child { compatible = "x,c"; clocks = <&parentdep_label>; }; };
};"""
    text = text.replace('parentdep { compatible = "x,p";', 'parentdep_label: parentdep { compatible = "x,p";')
    fw = Firmware(load_devicetree_string(text, "links.dts"))
    links = of_fwnode_links(fw, fw.fwnode("/bus/dev"))
    found = [(link.supplier.path, link.property) for link in links]
    assert found == [("/clock-controller", "clocks"), ("/gpio", "gpios")]
    assert of_fwnode_links(fw, fw.fwnode("/parentdep/child")) == ()


def test_qemu_virt_tree_reads_like_linux_would() -> None:
    fw = Firmware(load_devicetree(FIXTURES / "qemu-virt-smmuv3.dtb"))
    devices = {d.name: d for d in of_platform_populate(fw)}
    assert {"9050000.smmuv3", "4010000000.pcie", "9000000.pl011"} <= set(devices)
    assert devices["9000000.pl011"].bus == "amba"
    (smmu,) = smmu_descs(fw)
    assert smmu.base == 0x0905_0000 and smmu.msi_parent is None and "priq" in smmu.irqs
    (bridge,) = pci_host_bridge_descs(fw)
    (spec,) = of_pci_iommu_specs(fw, bridge.fwnode, Bdf(0, 3, 0))
    assert spec.fwnode == smmu.fwnode and spec.args == (0x18,)
    assert bridge.msi_parent is not None and bridge.msi_parent.path == "/intc@8000000/v2m@8020000"
