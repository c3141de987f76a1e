"""The ``pkvm-smmu`` command. This is the only module that prints."""

from __future__ import annotations

import click

from pkvm_smmu import __version__


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
