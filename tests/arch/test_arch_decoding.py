"""The parsing and decoding behind ``pkvm-smmu decode`` (no printing here)."""

from __future__ import annotations

import pytest

from pkvm_smmu.arch._bitfield import Field, Layout
from pkvm_smmu.arch.decoding import (
    KINDS,
    DecodeError,
    decode_register,
    decode_words,
    parse_words,
    simple_kind,
)


def test_parse_words_accepts_kernel_formats() -> None:
    assert parse_words(["0x000000000000000b", "0", "DEADbeef", "0x1,0x2"]) == [0xB, 0, 0xDEADBEEF, 1, 2]
    assert parse_words(["0x1_0000"]) == [0x10000]


@pytest.mark.parametrize("bad", ["zz", "0x", "-1", "0xg", "1" * 17])
def test_parse_words_rejects_bad_hex(bad: str) -> None:
    with pytest.raises(DecodeError):
        parse_words([bad])


def test_decode_ste() -> None:
    d = decode_words("ste", ["0x000000000000000b", *["0"] * 7])
    rows = {r.name: r for r in d.rows}
    assert rows["CONFIG"].meaning == "S1_TRANS" and (rows["CONFIG"].hi, rows["CONFIG"].lo) == (3, 1)
    assert rows["V"].raw == 1
    assert d.pretty == "STE(V=1 CONFIG=S1_TRANS)"
    assert d.reserved == 0
    assert [r.lo for r in d.rows] == sorted(r.lo for r in d.rows)


def test_decode_reports_reserved_bits() -> None:
    d = decode_words("l1std", ["0x20"])  # bit 5 is RES0
    assert d.reserved == 0x20


def test_decode_cmd_picks_the_layout_by_opcode() -> None:
    d = decode_words("cmd", ["0x0000cafe00001046", "0x0000000090000044"])
    names = {r.name for r in d.rows}
    assert {"CS", "MSIDATA", "MSIADDR"} <= names and "SID" not in names
    assert "CMD_SYNC" in d.title and "MSIADDR=0x90000044" in d.pretty


def test_decode_evt_shows_only_that_type() -> None:
    d = decode_words("evt", ["0x0000002000000010", "0x0000028800000000", "0x1000", "0x0000000812345000"])
    names = [r.name for r in d.rows]
    assert "IPA" in names and "FETCHADDR" not in names and "REASON" not in names
    assert d.pretty.startswith("F_TRANSLATION(")


def test_wrong_word_count_and_unknown_kind() -> None:
    with pytest.raises(DecodeError, match="8 64-bit words, got 2"):
        decode_words("ste", ["1", "2"])
    with pytest.raises(DecodeError, match="unknown kind"):
        decode_words("vmcs", ["1"])


def test_decode_register() -> None:
    d = decode_register("cmdq_cons", ["0x01000004"])
    assert {r.name: r.meaning for r in d.rows} == {"RD": "4", "ERR": "ILL"}
    assert decode_register("SMMU_CR0", ["0xd"]).pretty == "CR0(SMMUEN=1 EVENTQEN=1 CMDQEN=1)"
    assert decode_register("STRTAB_BASE", ["0x4000000080000000"]).rows  # 64-bit register
    with pytest.raises(DecodeError, match="unknown register"):
        decode_register("CR9", ["0"])
    with pytest.raises(DecodeError, match="32-bit"):
        decode_register("CR0", ["0x100000000"])
    with pytest.raises(DecodeError, match="one value"):
        decode_register("CR0", ["1", "2"])
    with pytest.raises(DecodeError, match="no architected"):
        decode_register("IDR4", ["0"])


def test_registry_takes_a_new_kind_in_one_line() -> None:
    class DEMO(Layout):
        VALID = Field(0)
        OA = Field(47, 12, addr_lo=12)

    KINDS["demo"] = simple_kind(DEMO, "a test descriptor")
    try:
        d = decode_words("demo", ["0x1001"])
        assert {r.name for r in d.rows} == {"VALID", "OA"}
    finally:
        del KINDS["demo"]
