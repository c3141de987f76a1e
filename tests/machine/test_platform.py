"""The machine a device tree describes: RAM, SMMUs, StreamIDs, ECAM config space, BME, interrupts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pkvm_smmu.devicetree import Bdf, DeviceTree, DeviceTreeError, load_devicetree, load_devicetree_string
from pkvm_smmu.machine.bus import InitiatorKind, RegionKind
from pkvm_smmu.machine.cpu import CpuFault, CpuPort
from pkvm_smmu.machine.devices import DMA_ENGINE_ID, DmaReg, DmaState, ErrorCode, ctrl_value, status_fields
from pkvm_smmu.machine.irq import msi_line
from pkvm_smmu.machine.pci import (
    ATS_CAP_OFFSET,
    DMA_ENGINE_DEVICE_ID,
    PCI_ATS_CTRL,
    PCI_ATS_CTRL_ENABLE,
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_1,
    PCI_CAP_ID_EXP,
    PCI_CAPABILITY_LIST,
    PCI_CLASS_DMA_CONTROLLER,
    PCI_CLASS_REVISION,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_EXT_CAP_ID_ATS,
    PCI_INTERRUPT_PIN,
    PKVM_SMMU_VENDOR_ID,
)
from pkvm_smmu.machine.platform import DeviceSpecError, Machine, build_machine, parse_device_spec
from pkvm_smmu.machine.smmu import SmmuFeatures
from pkvm_smmu.machine.smmu.translate import AtsStatus
from pkvm_smmu.platforms import default_platform

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ECAM = 0x3F000000  # default platform
SMMU_PATH = "/iommu@9050000"


@pytest.fixture
def machine() -> Machine:
    return build_machine(default_platform())


def cfg(bdf: Bdf, register: int, base: int = ECAM) -> int:
    return base + (bdf.bus << 20 | bdf.devfn << 12 | register)


# -- the default platform ------------------------------------------------------------------------------


def test_default_platform_ram_smmu_and_its(machine: Machine) -> None:
    (ram,) = machine.ram_regions
    assert (ram.base, ram.size) == (0x4000_0000, 4 << 30)
    smmu = machine.smmu()
    assert machine.smmus == {SMMU_PATH: smmu} and smmu.base == 0x0905_0000
    assert machine.bus.region_at(0x0905_0000).device is smmu  # type: ignore[union-attr]
    info = machine.smmu_info[SMMU_PATH]
    assert info.dma_coherent and smmu.features.coherent
    assert info.interrupts == {"eventq": "intid:106", "gerror": "intid:109", "cmdq-sync": "intid:108"}
    assert info.msi_parent == "/interrupt-controller@8000000/msi-controller@8080000"
    assert info.msi_device_id == 0xFF0000
    # The ITS doorbell is GITS_TRANSLATER in the translation frame (ITS base + 64 KiB + 0x40).
    cpu = machine.host_cpu()
    assert cpu.write(0x0809_0040, 4, 0x33) is None
    assert machine.irq.count(msi_line(0x33)) == 1


def test_stream_ids_from_iommus_and_iommu_map(machine: Machine) -> None:
    platform = machine.dma_device("/dma@a000000")
    assert (platform.stream_id, platform.smmu, platform.mmio_base) == (0x100, SMMU_PATH, 0x0A00_0000)
    assert platform.endpoint.stream_id == 0x100 and platform.endpoint.smmu is machine.smmu()
    by_bdf = {str(d.bdf): d for d in machine.dma_devices.values() if d.bdf is not None}
    sids = {bdf: d.stream_id for bdf, d in by_bdf.items()}
    assert sids == {"00:01.0": 0x08, "00:02.0": 0x10, "00:03.0": 0x18}
    assert by_bdf["00:02.0"].ats and machine.smmu().ats_endpoints == {0x10: by_bdf["00:02.0"].endpoint}


def test_cpu_ports_are_el1_and_el2_and_stable(machine: Machine) -> None:
    assert isinstance(machine.host_cpu(), CpuPort) and machine.host_cpu() is machine.host_cpu()
    assert machine.host_cpu().initiator.kind is InitiatorKind.CPU_EL1
    assert machine.hyp_cpu().initiator.kind is InitiatorKind.CPU_EL2
    assert machine.hyp_cpu().clock is machine.clock is machine.host_cpu().clock


# -- ECAM config space ---------------------------------------------------------------------------------


def test_ecam_header_of_an_endpoint_and_holes(machine: Machine) -> None:
    cpu = machine.host_cpu()
    bdf = Bdf(0, 2, 0)
    assert cpu.read(cfg(bdf, 0), 4) == DMA_ENGINE_DEVICE_ID << 16 | PKVM_SMMU_VENDOR_ID
    assert cpu.read(cfg(bdf, PCI_CLASS_REVISION), 4) >> 8 == PCI_CLASS_DMA_CONTROLLER
    assert cpu.read(cfg(bdf, PCI_COMMAND), 2) == 0  # firmware leaves decoding and mastering off
    assert cpu.read(cfg(Bdf(0, 5, 0), 0), 4) == 0xFFFF_FFFF  # no function there
    assert cpu.read(cfg(Bdf(0, 2, 1), 0), 2) == 0xFFFF
    assert cpu.read(cfg(bdf, PCI_INTERRUPT_PIN), 1) == 1  # INTA, routed by interrupt-map
    pcie_cap = cpu.read(cfg(bdf, PCI_CAPABILITY_LIST), 1)
    assert cpu.read(cfg(bdf, pcie_cap), 1) == PCI_CAP_ID_EXP


def test_bar0_is_assigned_from_the_bridge_window_and_sizes_like_a_bar(machine: Machine) -> None:
    cpu = machine.host_cpu()
    bars = {str(d.bdf): d.mmio_base for d in machine.dma_devices.values() if d.bdf is not None}
    assert bars == {"00:01.0": 0x1000_0000, "00:02.0": 0x1000_1000, "00:03.0": 0x1000_2000}
    bdf = Bdf(0, 3, 0)
    assert cpu.read(cfg(bdf, PCI_BASE_ADDRESS_0), 4) == 0x1000_2000 | 0x4  # 64-bit memory BAR
    assert cpu.read(cfg(bdf, PCI_BASE_ADDRESS_1), 4) == 0
    cpu.write(cfg(bdf, PCI_BASE_ADDRESS_0), 4, 0xFFFF_FFFF)
    assert cpu.read(cfg(bdf, PCI_BASE_ADDRESS_0), 4) == 0xFFFF_F000 | 0x4  # 4 KiB


def test_bar_decodes_only_with_memory_space_enabled(machine: Machine) -> None:
    cpu = machine.host_cpu()
    bdf = Bdf(0, 1, 0)
    bar = machine.dma_device(str(bdf)).mmio_base
    assert bar is not None
    assert isinstance(cpu.read(bar + DmaReg.ID, 4), CpuFault)
    cpu.write(cfg(bdf, PCI_COMMAND), 2, PCI_COMMAND_MEMORY)
    assert cpu.read(bar + DmaReg.ID, 4) == DMA_ENGINE_ID
    assert isinstance(cpu.read(0x1000_8000, 4), CpuFault)  # in the window, no BAR there


def _copy(cpu: CpuPort, regs: int, src: int, dst: int, length: int) -> int:
    cpu.write(regs + DmaReg.STATUS, 4, 0)
    cpu.write(regs + DmaReg.SRC, 8, src)
    cpu.write(regs + DmaReg.DST, 8, dst)
    cpu.write(regs + DmaReg.LEN, 4, length)
    cpu.write(regs + DmaReg.CTRL, 4, ctrl_value(irq=True))
    status = cpu.read(regs + DmaReg.STATUS, 4)
    assert isinstance(status, int)
    return status


def test_bus_master_enable_gates_endpoint_dma(machine: Machine) -> None:
    cpu = machine.host_cpu()
    bdf = Bdf(0, 2, 0)
    device = machine.dma_device(str(bdf))
    assert device.mmio_base is not None
    src, dst = 0x4000_0000, 0x4000_2000
    cpu.write_bytes(src, b"isolation")
    cpu.write(cfg(bdf, PCI_COMMAND), 2, PCI_COMMAND_MEMORY)  # decoding on, mastering off
    state, error, _, _ = status_fields(_copy(cpu, device.mmio_base, src, dst, 9))
    assert (state, error) == (DmaState.ERROR, ErrorCode.READ_ABORT)
    assert cpu.read_bytes(dst, 9) == bytes(9) and device.endpoint.refused == 1  # type: ignore[attr-defined]
    assert not device.endpoint.write(dst, b"x").ok

    cpu.write(cfg(bdf, PCI_COMMAND), 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
    state, error, _, _ = status_fields(_copy(cpu, device.mmio_base, src, dst, 9))
    assert (state, error) == (DmaState.DONE, ErrorCode.NONE)
    assert cpu.read_bytes(dst, 9) == b"isolation"
    assert machine.irq.count("intid:37") == 2  # INTA of 00:02.0 -> SPI 5, once per transfer


def test_ats_capability_and_ats_enable_gate_translation_requests(machine: Machine) -> None:
    cpu = machine.host_cpu()
    ats, plain = Bdf(0, 2, 0), Bdf(0, 1, 0)
    assert cpu.read(cfg(ats, ATS_CAP_OFFSET), 4) & 0xFFFF == PCI_EXT_CAP_ID_ATS
    assert cpu.read(cfg(plain, ATS_CAP_OFFSET), 4) == 0
    endpoint = machine.dma_device(str(ats)).endpoint
    cpu.write(cfg(ats, PCI_COMMAND), 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
    assert endpoint.ats_translate(0x1000).status is AtsStatus.UNSUPPORTED_REQUEST
    assert endpoint.translation_requests == 0  # ATS Enable clear: nothing was sent
    cpu.write(cfg(ats, PCI_ATS_CTRL), 2, PCI_ATS_CTRL_ENABLE)
    endpoint.ats_translate(0x1000)
    assert endpoint.translation_requests == 1


def test_smmu_wired_outputs_reach_the_lines_the_tree_names(machine: Machine) -> None:
    smmu = machine.smmu()
    machine.irq.pulse(smmu.interrupts.line("gerror"))
    machine.irq.pulse(smmu.interrupts.line("eventq"))
    assert machine.irq.count("intid:109") == 1 and machine.irq.count("intid:106") == 1
    assert machine.irq.count("intid:108") == 0


# -- RID -> StreamID with a mask --------------------------------------------------------------------------

MASKED = """
/dts-v1/;
/ {
    #address-cells = <2>;
    #size-cells = <2>;
    memory@80000000 { device_type = "memory"; reg = <0x0 0x80000000 0x0 0x10000000>; };
    smmu: iommu@2b400000 {
        compatible = "arm,smmu-v3";
        reg = <0x0 0x2b400000 0x0 0x20000>;
        #iommu-cells = <1>;
    };
    pcie@40000000 {
        compatible = "pci-host-ecam-generic";
        device_type = "pci";
        reg = <0x0 0x40000000 0x0 0x1000000>;
        #address-cells = <3>;
        #size-cells = <2>;
        ranges = <0x02000000 0x0 0x50000000 0x0 0x50000000 0x0 0x1000000>;
        /* functions share their device's StreamID; bus 0 and bus 1 go to different bases */
        iommu-map-mask = <0xfff8>;
        iommu-map = <0x000 &smmu 0x1000 0x100>, <0x100 &smmu 0x2000 0x100>;
    };
};
"""


@pytest.mark.parametrize(
    ("bdf", "sid"),
    [("00:00.0", 0x1000), ("00:02.3", 0x1010), ("00:1f.7", 0x10F8), ("01:00.0", 0x2000), ("01:01.5", 0x2008),
     ("02:00.0", None)],
)  # fmt: skip
def test_rid_to_sid_through_iommu_map_and_mask(bdf: str, sid: int | None) -> None:
    tree = load_devicetree_string(MASKED, "masked.dts")
    machine = build_machine(tree, extra_devices=[f"dma-engine,bdf={bdf}"])
    device = machine.dma_device(bdf)
    assert device.stream_id == sid
    assert device.smmu == ("/iommu@2b400000" if sid is not None else None)


def test_a_rid_without_iommu_masters_physical_memory_directly() -> None:
    tree = load_devicetree_string(MASKED, "masked.dts")
    machine = build_machine(tree, extra_devices=["dma-engine,bdf=02:00.0"])
    device = machine.dma_device("02:00.0")
    assert device.function is not None
    device.function.config_write(PCI_COMMAND, 2, PCI_COMMAND_MASTER)
    assert device.endpoint.write(0x8000_0000, b"raw").ok
    assert machine.bus.ram.read(0x8000_0000, 3) == b"raw"


# -- other trees -----------------------------------------------------------------------------------------


def test_qemu_virt_tree_builds_with_its_smmu_and_pcie() -> None:
    tree = load_devicetree(FIXTURES / "qemu-virt-smmuv3.dtb")
    machine = build_machine(tree, extra_devices=["dma-engine,bdf=00:02.0,ats=on"])
    smmu = machine.smmu("/smmuv3@9050000")
    assert smmu.base == 0x0905_0000
    bridge = machine.pci_bridges["/pcie@10000000"]
    assert (bridge.ecam_base, bridge.bus_range) == (0x40_1000_0000, (0, 255))
    device = machine.dma_device("00:02.0")
    assert (device.stream_id, device.mmio_base) == (0x10, 0x1000_0000)
    cpu = machine.host_cpu()
    assert cpu.read(cfg(Bdf(0, 2, 0), 0, bridge.ecam_base), 2) == PKVM_SMMU_VENDOR_ID
    assert [(r.base, r.size) for r in machine.ram_regions] == [(0x4000_0000, 128 << 20)]
    assert cpu.write(0x0802_0040, 4, 0x50) is None and machine.irq.count(msi_line(0x50)) == 1  # GICv2m


def test_fvp_style_tree_builds() -> None:
    machine = build_machine(load_devicetree(FIXTURES / "fvp-style.dts"))
    assert machine.smmu().base == 0x2B40_0000
    assert machine.dma_device("dma@1c1a0000").stream_id == 0x20
    ram = [(r.base, r.size) for r in machine.ram_regions]
    assert ram == [(0x8000_0000, 0x7F00_0000), (0x8_8000_0000, 1 << 31)]
    assert machine.smmu_info["/iommu@2b400000"].interrupts["priq"] == "intid:107"
    assert all(r.kind is RegionKind.MMIO for r in machine.bus.regions if "pci" in r.name)


def test_features_per_smmu_and_default_coherency() -> None:
    tree = default_platform()
    machine = build_machine(tree, features={"&smmu": SmmuFeatures(sid_bits=12, coherent=False)})
    assert machine.smmu().features.sid_bits == 12 and not machine.smmu().features.coherent
    with pytest.raises(DeviceTreeError, match="'/nope'"):
        build_machine(tree, features={"/nope": SmmuFeatures()})


# -- errors ----------------------------------------------------------------------------------------------


def test_sid_from_iommus_beyond_sidsize() -> None:
    with pytest.raises(DeviceTreeError) as caught:
        build_machine(default_platform(), features=SmmuFeatures(sid_bits=8))
    error = caught.value
    assert error.source.endswith("default.dts") and error.path == "/dma@a000000" and error.prop == "iommus"
    assert "StreamID 0x100" in error.message and "8 bits" in error.message


def test_sid_from_iommu_map_beyond_sidsize() -> None:
    text = MASKED.replace("<0x100 &smmu 0x2000 0x100>", "<0x100 &smmu 0x10000 0x100>")
    tree = load_devicetree_string(text, "wide.dts")
    build_machine(tree, extra_devices=["dma-engine,bdf=00:01.0"])  # bus 0 still fits
    with pytest.raises(DeviceSpecError) as caught:
        build_machine(tree, extra_devices=["dma-engine,bdf=01:00.0"])
    assert caught.value.option == "bdf"
    assert "StreamID 0x10000" in str(caught.value) and "wide.dts: /pcie@40000000" in str(caught.value)


def test_sid_beyond_sidsize_in_the_trees_own_endpoints() -> None:
    endpoints = 'pkvm-smmu,endpoints = "dma-engine,bdf=00:01.0";\n        '
    text = MASKED.replace("iommu-map-mask", endpoints + "iommu-map-mask")
    tree = load_devicetree_string(text, "own.dts")
    with pytest.raises(DeviceTreeError) as caught:
        build_machine(tree, features=SmmuFeatures(sid_bits=12))
    assert (caught.value.path, caught.value.prop) == ("/pcie@40000000", "iommu-map")
    assert "StreamID 0x1008" in caught.value.message


def test_iommus_naming_something_that_is_not_an_smmu() -> None:
    text = """/dts-v1/;
/ { #address-cells = <2>; #size-cells = <2>;
    other: iommu@1000 { reg = <0 0x1000 0 0x1000>; #iommu-cells = <1>; };
    dma@2000 { compatible = "pkvm-smmu,dma-engine"; reg = <0 0x2000 0 0x1000>; iommus = <&other 3>; };
};"""
    with pytest.raises(DeviceTreeError, match=r"^odd\.dts: /dma@2000: iommus: .*not an enabled arm,smmu-v3"):
        build_machine(load_devicetree_string(text, "odd.dts"))


def test_bad_endpoint_spec_in_the_tree_names_node_and_property() -> None:
    endpoints = 'pkvm-smmu,endpoints = "dma-engine,bdf=0:2";\n        '
    text = MASKED.replace("iommu-map-mask", endpoints + "iommu-map-mask")
    with pytest.raises(DeviceTreeError) as caught:
        build_machine(load_devicetree_string(text, "spec.dts"))
    assert (caught.value.path, caught.value.prop) == ("/pcie@40000000", "pkvm-smmu,endpoints")
    assert "bdf" in caught.value.message


@pytest.mark.parametrize(
    ("spec", "option"),
    [
        ("", "driver"),
        ("nvme,bdf=00:01.0", "driver"),
        ("dma-engine", "bdf"),
        ("dma-engine,bdf=0:2", "bdf"),
        ("dma-engine,bdf=00:20.0", "bdf"),
        ("dma-engine,bdf=00:01.8", "bdf"),
        ("dma-engine,bdf=00:01.0,ats=maybe", "ats"),
        ("dma-engine,bdf=00:01.0,speed=fast", "speed"),
        ("dma-engine,bdf=00:01.0,bdf=00:02.0", "bdf"),
        ("dma-engine,bdf=00:01.0,ats", "ats"),
        ("dma-engine,bdf=00:01.0,id=", "id"),
    ],
)
def test_parse_device_spec_errors_name_the_option(spec: str, option: str) -> None:
    with pytest.raises(DeviceSpecError) as caught:
        parse_device_spec(spec)
    assert caught.value.option == option
    assert str(caught.value).startswith(f"device '{spec}': {option}: ")


def test_parse_device_spec_accepts_qemu_style_options() -> None:
    spec = parse_device_spec("dma-engine,bdf=01:1f.7,ats=on,bus=pcie.0,id=nic")
    fields = (spec.kind, spec.bdf, spec.ats, spec.bus, spec.id)
    assert fields == ("dma-engine", Bdf(1, 0x1F, 7), True, "pcie.0", "nic")
    assert not parse_device_spec("dma-engine,bdf=00:02.0,ats=off").ats


@pytest.mark.parametrize(
    ("spec", "option", "text"),
    [
        ("dma-engine,bdf=00:02.0", "bdf", "already taken"),
        ("dma-engine,bdf=10:00.0", "bdf", "outside the bridge's bus range"),
        ("dma-engine,bdf=00:05.0,bus=/nowhere", "bus", "no PCIe host bridge '/nowhere'"),
        ("dma-engine,bdf=00:05.0,id=dma@a000000", "id", "already taken"),
    ],
)
def test_extra_devices_that_do_not_fit_the_platform(spec: str, option: str, text: str) -> None:
    with pytest.raises(DeviceSpecError) as caught:
        build_machine(default_platform(), extra_devices=[spec])
    assert caught.value.option == option and text in str(caught.value)


def test_extra_device_on_a_tree_without_pcie() -> None:
    tree: DeviceTree = load_devicetree(FIXTURES / "fvp-style.dts")
    no_pci = load_devicetree_string(
        "/dts-v1/; / { #address-cells = <2>; #size-cells = <2>; };", "nopci.dts"
    )
    machine = build_machine(tree, extra_devices=["dma-engine,bdf=01:00.0"])
    assert machine.dma_device("01:00.0").stream_id == 0x100
    with pytest.raises(DeviceSpecError, match=r"nopci\.dts has no PCIe host bridge"):
        build_machine(no_pci, extra_devices=["dma-engine,bdf=00:01.0"])


def test_extra_devices_select_a_bridge_by_domain() -> None:
    machine = build_machine(default_platform(), extra_devices=["dma-engine,bdf=00:04.0,bus=pcie.0,id=extra"])
    assert machine.dma_device("extra").bridge == "/pcie@3f000000"
    assert machine.dma_device("extra").mmio_base == 0x1000_3000


def test_build_records_the_platform_and_traces_the_inventory() -> None:
    from pkvm_smmu.trace import RecordingSink, TraceBus

    trace = TraceBus()
    sink = trace.attach(RecordingSink())
    machine = build_machine(default_platform(), trace=trace)
    assert machine.trace is trace and trace.metadata["platform"].endswith("default.dts")
    devices = {e.fields["name"]: e.fields for e in sink.events if e.kind == "dma-device"}
    assert devices["dma@a000000"]["sid"] == 0x100 and devices["dma-engine@00:02.0"]["ats"] is True
    assert [e.fields["base"] for e in sink.events if e.kind == "smmu"] == [0x0905_0000]
