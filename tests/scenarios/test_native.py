"""The native design end to end: boots of the default platform, QEMU's virt tree and an FVP-style
tree; the report; deferred probe ordering; determinism and trace metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pkvm_smmu.devicetree import DeviceTreeError
from pkvm_smmu.host.kernel import CmdlineError
from pkvm_smmu.machine.platform import DeviceSpecError
from pkvm_smmu.scenarios import DESIGNS, design, run
from pkvm_smmu.scenarios.boot import RunOptions
from pkvm_smmu.scenarios.native import boot_native, run_native
from pkvm_smmu.trace import RecordingSink, TraceEvent, load_jsonl

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# A DMA engine listed before the SMMU it sits behind.
CONSUMER_FIRST = """/dts-v1/;
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

	dma@a000000 {
		compatible = "pkvm-smmu,dma-engine";
		reg = <0x0 0x0a000000 0x0 0x1000>;
		interrupts = <0 80 1>;
		iommus = <&smmu 0x7>;
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


def test_default_platform_report() -> None:
    report = run(RunOptions(seed=5))
    assert report.ok, report.problems
    by_name = {d.name: d for d in report.devices}
    assert by_name["9050000.iommu"].driver == "arm-smmu-v3"
    assert by_name["a000000.dma"].stream_ids == (0x100,) and by_name["a000000.dma"].domain_type == "dma"
    for bdf, sid in (("01", 0x8), ("02", 0x10), ("03", 0x18)):
        dev = by_name[f"0000:00:{bdf}.0"]
        assert dev.bus == "pci" and dev.driver == "pkvm-smmu-dma-pci" and dev.stream_ids == (sid,)
    # Every engine got its own stage-1 DMA domain with its own ASID.
    dma_domains = [d for d in report.domains if d.type == "dma"]
    assert len(dma_domains) == 4 and all(d.stage == 1 for d in dma_domains)
    assert len({d.asid for d in dma_domains}) == 4
    assert len(report.copies) == 8 and all(c.ok for c in report.copies)
    assert report.translations.transfers == 8 and report.translations.verified == 8
    assert report.translations.dma_maps == report.translations.dma_unmaps == 16
    (fault,) = report.faults
    (check,) = report.fault_checks
    assert (fault.event, fault.address, fault.access) == ("F_TRANSLATION", check.iova, "read")
    assert fault.sid == by_name[check.device].stream_ids[0]
    opcodes = {c.opcode: c.count for c in report.commands}
    assert opcodes["CFGI_STE_RANGE"] == 1 and opcodes["TLBI_NSNH_ALL"] == 1  # reset: CFGI_ALL
    assert opcodes["TLBI_NH_VA"] >= 16 and opcodes["SYNC"] > opcodes["CFGI_STE"]
    assert opcodes.get("ATC_INV", 0) > 0  # 00:02.0 has ATS
    assert report.metadata == {
        "design": "native", "boot_variant": "none", "seed": 5, "platform": "default (embedded)",
        "devices": [], "cmdline": "",
    }  # fmt: skip


@pytest.mark.parametrize("name", ["qemu-virt-smmuv3.dts", "qemu-virt-smmuv3.dtb"])
def test_qemu_virt_with_extra_devices(name: str) -> None:
    devices = ("dma-engine,bdf=00:02.0", "dma-engine,bdf=00:03.0,ats=on", "dma-engine,bdf=00:04.0,id=nic")
    report = run(RunOptions(platform=str(FIXTURES / name), devices=devices, seed=2))
    assert report.ok, report.problems
    engines = {d.name: d for d in report.devices if d.driver == "pkvm-smmu-dma-pci"}
    assert sorted(engines) == ["0000:00:02.0", "0000:00:03.0", "0000:00:04.0"]
    assert [engines[n].stream_ids for n in sorted(engines)] == [(0x10,), (0x18,), (0x20,)]
    assert {d.name: d.driver for d in report.devices}["9050000.smmuv3"] == "arm-smmu-v3"
    # QEMU's SMMU has no msi-parent: the event that logged the fault came on a wired line.
    assert [f.event for f in report.faults] == ["F_TRANSLATION"]
    assert len(report.copies) == 6 and all(c.ok for c in report.copies)


def test_fvp_style_tree() -> None:
    report = run(RunOptions(platform=str(FIXTURES / "fvp-style.dts"), devices=("dma-engine,bdf=01:00.0",)))
    assert report.ok, report.problems
    by_name = {d.name: d for d in report.devices}
    assert by_name["1c1a0000.dma"].stream_ids == (0x20,) and by_name["1c1a0000.dma"].driver == "pkvm-smmu-dma"
    assert by_name["2b400000.iommu"].driver == "arm-smmu-v3"
    # The bridge scans its root bus only (no PCI-PCI bridges are modeled): bus 1 is not reached.
    assert "0000:01:00.0" not in by_name and len(report.copies) == 2


def probe_events(events: list[TraceEvent]) -> list[tuple[int, str, str, str]]:
    return [
        (e.seq, e.kind, str(e.fields.get("device") or e.fields.get("driver") or e.fields.get("iommu")),
         str(e.fields.get("result", "")))
        for e in events
        if (e.component, e.kind) in {("driver_core", "probe"), ("driver_core", "defer"),
                                     ("driver_core", "driver_register"), ("host.iommu", "iommu.register")}
    ]  # fmt: skip


@pytest.mark.parametrize(("cmdline", "stage"), [("", "links"), ("fw_devlink=off", "dma_configure")])
def test_a_consumer_before_its_smmu_probes_only_after_the_smmu_registers(
    tmp_path: Path, cmdline: str, stage: str
) -> None:
    tree = tmp_path / "consumer-first.dts"
    tree.write_text(CONSUMER_FIRST)
    sink = RecordingSink()
    system = boot_native(RunOptions(platform=str(tree), cmdline=cmdline), sinks=[sink])
    events = probe_events(sink.events)

    def seq(kind: str, name: str, result: str = "") -> int:
        return next(s for s, k, n, r in events if k == kind and n == name and r == result)

    deferred = next(e for e in sink.select("driver_core", "probe") if e.fields["device"] == "a000000.dma")
    assert deferred.fields["result"] == "defer" and deferred.fields["stage"] == stage
    assert seq("probe", "a000000.dma", "defer") < seq("defer", "a000000.dma")
    assert seq("defer", "a000000.dma") < seq("driver_register", "arm-smmu-v3")
    # A probe is reported when it ends: the SMMU's registration with the IOMMU core comes first.
    assert seq("driver_register", "arm-smmu-v3") < seq("iommu.register", "smmu3.0x9050000", "0")
    assert seq("iommu.register", "smmu3.0x9050000", "0") < seq("probe", "9050000.iommu", "bound")
    assert seq("probe", "9050000.iommu", "bound") < seq("probe", "a000000.dma", "bound")
    engine = system.host.dma_engines["a000000.dma"]
    assert system.host.stream_ids(engine.dev) == (7,) and engine.copy(4096).ok


def test_runs_are_deterministic_and_traces_carry_the_metadata(tmp_path: Path) -> None:
    options = RunOptions(seed=11, devices=("dma-engine,bdf=00:06.0",), cmdline="iommu.strict=0")
    first = run(RunOptions(**{**options.__dict__, "trace_jsonl": str(tmp_path / "a.jsonl")}))
    second = run(RunOptions(**{**options.__dict__, "trace_jsonl": str(tmp_path / "b.jsonl")}))
    assert first == second and first.ok
    assert first.translations.fq_flushes > 0  # lazy mode flushed on the timer
    a, b = load_jsonl(tmp_path / "a.jsonl"), load_jsonl(tmp_path / "b.jsonl")
    assert a.metadata == b.metadata == {**options.metadata(), "devices": ["dma-engine,bdf=00:06.0"]}
    assert a.metadata["design"] == "native" and a.metadata["seed"] == 11
    assert a.metadata["boot_variant"] == "none" and a.metadata["platform"] == "default (embedded)"
    assert [(e.time_ns, e.component, e.kind, e.fields) for e in a.events] == [
        (e.time_ns, e.component, e.kind, e.fields) for e in b.events
    ]
    other = run(RunOptions(**{**options.__dict__, "seed": 12}))
    assert [c.size for c in other.copies] != [c.size for c in first.copies]


def test_chrome_trace_file(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    run(RunOptions(trace_json=str(out)))
    doc = json.loads(out.read_text())
    assert doc["metadata"]["design"] == "native"
    names = {e["name"] for e in doc["traceEvents"]}
    assert {"probe", "initcall", "evtq.event", "copy", "cmd"} <= names


def test_bad_input_is_refused_before_any_file_is_written(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    with pytest.raises(DeviceSpecError):
        run(RunOptions(devices=("dma-engine,bdf=00:01.0",), trace_jsonl=str(out)))  # taken by the tree
    with pytest.raises(DeviceSpecError):
        run(RunOptions(devices=("nic,bdf=00:09.0",), trace_jsonl=str(out)))
    with pytest.raises(CmdlineError):
        run(RunOptions(cmdline="iommu.passthrough=perhaps", trace_jsonl=str(out)))
    bad = tmp_path / "bad.dts"
    bad.write_text("/dts-v1/;\n/ { dma { iommus = <&nowhere 1>; }; };\n")
    with pytest.raises(DeviceTreeError) as error:
        run(RunOptions(platform=str(bad), trace_jsonl=str(out)))
    assert "bad.dts" in str(error.value)
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]
    assert "native" in DESIGNS and design("native") is run_native
    with pytest.raises(KeyError, match="native"):
        design("pv-magic")


def test_kernel_parameters_from_the_command_line() -> None:
    from pkvm_smmu.host.iommu import DomainType
    from pkvm_smmu.host.kernel import KernelParams

    params = KernelParams.parse(
        "console=ttyAMA0 iommu.strict=0 arm-smmu-v3.disable_bypass=0 arm_smmu_v3.disable_msipolling=1 "
        "deferred_probe_timeout=3 fw_devlink=permissive"
    )
    assert params.iommu.default_domain_type is DomainType.DMA_FQ
    assert not params.disable_bypass and params.disable_msipolling
    assert params.deferred_probe_timeout == 3 and params.fw_devlink == "permissive"
    system = boot_native(RunOptions(cmdline=params.cmdline))
    assert system.host.kernel.fw_devlink == "permissive"
    assert not system.host.smmus[0].params.disable_bypass
    with pytest.raises(CmdlineError, match="fw_devlink"):
        KernelParams.parse("fw_devlink=sometimes")
