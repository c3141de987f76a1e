"""Loading DTS and DTB into one typed tree, and the tree's accessors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pkvm_smmu.devicetree import (
    DeviceTree,
    DeviceTreeError,
    interrupts,
    load_devicetree,
    load_devicetree_blob,
    load_devicetree_string,
    to_dtb,
)
from pkvm_smmu.platforms import default_platform, platform_source

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DEFAULT_DTS = Path(__file__).resolve().parents[2] / "src" / "pkvm_smmu" / "platforms" / "default.dts"


def compile_dtb(dts: Path, out: Path) -> Path:
    """A DTB of ``dts``: by dtc when installed, else by our own fdt writer."""
    dtc = shutil.which("dtc")
    if dtc is not None:
        subprocess.run([dtc, "-q", "-I", "dts", "-O", "dtb", "-o", str(out), str(dts)], check=True)
    else:
        out.write_bytes(to_dtb(load_devicetree(dts)))
    return out


@pytest.mark.parametrize("dts", [DEFAULT_DTS, FIXTURES / "fvp-style.dts"], ids=["default", "fvp-style"])
def test_dts_and_compiled_dtb_give_the_same_tree(dts: Path, tmp_path: Path) -> None:
    from_source = load_devicetree(dts)
    from_blob = load_devicetree(compile_dtb(dts, tmp_path / "out.dtb"))
    assert from_source.canonical() == from_blob.canonical()
    smmu = from_blob.compatible_nodes("arm,smmu-v3")[0]
    assert smmu.phandle is not None and from_blob.by_phandle(smmu.phandle) is smmu


def test_qemu_fixture_dts_matches_the_dtb_qemu_dumped() -> None:
    source = load_devicetree(FIXTURES / "qemu-virt-smmuv3.dts")
    blob = load_devicetree(FIXTURES / "qemu-virt-smmuv3.dtb")
    assert source.canonical() == blob.canonical()
    assert blob.node("/smmuv3@9050000").phandle == 0x8004


def test_our_dtb_writer_round_trips_every_property_byte() -> None:
    tree = load_devicetree(FIXTURES / "qemu-virt-smmuv3.dts")
    again = load_devicetree_blob(to_dtb(tree), "again.dtb")
    assert again.canonical() == tree.canonical()
    assert again.source == "again.dtb"


def test_default_platform_loads_from_package_data() -> None:
    tree = default_platform()
    assert "default.dts" in tree.source
    assert tree.canonical() == load_devicetree(DEFAULT_DTS).canonical()
    assert "pkvm-smmu,endpoints" in platform_source()


TYPED = """
/dts-v1/;
/memreserve/ 0x48000000 0x1000;
/ {
    #address-cells = <2>;
    #size-cells = <2>;
    aliases { serial0 = "/soc/uart@1000"; };
    gic: intc@8000000 {
        compatible = "arm,gic-v3";
        interrupt-controller;
        #interrupt-cells = <3>;
        reg = <0x0 0x8000000 0x0 0x10000>;
    };
    soc {
        compatible = "simple-bus";
        #address-cells = <1>;
        #size-cells = <1>;
        ranges = <0x0 0x0 0x20000000 0x100000>;
        interrupt-parent = <&gic>;
        uart: uart@1000 {
            compatible = "arm,pl011", "arm,primecell";
            reg = <0x1000 0x100>;
            interrupts = <0 5 4>;
            big = /bits/ 64 <0x123456789>;
            words = <1 2 3 4>;
            text = "a", "bc";
            flag;
        };
    };
};
"""


@pytest.fixture
def typed() -> DeviceTree:
    return load_devicetree_string(TYPED, "typed.dts")


def test_node_naming_labels_and_lookup(typed: DeviceTree) -> None:
    uart = typed.node("/soc/uart@1000")
    assert (uart.name, uart.node_name, uart.unit_address) == ("uart@1000", "uart", "1000")
    assert uart.labels == ("uart",)
    assert typed.find("&uart") is uart and typed.find("serial0") is uart and typed.find("/soc/uart") is uart
    assert uart.parent is typed.node("/soc") and uart in typed.node("/soc").children
    assert typed.find("/soc/nothing") is None
    assert typed.memreserves == [(0x48000000, 0x1000)]


def test_typed_property_accessors(typed: DeviceTree) -> None:
    uart = typed.node("&uart")
    assert uart.prop("big").u64() == 0x123456789
    assert uart.prop("words").u32s() == (1, 2, 3, 4)
    assert uart.prop("words").records(1, 1) == [(1, 2), (3, 4)]
    assert uart.prop("words").records(2) == [(0x1_00000002,), (0x3_00000004,)]
    assert uart.prop("text").strings() == ("a", "bc")
    assert uart.prop("flag").is_empty
    assert uart.compatible == ("arm,pl011", "arm,primecell") and uart.is_compatible("arm,primecell")
    with pytest.raises(DeviceTreeError, match=r"typed\.dts: /soc/uart@1000: words: expected one 32-bit cell"):
        uart.prop("words").u32()
    with pytest.raises(DeviceTreeError, match=r"whole number of 3-cell"):
        uart.prop("words").records(3)
    with pytest.raises(DeviceTreeError, match=r"/soc/uart@1000: missing required property 'clocks'"):
        uart.prop("clocks")


def test_reg_uses_the_parent_cells_and_ranges_translate_to_cpu_addresses(typed: DeviceTree) -> None:
    uart = typed.node("&uart")
    (reg,) = uart.reg()
    assert (reg.address, reg.size) == (0x1000, 0x100)  # 1 + 1 cells from /soc
    (cpu,) = uart.mmio()
    assert (cpu.address, cpu.size) == (0x20001000, 0x100)
    (gic,) = typed.node("&gic").reg()
    assert (gic.address, gic.size) == (0x8000000, 0x10000)  # 2 + 2 cells from /


def test_untranslatable_reg_is_an_error_only_when_asked_for() -> None:
    tree = load_devicetree_string(
        "/dts-v1/; / { #address-cells = <1>; #size-cells = <1>;"
        " bus { #address-cells = <1>; #size-cells = <1>; dev@10 { reg = <0x10 0x4>; }; }; };",
        "nobus.dts",
    )
    dev = tree.node("/bus/dev@10")
    assert dev.translated_reg() is None
    with pytest.raises(DeviceTreeError, match=r"nobus\.dts: /bus/dev@10: reg: cannot be translated"):
        dev.mmio()


def test_include_is_resolved_relative_to_the_including_file() -> None:
    tree = load_devicetree(FIXTURES / "fvp-style.dts")
    its = tree.node("&its")
    assert its.path == "/interrupt-controller@2f000000/msi-controller@2f020000"
    assert tree.node("/iommu@2b400000").prop("msi-parent").phandle_args("#msi-cells")[0].target is its


def test_string_loader_finds_includes_in_include_dirs(tmp_path: Path) -> None:
    (tmp_path / "extra.dtsi").write_text("/ { extra { value = <7>; }; };\n")
    text = '/dts-v1/;\n/ { };\n/include/ "extra.dtsi"\n'
    tree = load_devicetree_string(text, "inline.dts", include_dirs=[str(tmp_path)])
    assert tree.node("/extra").u32("value") == 7


def test_interrupt_parent_loop_without_cells_is_reported_not_spun() -> None:
    text = """/dts-v1/;
/ { #address-cells = <1>; #size-cells = <1>; interrupt-parent = <&gic>;
    gic: intc { interrupt-controller; };
    dev { interrupts = <1>; };
};"""
    tree = load_devicetree_string(text, "loop.dts")
    with pytest.raises(DeviceTreeError, match=r"^loop\.dts: /dev: interrupts: no interrupt parent"):
        interrupts(tree.node("/dev"))
