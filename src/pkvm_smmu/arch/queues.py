"""Queue index arithmetic on the PROD/CONS wrap-bit encoding (IHI 0070 §3.5, §6.3.27/28, §7.4).

With LOG2SIZE = QS, an index is QS+1 bits: bits [QS-1:0] select the slot and bit [QS] is the wrap
flag; higher bits (ERR, OVFLG, ...) are ignored here. QS = 0 is a one-entry queue whose index is only
the wrap bit. Entry sizes are in bytes.
"""

from __future__ import annotations

CMD_SIZE = 16
EVENT_SIZE = 32
PRI_SIZE = 16


def _index(index: int, log2size: int) -> int:
    return index & ((2 << log2size) - 1)


def q_slot(index: int, log2size: int) -> int:
    """The entry an index points at."""
    return index & ((1 << log2size) - 1)


def q_wrap(index: int, log2size: int) -> int:
    return (index >> log2size) & 1


def q_empty(prod: int, cons: int, log2size: int) -> bool:
    """Same slot, same wrap."""
    return _index(prod, log2size) == _index(cons, log2size)


def q_full(prod: int, cons: int, log2size: int) -> bool:
    """Same slot, wrap bits differ."""
    return _index(prod ^ cons, log2size) == 1 << log2size


def q_inc(index: int, n: int, log2size: int) -> int:
    """``index`` advanced by ``n`` entries, toggling the wrap bit on each pass of the end.

    Only the index bits are returned; callers keep any flags above them themselves.
    """
    if n < 0:
        raise ValueError("queue indexes only move forward")
    return _index(index + n, log2size)


def q_used(prod: int, cons: int, log2size: int) -> int:
    """Entries between CONS and PROD (0 .. 2^log2size)."""
    return _index(prod - cons, log2size)


def q_space(prod: int, cons: int, log2size: int) -> int:
    """Free entries a producer may still write."""
    return (1 << log2size) - q_used(prod, cons, log2size)
