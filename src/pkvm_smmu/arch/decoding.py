"""Turn the 64-bit words a kernel log prints into named fields, for ``pkvm-smmu decode``.

Pure functions: parsing and decoding only; the CLI prints. ``KINDS`` maps a kind name to how its
words decode, so another structure is one line: ``KINDS["s1-desc"] = simple_kind(S1_DESC, "...")``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pkvm_smmu.arch._bitfield import Layout
from pkvm_smmu.arch.commands import command_layout, pretty_command
from pkvm_smmu.arch.events import EVENT, EVENT_FIELDS, PRI_RECORD, EventType, pretty_event
from pkvm_smmu.arch.registers import REG_SIZE, REGISTER_LAYOUTS, Reg
from pkvm_smmu.arch.strtab import CD, L1CD, L1STD, STE

_U64 = (1 << 64) - 1


class DecodeError(ValueError):
    """Input the user can fix: the message names the problem."""


@dataclass(frozen=True)
class Row:
    name: str
    hi: int
    lo: int
    raw: int  # the field's bits
    meaning: str  # enum name, address, or the value again


@dataclass(frozen=True)
class Decoded:
    title: str
    value: int
    rows: tuple[Row, ...]
    pretty: str
    reserved: int = 0  # set bits no field of the layout defines


@dataclass(frozen=True)
class Kind:
    """How one kind of structure decodes from ``words`` 64-bit words."""

    words: int
    description: str
    layout_of: Callable[[int], type[Layout]]
    pretty: Callable[[int], str]
    fields_of: Callable[[int], Sequence[str] | None] = lambda value: None  # None: every field


def simple_kind(layout: type[Layout], description: str, words: int | None = None) -> Kind:
    return Kind(words or layout.n_words(), description, lambda value: layout, layout.pretty)


def _event_fields(value: int) -> Sequence[str] | None:
    try:
        return ("EVENTTYPE", *EVENT_FIELDS[EventType(value & 0xFF)])
    except ValueError:
        return ("EVENTTYPE", "SID")


KINDS: dict[str, Kind] = {
    "ste": simple_kind(STE, "stream table entry"),
    "cd": simple_kind(CD, "context descriptor"),
    "l1std": simple_kind(L1STD, "level-1 stream table descriptor"),
    "l1cd": simple_kind(L1CD, "level-1 context descriptor"),
    "cmd": Kind(2, "command queue entry", command_layout, pretty_command),
    "evt": Kind(4, "event queue record", lambda value: EVENT, pretty_event, _event_fields),
    "pri": simple_kind(PRI_RECORD, "PRI queue record"),
}


def parse_words(texts: Sequence[str]) -> list[int]:
    """Hex words as printed (``0x...`` or bare), separated by spaces or commas."""
    words = []
    for text in texts:
        for token in re.split(r"[\s,]+", text.strip()):
            if not token:
                continue
            digits = token[2:] if token.lower().startswith("0x") else token
            if not digits or not re.fullmatch(r"[0-9a-fA-F_]+", digits):
                raise DecodeError(f"{token!r} is not a hex number")
            value = int(digits.replace("_", ""), 16)
            if value > _U64:
                raise DecodeError(f"{token} does not fit in 64 bits")
            words.append(value)
    return words


def _rows(layout: type[Layout], value: int, names: Sequence[str] | None) -> tuple[Row, ...]:
    fields = layout.FIELDS if names is None else tuple(layout.field(n) for n in names)
    rows = []
    for f in sorted(fields, key=lambda f: (f.lo, f.hi)):
        raw = f.get(value)
        rows.append(Row(f.name, f.hi, f.lo, raw, f.display(raw)))
    return tuple(rows)


def decode_words(kind_name: str, texts: Sequence[str]) -> Decoded:
    kind = KINDS.get(kind_name.lower())
    if kind is None:
        known = ", ".join([*KINDS, "reg"])
        raise DecodeError(f"unknown kind {kind_name!r}; expected one of: {known}")
    words = parse_words(texts)
    if len(words) != kind.words:
        plural = "word" if kind.words == 1 else "words"
        raise DecodeError(
            f"a {kind_name} ({kind.description}) is {kind.words} 64-bit {plural}, got {len(words)}"
        )
    value = Layout.from_words(words)
    layout = kind.layout_of(value)
    names = kind.fields_of(value)
    title = f"{kind_name.upper()} ({layout.__name__})"
    return Decoded(title, value, _rows(layout, value, names), kind.pretty(value), layout.reserved_bits(value))


def register_by_name(name: str) -> Reg:
    key = name.upper().removeprefix("SMMU_")
    try:
        return Reg[key]
    except KeyError:
        raise DecodeError(
            f"unknown register {name!r}; expected one of: {', '.join(Reg.__members__)}"
        ) from None


def decode_register(name: str, texts: Sequence[str]) -> Decoded:
    reg = register_by_name(name)
    layout = REGISTER_LAYOUTS.get(reg)
    if layout is None:
        raise DecodeError(f"{reg.name} has no architected field layout to decode")
    words = parse_words(texts)
    if len(words) != 1:
        raise DecodeError(f"a register is one value, got {len(words)}")
    value = words[0]
    bits = 8 * REG_SIZE[reg]
    if value >> bits:
        raise DecodeError(f"{value:#x} does not fit in the {bits}-bit {reg.name}")
    title = f"{reg.name} @ {int(reg):#x} ({layout.__name__})"
    return Decoded(
        title, value, _rows(layout, value, None), layout.pretty(value), layout.reserved_bits(value)
    )
