"""The generic DMA-endpoint driver on a booted native system: it binds once its SMMU registered,
a workload's DMA lands at the buffer's PA through stage 1, DMA after unmap aborts with
F_TRANSLATION for its StreamID, and under iommu.passthrough=1 the DMA address is the PA."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pkvm_smmu.arch.events import EventType, decode_event
from pkvm_smmu.arch.strtab import STE, SteConfig
from pkvm_smmu.devicetree import DeviceTreeError, load_devicetree, load_devicetree_string
from pkvm_smmu.host.drivers.dma_endpoint import DMA_BITS, DmaEndpointDev
from pkvm_smmu.host.iommu import DomainType
from pkvm_smmu.machine.bus import HOST_CPU
from pkvm_smmu.machine.devices.endpoint import DmaFailure
from pkvm_smmu.machine.platform import build_machine
from pkvm_smmu.scenarios.boot import RunOptions
from pkvm_smmu.scenarios.native import NativeSystem, boot_native, run_endpoint_workload
from pkvm_smmu.trace import RecordingSink

NAME = "dma-endpoint"
SID = 0x42

# The endpoint comes before the SMMU it sits behind, so its first probe must defer.
TREE = """/dts-v1/;
/ {
	#address-cells = <2>;
	#size-cells = <2>;
	interrupt-parent = <&gic>;

	memory@40000000 {
		device_type = "memory";
		reg = <0x0 0x40000000 0x0 0x10000000>;
	};

	gic: interrupt-controller@8000000 {
		compatible = "arm,gic-v3";
		interrupt-controller;
		#interrupt-cells = <3>;
		reg = <0x0 0x08000000 0x0 0x10000>, <0x0 0x080a0000 0x0 0xf60000>;
	};

	dma-endpoint {
		compatible = "pkvm-smmu,dma-endpoint";
		dma-coherent;
		iommus = <&smmu 0x42>;
		%s
	};

	smmu: iommu@9050000 {
		compatible = "arm,smmu-v3";
		reg = <0x0 0x09050000 0x0 0x20000>;
		interrupts = <0 74 1>, <0 77 1>;
		interrupt-names = "eventq", "gerror";
		dma-coherent;
		#iommu-cells = <1>;
	};
};
"""


def write_tree(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "endpoint.dts"
    path.write_text(TREE % extra)
    return path


def boot(tmp_path: Path, cmdline: str = "") -> tuple[NativeSystem, RecordingSink]:
    sink = RecordingSink()
    options = RunOptions(platform=str(write_tree(tmp_path)), cmdline=cmdline)
    return boot_native(options, sinks=[sink]), sink


def bound(system: NativeSystem) -> DmaEndpointDev:
    assert list(system.host.dma_endpoints) == [NAME]
    return system.host.dma_endpoints[NAME]


def ram(system: NativeSystem, address: int, length: int) -> bytes:
    data = system.machine.bus.read_bytes(HOST_CPU, address, length)
    assert isinstance(data, bytes)
    return data


def test_the_machine_has_the_endpoint_and_the_tree_is_checked(tmp_path: Path) -> None:
    machine = build_machine(load_devicetree(write_tree(tmp_path, "pkvm-smmu,ats;")))
    (path,) = machine.dma_endpoints
    endpoint = machine.dma_endpoints[path]
    assert path == "/dma-endpoint" and endpoint.stream_id == SID and endpoint.ats_capable
    assert machine.smmu().ats_endpoints[SID] is endpoint
    no_smmu = TREE.replace("iommus = <&smmu 0x42>;", "") % "pkvm-smmu,ats;"
    with pytest.raises(DeviceTreeError, match="pkvm-smmu,ats"):
        build_machine(load_devicetree_string(no_smmu))


def test_binds_only_after_the_smmu_registers(tmp_path: Path) -> None:
    system, sink = boot(tmp_path)
    probes = [
        (e.seq, e.fields["device"], e.fields["result"])
        for e in sink.select("driver_core", "probe")
        if e.fields["device"] in (NAME, "9050000.iommu")
    ]
    first = [p for p in probes if p[1] == NAME]
    assert [r for _, _, r in first] == ["defer", "bound"]
    smmu_bound = next(s for s, d, r in probes if d == "9050000.iommu" and r == "bound")
    assert first[0][0] < smmu_bound < first[1][0]
    endpoint = bound(system)
    assert getattr(endpoint.dev, "dma_mask") == (1 << DMA_BITS) - 1  # noqa: B009
    assert system.host.stream_ids(endpoint.dev) == (SID,)
    assert STE.CONFIG.get(system.host.smmus[0].read_ste(SID)) == SteConfig.S1_TRANS
    assert [e.fields["dev"] for e in sink.select("host.dma_endpoint", "probe")] == [NAME]


def test_workload_lands_at_the_pa_through_stage1_and_unmapped_dma_aborts(tmp_path: Path) -> None:
    system, sink = boot(tmp_path)
    domain = system.host.domain_of(bound(system).dev)
    assert domain is not None and domain.type is DomainType.DMA
    (check,) = run_endpoint_workload(system.host, system.machine, seed=3, size=3 * 4096 + 17)
    assert check.device == NAME and check.stream_id == SID and check.domain == "dma"
    assert check.dma_addr != check.cpu_pa  # an IOVA, not the PA
    assert check.ok and check.in_ram and check.read_back
    # The device's bytes are in RAM at the buffer's PA (freed pages are not cleared).
    pattern = random.Random(f"3:{NAME}:{check.size}").randbytes(check.size)
    assert ram(system, check.cpu_pa, check.size) == pattern
    after = check.after_unmap
    assert check.unmapped_aborts and after.failure is DmaFailure.ABORT
    assert after.event is not None
    kind, fields = decode_event(after.event)
    assert kind is EventType.F_TRANSLATION and fields["SID"] == SID
    (logged,) = sink.select("arm-smmu-v3.9050000.iommu", "evtq.event")
    assert logged.fields["event"] == "F_TRANSLATION" and logged.fields["sid"] == SID
    assert logged.fields["inputaddr"] == check.dma_addr and logged.fields["client"] == NAME
    kinds = [e.kind for e in sink.select("host.dma_endpoint")]
    assert kinds == ["probe", "map", "unmap"]


def test_lazy_unmap_still_aborts_once_the_flush_queue_ran(tmp_path: Path) -> None:
    system, _ = boot(tmp_path, "iommu.strict=0")
    (check,) = run_endpoint_workload(system.host, system.machine)
    assert check.domain == "dma-fq" and check.ok and check.unmapped_aborts


def test_passthrough_dma_address_is_the_pa(tmp_path: Path) -> None:
    system, _ = boot(tmp_path, "iommu.passthrough=1")
    endpoint = bound(system)
    buf = endpoint.map_buffer(100)
    assert buf is not None and buf.dma_addr == buf.cpu_pa
    endpoint.unmap_buffer(buf)
    (check,) = run_endpoint_workload(system.host, system.machine, seed=1)
    assert check.domain == "identity" and check.dma_addr == check.cpu_pa and check.ok
    assert not check.unmapped_aborts  # nothing isolates an identity domain


def test_coherent_buffers_and_misuse(tmp_path: Path) -> None:
    system, _ = boot(tmp_path)
    endpoint = bound(system)
    device = system.machine.dma_endpoints["/dma-endpoint"]
    buf = endpoint.alloc_coherent(4096)
    assert buf is not None and buf.coherent and buf.dma_addr != buf.cpu_pa
    assert device.write(buf.dma_addr + 8, b"coherent").ok
    assert ram(system, buf.cpu_pa + 8, 8) == b"coherent"
    with pytest.raises(ValueError, match="streaming"):
        endpoint.unmap_buffer(buf)
    endpoint.free_coherent(buf)
    with pytest.raises(ValueError, match="coherent"):
        endpoint.free_coherent(buf)
    assert not device.read(buf.dma_addr, 8).ok


def test_the_default_platform_has_none_and_no_driver() -> None:
    system = boot_native(RunOptions())
    assert system.machine.dma_endpoints == {} and system.host.dma_endpoints == {}
    assert run_endpoint_workload(system.host, system.machine) == []
