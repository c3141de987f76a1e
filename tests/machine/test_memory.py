"""Ram: little-endian accesses, page crossings, sparse backing, zeroing, and a model-based property."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkvm_smmu.machine.memory import PAGE_SIZE, Ram

BASE = 0x8000_0000


@pytest.mark.parametrize(
    ("size", "value", "expected_bytes"),
    [
        (1, 0xA5, b"\xa5"),
        (2, 0x1234, b"\x34\x12"),
        (4, 0x1122_3344, b"\x44\x33\x22\x11"),
        (8, 0x0102_0304_0506_0708, b"\x08\x07\x06\x05\x04\x03\x02\x01"),
    ],
)
def test_int_accesses_are_little_endian(size: int, value: int, expected_bytes: bytes) -> None:
    ram = Ram()
    ram.write_int(BASE + 0x10, size, value)
    assert ram.read(BASE + 0x10, size) == expected_bytes
    assert ram.read_int(BASE + 0x10, size) == value


def test_narrow_reads_see_the_low_bytes_first() -> None:
    ram = Ram()
    ram.write_int(BASE, 8, 0xDEAD_BEEF_CAFE_F00D)
    assert ram.read_int(BASE, 4) == 0xCAFE_F00D
    assert ram.read_int(BASE + 4, 4) == 0xDEAD_BEEF
    assert ram.read_int(BASE + 6, 2) == 0xDEAD


def test_write_int_keeps_only_the_access_size_and_leaves_neighbours_alone() -> None:
    ram = Ram()
    ram.write(BASE, b"\x11" * 8)
    ram.write_int(BASE + 2, 2, 0x1_ABCD)
    ram.write_int(BASE + 4, 1, -1)  # two's complement, truncated to one byte
    assert ram.read(BASE, 8) == b"\x11\x11\xcd\xab\xff\x11\x11\x11"


@pytest.mark.parametrize(("size", "before_end"), [(size, n) for size in (2, 4, 8) for n in range(1, size)])
def test_int_access_crossing_a_page_boundary(size: int, before_end: int) -> None:
    ram = Ram()
    addr = BASE + PAGE_SIZE - before_end
    value = int.from_bytes(bytes(range(0x81, 0x81 + size)), "little")
    ram.write_int(addr, size, value)
    assert ram.read_int(addr, size) == value
    assert ram.read(BASE + PAGE_SIZE, size - before_end) == bytes(range(0x81 + before_end, 0x81 + size))
    assert ram.pages_backed == 2


def test_bulk_write_and_read_span_several_pages() -> None:
    ram = Ram()
    data = bytes(i & 0xFF for i in range(3 * PAGE_SIZE))
    ram.write(BASE + 100, data)
    assert ram.read(BASE + 100, len(data)) == data
    assert ram.pages_backed == 4
    assert ram.read(BASE, 100) == bytes(100)


def test_untouched_memory_reads_zero_and_costs_nothing() -> None:
    ram = Ram()
    assert ram.read_int(BASE, 8) == 0
    assert ram.read_int(BASE + PAGE_SIZE - 2, 4) == 0
    assert ram.read(BASE, 5 * PAGE_SIZE) == bytes(5 * PAGE_SIZE)
    assert ram.page_if_backed(BASE >> 12) is None
    ram.write(BASE, b"")
    assert ram.pages_backed == 0


def test_page_materialises_storage_that_reads_see() -> None:
    ram = Ram()
    ram.page(BASE >> 12)[8:10] = b"\x01\x02"
    assert ram.pages_backed == 1
    assert ram.read_int(BASE + 8, 2) == 0x0201
    assert ram.page_if_backed(BASE >> 12) is ram.page(BASE >> 12)


def test_zero_releases_whole_pages_and_clears_partial_ones() -> None:
    ram = Ram()
    ram.write(BASE, b"\xff" * (3 * PAGE_SIZE))
    ram.zero(BASE + 16, 2 * PAGE_SIZE)  # tail of page 0, all of page 1, head of page 2
    assert ram.pages_backed == 2
    assert ram.page_if_backed((BASE >> 12) + 1) is None
    assert ram.read(BASE, 16) == b"\xff" * 16
    assert ram.read(BASE + 16, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE)
    assert ram.read(BASE + 2 * PAGE_SIZE + 16, PAGE_SIZE - 16) == b"\xff" * (PAGE_SIZE - 16)


def test_zero_of_untouched_memory_backs_nothing() -> None:
    ram = Ram()
    ram.zero(BASE + 5, 3 * PAGE_SIZE)
    assert ram.pages_backed == 0


# -- model-based property ----------------------------------------------------------------------------

WINDOW_BASE = BASE - PAGE_SIZE  # the window crosses two page boundaries
WINDOW = 3 * PAGE_SIZE
offsets = st.integers(0, WINDOW - 8)
operations = st.one_of(
    st.tuples(st.just("write_int"), offsets, st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("write"), offsets, st.binary(max_size=PAGE_SIZE + 16)),
    st.tuples(st.just("zero"), offsets, st.integers(0, 2 * PAGE_SIZE)),
    st.tuples(st.just("read_int"), offsets, st.sampled_from([1, 2, 4, 8])),
    st.tuples(st.just("read"), offsets, st.integers(0, PAGE_SIZE + 16)),
)


@given(st.lists(operations, max_size=30))
def test_ram_behaves_like_a_flat_bytearray(ops: list[tuple[Any, ...]]) -> None:
    ram, model = Ram(), bytearray(WINDOW)
    for op, offset, *args in ops:
        addr = WINDOW_BASE + offset
        if op == "write_int":
            size, value = args
            ram.write_int(addr, size, value)
            model[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        elif op == "write":
            (data,) = args
            data = data[: WINDOW - offset]
            ram.write(addr, data)
            model[offset : offset + len(data)] = data
        elif op == "zero":
            length = min(args[0], WINDOW - offset)
            ram.zero(addr, length)
            model[offset : offset + length] = bytes(length)
        elif op == "read_int":
            (size,) = args
            assert ram.read_int(addr, size) == int.from_bytes(model[offset : offset + size], "little")
        else:
            length = min(args[0], WINDOW - offset)
            assert ram.read(addr, length) == bytes(model[offset : offset + length])
    assert ram.read(WINDOW_BASE, WINDOW) == bytes(model)
    assert ram.pages_backed <= 3
