"""Initcall levels in ``include/linux/init.h`` order, and the table the kernel runs at boot.

Each level is followed by its ``_sync`` level, as the linker script lays out ``.initcallN.init`` then
``.initcallNs.init``; ``rootfs`` sits between ``fs_sync`` and ``device``. Linux defines no macro for
``pure_sync`` or ``rootfs_sync``; the levels exist here so the table has no holes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

Initcall = Callable[[], int]


class InitcallLevel(IntEnum):
    PURE = 0
    PURE_SYNC = 1
    CORE = 2
    CORE_SYNC = 3
    POSTCORE = 4
    POSTCORE_SYNC = 5
    ARCH = 6
    ARCH_SYNC = 7
    SUBSYS = 8
    SUBSYS_SYNC = 9
    FS = 10
    FS_SYNC = 11
    ROOTFS = 12
    ROOTFS_SYNC = 13
    DEVICE = 14
    DEVICE_SYNC = 15
    LATE = 16
    LATE_SYNC = 17

    @property
    def linux_name(self) -> str:
        """The registering macro: ``device_initcall_sync``, ``late_initcall``..."""
        base, _, sync = self.name.lower().partition("_")
        return f"{base}_initcall_sync" if sync else f"{base}_initcall"

    @classmethod
    def parse(cls, level: InitcallLevel | str) -> InitcallLevel:
        """Accepts the enum, ``"device_sync"``, ``"device_initcall_sync"`` or ``"module_init"``."""
        if isinstance(level, InitcallLevel):
            return level
        text = level.strip().lower()
        if text == "module_init":
            return cls.DEVICE
        text = text.replace("_initcall", "")
        try:
            return cls[text.upper()]
        except KeyError:
            names = ", ".join(member.linux_name for member in cls)
            raise ValueError(f"unknown initcall level {level!r}; expected one of: {names}") from None


@dataclass(frozen=True)
class InitcallEntry:
    level: InitcallLevel
    fn: Initcall
    name: str


class InitcallTable:
    """Initcalls by level, each level in registration order (Linux: link order).

    Levels run once, in order. Registering into a level that has already run is a bug in the model's
    setup (Linux initcalls are static sections), so it raises.
    """

    def __init__(self) -> None:
        self._levels: dict[InitcallLevel, list[InitcallEntry]] = {level: [] for level in InitcallLevel}
        self.next_level = InitcallLevel.PURE  # the first level that has not started
        self.current: InitcallLevel | None = None  # the level running now
        self.done = False

    def register(self, level: InitcallLevel | str, fn: Initcall, name: str | None = None) -> InitcallEntry:
        lvl = InitcallLevel.parse(level)
        if self.done or (lvl < self.next_level and lvl != self.current):
            raise ValueError(f"{lvl.linux_name} has already run; cannot register {name or fn!r}")
        label: str = name if name else str(getattr(fn, "__qualname__", repr(fn)))
        entry = InitcallEntry(lvl, fn, label)
        self._levels[lvl].append(entry)
        return entry

    def entries(self, level: InitcallLevel | str) -> tuple[InitcallEntry, ...]:
        return tuple(self._levels[InitcallLevel.parse(level)])

    def run(self, call: Callable[[InitcallEntry], None], until: InitcallLevel | None = None) -> None:
        """Run every level from ``next_level`` through ``until`` (default: all), calling ``call``
        for each initcall. An initcall may register more initcalls at its own or a later level."""
        last = InitcallLevel.LATE_SYNC if until is None else until
        while not self.done and self.next_level <= last:
            level = self.next_level
            self.current = level
            calls = self._levels[level]
            index = 0
            while index < len(calls):  # re-read the length: the list may grow while it runs
                call(calls[index])
                index += 1
            self.current = None
            if level == InitcallLevel.LATE_SYNC:
                self.done = True
            else:
                self.next_level = InitcallLevel(level + 1)
