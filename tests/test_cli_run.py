"""``pkvm-smmu run`` end to end through click: the report, trace files, and input errors (exit 2,
the option named, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pkvm_smmu.cli import main
from pkvm_smmu.trace import load_jsonl

WIDE = {"COLUMNS": "200"}
FIXTURES = Path(__file__).resolve().parent / "fixtures"
BROKEN = """/dts-v1/;
/ {
	#address-cells = <2>;
	#size-cells = <2>;
	smmu: iommu@9050000 {
		compatible = "arm,smmu-v3";
		reg = <0x0 0x09050000 0x0 0x20000>;
		#iommu-cells = <2>;
	};
	dma@a000000 {
		compatible = "pkvm-smmu,dma-engine";
		reg = <0x0 0x0a000000 0x0 0x1000>;
		iommus = <&smmu 0x1>;
	};
};
"""


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["run", *args], env=WIDE)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_run_prints_the_boot_sequence_and_the_report() -> None:
    code, out = run("--design", "native", "--seed", "4")
    assert code == 0, out
    for title in ("Boot and probe sequence", "Devices", "Domains", "DMA workload", "Translations",
                  "Faults logged by arm-smmu-v3", "Commands consumed"):  # fmt: skip
        assert title in out
    assert "design=native" in out and "seed=4" in out and "boot-variant=none" in out
    assert "deferred_probe_initcall" in out and "supplier 9050000.iommu not ready" in out
    assert "F_TRANSLATION" in out and "done, verified" in out and "TLBI_NH_VA" in out
    assert out.rstrip().splitlines()[-1].startswith("OK: 8 copies verified, 1 fault(s) logged")


def test_run_on_qemu_virt_with_devices_and_cmdline() -> None:
    code, out = run(
        "--platform", str(FIXTURES / "qemu-virt-smmuv3.dtb"), "--device", "dma-engine,bdf=00:02.0",
        "--device", "dma-engine,bdf=00:03.0,ats=on", "--cmdline", "iommu.passthrough=1",
    )  # fmt: skip
    assert code == 0, out
    assert "0000:00:03.0" in out and "identity" in out and "skipped: no translating domain" in out
    assert "more without a driver or an IOMMU" in out  # QEMU's virtio-mmio slots are only counted


def test_trace_files(tmp_path: Path) -> None:
    chrome, jsonl = tmp_path / "run.json", tmp_path / "run.jsonl"
    code, out = run("--design", "native", "--trace", str(chrome), "--trace-jsonl", str(jsonl), "--seed", "9")
    assert code == 0, out
    doc = json.loads(chrome.read_text())
    assert doc["displayTimeUnit"] == "ns" and doc["metadata"]["seed"] == 9
    events = doc["traceEvents"]
    assert all({"ph", "pid", "tid", "name"} <= set(e) for e in events)
    assert any(e["ph"] == "X" and e["name"] == "probe" for e in events)
    assert any(e["ph"] == "i" and e["name"] == "evtq.event" for e in events)
    log = load_jsonl(jsonl)
    assert log.metadata["design"] == "native" and log.metadata["platform"] == "default (embedded)"
    assert len(log.events) == sum(1 for e in events if e["ph"] != "M")


@pytest.mark.parametrize(
    ("args", "option", "words"),
    [
        (["--design", "pv-magic"], "--design", "pv-magic"),
        (["--device", "dma-engine"], "--device", "bdf"),
        (["--device", "gpu,bdf=00:05.0"], "--device", "unknown device type 'gpu'"),
        (["--device", "dma-engine,bdf=00:02.0"], "--device", "already taken"),
        (["--device", "dma-engine,bdf=00:05.0,ats=maybe"], "--device", "ats"),
        (["--platform", "/no/such/tree.dts"], "--platform", "does not exist"),
        (["--cmdline", "iommu.strict=sometimes"], "--cmdline", "iommu.strict"),
        (["--seed", "many"], "--seed", "many"),
        (["--trace", "/no/such/dir/run.json"], "--trace", "/no/such/dir"),
    ],
)
def test_bad_options_exit_2_naming_the_option(args: list[str], option: str, words: str) -> None:
    code, out = run(*args)
    assert code == 2, out
    assert f"'{option}'" in out and words in out and "Traceback" not in out


def test_malformed_platform_names_the_file_and_node(tmp_path: Path) -> None:
    tree = tmp_path / "broken.dts"
    tree.write_text(BROKEN)
    code, out = run("--platform", str(tree))
    assert code == 2, out
    assert "'--platform'" in out and "broken.dts" in out and "Traceback" not in out
    assert "/iommu@9050000" in out and "#iommu-cells" in out


# -- under pKVM (the default design) ------------------------------------------------------------------


def test_run_defaults_to_trap_emulate_and_reports_the_hyp() -> None:
    code, out = run("--seed", "1")
    assert code == 0, out
    header = out.splitlines()[0]
    for word in ("design=trap-emulate", "policy=v4", "boot-variant=late-register", "pkvm=protected"):
        assert word in header
    for title in ("Isolation after each boot step", "Traps by register", "Hyp command filter",
                  "Ownership changes", "Guest donation"):  # fmt: skip
        assert title in out
    assert "STEs shadowed: abort 4, nested 4" in out and "Identity stage-2:" in out
    assert "pKVM: protected" in out and "finalize_pkvm" in out
    assert out.rstrip().splitlines()[-1].startswith("OK: 8 copies verified")


@pytest.mark.parametrize(
    ("args", "option", "words"),
    [
        (["--boot-variant", "sooner"], "--boot-variant", "sooner"),
        (["--policy", "v9"], "--policy", "unknown policy 'v9'"),
        (["--pkvm-fail", "maybe"], "--pkvm-fail", "maybe"),
    ],
)
def test_bad_pkvm_options_exit_2_naming_the_option(args: list[str], option: str, words: str) -> None:
    code, out = run(*args)
    assert code == 2, out
    assert f"'{option}'" in out and words in out and "Traceback" not in out


def test_boot_variants_and_pkvm_off_or_failing() -> None:
    code, out = run("--boot-variant", "aux-device")
    assert code == 0, out
    assert "pKVM driver created arm_smmu_v3_kvm.smmu.0 (aux-device of 9050000.iommu)" in out
    code, out = run("--boot-variant", "child-platform")
    assert code == 1, out
    assert "found 9050000.iommu (bound to kvm-arm-smmu-v3" in out and "probe failed in dma_configure" in out
    code, out = run("--no-pkvm")
    assert code == 0 and "pkvm=off" in out and "not promised: pKVM off" in out, out
    code, out = run("--pkvm-fail", "cntfrq")
    assert code == 0 and "pKVM: failed at __pkvm_init_finalise: -19" in out, out
