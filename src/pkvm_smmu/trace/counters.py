"""Event counters, derived from the trace bus (the project keeps no statistics of its own)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from pkvm_smmu.trace.bus import TraceEvent

# snapshot() shape: {"counts": {component: {kind: n}},
#                    "by_field": {component: {kind: {field: {value: n}}}}}
Snapshot = dict[str, Any]


def kind_matches(kind: str, pattern: str) -> bool:
    """``"cmd"`` and ``"cmd."`` match ``cmd`` and every ``cmd.*``; ``"cmd.sync"`` matches itself and below."""
    family = pattern.rstrip(".")
    return kind == family or kind.startswith(family + ".")


class Counters:
    """A sink counting events per (component, kind), and per value of the fields named in ``by_fields``."""

    def __init__(self, by_fields: Iterable[str] = ()) -> None:
        self.by_fields = tuple(by_fields)
        self._counts: dict[tuple[str, str], int] = {}
        self._field_counts: dict[tuple[str, str, str], dict[Hashable, int]] = {}

    def __call__(self, event: TraceEvent) -> None:
        key = (event.component, event.kind)
        self._counts[key] = self._counts.get(key, 0) + 1
        for name in self.by_fields:
            if name in event.fields:
                per_value = self._field_counts.setdefault((event.component, event.kind, name), {})
                value = _hashable(event.fields[name])
                per_value[value] = per_value.get(value, 0) + 1

    def get(self, component: str, kind: str) -> int:
        return self._counts.get((component, kind), 0)

    def total(self, kind: str) -> int:
        """Events of ``kind`` or of its family (see ``kind_matches``), summed over components."""
        return sum(n for (_, k), n in self._counts.items() if kind_matches(k, kind))

    def by_field(self, component: str, kind: str, field: str) -> dict[Hashable, int]:
        if field not in self.by_fields:
            raise ValueError(f"field {field!r} is not counted; configured fields: {list(self.by_fields)}")
        return dict(self._field_counts.get((component, kind, field), {}))

    def clear(self) -> None:
        self._counts.clear()
        self._field_counts.clear()

    def snapshot(self) -> Snapshot:
        """A plain nested dict of every count, independent of later events."""
        counts: dict[str, dict[str, int]] = {}
        for (component, kind), n in sorted(self._counts.items()):
            counts.setdefault(component, {})[kind] = n
        by_field: dict[str, dict[str, dict[str, dict[Hashable, int]]]] = {}
        for (component, kind, name), per_value in sorted(self._field_counts.items()):
            by_field.setdefault(component, {}).setdefault(kind, {})[name] = dict(per_value)
        return {"counts": counts, "by_field": by_field}

    @staticmethod
    def diff(before: Snapshot, after: Snapshot) -> Snapshot:
        """What happened between two snapshots: ``after - before``, leaving out counts that did not change."""
        return {
            part: _diff_tree(before.get(part, {}), after.get(part, {})) for part in ("counts", "by_field")
        }


def _hashable(value: Any) -> Hashable:
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _diff_tree(before: Mapping[Any, Any], after: Mapping[Any, Any]) -> dict[Any, Any]:
    delta: dict[Any, Any] = {}
    # after's keys first, in their order, so the result is deterministic
    keys = [*after.keys(), *(key for key in before if key not in after)]
    for key in keys:
        old, new = before.get(key), after.get(key)
        if isinstance(old, Mapping) or isinstance(new, Mapping):
            if sub := _diff_tree(old or {}, new or {}):
                delta[key] = sub
        elif (change := (new or 0) - (old or 0)) != 0:
            delta[key] = change
    return delta
