"""The ``pkvm-smmu`` command. This is the only module that prints."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import click

from pkvm_smmu import __version__
from pkvm_smmu.scenarios import DEFAULT_DESIGN, DESIGNS

if TYPE_CHECKING:
    from rich.console import Console

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
