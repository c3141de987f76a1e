"""The one error a device tree can raise: it says where (file, line, node path, property) and what."""

from __future__ import annotations


class DeviceTreeError(Exception):
    """A malformed or inconsistent device tree (or a request the tree cannot satisfy).

    ``str()`` reads ``file[:line]: /node/path: property: message``; each part is also an attribute
    so that tools can point at the spot.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str,
        path: str | None = None,
        prop: str | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.path = path
        self.prop = prop
        self.line = line
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        parts = [where]
        if self.path is not None:
            parts.append(self.path)
        if self.prop is not None:
            parts.append(self.prop)
        parts.append(self.message)
        return ": ".join(parts)
