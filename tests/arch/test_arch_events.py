"""Event and PRI records against records built by hand from the spec's figures (§7.3, §8) and
Linux's ``EVTQ_*``/``PRIQ_*`` masks. Records are written as their four (or two) dwords."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkvm_smmu.arch.events import (
    EVENT,
    EVENT_FIELDS,
    EVENT_SIZE,
    PRI_RECORD,
    PRI_SIZE,
    EventType,
    FaultClass,
    build_event,
    decode_event,
    pretty_event,
)


def rec(*dwords: int) -> int:
    return sum(w << (64 * i) for i, w in enumerate(dwords))


def test_sizes_and_coverage() -> None:
    assert EVENT_SIZE == 32 and PRI_SIZE == 16
    assert set(EVENT_FIELDS) == set(EventType)
    names = {f.name for f in EVENT.FIELDS}
    for fields in EVENT_FIELDS.values():
        assert set(fields) <= names
        assert "EVENTTYPE" not in fields


def test_f_translation_stage2() -> None:
    value = rec(
        0x10 | 1 << 11 | 3 << 12 | 0x20 << 32,  # F_TRANSLATION, SSV, SSID = 3, SID = 0x20
        1 << 35 | 1 << 39 | 0b10 << 40,  # RnW (bit 99), S2 (bit 103), CLASS = IN (bits 105:104)
        0xFFFF_0000_DEAD_BEEF,  # InputAddr
        0x8_1234_5000,  # IPA[55:12], in place in dword 3
    )
    etype, d = decode_event(value)
    assert etype is EventType.F_TRANSLATION
    assert d["SID"] == 0x20 and d["SSV"] == 1 and d["SSID"] == 3
    assert d["RNW"] == 1 and d["S2"] == 1 and d["CLASS"] is FaultClass.IN
    assert d["INPUTADDR"] == 0xFFFF_0000_DEAD_BEEF
    assert d["IPA"] == 0x8_1234_5000
    assert d["STALL"] == d["STAG"] == d["PNU"] == d["IND"] == 0
    assert (
        build_event(
            EventType.F_TRANSLATION,
            SID=0x20,
            SSV=1,
            SSID=3,
            RNW=1,
            S2=1,
            CLASS=FaultClass.IN,
            INPUTADDR=0xFFFF_0000_DEAD_BEEF,
            IPA=0x8_1234_5000,
        )
        == value
    )
    assert EVENT.reserved_bits(value) == 0
    assert "CLASS=IN" in pretty_event(value) and "IPA=0x812345000" in pretty_event(value)


def test_stall_and_attributes() -> None:
    # STAG = dword 1 [15:0], Stall = bit 95, PnU/InD/RnW = bits 97/98/99, NSIPA = 100
    value = rec(0x13, 0xBEEF | 1 << 31 | 1 << 33 | 1 << 34 | 1 << 36)
    _, d = decode_event(value)
    assert d["STAG"] == 0xBEEF and d["STALL"] == 1
    assert d["PNU"] == 1 and d["IND"] == 1 and d["RNW"] == 0 and d["NSIPA"] == 1


def test_f_permission_ttrnw() -> None:
    value = rec(0x13, 1 << 39 | 0b01 << 40 | 1 << 44)  # S2, CLASS = TT, TTRnW (bit 108)
    _, d = decode_event(value)
    assert d["CLASS"] is FaultClass.TT and d["TTRNW"] == 1
    assert build_event(EventType.F_PERMISSION, S2=1, CLASS=FaultClass.TT, TTRNW=1) == value
    with pytest.raises(ValueError):
        build_event(EventType.F_TRANSLATION, TTRNW=1)


def test_f_ste_fetch() -> None:
    value = rec(
        0x03 | 7 << 32,  # F_STE_FETCH, SID = 7
        0x5A | 1 << 16,  # Reason (IMPDEF) [79:64], GPCF (bit 80)
        0,
        0x4000_0048,  # FetchAddr[55:3], in place in dword 3
    )
    etype, d = decode_event(value)
    assert etype is EventType.F_STE_FETCH
    assert d == {"SSV": 0, "SSID": 0, "SID": 7, "REASON": 0x5A, "GPCF": 1, "FETCHADDR": 0x4000_0048}
    assert build_event(EventType.F_STE_FETCH, SID=7, REASON=0x5A, GPCF=1, FETCHADDR=0x4000_0048) == value
    assert "FETCHADDR=0x40000048" in pretty_event(value)


def test_f_walk_eabt() -> None:
    value = rec(0x0B | 2 << 32, 1 << 39 | 0b01 << 40, 0x1000, 0x7000_0010)
    _, d = decode_event(value)
    assert d["S2"] == 1 and d["CLASS"] is FaultClass.TT
    assert d["INPUTADDR"] == 0x1000 and d["FETCHADDR"] == 0x7000_0010


def test_f_bad_ats_treq() -> None:
    value = rec(
        0x05 | 9 << 32,
        4 | 1 << 28 | 1 << 31,  # Span[67:64] = 4, P (bit 92), R (bit 95)
        0x1234_5000,  # InputAddr[63:12]; bits [139:128] are RES0 here
    )
    _, d = decode_event(value)
    assert d["SPAN"] == 4 and d["P"] == 1 and d["R"] == 1 and d["W"] == 0 and d["X"] == 0
    assert build_event(EventType.F_BAD_ATS_TREQ, SID=9, SPAN=4, P=1, R=1, INPUTADDR=0x1234_5000) == value
    with pytest.raises(ValueError):
        build_event(EventType.F_BAD_ATS_TREQ, INPUTADDR=0x1234_5678)


def test_e_page_request() -> None:
    # pR 103, pW 102, uR 99, Span [115:108]
    value = rec(0x24, 1 << 39 | 1 << 38 | 1 << 35 | 16 << 44, 0x4000)
    _, d = decode_event(value)
    assert d["PR"] == d["PW"] == d["UR"] == 1 and d["PX"] == d["UW"] == d["UX"] == 0
    assert d["PAGE_SPAN"] == 16 and d["INPUTADDR"] == 0x4000


def test_conflict_reasons() -> None:
    value = rec(0x21 | 5 << 32, 0xDEAD_BEEF)  # Reason (IMPDEF) [95:64]
    assert decode_event(value)[1]["CONFLICT_REASON"] == 0xDEAD_BEEF


def test_records_without_ssv() -> None:
    assert EVENT_FIELDS[EventType.F_STREAM_DISABLED] == ("SID",)
    with pytest.raises(ValueError):
        build_event(EventType.F_STREAM_DISABLED, SSV=1)
    assert "SSV" not in EVENT_FIELDS[EventType.C_BAD_SUBSTREAMID]
    assert build_event(EventType.C_BAD_SUBSTREAMID, SID=1, SSID=0x55) == rec(0x08 | 0x55 << 12 | 1 << 32)


def test_pretty_shows_only_defined_fields() -> None:
    value = build_event(EventType.C_BAD_STE, SID=0x30)
    assert pretty_event(value) == "C_BAD_STE(SSV=0 SSID=0 SID=0x30)"
    # Bits another type would call IPA are not shown for C_BAD_STREAMID.
    assert "IPA" not in pretty_event(rec(0x02, 0, 0, 0x5000))


def test_unknown_event_type() -> None:
    value = rec(0xE3 | 4 << 32)
    etype, d = decode_event(value)
    assert etype == 0xE3 and not isinstance(etype, EventType)
    assert d == {"SID": 4}
    assert pretty_event(value).startswith("EVENT_0xe3(SID=0x4")
    with pytest.raises(ValueError):
        build_event(0xE3)


@pytest.mark.parametrize("etype", list(EventType), ids=[e.name for e in EventType])
@given(data=st.data())
def test_decode_then_build_round_trips(etype: EventType, data: st.DataObject) -> None:
    mask = EVENT.EVENTTYPE.in_place_mask
    for name in EVENT_FIELDS[etype]:
        mask |= EVENT.field(name).in_place_mask
    if etype in (EventType.F_BAD_ATS_TREQ, EventType.E_PAGE_REQUEST):
        mask &= ~(0xFFF << 128)
    value = data.draw(st.integers(0, (1 << 256) - 1)) & mask & ~0xFF | etype
    decoded_type, fields = decode_event(value)
    assert build_event(decoded_type, **fields) == value


def test_pri_record() -> None:
    value = rec(
        0x10 | 5 << 32 | 1 << 60 | 1 << 61 | 1 << 62 | 1 << 63,  # SID, SSID, R, W, Last, SSV
        0x12 | 0x7000_0000,  # PRGIndex[8:0], page address [63:12] in place
    )
    d = PRI_RECORD.decode(value)
    assert d["SID"] == 0x10 and d["SSID"] == 5 and d["SSV"] == 1
    assert d["R"] == d["W"] == d["LAST"] == 1 and d["X"] == d["PRIV"] == 0
    assert d["PRGINDEX"] == 0x12
    assert PRI_RECORD.ADDR.get_address(value) == 0x7000_0000
    assert PRI_RECORD.encode(PRIV=1, X=1) == 1 << 58 | 1 << 59
