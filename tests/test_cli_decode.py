"""``pkvm-smmu decode`` end to end through click."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pkvm_smmu.cli import main

WIDE = {"COLUMNS": "200"}


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["decode", *args], env=WIDE)
    return result.exit_code, result.output


def test_decode_ste_like_the_readme() -> None:
    code, out = run("ste", "0x000000000000000b", "0", "0", "0", "0", "0", "0", "0")
    assert code == 0, out
    assert "CONFIG" in out and "S1_TRANS" in out and "[3:1]" in out
    assert "STE(V=1 CONFIG=S1_TRANS)" in out


def test_decode_stage2_ste_shows_s2ttb() -> None:
    code, out = run("ste", "0xd", "0", "0x0005000000000000", "0x0000000812345000", "0", "0", "0", "0")
    assert code == 0, out
    assert "S2_TRANS" in out and "S2TTB" in out and "0x812345000" in out and "BITS_48" in out


def test_decode_command_event_and_register() -> None:
    code, out = run("cmd", "0x0000123400000003", "0x1")
    assert code == 0 and "CMD_CFGI_STE" in out and "LEAF" in out
    code, out = run("evt", "0x0000000700000003", "0", "0", "0x40000048")
    assert code == 0 and "F_STE_FETCH" in out and "0x40000048" in out
    code, out = run("reg", "CMDQ_CONS", "0x01000004")
    assert code == 0 and "ILL" in out and "[30:24]" in out
    code, out = run("l1std", "0x12345009")
    assert code == 0 and "SPAN" in out


def test_reserved_bits_are_flagged() -> None:
    code, out = run("l1std", "0x20")
    assert code == 0 and "RES0" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("ste", "0xzz", "0", "0", "0", "0", "0", "0", "0"), "not a hex number"),
        (("ste", "1", "2"), "8 64-bit words, got 2"),
        (("cmd", "1"), "2 64-bit words, got 1"),
        (("frob", "1"), "unknown kind 'frob'"),
        (("reg", "NOPE", "1"), "unknown register 'NOPE'"),
        (("reg",), "register NAME"),
        (("reg", "CR0", "0x1ffffffff"), "does not fit"),
        (("l1cd", "0x10000000000000000"), "does not fit in 64 bits"),
    ],
)
def test_bad_input_is_a_usage_error(args: tuple[str, ...], message: str) -> None:
    code, out = run(*args)
    assert code == 2
    assert message in out
    assert "Traceback" not in out


def test_help_lists_the_kinds() -> None:
    result = CliRunner().invoke(main, ["decode", "--help"])
    assert result.exit_code == 0
    assert "ste, cd, l1std, l1cd, cmd, evt, pri" in result.output
