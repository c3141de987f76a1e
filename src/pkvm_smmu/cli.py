"""The ``pkvm-smmu`` command. This is the only module that prints."""

from __future__ import annotations

import click

from pkvm_smmu import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pkvm-smmu")
def main() -> None:
    """An executable model of the pKVM SMMUv3 isolation design."""
