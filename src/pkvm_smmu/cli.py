"""The ``pkvm-smmu`` command. This is the only module that prints."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import click

from pkvm_smmu import __version__
from pkvm_smmu.scenarios import DEFAULT_DESIGN, DESIGNS

if TYPE_CHECKING:
    from rich.console import Console

    from pkvm_smmu.scenarios.compare import Comparison
    from pkvm_smmu.scenarios.pkvm_report import PkvmRunReport
    from pkvm_smmu.scenarios.report import RunReport


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pkvm-smmu")
def main() -> None:
    """An executable model of the pKVM SMMUv3 isolation design."""


@main.command()
@click.argument("kind")
@click.argument("words", nargs=-1)
def decode(kind: str, words: tuple[str, ...]) -> None:
    """Decode an SMMUv3 structure from the 64-bit words a kernel log prints (word 0 first).

    KIND is one of ste, cd, l1std, l1cd, cmd, evt, pri, or `reg NAME` for a register:

    \b
      pkvm-smmu decode ste 0x000000000000000b 0 0 0 0 0 0 0
      pkvm-smmu decode cmd 0x0000000100000003 0x1
      pkvm-smmu decode reg CMDQ_CONS 0x01000004
    """
    from rich.console import Console
    from rich.table import Table

    from pkvm_smmu.arch.decoding import DecodeError, decode_register, decode_words

    try:
        if kind.lower() == "reg":
            if not words:
                raise click.UsageError("decode reg needs a register NAME and its value")
            decoded = decode_register(words[0], words[1:])
        else:
            decoded = decode_words(kind, words)
    except DecodeError as e:
        raise click.UsageError(str(e)) from None

    table = Table(title=decoded.title, title_justify="left")
    table.add_column("Field")
    table.add_column("Bits", justify="right")
    table.add_column("Value", justify="right")
    table.add_column("Meaning")
    for row in decoded.rows:
        bits = f"[{row.hi}]" if row.hi == row.lo else f"[{row.hi}:{row.lo}]"
        table.add_row(row.name, bits, hex(row.raw), row.meaning)
    console = Console()
    console.print(table)
    console.print(decoded.pretty, markup=False, highlight=False)
    if decoded.reserved:
        console.print(f"[yellow]warning:[/] RES0 bits set: {decoded.reserved:#x}")


# -- run ----------------------------------------------------------------------------------------------


def _check_output(path: str | None, option: str) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise click.BadParameter(f"'{path}' is a directory", param_hint=option)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise click.BadParameter(f"cannot write '{path}': no writable directory {folder}", param_hint=option)


@main.command()
@click.option(
    "--platform",
    "platform_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Device tree (DTS or DTB) of the platform; default: the embedded default platform.",
)
@click.option(
    "--device",
    "devices",
    multiple=True,
    metavar="SPEC",
    help="Add a PCI endpoint, QEMU style: dma-engine,bdf=00:02.0[,ats=on][,bus=pcie.0][,id=NAME] "
    "(repeatable).",
)
@click.option("--trace", "trace_json", metavar="FILE.json", help="Write a Chrome/Perfetto trace.")
@click.option("--trace-jsonl", "trace_jsonl", metavar="FILE", help="Write the trace as JSONL.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the workload's data and sizes.")
@click.option(
    "--design",
    type=click.Choice(sorted(DESIGNS)),
    default=DEFAULT_DESIGN,
    show_default=True,
    help="How the hypervisor and host share the SMMU.",
)
@click.option(
    "--boot-variant",
    default="none",
    metavar="NAME",
    help="How the host's drivers meet pKVM's init (trap-emulate: late-register (default), defer, "
    "aux-device, child-platform, naive; pv-identity: three-drivers or impl-hooks).",
)
@click.option(
    "--policy",
    default="v4",
    show_default=True,
    metavar="NAME",
    help="The hyp's SMMUv3 emulation policy (trap-emulate).",
)
@click.option(
    "--no-pkvm", "no_pkvm", is_flag=True, help="Boot without kvm-arm.mode=protected: pKVM stays off."
)
@click.option(
    "--pkvm-fail",
    "pkvm_fail",
    metavar="HOW",
    help="Make pKVM's initialisation fail (trap-emulate): cntfrq (CNTFRQ_EL0 reads 0) or smmu-stage2 "
    "(an SMMU without stage 2).",
)
@click.option(
    "--cmdline", default="", metavar="ARGS", help='Host kernel command line, e.g. "iommu.strict=0".'
)
def run(
    platform_file: str | None,
    devices: tuple[str, ...],
    trace_json: str | None,
    trace_jsonl: str | None,
    seed: int,
    design: str,
    boot_variant: str,
    policy: str,
    no_pkvm: bool,
    pkvm_fail: str | None,
    cmdline: str,
) -> None:
    """Boot a platform, run a DMA workload through the SMMU, and report.

    By default the host boots under pKVM (design trap-emulate) and the same DMA workload runs
    through the SMMU the hyp emulates; then pages the host mapped for DMA are given to the hyp and
    to a protected VM, and every device tries to reach them. --design native boots without pKVM.

    \b
      pkvm-smmu run
      pkvm-smmu run --boot-variant child-platform
      pkvm-smmu run --design native --device dma-engine,bdf=00:04.0,ats=on --cmdline iommu.strict=0
      pkvm-smmu run --platform virt.dtb --device dma-engine,bdf=00:02.0 --trace run.json
    """
    from pkvm_smmu.devicetree import DeviceTreeError
    from pkvm_smmu.host.kernel import CmdlineError
    from pkvm_smmu.machine.platform import DeviceSpecError
    from pkvm_smmu.scenarios import run as run_scenario
    from pkvm_smmu.scenarios.boot import RunOptions

    _check_output(trace_json, "'--trace'")
    _check_output(trace_jsonl, "'--trace-jsonl'")
    options = RunOptions(
        platform=platform_file,
        devices=devices,
        seed=seed,
        cmdline=cmdline,
        design=design,
        boot_variant=boot_variant,
        trace_json=trace_json,
        trace_jsonl=trace_jsonl,
        policy=policy,
        pkvm=not no_pkvm,
        pkvm_fail=pkvm_fail,
    )
    try:
        report = run_scenario(options)
    except DeviceSpecError as error:
        raise click.BadParameter(str(error), param_hint="'--device'") from None
    except CmdlineError as error:
        raise click.BadParameter(str(error), param_hint="'--cmdline'") from None
    except DeviceTreeError as error:
        raise click.BadParameter(str(error), param_hint="'--platform'") from None
    except ValueError as error:
        option = getattr(error, "option", None)  # a design's own option error names the option
        if option is None:
            raise
        raise click.BadParameter(str(error), param_hint=f"'{option}'") from None
    from rich.console import Console

    console = Console()
    _print_report(console, report)
    if not report.ok:
        raise SystemExit(1)


def _hex(value: int | None) -> str:
    return "-" if value is None else f"{value:#x}"


def _print_report(console: Console, report: RunReport) -> None:
    from rich.table import Table

    meta = report.metadata
    policy = f"  policy={meta['policy']}" if "policy" in meta else ""
    pkvm = f"  pkvm={meta['pkvm']}" if "pkvm" in meta else ""
    console.print(
        f"[bold]pkvm-smmu run[/]  design={meta['design']}{policy}  boot-variant={meta['boot_variant']}"
        f"{pkvm}  platform={meta['platform']}  seed={meta['seed']}  cmdline={meta['cmdline']!r}",
        highlight=False,
    )
    if "dma_api" in meta:
        console.print(f"domain types: {', '.join(meta['domain_types']) or '-'}; DMA API: {meta['dma_api']}")
    colour = {"bound": "green", "defer": "yellow", "rejected": "dim", "failed": "red"}

    probes = Table(title="Boot and probe sequence", title_justify="left")
    for column in ("#", "Initcall", "Device", "Driver", "Result", "Why"):
        probes.add_column(column)
    for index, step in enumerate(report.probes, 1):
        why = "" if step.result == "bound" else f"{step.stage}: {step.reason or ''}".rstrip(": ")
        result = f"[{colour.get(step.result, 'white')}]{step.result}[/]"
        probes.add_row(str(index), step.initcall, step.device, step.driver, result, why)
    console.print(probes)

    # Devices nothing drives and no IOMMU translates (QEMU's virtio-mmio slots...) are counted only.
    shown = [d for d in report.devices if d.driver or d.stream_ids or d.deferrals]
    hidden = len(report.devices) - len(shown)
    caption = f"{hidden} more without a driver or an IOMMU" if hidden else None
    devices = Table(title="Devices", title_justify="left", caption=caption, caption_justify="left")
    for column in ("Device", "Bus", "Driver", "StreamIDs", "Domain", "Deferrals"):
        devices.add_column(column)
    for dev in shown:
        domain = f"{dev.domain} ({dev.domain_type})" if dev.domain else "-"
        sids = ", ".join(_hex(s) for s in dev.stream_ids) or "-"
        devices.add_row(dev.name, dev.bus, dev.driver or "-", sids, domain, str(dev.deferrals or ""))
    console.print(devices)

    domains = Table(title="Domains", title_justify="left")
    for column in ("Domain", "Type", "Stage", "ASID", "VMID", "Devices"):
        domains.add_column(column)
    for dom in report.domains:
        domains.add_row(
            dom.label, dom.type, str(dom.stage or "-"), str(dom.asid if dom.asid is not None else "-"),
            str(dom.vmid if dom.vmid is not None else "-"), ", ".join(dom.devices),
        )  # fmt: skip
    console.print(domains)

    work = Table(title="DMA workload", title_justify="left")
    for column in ("Device", "Operation", "Bytes", "IOVA", "Result"):
        work.add_column(column)
    for copy in report.copies:
        iova = f"{_hex(copy.src_dma)} -> {_hex(copy.dst_dma)}"
        result = "[green]done, verified[/]" if copy.ok else f"[red]{copy.state} {copy.error}[/]"
        work.add_row(copy.device, "copy", str(copy.size), iova, result)
    for check in report.fault_checks:
        if check.skipped:
            work.add_row(check.device, "fault", "-", "-", f"[dim]skipped: {check.skipped}[/]")
            continue
        seen = f"{check.state}: {check.error} at {_hex(check.err_addr)}"
        if check.event:
            seen += f" ({check.event})"
        work.add_row(
            check.device, "fault", "-", _hex(check.iova), f"[{'green' if check.observed else 'red'}]{seen}[/]"
        )
    console.print(work)

    t = report.translations
    stats = Table(title="Translations", title_justify="left")
    stats.add_column("Measure")
    stats.add_column("Count", justify="right")
    rows = [
        ("DMA-engine transfers", t.transfers), ("bytes copied", t.bytes_copied), ("verified", t.verified),
        ("dma_map / dma_unmap", f"{t.dma_maps} / {t.dma_unmaps}"),
        ("iommu_map / iommu_unmap", f"{t.iommu_maps} / {t.iommu_unmaps}"),
        ("IOTLB syncs", t.iotlb_syncs), ("flush-queue flushes", t.fq_flushes),
        ("SMMU faults", t.smmu_faults),
    ]  # fmt: skip
    if t.tlb_hits is not None or t.tlb_misses is not None:
        rows.append(("TLB hits / misses", f"{t.tlb_hits or 0} / {t.tlb_misses or 0}"))
    for name, value in rows:
        stats.add_row(name, str(value))
    console.print(stats)

    faults = Table(title="Faults logged by arm-smmu-v3", title_justify="left")
    for column in ("SMMU", "Event", "SID", "Address", "Device", "Access"):
        faults.add_column(column)
    for fault in report.faults:
        faults.add_row(
            fault.smmu, fault.event, _hex(fault.sid), _hex(fault.address), fault.client, fault.access
        )
    console.print(faults)

    commands = Table(title="Commands consumed", title_justify="left")
    for column in ("SMMU", "Opcode", "Count"):
        commands.add_column(column, justify="right" if column == "Count" else "left")
    for command in report.commands:
        commands.add_row(command.smmu, command.opcode, str(command.count))
    console.print(commands)

    from pkvm_smmu.scenarios.pkvm_report import PkvmRunReport

    if isinstance(report, PkvmRunReport):
        _print_pkvm(console, report)

    timing = f"modeled time: boot {report.boot_ns / 1000:.1f} us, total {report.total_ns / 1000:.1f} us"
    if report.ok:
        verified = sum(1 for c in report.copies if c.ok)
        console.print(
            f"[green]OK[/]: {verified} copies verified, {len(report.faults)} fault(s) logged; {timing}"
        )
    else:
        console.print(f"[red]FAILED[/] ({timing}):")
        for problem in report.problems:
            console.print(f"  - {problem}", markup=False, highlight=False)


def _print_pkvm(console: Console, report: PkvmRunReport) -> None:
    """The sections a run under pKVM adds."""
    from rich.table import Table

    def table(title: str, *columns: str, numeric: int = 0) -> Table:
        out = Table(title=title, title_justify="left")
        for index, column in enumerate(columns):
            out.add_column(column, justify="right" if index >= len(columns) - numeric else "left")
        return out

    status = report.pkvm
    if status is None:
        console.print("pKVM: off (the host did not ask for protected mode)")
    else:
        state = {"protected": "[green]protected[/]", "failed": "[red]failed[/]"}.get(
            status.state, status.state
        )
        failure = f" at {status.failure}" if status.failure else ""
        console.print(
            f"pKVM: {state}{failure}; carveout {status.carveout_pages} pages at {_hex(status.carveout_base)} "
            f"({status.iommu_pool_pages} for the IOMMU pool, {status.pool_pages_used} in use)"
        )
    for device in report.spawned:
        console.print(f"pKVM driver created {device}", markup=False, highlight=False)

    boot = table("Isolation after each boot step", "#", "After", "Result")
    for index, check in enumerate(report.isolation, 1):
        if not check.protected:
            result = f"[dim]not promised: {check.note}[/]"
        elif check.ok:
            result = "[green]holds[/]"
        else:
            result = "[red]" + "; ".join(check.violations) + "[/]"
        boot.add_row(str(index), check.after, result)
    console.print(boot)

    if report.iommu_probe_failures or report.without_iommu_ops:
        refused = table("IOMMU probe refusals", "Device: why")
        for line in report.iommu_probe_failures:
            refused.add_row(line)
        for device in report.without_iommu_ops:
            refused.add_row(f"[red]{device}: bound without IOMMU ops[/]")
        console.print(refused)

    traps = table("Traps by register", "SMMU", "Register", "Handling", "Reads", "Writes", numeric=2)
    for trap in report.traps:
        traps.add_row(trap.smmu, trap.reg, trap.access, str(trap.reads), str(trap.writes))
    console.print(traps)

    cmds = table(
        "Hyp command filter", "Opcode", "Seen", "Passed", "Rewritten", "Dropped", "Hyp's own", numeric=5
    )
    for row in report.filter:
        cmds.add_row(
            row.opcode, str(row.seen), str(row.passed), str(row.rewritten), str(row.dropped), str(row.hyp)
        )
    console.print(cmds)

    stes = ", ".join(f"{how} {count}" for how, count in report.stes) or "none"
    console.print(f"STEs shadowed: {stes}", highlight=False)
    idmap = report.idmap
    if idmap is not None:
        console.print(
            f"Identity stage-2: {idmap.pages} table pages, {idmap.entries} leaf entries at build; "
            f"then {idmap.unmaps} unmaps, {idmap.maps} maps, {idmap.invalidations} invalidations",
            highlight=False,
        )

    owners = table(
        "Ownership changes", "Transition", "Calls", "Pages", "Errors", "Idmap unmapped", "Idmap mapped",
        "Invalidations", "TLBI/SYNC cmds", numeric=7,
    )  # fmt: skip
    for change in report.ownership:
        owners.add_row(
            change.transition, str(change.calls), str(change.pages), str(change.errors),
            _hex(change.idmap_unmapped), _hex(change.idmap_mapped), str(change.invalidations),
            str(change.tlbi_commands),
        )  # fmt: skip
    console.print(owners)

    if report.donation:
        donation = table(
            "Guest donation: DMA to pages the host had mapped", "Step", "Page", "Owner", "Devices", "Cached",
            "DMA", "Expected",
        )  # fmt: skip
        rows: dict[tuple[object, ...], list[str]] = {}
        for dma in report.donation:  # one row per step and page, the devices that fared alike together
            key = (
                dma.step,
                dma.page,
                dma.owner,
                dma.cached,
                dma.reachable,
                dma.remapped,
                dma.expected,
                dma.ok,
            )
            rows.setdefault(key, []).append(dma.device)
        for (step, page, owner, cached, reached, remapped, expected, ok), names in rows.items():
            seen = ("reached" if reached else "blocked") + (" (identity map restored)" if remapped else "")
            donation.add_row(
                str(step), _hex(int(str(page))), str(owner), ", ".join(names), "yes" if cached else "no",
                f"[{'green' if ok else 'red'}]{seen}[/]", "reachable" if expected else "blocked",
            )  # fmt: skip
        console.print(donation)
    for warning in report.hyp_warnings:
        console.print(f"[yellow]hyp WARN:[/] {warning}", highlight=False)


# -- compare ------------------------------------------------------------------------------------------


def _split_designs(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


@main.command()
@click.option(
    "--designs",
    callback=_split_designs,
    metavar="A,B,...",
    help=f"Designs to compare, comma-separated; default: all ({', '.join(DESIGNS)}).",
)
@click.option(
    "--iterations",
    type=int,
    default=8,
    show_default=True,
    help="Times each DMA map/unmap and each donation runs per design.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data the devices move.")
@click.option(
    "--platform",
    "platform_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Device tree (DTS or DTB) of the platform; default: the embedded default platform.",
)
@click.option("--json", "json_file", metavar="FILE", help="Also write the comparison as JSON.")
@click.option(
    "--plot", "plot_file", metavar="FILE.png", help="Also plot modeled time per operation (matplotlib)."
)
def compare(
    designs: list[str] | None,
    iterations: int,
    seed: int,
    platform_file: str | None,
    json_file: str | None,
    plot_file: str | None,
) -> None:
    """Run the same host operations under every design and compare what they cost.

    Boot; dma_map_single / device DMA / dma_unmap_single of 4 KiB and 1 MiB buffers (strict
    invalidation); pages donated to a protected VM and reclaimed. Counts come from the trace,
    modeled time from the cost model (docs/design-comparison.md), and the isolation verdict from
    the oracle after every operation.

    \b
      pkvm-smmu compare
      pkvm-smmu compare --designs native,pv-paging --iterations 4 --json cmp.json --plot cmp.png
    """
    from pkvm_smmu.devicetree import DeviceTreeError
    from pkvm_smmu.scenarios.compare import CompareError, check_designs, plot_available
    from pkvm_smmu.scenarios.compare import compare as run_compare

    _check_output(json_file, "'--json'")
    _check_output(plot_file, "'--plot'")
    if plot_file is not None:
        if not plot_file.lower().endswith(".png"):
            raise click.BadParameter(f"'{plot_file}' is not a .png file", param_hint="'--plot'")
        if not plot_available():
            raise click.ClickException("--plot needs matplotlib: pip install 'pkvm-smmu[plot]'")
    if iterations < 1:
        raise click.BadParameter(f"must be at least 1 (got {iterations})", param_hint="'--iterations'")
    try:
        check_designs(designs if designs is not None else list(DESIGNS))
        comparison = run_compare(designs, iterations=iterations, seed=seed, platform=platform_file)
    except CompareError as error:
        raise click.BadParameter(str(error), param_hint=f"'{error.option}'") from None
    except DeviceTreeError as error:
        raise click.BadParameter(str(error), param_hint="'--platform'") from None
    from rich.console import Console

    from pkvm_smmu.scenarios.compare import write_json, write_plot

    console = Console()
    _print_comparison(console, comparison)
    if json_file is not None:
        write_json(comparison, json_file)
        console.print(f"JSON written to {json_file}", highlight=False)
    if plot_file is not None:
        write_plot(comparison, plot_file)
        console.print(f"plot written to {plot_file}", highlight=False)
    if not comparison.ok and any(r.problems for r in comparison.results):
        raise SystemExit(1)


def _per_op(value: float) -> str:
    """A per-operation mean: whole numbers as such, others with two decimals."""
    if value == int(value):
        return str(int(value))
    return f"{value:.2f}"


def _print_comparison(console: Console, comparison: Comparison) -> None:
    from rich.table import Table

    from pkvm_smmu.scenarios.compare import ISOLATION_NA

    platform = comparison.platform or "default (embedded)"
    console.print(
        f"[bold]pkvm-smmu compare[/]  designs={','.join(comparison.designs)}  "
        f"iterations={comparison.iterations}  seed={comparison.seed}  platform={platform}  "
        "(per operation: mean over its runs)",
        highlight=False,
    )
    table = Table(title="Cost per host operation", title_justify="left")
    columns = (
        ("Design", "left"), ("Operation", "left"), ("n", "right"), ("Traps", "right"),
        ("HVCs", "right"), ("Cmds", "right"), ("SYNCs", "right"), ("MMIO wr", "right"),
        ("PTE wr", "right"), ("PT pages", "right"), ("Pool pages", "right"), ("TLB miss", "right"),
        ("Walk rd", "right"), ("Model us", "right"), ("Isolation", "left"),
    )  # fmt: skip
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    colour = {"ok": "green", ISOLATION_NA: "dim"}
    for result in comparison.results:
        for index, op in enumerate(result.operations):
            design = result.design if index == 0 else ""
            if not op.supported:
                table.add_row(design, op.operation, "0", *["-"] * 11, f"[dim]{op.note}[/]")
                continue
            iso = op.isolation
            cells = [
                _per_op(op.per_op(key))
                for key in (
                    "traps", "hypercalls", "commands", "cmd_syncs", "mmio_writes", "pte_writes",
                    "table_pages", "pool_pages", "tlb_misses", "walk_levels",
                )
            ]  # fmt: skip
            table.add_row(
                design, op.operation, str(op.n), *cells, f"{op.modeled_ns / 1000:.3f}",
                f"[{colour.get(iso, 'red')}]{iso}[/]",
            )  # fmt: skip
        table.add_section()
    console.print(table)

    commands = Table(title="Commands consumed by the SMMU, per operation", title_justify="left")
    for name in ("Design", "Operation", "By opcode"):
        commands.add_column(name)
    for result in comparison.results:
        for op in result.operations:
            if op.supported and op.total.commands:
                text = ", ".join(
                    f"{code} {_per_op(count / op.n)}"
                    for code, count in sorted(op.total.commands.items(), key=lambda kv: (-kv[1], kv[0]))
                )
                commands.add_row(result.design, op.operation, text)
    console.print(commands)

    rfc = comparison.rfc_v2()
    if rfc:
        ratios = Table(
            title="pv-paging / native: the model next to RFC v2 (Morello, 1 thread, us)", title_justify="left"
        )
        headers = ("Case", "RFC native", "RFC pKVM", "RFC ratio", "Model native", "Model pv-paging")
        for name in (*headers, "Model ratio"):
            ratios.add_column(name, justify="left" if name == "Case" else "right")
        for row in rfc:
            ratios.add_row(
                f"{row.operation} {row.size}", f"{row.measured_native_us:g}", f"{row.measured_pkvm_us:g}",
                f"{row.measured_ratio:.2f}", f"{row.model_native_us:.3f}", f"{row.model_pv_paging_us:.3f}",
                f"{row.model_ratio:.2f}",
            )  # fmt: skip
        console.print(ratios)

    console.print("[bold]Isolation (verify.oracle, after every operation and a full check at the end)[/]")
    for result in comparison.results:
        style = "red" if result.violations else ("dim" if "not applicable" in result.isolation else "green")
        console.print(f"  {result.design}: [{style}]{result.isolation}[/]", highlight=False)
        for line in result.violations:
            console.print(f"    - {line}", markup=False, highlight=False)
        for problem in result.problems:
            console.print(f"    ! {problem}", markup=False, highlight=False)


# -- fuzz ---------------------------------------------------------------------------------------------------

_SPEC_OPTIONS = {"design": "'--design'", "policy": "'--policy'", "boot-variant": "'--boot-variant'"}


@main.command()
@click.option(
    "--design",
    default=DEFAULT_DESIGN,
    show_default=True,
    help="The design to attack (trap-emulate, pv-identity, pv-paging).",
)
@click.option("--policy", default="v4", show_default=True, help="trap-emulate: the hyp's emulation policy.")
@click.option("--boot-variant", default="none", metavar="NAME", help="Boot variant; default: the design's.")
@click.option(
    "--platform",
    "platform_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Device tree (DTS or DTB) of the platform; default: the embedded default platform.",
)
@click.option("--device", "devices", multiple=True, metavar="SPEC", help="Add a PCI endpoint (repeatable).")
@click.option("--steps", type=int, default=1000, show_default=True, help="Adversarial steps in the campaign.")
@click.option(
    "--episode-steps",
    type=int,
    default=100,
    show_default=True,
    help="Steps per episode (each on a fresh system).",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Campaign seed: same seed, same campaign."
)
@click.option(
    "--workers", type=int, default=None, help="Worker processes; default: every core (1: this process)."
)
@click.option("--executor", metavar="dask://HOST:PORT", help="Run the episodes on a Dask cluster instead.")
@click.option(
    "--out",
    "out_dir",
    default="fuzz-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for the journal (campaign.jsonl) and the replay files.",
)
@click.option("--resume", is_flag=True, help="Continue the campaign in --out, skipping finished episodes.")
@click.option("--sanitizer", is_flag=True, help="Also attach the sanitizer (reports about the hyp).")
@click.option("--no-shrink", is_flag=True, help="Do not shrink findings to minimal replays.")
@click.option("--shrink-only", metavar="REGEX", help="Shrink only the finding classes this matches.")
@click.option(
    "--keep-queue-alive",
    is_flag=True,
    help="Never stop the hyp's command queue (no illegal commands, CMDQEN clears or PROD games): "
    "faster against v4 (no stopped-queue timeouts), less coverage.",
)
@click.option(
    "--step-timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Wall-clock seconds one step may take before it is reported as a hang.",
)
def fuzz(
    design: str,
    policy: str,
    boot_variant: str,
    platform_file: str | None,
    devices: tuple[str, ...],
    steps: int,
    episode_steps: int,
    seed: int,
    workers: int | None,
    executor: str | None,
    out_dir: str,
    resume: bool,
    sanitizer: bool,
    no_shrink: bool,
    shrink_only: str | None,
    keep_queue_alive: bool,
    step_timeout: float,
) -> None:
    """Attack a design as a malicious host would: seeded episodes of adversarial actions, the
    isolation oracle after every step, each new finding shrunk to a minimal replay file.

    Exit status: 0 when nothing was found, 1 when something was (see OUT/replays/).

    \b
      pkvm-smmu fuzz --policy v4 --steps 5000 --seed 1
      pkvm-smmu fuzz --steps 200000 --workers 16 --out campaign --resume
      pkvm-smmu fuzz --executor dask://scheduler:8786 --steps 10000000
    """
    from pathlib import Path

    from pkvm_smmu.devicetree import DeviceTreeError
    from pkvm_smmu.machine.platform import DeviceSpecError
    from pkvm_smmu.scenarios.boot import load_platform_tree, parse_devices
    from pkvm_smmu.verify.adversary import SpecError, SystemSpec, resolve_spec
    from pkvm_smmu.verify.fuzz import CampaignConfig, CampaignError, CampaignEvent, run_campaign

    for option, value in (("'--steps'", steps), ("'--episode-steps'", episode_steps)):
        if value < 1:
            raise click.BadParameter(f"must be at least 1 (got {value})", param_hint=option)
    if workers is not None and workers < 1:
        raise click.BadParameter(f"must be at least 1 (got {workers})", param_hint="'--workers'")
    if step_timeout <= 0:
        raise click.BadParameter(f"must be positive (got {step_timeout})", param_hint="'--step-timeout'")
    if shrink_only is not None:
        import re

        try:
            re.compile(shrink_only)
        except re.error as error:
            raise click.BadParameter(f"'{shrink_only}': {error}", param_hint="'--shrink-only'") from None
    spec = SystemSpec(design, policy, boot_variant, platform_file, devices, 0, sanitizer)
    try:
        spec = resolve_spec(spec)
        load_platform_tree(platform_file)
        parse_devices(devices)
    except SpecError as error:
        raise click.BadParameter(
            str(error), param_hint=_SPEC_OPTIONS.get(error.option, error.option)
        ) from None
    except DeviceTreeError as error:
        raise click.BadParameter(str(error), param_hint="'--platform'") from None
    except DeviceSpecError as error:
        raise click.BadParameter(str(error), param_hint="'--device'") from None
    config = CampaignConfig(
        spec,
        seed=seed,
        steps=steps,
        episode_steps=episode_steps,
        workers=workers if workers is not None else (os.cpu_count() or 1),
        executor=executor,
        out=Path(out_dir),
        resume=resume,
        step_timeout=step_timeout,
        shrink=not no_shrink,
        shrink_match=shrink_only,
        keep_queue_alive=keep_queue_alive,
    )
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    where = executor or f"{config.workers} worker{'s' if config.workers != 1 else ''}"
    console.print(
        f"[bold]pkvm-smmu fuzz[/]  {spec.describe()}  steps={steps} ({config.episodes} episodes of "
        f"{episode_steps})  seed={seed}  on {where}  out={out_dir}",
        highlight=False,
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("findings: {task.fields[findings]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("episodes", total=config.episodes, findings=0)

        def progress(event: CampaignEvent) -> None:
            if event.kind in ("start", "episode", "done"):
                bar.update(task, completed=event.done, findings=event.findings)
            elif event.kind == "shrink-start":
                bar.update(task, description="shrinking", findings=event.findings)
            elif event.kind == "shrink-done":
                bar.console.print(f"  shrunk {event.text}", markup=False, highlight=False)

        try:
            summary = run_campaign(config, progress)
        except CampaignError as error:
            raise click.BadParameter(str(error), param_hint=f"'{error.option}'") from None
    _print_campaign(console, summary)
    if summary.findings or summary.unshrunk:
        raise SystemExit(1)


def _print_campaign(console: Console, summary: object) -> None:
    from rich.table import Table

    from pkvm_smmu.verify.fuzz import CampaignSummary

    assert isinstance(summary, CampaignSummary)
    rate = f"{summary.steps_per_second:,.0f} steps/s per worker" if summary.steps_run else "no steps run"
    skipped = f", {summary.episodes_skipped} resumed" if summary.episodes_skipped else ""
    console.print(
        f"{summary.episodes_run} episodes run{skipped}, {summary.steps_run} steps, {rate}, "
        f"{summary.elapsed_s:.1f} s",
        highlight=False,
    )
    if not summary.findings and not summary.unshrunk:
        console.print("[green]no findings[/]")
        return
    table = Table(title="Findings (one per class, shrunk from its first episode)", title_justify="left")
    for column in ("Class", "Episode", "Step", "Replay", "Actions"):
        table.add_column(column)
    for record in summary.findings:
        table.add_row(
            record.signature,
            str(record.episode),
            "boot" if record.step < 0 else str(record.step),
            str(summary.config.out / record.replay),
            f"{record.length} (from {record.original_length})",
        )
    for signature in summary.unshrunk:
        table.add_row(signature, "-", "-", "(not shrunk)", "-")
    console.print(table)
    for record in summary.findings:
        console.print(f"  {record.signature}: {record.summary}", markup=False, highlight=False)


# -- attacks ------------------------------------------------------------------------------------------------


@main.command()
@click.option("--policy", default="v4", show_default=True, help="The hyp's emulation policy to attack.")
@click.option("--only", "only", multiple=True, metavar="NAME", help="Run only this attack (repeatable).")
@click.option("--list", "list_only", is_flag=True, help="List the attacks without running them.")
@click.option("--json", "json_file", metavar="FILE", help="Also write the results as JSON.")
def attacks(policy: str, only: tuple[str, ...], list_only: bool, json_file: str | None) -> None:
    """Run the attack catalogue against a policy: one named script of adversary actions per attack
    class, each outcome (violation, sanitizer, crash, blocked) next to the catalogue's expectation.

    Exit status: 0 when every outcome is the expected one, 1 otherwise.

    \b
      pkvm-smmu attacks --policy v4
      pkvm-smmu attacks --policy hardened --only ste-nested --json out.json
    """
    from rich.console import Console
    from rich.table import Table

    from pkvm_smmu.hyp.smmuv3 import POLICIES
    from pkvm_smmu.verify.attacks import ATTACKS, find_attack, run_attack
    from pkvm_smmu.verify.replay import write_json_atomic

    if policy not in POLICIES:
        raise click.BadParameter(
            f"unknown policy '{policy}' (have: {', '.join(sorted(POLICIES))})", param_hint="'--policy'"
        )
    try:
        chosen = [find_attack(name) for name in only] if only else list(ATTACKS)
    except KeyError as error:
        raise click.BadParameter(str(error.args[0]), param_hint="'--only'") from None
    _check_output(json_file, "'--json'")
    console = Console()
    if list_only:
        listing = Table(title="Attack catalogue", title_justify="left")
        for column in ("Attack", "Class", *sorted(POLICIES), "What"):
            listing.add_column(column, overflow="fold")
        for attack in chosen:
            expected = [str(attack.expected.get(name, "-")) for name in sorted(POLICIES)]
            listing.add_row(attack.name, attack.attack_class, *expected, attack.description)
        console.print(listing)
        return
    table = Table(title=f"Attacks against policy {policy}", title_justify="left")
    for column in ("Attack", "Class", "Outcome", "Expected", "", "Finding"):
        table.add_column(column)
    results = []
    for attack in chosen:
        result = run_attack(attack, policy)
        results.append(result)
        first = result.run.findings[0].signature if result.run.findings else ""
        style = "green" if result.as_expected else "red"
        table.add_row(
            attack.name,
            attack.attack_class,
            f"[{style}]{result.outcome}[/]",
            str(result.expected or "-"),
            "ok" if result.as_expected else "[red]UNEXPECTED[/]",
            first,
        )
    console.print(table)
    if json_file:
        write_json_atomic(
            json_file,
            {
                "policy": policy,
                "attacks": [
                    {
                        "name": r.attack.name,
                        "class": r.attack.attack_class,
                        "outcome": str(r.outcome),
                        "expected": str(r.expected) if r.expected else None,
                        "as_expected": r.as_expected,
                        "actions": [a.to_json() for a in r.run.actions],
                        "results": r.run.results,
                        "findings": [f.to_json() for f in r.run.findings],
                    }
                    for r in results
                ],
            },
        )
    unexpected = [r.attack.name for r in results if not r.as_expected]
    if unexpected:
        console.print(
            f"[red]{len(unexpected)} unexpected outcome(s):[/] {', '.join(unexpected)}", highlight=False
        )
        raise SystemExit(1)
    console.print(f"[green]all {len(results)} outcomes as expected[/]")


# -- replay --------------------------------------------------------------------------------------------------


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--quiet", is_flag=True, help="Only the verdict.")
def replay(file: str, quiet: bool) -> None:
    """Re-run a replay file and explain it step by step: each action, what the hyp did about it,
    and for each finding the stream, the physical pages, their owner and what makes them reachable.

    Exit status: 1 if the expected finding reproduces (for a file that expects nothing: if any
    finding appears after boot), 0 if it does not, 2 if the file cannot be used.

    \b
      pkvm-smmu replay fuzz-out/replays/violation-device-hyp-gbpa-bypass-1a2b3c4d.json
    """
    from rich.console import Console

    from pkvm_smmu.devicetree import DeviceTreeError
    from pkvm_smmu.machine.platform import DeviceSpecError
    from pkvm_smmu.verify.adversary import SpecError
    from pkvm_smmu.verify.replay import ReplayError, load_replay, run_replay

    err = Console(stderr=True, soft_wrap=True)
    try:
        loaded = load_replay(file)
        result = run_replay(loaded)
    except ReplayError as error:
        err.print(f"error: {error}", markup=False, highlight=False)
        raise SystemExit(2) from None
    except (SpecError, DeviceTreeError, DeviceSpecError) as error:
        err.print(f"error: {file}: system: {error}", markup=False, highlight=False)
        raise SystemExit(2) from None
    console = Console(soft_wrap=True)
    expected = loaded.expected
    if not quiet:
        console.print(f"[bold]replay[/] {file}: {loaded.system.describe()}", highlight=False)
        if expected is not None:
            console.print(f"expects {expected}", markup=False, highlight=False)
        for step in result.steps:
            if step.action is None:
                head = "boot"
                if not step.findings:
                    continue
            else:
                head = f"step {step.index}: {step.action.describe()}  ->  {step.result}"
            console.print(head, markup=False, highlight=False)
            for line in step.hyp_events:
                console.print(f"    hyp: {line}", markup=False, highlight=False)
            for finding, lines in zip(step.findings, step.explanations, strict=True):
                is_expected = expected is not None and finding.signature == expected.signature
                mark = "EXPECTED " if is_expected else ""
                console.print(f"    {mark}FINDING [{finding.signature}]", markup=False, highlight=False)
                if step.action is None and not is_expected:
                    console.print(f"      {finding.summary} (present at boot)", markup=False, highlight=False)
                    continue
                for line in lines:
                    console.print(f"      {line}", markup=False, highlight=False)
    if result.reproduced:
        console.print("[red]REPRODUCED[/] (exit 1)")
        raise SystemExit(1)
    console.print("[green]not reproduced[/] (exit 0)")
