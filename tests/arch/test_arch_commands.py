"""Every command layout against a command built by hand from the spec's figures (§4) and Linux's
``CMDQ_*`` masks. Each vector is (dword 0, dword 1)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkvm_smmu.arch.commands import (
    CMD_CFGI_CD,
    CMD_SIZE,
    CMD_SYNC,
    CMD_TLBI_NH_VA,
    COMMAND_LAYOUTS,
    Opcode,
    PriResp,
    SyncCs,
    TlbiTg,
    build_command,
    cfgi_all,
    command_opcode,
    command_words,
    decode_command,
    pretty_command,
)
from pkvm_smmu.arch.registers import Shareability


def cmd(w0: int, w1: int = 0) -> int:
    return w0 | w1 << 64


VA = 0xFFFF_8000_DEAD_B000  # a VA: ADDR holds bits [63:12], dword 1 keeps them in place
IPA = 0x00F0_8000_1234_5000  # an IPA/PA: ADDR holds bits [55:12]

# opcode, fields for build_command, hand-built (dword0, dword1)
VECTORS: list[tuple[Opcode, dict[str, int], tuple[int, int]]] = [
    (Opcode.PREFETCH_CONFIG, {"SID": 0x10, "SSV": 1, "SSID": 5}, (0x01 | 1 << 11 | 5 << 12 | 0x10 << 32, 0)),
    (
        Opcode.PREFETCH_ADDR,
        {"SID": 3, "SIZE": 4, "STRIDE": 2, "ADDR": VA},
        (0x02 | 3 << 32, 4 | 2 << 5 | VA),  # Size[4:0], Stride[9:5] of dword 1
    ),
    (Opcode.CFGI_STE, {"SID": 0x1234, "LEAF": 1}, (0x03 | 0x1234 << 32, 1)),
    (Opcode.CFGI_STE_RANGE, {"SID": 0x40, "RANGE": 5}, (0x04 | 0x40 << 32, 5)),
    (Opcode.CFGI_CD, {"SID": 9, "SSID": 7, "LEAF": 1}, (0x05 | 7 << 12 | 9 << 32, 1)),
    (Opcode.CFGI_CD_ALL, {"SID": 9}, (0x06 | 9 << 32, 0)),
    (Opcode.CFGI_VMS_PIDM, {"VMID": 5}, (0x07 | 5 << 32, 0)),
    (Opcode.TLBI_NH_ALL, {"VMID": 3}, (0x10 | 3 << 32, 0)),
    (Opcode.TLBI_NH_ASID, {"VMID": 3, "ASID": 0x77}, (0x11 | 3 << 32 | 0x77 << 48, 0)),
    (
        Opcode.TLBI_NH_VA,
        {"VMID": 3, "ASID": 0x77, "NUM": 3, "SCALE": 1, "LEAF": 1, "TTL": 3, "TG": 1, "ADDR": VA},
        # NUM[16:12], SCALE[24:20]; dword 1: Leaf[0], TTL[9:8], TG[11:10], Addr[63:12]
        (0x12 | 3 << 12 | 1 << 20 | 3 << 32 | 0x77 << 48, 1 | 3 << 8 | 1 << 10 | VA),
    ),
    (Opcode.TLBI_NH_VAA, {"VMID": 3, "LEAF": 1, "ADDR": VA}, (0x13 | 3 << 32, 1 | VA)),
    (Opcode.TLBI_EL3_ALL, {}, (0x18, 0)),
    (Opcode.TLBI_EL3_VA, {"ADDR": VA}, (0x1A, VA)),
    (Opcode.TLBI_EL2_ALL, {}, (0x20, 0)),
    (Opcode.TLBI_EL2_ASID, {"ASID": 9}, (0x21 | 9 << 48, 0)),
    (Opcode.TLBI_EL2_VA, {"ASID": 9, "LEAF": 1, "ADDR": VA}, (0x22 | 9 << 48, 1 | VA)),
    (Opcode.TLBI_EL2_VAA, {"ADDR": VA}, (0x23, VA)),
    (Opcode.TLBI_S12_VMALL, {"VMID": 0xBEEF}, (0x28 | 0xBEEF << 32, 0)),
    (
        Opcode.TLBI_S2_IPA,
        {"VMID": 2, "LEAF": 1, "TTL": 2, "TG": 3, "NUM": 1, "ADDR": IPA},
        (0x2A | 1 << 12 | 2 << 32, 1 | 2 << 8 | 3 << 10 | IPA),
    ),
    (Opcode.TLBI_NSNH_ALL, {}, (0x30, 0)),
    (
        Opcode.ATC_INV,
        {"SID": 0x100, "SSV": 1, "SSID": 2, "GLOBAL": 1, "SIZE": 52},
        (0x40 | 1 << 9 | 1 << 11 | 2 << 12 | 0x100 << 32, 52),  # G at 9; Size[5:0]
    ),
    (
        Opcode.PRI_RESP,
        {"SID": 4, "PRGINDEX": 0x1FF, "RESP": PriResp.SUCCESS},
        (0x41 | 4 << 32, 0x1FF | 0b10 << 12),  # PRGIndex[8:0], Resp[13:12]
    ),
    (
        Opcode.RESUME,
        {"SID": 6, "AC": 1, "STAG": 0xBEEF},
        (0x44 | 1 << 12 | 6 << 32, 0xBEEF),  # Linux RESP_RETRY = 1 in [13:12]
    ),
    (Opcode.STALL_TERM, {"SID": 6}, (0x45 | 6 << 32, 0)),
    (
        Opcode.SYNC,
        {"CS": SyncCs.IRQ, "MSH": 3, "MSIATTR": 0xF, "MSIDATA": 0xCAFE, "MSIADDR": 0x9000_0044},
        # CS[13:12], MSH[23:22], MSIAttr[27:24], MSIData[63:32]; dword 1 MSIAddress[55:2] in place
        (0x46 | 1 << 12 | 3 << 22 | 0xF << 24 | 0xCAFE << 32, 0x9000_0044),
    ),
    (Opcode.TLBI_S_EL2_ALL, {}, (0x50, 0)),
    (Opcode.TLBI_S_EL2_ASID, {"ASID": 1}, (0x51 | 1 << 48, 0)),
    (Opcode.TLBI_S_EL2_VA, {"ASID": 1, "ADDR": VA}, (0x52 | 1 << 48, VA)),
    (Opcode.TLBI_S_EL2_VAA, {"ADDR": VA}, (0x53, VA)),
    (Opcode.TLBI_S_S12_VMALL, {"VMID": 8}, (0x58 | 8 << 32, 0)),
    (Opcode.TLBI_S_S2_IPA, {"VMID": 8, "NS": 1, "LEAF": 1, "ADDR": IPA}, (0x5A | 8 << 32, 1 | 1 << 1 | IPA)),
    (Opcode.TLBI_SNH_ALL, {}, (0x60, 0)),
    (Opcode.DPTI_ALL, {}, (0x70, 0)),
    (Opcode.DPTI_PA, {"LEAF": 1, "SIZE": 3, "ADDR": IPA}, (0x73, 1 | 3 << 8 | IPA)),  # SIZE[11:8]
]


def test_every_opcode_has_a_layout_and_a_vector() -> None:
    assert set(COMMAND_LAYOUTS) == set(Opcode)
    assert {op for op, _, _ in VECTORS} == set(Opcode)
    assert CMD_SIZE == 16
    for op, layout in COMMAND_LAYOUTS.items():
        assert layout.WIDTH == 128
        assert layout.__name__ == f"CMD_{op.name}"


@pytest.mark.parametrize(("opcode", "fields", "dwords"), VECTORS, ids=[v[0].name for v in VECTORS])
def test_command_vectors(opcode: Opcode, fields: dict[str, int], dwords: tuple[int, int]) -> None:
    expected = cmd(*dwords)
    assert build_command(opcode, **fields) == expected
    assert command_opcode(expected) == opcode
    assert command_words(expected) == dwords
    decoded_op, decoded = decode_command(expected)
    assert decoded_op is opcode
    for name, value in fields.items():
        assert decoded[name] == value, name
    assert all(v == 0 for k, v in decoded.items() if k not in fields)
    assert COMMAND_LAYOUTS[opcode].reserved_bits(expected) == 0
    assert pretty_command(expected).startswith(f"CMD_{opcode.name}(")


def test_decode_gives_enums() -> None:
    _, d = decode_command(cmd(0x46 | 2 << 12 | 2 << 22))
    assert d["CS"] is SyncCs.SEV and d["MSH"] is Shareability.OSH
    _, d = decode_command(cmd(0x12, 3 << 10))
    assert d["TG"] is TlbiTg.G64K
    _, d = decode_command(cmd(0x41, 1 << 12))
    assert d["RESP"] is PriResp.INVALID


def test_resume_abort_bit() -> None:
    # Linux RESP_ABORT = 2 in [13:12]: terminate (AC=0) with abort (AB=1).
    _, d = decode_command(cmd(0x44 | 2 << 12))
    assert d["AC"] == 0 and d["AB"] == 1


def test_sync_msi_address_and_ns() -> None:
    value = build_command(Opcode.SYNC, CS=1, MSIADDR=0xFF_FFFF_FFFF_FFFC)
    assert CMD_SYNC.MSIADDR.get_address(value) == 0xFF_FFFF_FFFF_FFFC
    assert value >> 64 == 0xFF_FFFF_FFFF_FFFC  # MSIAddress[55:2] at dword-1 bits [55:2]
    assert build_command(Opcode.SYNC, MSI_NS=1) == 0x46 | 1 << 127


def test_cfgi_all() -> None:
    assert cfgi_all() == cmd(0x04, 31)
    assert cfgi_all(ssec=1) == cmd(0x04 | 1 << 10, 31)


def test_cfgi_cd_has_no_ssv() -> None:
    assert CMD_CFGI_CD.reserved_bits(cmd(0x05 | 1 << 11)) == 1 << 11


def test_tlbi_scale_is_six_bits_with_ds() -> None:
    assert CMD_TLBI_NH_VA.encode(SCALE=39) == 39 << 20
    assert CMD_TLBI_NH_VA.encode(TTL128=1) == 1 << 71


def test_unknown_opcode_decodes_common_fields() -> None:
    value = cmd(0x99 | 1 << 11 | 3 << 12 | 7 << 32)
    op, d = decode_command(value)
    assert op == 0x99 and not isinstance(op, Opcode)
    assert d == {"SSEC": 0, "SSV": 1, "SSID": 3, "SID": 7}
    assert "0x99" in pretty_command(value)


def test_build_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        build_command(Opcode.CFGI_STE, ASID=1)  # not a CFGI_STE field
    with pytest.raises(ValueError):
        build_command(Opcode.TLBI_NH_VA, ADDR=0x1234)  # not 4 KB aligned
    with pytest.raises(ValueError):
        build_command(Opcode.TLBI_S2_IPA, ADDR=1 << 56)  # an IPA has 56 bits at most
    with pytest.raises(ValueError):
        build_command(Opcode.CFGI_STE, SID=1 << 32)
    with pytest.raises(ValueError):
        build_command(0x99)


@pytest.mark.parametrize("opcode", list(Opcode), ids=[o.name for o in Opcode])
@given(data=st.data())
def test_decode_then_build_round_trips(opcode: Opcode, data: st.DataObject) -> None:
    layout = COMMAND_LAYOUTS[opcode]
    value = data.draw(st.integers(0, (1 << 128) - 1)) & layout.DEFINED_MASK & ~0xFF | opcode
    op, fields = decode_command(value)
    assert build_command(op, **fields) == value
