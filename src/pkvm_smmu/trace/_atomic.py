"""Text files that appear at their path complete or not at all (DESIGN.md rule 8)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref
from pathlib import Path
from typing import IO


def _discard(stream: IO[str], temp_path: str) -> None:
    stream.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp_path)


class AtomicTextFile:
    """Writes to a hidden temporary file next to ``path``; ``commit()`` renames it onto ``path``.

    Until then the target is untouched. If the object is dropped without ``commit()`` (an aborted run),
    the temporary file is removed; a killed process may leave one behind, never a partial target.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        fd, temp_path = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.temp_path = Path(temp_path)
        self._stream: IO[str] = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        self._finalizer = weakref.finalize(self, _discard, self._stream, temp_path)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def write(self, text: str) -> None:
        self._stream.write(text)

    def commit(self) -> None:
        if self.closed:
            return
        self._finalizer.detach()
        with self._stream:
            self._stream.flush()
            os.fsync(self._stream.fileno())
        os.replace(self.temp_path, self.path)

    def discard(self) -> None:
        self._finalizer()
