"""Physical address ranges as runs, and the pages an owner may not touch.

Reachable memory is a ``Runs``: sorted ``(start, end, perms)`` byte ranges, so a gigabyte identity
map is a handful of runs. ``Forbidden`` is the sorted, disjoint set of ranges some actor may not
access, each with the owner to name; intersecting the two is a merge.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

READ = 1
WRITE = 2
READ_WRITE = READ | WRITE
ADDRESS_END = 1 << 64  # "every address"

Run = tuple[int, int, int]  # start, end, perms


def perms_text(perms: int) -> str:
    return {READ: "read", WRITE: "write", READ_WRITE: "read/write"}.get(perms, "none")


class Runs:
    """Sorted ``(start, end, perms)`` ranges; adjacent ranges with the same perms are merged.

    Hashed by identity on purpose: results derived from a Runs are cached per object."""

    __slots__ = ("items",)

    def __init__(self, items: tuple[Run, ...]) -> None:
        self.items = items

    @classmethod
    def of(cls, runs: Iterable[Run]) -> Runs:
        ordered = sorted(r for r in runs if r[1] > r[0] and r[2])
        merged: list[Run] = []
        for start, end, perms in ordered:
            if merged:
                last_start, last_end, last_perms = merged[-1]
                if last_perms == perms and start <= last_end:
                    if end > last_end:
                        merged[-1] = (last_start, end, perms)
                    continue
            merged.append((start, end, perms))
        return cls(tuple(merged))

    def __bool__(self) -> bool:
        return bool(self.items)

    def __repr__(self) -> str:
        inner = ", ".join(f"[{s:#x}, {e:#x}) {perms_text(p)}" for s, e, p in self.items[:4])
        more = f", ... {len(self.items) - 4} more" if len(self.items) > 4 else ""
        return f"Runs({inner}{more})"


EVERYTHING = Runs(((0, ADDRESS_END, READ_WRITE),))
NOTHING = Runs(())


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


class Forbidden:
    """Disjoint, sorted ``(start, end, owner)`` ranges an actor may not touch."""

    __slots__ = ("runs", "starts")

    def __init__(self, runs: Sequence[tuple[int, int, str]]) -> None:
        self.runs = tuple(runs)
        self.starts = [r[0] for r in self.runs]

    def __bool__(self) -> bool:
        return bool(self.runs)

    def minus(self, allowed: Sequence[tuple[int, int]]) -> Forbidden:
        """These ranges without ``allowed`` (merged, sorted)."""
        if not allowed or not self.runs:
            return self
        out: list[tuple[int, int, str]] = []
        allowed_starts = [a[0] for a in allowed]
        for start, end, owner in self.runs:
            cursor = start
            i = max(0, bisect.bisect_right(allowed_starts, start) - 1)
            while cursor < end and i < len(allowed):
                a_start, a_end = allowed[i]
                if a_end <= cursor:
                    i += 1
                    continue
                if a_start >= end:
                    break
                if a_start > cursor:
                    out.append((cursor, a_start, owner))
                cursor = max(cursor, a_end)
                i += 1
            if cursor < end:
                out.append((cursor, end, owner))
        return Forbidden(out)

    def overlapping(self, start: int, end: int) -> list[tuple[int, int, str]]:
        """The parts of ``[start, end)`` inside these ranges."""
        runs = self.runs
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        out = []
        while i < len(runs):
            f_start, f_end, owner = runs[i]
            if f_start >= end:
                break
            if f_end > start:
                out.append((max(start, f_start), min(end, f_end), owner))
            i += 1
        return out

    def intersect(self, runs: Runs) -> list[tuple[int, int, str, int]]:
        """``(start, end, owner, perms)`` for every part of ``runs`` inside these ranges, merged
        where adjacent with the same owner and perms."""
        if not self.runs:
            return []
        out: list[tuple[int, int, str, int]] = []
        for start, end, perms in runs.items:
            for part_start, part_end, owner in self.overlapping(start, end):
                if out:
                    last = out[-1]
                    if last[1] == part_start and last[2] == owner and last[3] == perms:
                        out[-1] = (last[0], part_end, owner, perms)
                        continue
                out.append((part_start, part_end, owner, perms))
        return out


__all__ = [
    "ADDRESS_END",
    "EVERYTHING",
    "NOTHING",
    "READ",
    "READ_WRITE",
    "WRITE",
    "Forbidden",
    "Run",
    "Runs",
    "merge_ranges",
    "perms_text",
]
