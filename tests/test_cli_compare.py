"""``pkvm-smmu compare`` through click: the tables, the JSON for scripts, the plot, and input errors
(exit 2 naming the option, no traceback, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import pkvm_smmu.scenarios.compare as compare_module
from pkvm_smmu.cli import main
from pkvm_smmu.scenarios.compare import FORMAT, OPERATIONS

WIDE = {"COLUMNS": "220"}
SMALL = ("--designs", "native,pv-paging", "--iterations", "1")
COUNT_KEYS = {
    "traps", "hypercalls", "commands", "cmd_syncs", "mmio_writes", "pte_writes", "table_pages",
    "pool_pages", "tlb_misses", "walk_levels", "dma_api_calls", "page_state_pages",
}  # fmt: skip


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["compare", *args], env=WIDE)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def small_json(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    path = tmp_path_factory.mktemp("compare") / "cmp.json"
    code, out = run(*SMALL, "--seed", "5", "--json", str(path))
    assert code == 0, out
    return out, json.loads(path.read_text())


def test_prints_one_cost_table_the_rfc_comparison_and_the_verdicts(small_json: tuple[str, dict]) -> None:
    out, _ = small_json
    for title in ("Cost per host operation", "Commands consumed by the SMMU", "RFC v2", "Isolation"):
        assert title in out
    for operation in OPERATIONS:
        assert operation in out
    assert "native: not applicable" in out
    assert "__pkvm" not in out.split("Cost per host operation")[0]  # the header is the options only


def test_json_schema(small_json: tuple[str, dict]) -> None:
    _, data = small_json
    assert data["format"] == FORMAT
    assert (data["seed"], data["iterations"], data["designs"]) == (5, 1, ["native", "pv-paging"])
    assert data["operations"] == list(OPERATIONS)
    assert set(data["cost_model"]["parameters_ns"]) >= {
        "trap_ns",
        "hypercall_ns",
        "command_ns",
        "sync_wait_ns",
    }
    for entry in data["cost_model"]["calibration"]:
        assert set(entry) == {"parameter", "value_ns", "derivation", "sources"}
    for result in data["results"]:
        assert set(result) == {"design", "metadata", "isolation", "violations", "problems", "operations"}
        assert result["metadata"]["design"] == result["design"]
        assert [op["operation"] for op in result["operations"]] == list(OPERATIONS)
        for op in result["operations"]:
            assert isinstance(op["n"], int) and isinstance(op["supported"], bool)
            assert set(op["per_op"]) == COUNT_KEYS
            assert set(op["total"]) > COUNT_KEYS
            assert isinstance(op["total"]["commands_by_opcode"], dict)
            assert isinstance(op["modeled_ns_per_op"], float)
            assert set(op["isolation_checks"]) == {"checks", "failed", "worst"}
    cases = [row["case"] for row in data["rfc_v2"]]
    assert cases == ["map 4K", "unmap 4K", "map 1M", "unmap 1M"]
    paging = next(r for r in data["results"] if r["design"] == "pv-paging")
    map_4k = next(op for op in paging["operations"] if op["operation"] == "map 4K")
    assert map_4k["per_op"]["hypercalls"] == 1 and map_4k["per_op"]["traps"] == 0


def test_output_is_the_same_for_the_same_seed(small_json: tuple[str, dict], tmp_path: Path) -> None:
    out, data = small_json
    path = tmp_path / "again.json"
    code, again = run(*SMALL, "--seed", "5", "--json", str(path))
    assert code == 0
    assert again.replace(str(path), "") == out.replace(out.split("JSON written to ")[1].split()[0], "")
    assert json.loads(path.read_text()) == data


def test_plot_is_written_when_matplotlib_is_there(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "cmp.png"
    code, out = run("--designs", "native", "--iterations", "1", "--plot", str(path))
    assert code == 0, out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_plot_without_matplotlib_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(compare_module, "plot_available", lambda: False)
    code, out = run("--designs", "native", "--iterations", "1", "--plot", str(tmp_path / "x.png"))
    assert code == 1
    assert "matplotlib" in out and "pkvm-smmu[plot]" in out
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("--designs", "native,warp-drive"), "'--designs'"),
        (("--designs", ","), "'--designs'"),
        (("--iterations", "0"), "'--iterations'"),
        (("--iterations", "many"), "'--iterations'"),
        (("--seed", "x"), "'--seed'"),
        (("--json", "/nonexistent-dir/out.json"), "'--json'"),
        (("--plot", "out.svg"), "'--plot'"),
        (("--platform", "/nonexistent.dts"), "'--platform'"),
    ],
)
def test_bad_options_exit_2_naming_the_option(args: tuple[str, ...], option: str, tmp_path: Path) -> None:
    code, out = run(*args)
    assert code == 2, out
    assert option in out
    assert "Traceback" not in out


def test_a_json_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    code, out = run("--json", str(tmp_path))
    assert code == 2 and "'--json'" in out and "directory" in out


def test_a_broken_platform_is_named_before_anything_runs(tmp_path: Path) -> None:
    dts = tmp_path / "broken.dts"
    dts.write_text("/dts-v1/;\n/ { oops")
    out_json = tmp_path / "cmp.json"
    code, out = run("--platform", str(dts), "--json", str(out_json))
    assert code == 2 and "'--platform'" in out
    assert not out_json.exists()
