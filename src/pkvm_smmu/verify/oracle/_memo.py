"""A memo of values derived from memory that knows what each value depends on.

Each value remembers the physical pages it read directly and the memo values it used. A write to
a page drops every value that read it and, transitively, every value that used those; the next
``get`` recomputes only what was dropped. Group values (one per SMMU and source) also carry a
signature of the non-memory state they were computed from (register values, cache generations):
a different signature drops them too.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

_NO_SIGNATURE = object()


class _Entry:
    __slots__ = ("args", "children", "compute", "key", "pages", "parents", "signature", "value")

    def __init__(self, key: Hashable, signature: object) -> None:
        self.key = key
        self.signature = signature
        self.compute: Callable[..., Any] | None = None  # kept for an early cut-off
        self.args: tuple[Any, ...] = ()
        self.value: Any = None
        self.pages: set[int] = set()
        self.parents: set[Hashable] = set()
        self.children: set[Hashable] = set()


class DependencyMemo:
    def __init__(self) -> None:
        self._entries: dict[Hashable, _Entry] = {}
        self._by_page: dict[int, set[Hashable]] = {}
        self._computing: list[_Entry] = []
        self._live_after_sweep = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self,
        key: Hashable,
        compute: Callable[..., T],
        *args: Any,
        signature: object = _NO_SIGNATURE,
        cutoff: bool = False,
    ) -> T:
        """The value for ``key``: remembered, or ``compute(*args)`` (recording what it reads).

        ``cutoff``: when something this value depends on changes, recompute it at once and keep
        the values that used it if it comes out equal (for small values many others depend on).
        """
        entry = self._entries.get(key)
        if entry is not None and entry.signature is not signature and entry.signature != signature:
            self._drop(key)
            entry = None
        if entry is None:
            entry = self._compute(key, signature, compute, args)
            if cutoff:
                entry.compute, entry.args = compute, args
        if self._computing:
            parent = self._computing[-1]
            entry.parents.add(parent.key)
            parent.children.add(key)
        return entry.value

    def _compute(
        self, key: Hashable, signature: object, compute: Callable[..., Any], args: tuple[Any, ...]
    ) -> _Entry:
        entry = _Entry(key, signature)
        self._computing.append(entry)
        try:
            entry.value = compute(*args)
        finally:
            self._computing.pop()
        self._entries[key] = entry
        by_page = self._by_page
        for page in entry.pages:
            keys = by_page.get(page)
            if keys is None:
                by_page[page] = {key}
            else:
                keys.add(key)
        return entry

    def note_pages(self, first: int, last: int) -> None:
        """The value being computed read pages ``first..last`` (inclusive)."""
        if self._computing:
            pages = self._computing[-1].pages
            if first == last:
                pages.add(first)
            else:
                pages.update(range(first, last + 1))

    @property
    def watched(self) -> dict[int, set[Hashable]]:
        """Live view of the pages some value depends on (page -> keys); do not modify."""
        return self._by_page

    def invalidate(self, pages: Iterable[int]) -> int:
        """Drop every value that depends on one of ``pages``; how many values were dropped."""
        before = len(self._entries)
        by_page = self._by_page
        for page in pages:
            keys = by_page.get(page)
            if keys:
                for key in list(keys):
                    self._drop(key)
        return before - len(self._entries)

    def _drop(self, key: Hashable) -> None:
        todo = [key]
        entries = self._entries
        by_page = self._by_page
        while todo:
            entry = entries.pop(todo.pop(), None)
            if entry is None:
                continue
            for page in entry.pages:
                keys = by_page.get(page)
                if keys is not None:
                    keys.discard(entry.key)
                    if not keys:
                        del by_page[page]
            if entry.compute is not None and not self._computing:
                fresh = self._compute(entry.key, entry.signature, entry.compute, entry.args)
                fresh.compute, fresh.args = entry.compute, entry.args
                if fresh.value == entry.value:
                    fresh.value = entry.value  # the same object: nothing that used it changes
                    fresh.parents = entry.parents
                    continue
            todo.extend(entry.parents)

    def sweep(self, roots: Iterable[Hashable]) -> None:
        """Forget values no root uses any more (content that changed leaves old keys behind);
        cheap to call often: it only works when the memo has doubled since the last sweep."""
        if len(self._entries) <= 2 * self._live_after_sweep + 4096:
            return
        entries = self._entries
        live: set[Hashable] = set()
        todo = [key for key in roots if key in entries]
        while todo:
            key = todo.pop()
            if key in live:
                continue
            live.add(key)
            entry = entries.get(key)
            if entry is not None:
                todo.extend(child for child in entry.children if child in entries)
        for key in [key for key in entries if key not in live]:
            entry = entries.pop(key)
            for page in entry.pages:
                keys = self._by_page.get(page)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._by_page[page]
        self._live_after_sweep = len(entries)


__all__ = ["DependencyMemo"]
