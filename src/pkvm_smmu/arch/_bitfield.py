"""Bit fields in the specification's ``[hi:lo]`` numbering, and layouts built from them.

A register, descriptor, STE, CD, command or event record is one Python int; a ``Layout``
subclass names its fields once and knows how to decode, encode and print such an int.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from typing import Any, ClassVar


class Field:
    """Bits ``[hi:lo]`` of a value, as the specification writes them."""

    __slots__ = ("addr_lo", "enum", "hi", "lo", "mask", "name", "width")

    def __init__(
        self,
        hi: int,
        lo: int | None = None,
        enum: type[IntEnum] | None = None,
        *,
        addr_lo: int | None = None,
    ) -> None:
        lo = hi if lo is None else lo
        if hi < lo or lo < 0:
            raise ValueError(f"bad field bounds [{hi}:{lo}]")
        self.hi = hi
        self.lo = lo
        self.width = hi - lo + 1
        self.mask = (1 << self.width) - 1
        self.enum = enum
        # For address fields: the field holds address bits [addr_lo + width - 1 : addr_lo].
        self.addr_lo = addr_lo
        self.name = f"[{hi}:{lo}]"

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @property
    def in_place_mask(self) -> int:
        """The field's bits at their position in the containing value."""
        return self.mask << self.lo

    def get(self, value: int) -> int:
        return (value >> self.lo) & self.mask

    def insert(self, field_value: int) -> int:
        """``field_value`` shifted into place; rejects values that do not fit."""
        field_value = int(field_value)
        if field_value < 0 or field_value > self.mask:
            raise ValueError(f"{self.name}={field_value:#x} does not fit in {self.width} bits")
        return field_value << self.lo

    def set(self, value: int, field_value: int) -> int:
        return (value & ~(self.mask << self.lo)) | self.insert(field_value)

    def get_address(self, value: int) -> int:
        """The address an address field holds (its bits put back at ``addr_lo``)."""
        return ((value >> self.lo) & self.mask) << (self.addr_lo or 0)

    def insert_address(self, address: int) -> int:
        """An address placed in the field; bits below ``addr_lo`` must be zero."""
        shift = self.addr_lo or 0
        if address & ((1 << shift) - 1):
            raise ValueError(f"{self.name}: address {address:#x} is not aligned to {1 << shift:#x}")
        return self.insert(address >> shift)

    def set_address(self, value: int, address: int) -> int:
        return (value & ~(self.mask << self.lo)) | self.insert_address(address)

    def display(self, field_value: int) -> str:
        if self.enum is not None:
            try:
                return self.enum(field_value).name
            except ValueError:
                pass
        if self.width == 1:
            return str(field_value)
        if self.addr_lo is not None:
            return hex(field_value << self.addr_lo)
        return hex(field_value) if field_value > 9 else str(field_value)

    def __repr__(self) -> str:
        return f"Field({self.name}[{self.hi}:{self.lo}])"


class Layout:
    """A named set of fields of a ``WIDTH``-bit value.

    Subclasses declare ``Field`` class attributes; ``FIELDS`` is collected in declaration order.
    Overlapping fields are a definition error unless ``ALLOW_OVERLAP`` is set (aliases).
    """

    WIDTH: ClassVar[int] = 64
    ALLOW_OVERLAP: ClassVar[bool] = False
    FIELDS: ClassVar[tuple[Field, ...]] = ()
    DEFINED_MASK: ClassVar[int] = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        inherited = [f for f in cls.FIELDS if f.name not in cls.__dict__]
        own = [v for v in cls.__dict__.values() if isinstance(v, Field)]
        fields = inherited + own
        used = 0
        for field in fields:
            if field.hi >= cls.WIDTH:
                raise TypeError(
                    f"{cls.__name__}.{field.name} [{field.hi}:{field.lo}] exceeds {cls.WIDTH} bits"
                )
            bits = field.in_place_mask
            if used & bits and not cls.ALLOW_OVERLAP:
                raise TypeError(f"{cls.__name__}.{field.name} overlaps another field")
            used |= bits
        cls.FIELDS = tuple(fields)
        cls.DEFINED_MASK = used

    @classmethod
    def field(cls, name: str) -> Field:
        for f in cls.FIELDS:
            if f.name == name:
                return f
        raise KeyError(f"{cls.__name__} has no field {name}")

    @classmethod
    def encode(cls, **values: int) -> int:
        """Build a value from field names; unnamed fields are zero."""
        out = 0
        for name, field_value in values.items():
            out = cls.field(name).set(out, field_value)
        return out

    @classmethod
    def decode(cls, value: int) -> dict[str, int]:
        """Every field's value; enum fields give their member when the value is defined."""
        out: dict[str, int] = {}
        for f in cls.FIELDS:
            raw = f.get(value)
            if f.enum is not None:
                try:
                    out[f.name] = f.enum(raw)
                    continue
                except ValueError:
                    pass
            out[f.name] = raw
        return out

    @classmethod
    def pretty(cls, value: int, *, all_fields: bool = False) -> str:
        """One line, ``NAME=value`` for each non-zero field (every field with ``all_fields``)."""
        parts = []
        for f in cls.FIELDS:
            raw = f.get(value)
            if raw or all_fields:
                parts.append(f"{f.name}={f.display(raw)}")
        undefined = value & ~cls.DEFINED_MASK & ((1 << cls.WIDTH) - 1)
        if undefined:
            parts.append(f"RES0!={undefined:#x}")
        return f"{cls.__name__}(" + " ".join(parts) + ")"

    @classmethod
    def reserved_bits(cls, value: int) -> int:
        """Bits set in ``value`` that no field of this layout defines."""
        return value & ~cls.DEFINED_MASK & ((1 << cls.WIDTH) - 1)

    @classmethod
    def n_words(cls) -> int:
        return (cls.WIDTH + 63) // 64

    @classmethod
    def to_words(cls, value: int) -> tuple[int, ...]:
        """Little-endian 64-bit words, word 0 holding bits [63:0]."""
        return tuple((value >> (64 * i)) & 0xFFFF_FFFF_FFFF_FFFF for i in range(cls.n_words()))

    @classmethod
    def from_words(cls, words: Iterable[int]) -> int:
        out = 0
        for i, word in enumerate(words):
            out |= (int(word) & 0xFFFF_FFFF_FFFF_FFFF) << (64 * i)
        return out

    @classmethod
    def to_bytes(cls, value: int) -> bytes:
        return value.to_bytes(cls.WIDTH // 8, "little")

    @classmethod
    def from_bytes(cls, data: bytes) -> int:
        return int.from_bytes(data, "little")
