"""Every malformed tree is a DeviceTreeError naming the file and the node (and property)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pkvm_smmu.devicetree import (
    DeviceTreeError,
    load_devicetree,
    load_devicetree_blob,
    load_devicetree_string,
    to_dtb,
)

HEAD = "/dts-v1/;\n/ {\n    #address-cells = <2>;\n    #size-cells = <2>;\n"
SMMU = """
    smmu: iommu@2b400000 {
        compatible = "arm,smmu-v3";
        reg = <0x0 0x2b400000 0x0 0x20000>;
        #iommu-cells = <1>;
    };
"""


def tree_text(body: str) -> str:
    return HEAD + body + "};\n"


def load_error(text: str, name: str = "bad.dts") -> DeviceTreeError:
    with pytest.raises(DeviceTreeError) as caught:
        load_devicetree_string(text, name)
    return caught.value


def test_syntax_error_names_file_line_and_enclosing_node() -> None:
    text = tree_text(SMMU + "    dma@1000 {\n        reg = <0x0 0x1000 0x0 0x100;\n    };\n")
    error = load_error(text, "syntax.dts")
    line = text.split("\n").index("        reg = <0x0 0x1000 0x0 0x100;") + 1
    assert (error.source, error.line, error.path) == ("syntax.dts", line, "/dma@1000")
    assert str(error).startswith(f"syntax.dts:{line}: /dma@1000: syntax error:")


def test_syntax_error_in_an_included_file_names_that_file(tmp_path: Path) -> None:
    (tmp_path / "part.dtsi").write_text("/ {\n    broken {\n        x = <1\n    };\n};\n")
    main = tmp_path / "main.dts"
    main.write_text('/dts-v1/;\n/include/ "part.dtsi"\n')
    with pytest.raises(DeviceTreeError) as caught:
        load_devicetree(main)
    assert caught.value.source.endswith("part.dtsi")
    assert caught.value.path == "/broken" and caught.value.line is not None


def test_numeric_dangling_phandle_names_node_and_property() -> None:
    error = load_error(tree_text(SMMU + "    dma@1000 { reg = <0 0x1000 0 0x100>; iommus = <0x99 0x1>; };\n"))
    assert (error.source, error.path, error.prop) == ("bad.dts", "/dma@1000", "iommus")
    assert "phandle 0x99 refers to no node" in str(error)


def test_dangling_phandle_in_a_blob_names_the_blob() -> None:
    dma = "    dma@1000 { reg = <0 0x1000 0 0x100>; iommus = <&smmu 1>; };\n"
    good = load_devicetree_string(tree_text(SMMU + dma))
    blob = to_dtb(good).replace(b"\x00\x00\x00\x01\x00\x00\x00\x01", b"\x00\x00\x00\x42\x00\x00\x00\x01")
    with pytest.raises(DeviceTreeError) as caught:
        load_devicetree_blob(blob, "board.dtb")
    assert (caught.value.source, caught.value.path, caught.value.prop) == ("board.dtb", "/dma@1000", "iommus")


def test_undefined_label_reference_names_the_node() -> None:
    error = load_error(tree_text("    dma@1000 { reg = <0 0x1000 0 0x100>; iommus = <&nosuch 1>; };\n"))
    assert error.source == "bad.dts" and error.path == "/dma@1000" and "nosuch" in error.message


def test_too_few_iommu_cells() -> None:
    error = load_error(tree_text(SMMU + "    dma@1000 { reg = <0 0x1000 0 0x100>; iommus = <&smmu>; };\n"))
    assert (error.path, error.prop) == ("/dma@1000", "iommus")
    assert "#iommu-cells = <1>" in error.message


def test_too_many_iommu_cells_points_at_the_arity() -> None:
    dma = "    dma@1000 { reg = <0 0x1000 0 0x100>; iommus = <&smmu 0x10 0x20>; };\n"
    error = load_error(tree_text(SMMU + dma))
    assert (error.path, error.prop) == ("/dma@1000", "iommus")
    assert "is #iommu-cells of /iommu@2b400000 right" in error.message


def test_smmu_v3_must_have_one_iommu_cell() -> None:
    error = load_error(tree_text(SMMU.replace("#iommu-cells = <1>", "#iommu-cells = <2>")))
    assert (error.path, error.prop) == ("/iommu@2b400000", "#iommu-cells")


def test_iommu_map_target_needs_one_cell() -> None:
    body = """
    other: iommu@1000 { reg = <0 0x1000 0 0x100>; #iommu-cells = <2>; };
    pcie@2000 { reg = <0 0x2000 0 0x1000>; iommu-map = <0x0 &other 0x0 0x100>; };
"""
    error = load_error(tree_text(body))
    assert (error.path, error.prop) == ("/pcie@2000", "iommu-map")
    assert "#iommu-cells = <2>" in error.message


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ("iommu-map = <0x0 &smmu 0x0>;", "whole number of 4-cell"),
        ("iommu-map = <0x8 &smmu 0x0 0x10>; iommu-map-mask = <0xfff0>;", "ignores bits of id-base 0x8"),
    ],
)
def test_malformed_iommu_map(mapping: str, expected: str) -> None:
    error = load_error(tree_text(SMMU + f"    pcie@2000 {{ reg = <0 0x2000 0 0x1000>; {mapping} }};\n"))
    assert (error.path, error.prop) == ("/pcie@2000", "iommu-map")
    assert expected in error.message


def test_overlapping_device_regs() -> None:
    body = SMMU + "    dma@2b410000 { reg = <0x0 0x2b410000 0x0 0x1000>; };\n"
    error = load_error(tree_text(body))
    assert error.prop == "reg"
    other = error.message.split(" overlaps ")[1].split(" ")[0]
    assert {error.path, other} == {"/iommu@2b400000", "/dma@2b410000"}


def test_overlapping_memory_and_device() -> None:
    body = (
        '    memory@40000000 { device_type = "memory"; reg = <0x0 0x40000000 0x1 0x0>; };\n'
        "    dma@80000000 { reg = <0x0 0x80000000 0x0 0x1000>; };\n"
    )
    error = load_error(tree_text(body), "mem.dts")
    expected = "mem.dts: /dma@80000000: reg: [0x80000000, 0x80001000) overlaps /memory@40000000"
    assert str(error).startswith(expected)


def test_overlap_through_ranges_is_found_in_cpu_addresses() -> None:
    body = """
    soc { compatible = "simple-bus"; #address-cells = <1>; #size-cells = <1>;
          ranges = <0x0 0x0 0x10000000 0x100000>;
          uart@1000 { reg = <0x1000 0x100>; }; };
    dev@10001000 { reg = <0x0 0x10001080 0x0 0x10>; };
"""
    error = load_error(tree_text(body))
    assert error.prop == "reg" and "/soc/uart@1000" in str(error) and "/dev@10001000" in str(error)


def test_parent_windows_disabled_nodes_and_reserved_memory_may_overlap() -> None:
    body = """
    memory@40000000 { device_type = "memory"; reg = <0x0 0x40000000 0x0 0x40000000>; };
    reserved-memory { #address-cells = <2>; #size-cells = <2>; ranges;
        carve@48000000 { reg = <0x0 0x48000000 0x0 0x100000>; }; };
    gic@8000000 { reg = <0x0 0x8000000 0x0 0x100000>; #address-cells = <2>; #size-cells = <2>; ranges;
        its@8080000 { reg = <0x0 0x8080000 0x0 0x20000>; }; };
    a@9000000 { reg = <0x0 0x9000000 0x0 0x1000>; };
    b@9000000 { reg = <0x0 0x9000000 0x0 0x1000>; status = "disabled"; };
"""
    tree = load_devicetree_string(tree_text(body), "ok.dts")
    assert tree.node("/reserved-memory/carve@48000000").mmio()[0].address == 0x48000000


@pytest.mark.parametrize(
    ("body", "path", "prop"),
    [
        ('    memory@0 { device_type = "memory"; };\n', "/memory@0", "reg"),
        (SMMU.replace("#iommu-cells = <1>;", ""), "/iommu@2b400000", "#iommu-cells"),
        (SMMU.replace("reg = <0x0 0x2b400000 0x0 0x20000>;", ""), "/iommu@2b400000", "reg"),
    ],
    ids=["memory-reg", "smmu-iommu-cells", "smmu-reg"],
)
def test_missing_required_property(body: str, path: str, prop: str) -> None:
    error = load_error(tree_text(body))
    assert error.path == path and f"missing required property '{prop}'" in error.message


def test_reg_with_a_partial_entry() -> None:
    error = load_error(tree_text("    dev@0 { reg = <0x0 0x0 0x0>; };\n"))
    assert (error.path, error.prop) == ("/dev@0", "reg") and "not a whole number of 4-cell" in error.message


def test_duplicate_phandle_values() -> None:
    error = load_error(tree_text("    a { phandle = <5>; };\n    b { phandle = <5>; };\n"))
    assert error.source == "bad.dts" and error.path in ("/a", "/b") and "0x5" in str(error)


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DeviceTreeError, match=r"nothere\.dts: cannot read"):
        load_devicetree(tmp_path / "nothere.dts")


def test_corrupt_blobs_name_the_blob() -> None:
    blob = to_dtb(load_devicetree_string(tree_text(SMMU)))
    with pytest.raises(DeviceTreeError, match=r"^cut\.dtb: header says"):
        load_devicetree_blob(blob[:100], "cut.dtb")
    with pytest.raises(DeviceTreeError, match=r"^magic\.dtb: bad DTB magic"):
        load_devicetree_blob(b"\x00" * 64, "magic.dtb")
    broken = bytearray(blob)
    struct_offset = int.from_bytes(blob[8:12], "big")
    broken[struct_offset : struct_offset + 4] = b"\x00\x00\x00\x07"  # no such token
    with pytest.raises(DeviceTreeError, match=r"^tok\.dtb: corrupt device tree blob"):
        load_devicetree_blob(bytes(broken), "tok.dtb")
