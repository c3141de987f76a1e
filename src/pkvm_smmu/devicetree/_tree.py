"""The typed device tree: nodes, properties and the address arithmetic of the DT specification.

A property keeps its raw big-endian bytes, as in a blob; the accessors decode it on demand and
raise ``DeviceTreeError`` naming the file, the node path and the property when the bytes do not
have the asked-for shape. Nothing here knows a particular binding beyond the core ones
(``#address-cells``, ``#size-cells``, ``reg``, ``ranges``, ``phandle``, ``status``, ``compatible``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from pkvm_smmu.devicetree._errors import DeviceTreeError

# Defaults of the DT specification (v0.4, 2.3.5) when a parent omits them.
DEFAULT_ADDRESS_CELLS = 2
DEFAULT_SIZE_CELLS = 1


@dataclass(frozen=True, slots=True)
class RegEntry:
    """One (address, size) pair of a ``reg`` property."""

    address: int
    size: int

    @property
    def end(self) -> int:
        return self.address + self.size


@dataclass(frozen=True, slots=True)
class RangeEntry:
    """One ``ranges`` triplet: ``child_address`` (``child_cells`` wide) maps to ``parent_address``."""

    child_address: int
    parent_address: int
    size: int
    child_cells: int


@dataclass(frozen=True, slots=True)
class PhandleArgs:
    """One entry of a phandle array: the target node and its specifier cells."""

    target: Node
    args: tuple[int, ...]


def _be_cells(data: bytes) -> tuple[int, ...]:
    return tuple(int.from_bytes(data[i : i + 4], "big") for i in range(0, len(data), 4))


def _join_cells(cells: tuple[int, ...]) -> int:
    value = 0
    for cell in cells:
        value = (value << 32) | cell
    return value


class Property:
    """A property's raw value with typed accessors."""

    __slots__ = ("name", "node", "raw")

    def __init__(self, node: Node, name: str, raw: bytes) -> None:
        self.node = node
        self.name = name
        self.raw = bytes(raw)

    def error(self, message: str) -> DeviceTreeError:
        return self.node.error(message, prop=self.name)

    def __repr__(self) -> str:
        return f"Property({self.node.path}:{self.name}, {self.raw.hex()})"

    @property
    def is_empty(self) -> bool:
        return not self.raw

    # -- numbers ---------------------------------------------------------------------------------
    def u32s(self) -> tuple[int, ...]:
        if len(self.raw) % 4:
            raise self.error(f"length {len(self.raw)} is not a whole number of 32-bit cells")
        return _be_cells(self.raw)

    def u32(self) -> int:
        if len(self.raw) != 4:
            raise self.error(f"expected one 32-bit cell, found {len(self.raw)} bytes")
        return int.from_bytes(self.raw, "big")

    def u64(self) -> int:
        if len(self.raw) != 8:
            raise self.error(f"expected a 64-bit value (2 cells), found {len(self.raw)} bytes")
        return int.from_bytes(self.raw, "big")

    def records(self, *widths: int) -> list[tuple[int, ...]]:
        """The cells cut into records of ``widths`` cells per field, each field joined big-endian
        (``records(2, 2)`` on a ``reg`` with 2+2 cells gives ``[(address, size), ...]``)."""
        cells = self.u32s()
        per_record = sum(widths)
        if per_record == 0:
            if cells:
                raise self.error("has cells, but the record width from the #cells properties is 0")
            return []
        if len(cells) % per_record:
            raise self.error(
                f"{len(cells)} cells is not a whole number of {per_record}-cell entries "
                f"({' + '.join(map(str, widths))})"
            )
        out: list[tuple[int, ...]] = []
        for start in range(0, len(cells), per_record):
            fields = []
            at = start
            for width in widths:
                fields.append(_join_cells(cells[at : at + width]))
                at += width
            out.append(tuple(fields))
        return out

    # -- strings ---------------------------------------------------------------------------------
    def strings(self) -> tuple[str, ...]:
        if not self.raw or self.raw[-1] != 0:
            raise self.error("is not a NUL-terminated string list")
        try:
            return tuple(self.raw[:-1].decode("utf-8").split("\0"))
        except UnicodeDecodeError:
            raise self.error("is not valid UTF-8 text") from None

    def string(self) -> str:
        values = self.strings()
        if len(values) != 1:
            raise self.error(f"expected one string, found {len(values)}")
        return values[0]

    # -- phandles --------------------------------------------------------------------------------
    def phandle(self) -> Node:
        """A property holding exactly one phandle (``interrupt-parent``, ``msi-parent`` of a bridge)."""
        return self.node.tree.resolve_phandle(self.u32(), self)

    def phandle_args(self, cells_name: str, *, default_cells: int | None = None) -> list[PhandleArgs]:
        """A phandle array whose specifier lengths come from each target's ``cells_name``
        (``iommus`` with ``#iommu-cells``). A target lacking it is an error unless
        ``default_cells`` is given."""
        cells = self.u32s()
        out: list[PhandleArgs] = []
        at = 0
        previous: str = ""
        while at < len(cells):
            # After a first entry, a bad phandle usually means the previous entry had the wrong
            # number of cells for its target: say so.
            hint = f" (is {cells_name} of {previous} right for the cells given?)" if previous else ""
            target = self.node.tree.by_phandle(cells[at])
            if target is None:
                raise self.error(f"phandle {cells[at]:#x} refers to no node (dangling phandle){hint}")
            count_prop = target.get(cells_name)
            if count_prop is None:
                if default_cells is None:
                    raise self.error(f"target {target.path} has no {cells_name}{hint}")
                count = default_cells
            else:
                count = count_prop.u32()
            at += 1
            if at + count > len(cells):
                raise self.error(
                    f"entry for {target.path} needs {count} cell(s) ({cells_name} = <{count}>), "
                    f"only {len(cells) - at} left"
                )
            out.append(PhandleArgs(target, tuple(cells[at : at + count])))
            at += count
            previous = target.path
        return out


class Node:
    """One node. ``name`` is the full node name (``smmu@2b400000``); ``path`` is unique."""

    def __init__(self, tree: DeviceTree, name: str, parent: Node | None) -> None:
        self.tree = tree
        self.name = name
        self.parent = parent
        self.path: str = "/" if parent is None else (parent.path.rstrip("/") + "/" + name)
        self.labels: tuple[str, ...] = ()
        self._props: dict[str, Property] = {}
        self._children: dict[str, Node] = {}

    def __repr__(self) -> str:
        return f"Node({self.path})"

    def error(self, message: str, prop: str | None = None) -> DeviceTreeError:
        return DeviceTreeError(message, source=self.tree.source, path=self.path, prop=prop)

    # -- construction (loaders only) ------------------------------------------------------------
    def _add_child(self, name: str) -> Node:
        child = Node(self.tree, name, self)
        self._children[name] = child
        return child

    def _set(self, name: str, raw: bytes) -> None:
        self._props[name] = Property(self, name, raw)

    # -- naming ----------------------------------------------------------------------------------
    @property
    def node_name(self) -> str:
        """The name without its unit address."""
        return self.name.partition("@")[0]

    @property
    def unit_address(self) -> str | None:
        _, at, unit = self.name.partition("@")
        return unit if at else None

    @property
    def phandle(self) -> int | None:
        prop = self._props.get("phandle") or self._props.get("linux,phandle")
        return prop.u32() if prop is not None else None

    # -- structure -------------------------------------------------------------------------------
    @property
    def children(self) -> tuple[Node, ...]:
        return tuple(self._children.values())

    def child(self, name: str) -> Node | None:
        return self._children.get(name)

    def walk(self) -> Iterator[Node]:
        """This node and its descendants, depth first, in source order."""
        yield self
        for child in self._children.values():
            yield from child.walk()

    def is_ancestor_of(self, other: Node) -> bool:
        node = other.parent
        while node is not None:
            if node is self:
                return True
            node = node.parent
        return False

    # -- properties ------------------------------------------------------------------------------
    @property
    def props(self) -> Mapping[str, Property]:
        return dict(self._props)

    def get(self, name: str) -> Property | None:
        return self._props.get(name)

    def has(self, name: str) -> bool:
        return name in self._props

    def prop(self, name: str) -> Property:
        """A property the binding requires; its absence is an error naming the node."""
        found = self._props.get(name)
        if found is None:
            raise self.error(f"missing required property '{name}'")
        return found

    def u32(self, name: str, default: int | None = None) -> int:
        found = self._props.get(name)
        if found is None:
            if default is None:
                raise self.error(f"missing required property '{name}'")
            return default
        return found.u32()

    @property
    def compatible(self) -> tuple[str, ...]:
        found = self._props.get("compatible")
        return found.strings() if found is not None else ()

    def is_compatible(self, *compatibles: str) -> bool:
        mine = self.compatible
        return any(c in mine for c in compatibles)

    @property
    def available(self) -> bool:
        """``status`` absent, ``"okay"`` or ``"ok"`` (Linux's of_device_is_available)."""
        found = self._props.get("status")
        return found is None or found.raw.rstrip(b"\0") in (b"okay", b"ok")

    @property
    def device_type(self) -> str | None:
        found = self._props.get("device_type")
        return found.string() if found is not None else None

    # -- addresses -------------------------------------------------------------------------------
    @property
    def address_cells(self) -> int:
        """``#address-cells`` this node gives its children."""
        return self.u32("#address-cells", DEFAULT_ADDRESS_CELLS)

    @property
    def size_cells(self) -> int:
        return self.u32("#size-cells", DEFAULT_SIZE_CELLS)

    def reg(self) -> tuple[RegEntry, ...]:
        """``reg`` decoded with the parent's cells, in the parent's address space (empty if absent)."""
        found = self._props.get("reg")
        if found is None:
            return ()
        if self.parent is None:
            raise found.error("the root node has no parent address space")
        ac, sc = self.parent.address_cells, self.parent.size_cells
        return tuple(RegEntry(a, s) for a, s in found.records(ac, sc))

    def ranges(self) -> tuple[RangeEntry, ...] | None:
        """``ranges`` decoded (child cells from this node, parent cells from the parent); None when
        absent (the children are not memory mapped), () for an empty ``ranges;`` (identity)."""
        found = self._props.get("ranges")
        if found is None:
            return None
        if found.is_empty:
            return ()
        pac = self.parent.address_cells if self.parent is not None else DEFAULT_ADDRESS_CELLS
        ac, sc = self.address_cells, self.size_cells
        return tuple(RangeEntry(c, p, s, ac) for c, p, s in found.records(ac, pac, sc))

    def translate(self, address: int) -> int | None:
        """A CPU physical address for ``address`` on this node's child bus, following ``ranges``
        up to the root; None when some bus on the way is not memory mapped."""
        node: Node = self
        while node.parent is not None:
            if node.device_type == "pci":
                return None  # children's reg are config-space addresses
            ranges = node.ranges()
            if ranges is None:
                return None
            if ranges:
                for entry in ranges:
                    if entry.child_address <= address < entry.child_address + entry.size:
                        address = entry.parent_address + (address - entry.child_address)
                        break
                else:
                    return None
            node = node.parent
        return address

    def translated_reg(self) -> tuple[RegEntry, ...] | None:
        """``reg`` in CPU physical addresses, or None when it cannot be translated."""
        if self.parent is None:
            return None
        out = []
        for entry in self.reg():
            cpu = self.parent.translate(entry.address)
            if cpu is None:
                return None
            out.append(RegEntry(cpu, entry.size))
        return tuple(out)

    def mmio(self) -> tuple[RegEntry, ...]:
        """``reg`` in CPU physical addresses; required, and an error when not translatable."""
        self.prop("reg")
        regions = self.translated_reg()
        if regions is None:
            raise self.error("cannot be translated to a CPU address (a parent lacks 'ranges')", "reg")
        return regions


class DeviceTree:
    """A loaded tree. ``source`` is the name errors use for the file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.root = Node(self, "/", None)
        self.memreserves: list[tuple[int, int]] = []  # /memreserve/ (address, size) pairs
        self._by_phandle: dict[int, Node] | None = None
        self._by_label: dict[str, Node] | None = None

    def __repr__(self) -> str:
        return f"DeviceTree({self.source})"

    def error(self, message: str, path: str | None = None, prop: str | None = None) -> DeviceTreeError:
        return DeviceTreeError(message, source=self.source, path=path, prop=prop)

    def nodes(self) -> Iterator[Node]:
        return self.root.walk()

    def find(self, path: str) -> Node | None:
        """A node by absolute path, by ``&label``, or by an alias from ``/aliases``."""
        if path.startswith("&"):
            return self.by_label(path[1:])
        if not path.startswith("/"):
            aliases = self.root.child("aliases")
            alias = aliases.get(path) if aliases is not None else None
            if alias is None:
                return None
            path = alias.string()
        node: Node | None = self.root
        for part in (p for p in path.split("/") if p):
            if node is None:
                return None
            found = node.child(part)
            if found is None:  # a name without unit address matches when unambiguous
                matches = [c for c in node.children if c.node_name == part]
                found = matches[0] if len(matches) == 1 else None
            node = found
        return node

    def node(self, path: str) -> Node:
        found = self.find(path)
        if found is None:
            raise self.error("no such node", path=path)
        return found

    def compatible_nodes(self, *compatibles: str, available_only: bool = True) -> list[Node]:
        return [
            n for n in self.nodes() if n.is_compatible(*compatibles) and (n.available or not available_only)
        ]

    # -- phandles and labels ---------------------------------------------------------------------
    def _index(self) -> None:
        by_phandle: dict[int, Node] = {}
        by_label: dict[str, Node] = {}
        for node in self.nodes():
            value = node.phandle
            if value is not None:
                if value in (0, 0xFFFF_FFFF):
                    raise node.error(f"invalid phandle value {value:#x}", "phandle")
                other = by_phandle.get(value)
                if other is not None:
                    raise node.error(f"phandle {value:#x} is also used by {other.path}", "phandle")
                by_phandle[value] = node
            for label in node.labels:
                by_label.setdefault(label, node)
        self._by_phandle, self._by_label = by_phandle, by_label

    def by_phandle(self, value: int) -> Node | None:
        if self._by_phandle is None:
            self._index()
        assert self._by_phandle is not None
        return self._by_phandle.get(value)

    def by_label(self, label: str) -> Node | None:
        if self._by_label is None:
            self._index()
        assert self._by_label is not None
        return self._by_label.get(label)

    def resolve_phandle(self, value: int, where: Property) -> Node:
        target = self.by_phandle(value)
        if target is None:
            raise where.error(f"phandle {value:#x} refers to no node (dangling phandle)")
        return target

    # -- comparison ------------------------------------------------------------------------------
    def canonical(self) -> dict[str, dict[str, bytes]]:
        """Every node path with its properties' raw values: two loads of the same tree compare equal."""
        return {node.path: {name: p.raw for name, p in node._props.items()} for node in self.nodes()}
