"""Event queue records (IHI 0070 §7.3) and PRI queue records (§8).

One ``EVENT`` layout holds every field any event type defines, at the spec's absolute bit numbers;
fields of different types share bits (STAG/REASON, IPA/FETCHADDR), so ``EVENT_FIELDS`` says which
ones a given type defines. Positions are from the G.b record figures, cross-checked with Linux
``EVTQ_*``/``PRIQ_*`` masks and QEMU's ``EVT_SET_*``.

``build_event``/``decode_event`` speak byte addresses for IPA and FETCHADDR; INPUTADDR is the full
64-bit input address.
"""

from __future__ import annotations

from enum import IntEnum

from pkvm_smmu.arch._bitfield import Field, Layout

EVENT_SIZE = 32
PRI_SIZE = 16


class EventType(IntEnum):
    F_UUT = 0x01
    C_BAD_STREAMID = 0x02
    F_STE_FETCH = 0x03
    C_BAD_STE = 0x04
    F_BAD_ATS_TREQ = 0x05
    F_STREAM_DISABLED = 0x06
    F_TRANSL_FORBIDDEN = 0x07
    C_BAD_SUBSTREAMID = 0x08
    F_CD_FETCH = 0x09
    C_BAD_CD = 0x0A
    F_WALK_EABT = 0x0B
    F_TRANSLATION = 0x10
    F_ADDR_SIZE = 0x11
    F_ACCESS = 0x12
    F_PERMISSION = 0x13
    F_TLB_CONFLICT = 0x20
    F_CFG_CONFLICT = 0x21
    E_PAGE_REQUEST = 0x24
    F_VMS_FETCH = 0x25


class FaultClass(IntEnum):
    CD = 0  # CD fetch
    TT = 1  # stage-1 translation table fetch
    IN = 2  # the input address


class EVENT(Layout):
    WIDTH = 256
    ALLOW_OVERLAP = True
    # dword 0
    EVENTTYPE = Field(7, 0, EventType)
    SSV = Field(11)
    SSID = Field(31, 12)
    SID = Field(63, 32)
    # dword 1
    STAG = Field(79, 64)
    REASON = Field(79, 64)  # IMPLEMENTATION DEFINED cause (F_UUT, *_FETCH, F_WALK_EABT)
    CONFLICT_REASON = Field(95, 64)  # IMPDEF Reason of F_TLB_CONFLICT / F_CFG_CONFLICT
    SPAN = Field(67, 64)  # F_BAD_ATS_TREQ: STUs requested
    GPCF = Field(80)
    P = Field(92)  # F_BAD_ATS_TREQ requested permissions
    X = Field(93)
    W = Field(94)
    R = Field(95)
    STALL = Field(95)
    PNU = Field(97)
    IND = Field(98)
    RNW = Field(99)  # 1 = read
    NSIPA = Field(100)
    S2 = Field(103)
    CLASS = Field(105, 104, FaultClass)
    TTRNW = Field(108)  # F_PERMISSION with CLASS=TT: 1 = descriptor read
    IMPL_DEF = Field(127, 112)
    UX = Field(97)  # E_PAGE_REQUEST anticipated accesses
    UW = Field(98)
    UR = Field(99)
    PX = Field(101)
    PW = Field(102)
    PR = Field(103)
    PAGE_SPAN = Field(115, 108)  # E_PAGE_REQUEST: span in 4 KB units
    # dword 2
    INPUTADDR = Field(191, 128)
    # dword 3
    FETCHADDR = Field(247, 195, addr_lo=3)
    IPA = Field(247, 204, addr_lo=12)


_IDS = ("SSV", "SSID", "SID")
_FETCH = (*_IDS, "REASON", "GPCF", "FETCHADDR")
_ATTRS = ("PNU", "IND", "RNW")
_FAULT = (*_IDS, "STAG", "STALL", *_ATTRS, "NSIPA", "S2", "CLASS", "IMPL_DEF", "INPUTADDR", "IPA")

EVENT_FIELDS: dict[EventType, tuple[str, ...]] = {
    EventType.F_UUT: (*_IDS, "REASON", *_ATTRS, "INPUTADDR"),
    EventType.C_BAD_STREAMID: _IDS,
    EventType.F_STE_FETCH: _FETCH,
    EventType.C_BAD_STE: _IDS,
    EventType.F_BAD_ATS_TREQ: (*_IDS, "SPAN", "P", "X", "W", "R", "INPUTADDR"),
    EventType.F_STREAM_DISABLED: ("SID",),
    EventType.F_TRANSL_FORBIDDEN: ("SID", "RNW", "INPUTADDR"),
    EventType.C_BAD_SUBSTREAMID: ("SSID", "SID"),  # SSID always valid: no SSV
    EventType.F_CD_FETCH: _FETCH,
    EventType.C_BAD_CD: _IDS,
    EventType.F_WALK_EABT: (*_FETCH, *_ATTRS, "NSIPA", "S2", "CLASS", "INPUTADDR"),
    EventType.F_TRANSLATION: _FAULT,
    EventType.F_ADDR_SIZE: _FAULT,
    EventType.F_ACCESS: _FAULT,
    EventType.F_PERMISSION: (*_FAULT, "TTRNW"),
    EventType.F_TLB_CONFLICT: (*_IDS, "CONFLICT_REASON", *_ATTRS, "NSIPA", "S2", "INPUTADDR", "IPA"),
    EventType.F_CFG_CONFLICT: (*_IDS, "CONFLICT_REASON"),
    EventType.E_PAGE_REQUEST: (*_IDS, "UX", "UW", "UR", "PX", "PW", "PR", "PAGE_SPAN", "INPUTADDR"),
    EventType.F_VMS_FETCH: _FETCH,
}

# Types whose record holds only InputAddr[63:12] (bits [139:128] are RES0).
_PAGE_ADDR_TYPES = (EventType.F_BAD_ATS_TREQ, EventType.E_PAGE_REQUEST)
_MASK256 = (1 << 256) - 1


def event_type(value: int) -> int:
    return value & 0xFF


def build_event(event_type: int, **fields: int) -> int:
    """A record of ``event_type``; rejects fields that type does not define."""
    etype = EventType(event_type)
    allowed = EVENT_FIELDS[etype]
    value = EVENT.EVENTTYPE.insert(etype)
    for name, field_value in fields.items():
        if name not in allowed:
            raise ValueError(f"{etype.name} has no field {name} (it defines {', '.join(allowed)})")
        f = EVENT.field(name)
        if name == "INPUTADDR" and etype in _PAGE_ADDR_TYPES and field_value & 0xFFF:
            raise ValueError(f"{etype.name} records only InputAddr[63:12]; got {field_value:#x}")
        value = f.set_address(value, field_value) if f.addr_lo is not None else f.set(value, field_value)
    return value


def decode_event(value: int) -> tuple[EventType | int, dict[str, int]]:
    """``(type, fields)`` with only the fields the type defines; unknown types give just SID."""
    value &= _MASK256
    raw = event_type(value)
    try:
        etype = EventType(raw)
    except ValueError:
        return raw, {"SID": EVENT.SID.get(value)}
    decoded = EVENT.decode(value)
    out: dict[str, int] = {}
    for name in EVENT_FIELDS[etype]:
        f = EVENT.field(name)
        out[name] = f.get_address(value) if f.addr_lo is not None else decoded[name]
    return etype, out


def pretty_event(value: int) -> str:
    """One line with the fields the record's type defines."""
    value &= _MASK256
    etype, _ = decode_event(value)
    if not isinstance(etype, EventType):
        return f"EVENT_{etype:#04x}(SID={EVENT.SID.get(value):#x} raw={value:#066x})"
    parts = []
    for name in EVENT_FIELDS[etype]:
        f = EVENT.field(name)
        parts.append(f"{name}={f.display(f.get(value))}")
    return f"{etype.name}(" + " ".join(parts) + ")"


class PRI_RECORD(Layout):
    """A PRI queue entry: one PCIe Page Request."""

    WIDTH = 128
    SID = Field(31, 0)
    SSID = Field(51, 32)
    PRIV = Field(58)
    X = Field(59)
    R = Field(60)
    W = Field(61)
    LAST = Field(62)  # last request of its Page Request Group
    SSV = Field(63)
    PRGINDEX = Field(72, 64)
    ADDR = Field(127, 76, addr_lo=12)  # page address [63:12]
