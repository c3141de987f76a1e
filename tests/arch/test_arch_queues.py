"""Queue index arithmetic on the wrap-bit encoding, including the one-entry queue."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkvm_smmu.arch.queues import (
    CMD_SIZE,
    EVENT_SIZE,
    PRI_SIZE,
    q_empty,
    q_full,
    q_inc,
    q_slot,
    q_space,
    q_used,
    q_wrap,
)


def test_entry_sizes() -> None:
    assert (CMD_SIZE, EVENT_SIZE, PRI_SIZE) == (16, 32, 16)


def test_one_entry_queue() -> None:
    # log2size 0: the index is only the wrap bit.
    assert q_slot(1, 0) == 0 and q_wrap(1, 0) == 1
    assert q_empty(0, 0, 0) and q_empty(1, 1, 0)
    assert q_full(1, 0, 0) and q_full(0, 1, 0)
    assert not q_full(0, 0, 0) and not q_empty(1, 0, 0)
    assert q_inc(0, 1, 0) == 1 and q_inc(1, 1, 0) == 0
    assert q_used(1, 0, 0) == 1 and q_space(1, 0, 0) == 0
    assert q_used(0, 1, 0) == 1  # prod wrapped back to 0 after cons reached 1
    assert q_space(0, 0, 0) == 1


def test_two_entry_queue() -> None:
    # log2size 1: slot is bit 0, wrap is bit 1.
    assert q_inc(1, 1, 1) == 0b10  # slot 0, wrap set
    assert q_inc(0b11, 1, 1) == 0  # slot 0, wrap cleared
    assert q_full(0b10, 0b00, 1) and q_full(0b01, 0b11, 1)
    assert not q_full(0b01, 0b00, 1)
    assert q_empty(0b11, 0b11, 1) and not q_empty(0b10, 0b00, 1)
    assert q_used(0b01, 0b11, 1) == 2  # cons at slot 1 wrap 1, prod at slot 1 wrap 0 wrapped past
    assert q_used(0b00, 0b11, 1) == 1


def test_256_entry_queue() -> None:
    assert q_slot(0x1FF, 8) == 0xFF and q_wrap(0x1FF, 8) == 1
    assert q_full(0x100, 0x000, 8)
    assert q_empty(0x1FF, 0x1FF, 8)
    assert q_inc(0xFF, 1, 8) == 0x100
    assert q_inc(0x1FF, 1, 8) == 0x000
    assert q_used(0x105, 0x0FF, 8) == 6
    assert q_space(0x105, 0x0FF, 8) == 250


def test_flags_above_the_index_are_ignored() -> None:
    ovflg = 1 << 31
    err = 1 << 24
    assert q_empty(5 | ovflg, 5, 8)
    assert q_full(0x100 | err, 0, 8)
    assert q_inc(0x1FF | ovflg, 1, 8) == 0


def test_q_inc_rejects_backwards() -> None:
    with pytest.raises(ValueError):
        q_inc(3, -1, 4)


@st.composite
def queue_moves(draw: st.DrawFn) -> tuple[int, int, int]:
    log2size = draw(st.integers(0, 19))
    cons = draw(st.integers(0, (2 << log2size) - 1))
    n = draw(st.integers(0, 1 << log2size))
    return log2size, cons, n


@given(queue_moves())
def test_produce_n_then_used_is_n(move: tuple[int, int, int]) -> None:
    log2size, cons, n = move
    prod = q_inc(cons, n, log2size)
    assert q_used(prod, cons, log2size) == n
    assert q_space(prod, cons, log2size) == (1 << log2size) - n
    assert q_empty(prod, cons, log2size) == (n == 0)
    assert q_full(prod, cons, log2size) == (n == 1 << log2size)
    assert prod < 2 << log2size


@given(queue_moves())
def test_a_full_lap_toggles_only_the_wrap_bit(move: tuple[int, int, int]) -> None:
    log2size, index, _ = move
    lapped = q_inc(index, 1 << log2size, log2size)
    assert q_slot(lapped, log2size) == q_slot(index, log2size)
    assert q_wrap(lapped, log2size) != q_wrap(index, log2size)
    assert q_inc(index, 2 << log2size, log2size) == index


@given(queue_moves(), st.integers(0, 1 << 19))
def test_increments_compose(move: tuple[int, int, int], m: int) -> None:
    log2size, index, n = move
    assert q_inc(q_inc(index, n, log2size), m, log2size) == q_inc(index, n + m, log2size)
