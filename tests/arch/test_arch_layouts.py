"""Properties every layout must have: decode/encode, word and byte round trips, Field set/get."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkvm_smmu.arch import registers
from pkvm_smmu.arch._bitfield import Field, Layout
from pkvm_smmu.arch.commands import CMD_COMMON, COMMAND_LAYOUTS
from pkvm_smmu.arch.events import EVENT, PRI_RECORD
from pkvm_smmu.arch.strtab import CD, L1CD, L1STD, STE

REGISTER_LAYOUTS = sorted(
    {
        v
        for v in vars(registers).values()
        if isinstance(v, type) and issubclass(v, Layout) and v is not Layout
    },
    key=lambda c: c.__name__,
)
ALL_LAYOUTS = [
    *REGISTER_LAYOUTS,
    STE,
    CD,
    L1STD,
    L1CD,
    CMD_COMMON,
    *COMMAND_LAYOUTS.values(),
    EVENT,
    PRI_RECORD,
]
IDS = [c.__name__ for c in ALL_LAYOUTS]


def values_of(layout: type[Layout]) -> st.SearchStrategy[int]:
    return st.integers(min_value=0, max_value=(1 << layout.WIDTH) - 1)


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=IDS)
@given(data=st.data())
def test_encode_of_decode_keeps_exactly_the_defined_bits(layout: type[Layout], data: st.DataObject) -> None:
    value = data.draw(values_of(layout))
    assert layout.encode(**layout.decode(value)) == value & layout.DEFINED_MASK
    assert layout.reserved_bits(value) == value & ~layout.DEFINED_MASK


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=IDS)
@given(data=st.data())
def test_words_and_bytes_round_trip(layout: type[Layout], data: st.DataObject) -> None:
    value = data.draw(values_of(layout))
    words = layout.to_words(value)
    assert len(words) == layout.n_words()
    assert all(0 <= w < 1 << 64 for w in words)
    assert layout.from_words(words) == value
    raw = layout.to_bytes(value)
    assert len(raw) == layout.WIDTH // 8
    assert layout.from_bytes(raw) == value


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=IDS)
def test_field_names_are_unique_and_upper_case(layout: type[Layout]) -> None:
    names = [f.name for f in layout.FIELDS]
    assert len(names) == len(set(names))
    assert all(n == n.upper() for n in names)


def test_word_order_is_little_endian() -> None:
    # An STE with only bit 64 set lives in word 1, byte 8.
    value = 1 << 64
    assert STE.to_words(value) == (0, 1, 0, 0, 0, 0, 0, 0)
    assert STE.to_bytes(value)[8] == 1
    assert sum(STE.to_bytes(value)) == 1


@st.composite
def fields_and_values(draw: st.DrawFn) -> tuple[Field, int, int]:
    lo = draw(st.integers(0, 500))
    hi = draw(st.integers(lo, lo + 64))
    f = Field(hi, lo)
    return f, draw(st.integers(0, (1 << 600) - 1)), draw(st.integers(0, f.mask))


@given(fields_and_values())
def test_field_set_then_get(case: tuple[Field, int, int]) -> None:
    f, value, x = case
    updated = f.set(value, x)
    assert f.get(updated) == x
    # Only the field's own bits change.
    assert updated & ~f.in_place_mask == value & ~f.in_place_mask
    assert f.set(updated, f.get(value)) == value


@given(fields_and_values())
def test_field_rejects_values_that_do_not_fit(case: tuple[Field, int, int]) -> None:
    f, _, _ = case
    with pytest.raises(ValueError):
        f.insert(f.mask + 1)
    with pytest.raises(ValueError):
        f.insert(-1)


@given(st.integers(0, (1 << 44) - 1))
def test_address_field_round_trip(page: int) -> None:
    f = Field(55, 12, addr_lo=12)
    address = page << 12
    assert f.insert_address(address) == address  # [55:12] holds address bits [55:12] in place
    assert f.get_address(f.insert_address(address)) == address
    if address:
        with pytest.raises(ValueError):
            f.insert_address(address | 0x800)
