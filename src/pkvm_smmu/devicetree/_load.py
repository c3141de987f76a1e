"""Loading a tree from a source file (dtlib) or a blob (fdt), and writing a blob back (fdt).

Every failure becomes a ``DeviceTreeError`` naming the file; for syntax errors the line too, and
the path of the node being parsed (found by re-reading the source up to that line, since dtlib
reports only a position).
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import fdt
from devicetree import dtlib

from pkvm_smmu.devicetree._checks import check_tree
from pkvm_smmu.devicetree._errors import DeviceTreeError
from pkvm_smmu.devicetree._tree import DeviceTree, Node

DTB_MAGIC = 0xD00DFEED
_HEADER = struct.Struct(">10I")

_PARSE_ERROR = re.compile(
    r"^(?P<file>.+?):(?P<line>\d+) \(column (?P<column>\d+)\): parse error: (?P<msg>.*)$", re.S
)
_NODE_ERROR = re.compile(r"^(?P<path>/[^:\s]*): (?P<msg>.*)$", re.S)


def load_devicetree(
    path: str | os.PathLike[str], *, include_dirs: Iterable[str] = (), validate: bool = True
) -> DeviceTree:
    """Load a DTS (``/include/`` resolved relative to the including file, then ``include_dirs``)
    or a DTB (recognised by its magic), and check it unless ``validate`` is False."""
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except OSError as error:
        raise DeviceTreeError(f"cannot read: {error.strerror or error}", source=source) from None
    if data[:4] == DTB_MAGIC.to_bytes(4, "big"):
        tree = _from_dtb(data, source)
    else:
        tree = _from_dts(source, include_dirs, display=None)
    if validate:
        check_tree(tree)
    return tree


def load_devicetree_string(
    text: str, name: str = "<string>", *, include_dirs: Iterable[str] = (), validate: bool = True
) -> DeviceTree:
    """Load DTS text; ``name`` stands for the file in errors. ``/include/`` looks in
    ``include_dirs`` and then the current directory."""
    with tempfile.TemporaryDirectory(prefix="pkvm-smmu-dts-") as tmp:
        file = Path(tmp) / (Path(name).name.replace("<", "").replace(">", "") or "tree.dts")
        file.write_text(text, encoding="utf-8")
        tree = _from_dts(str(file), [*include_dirs, os.getcwd()], display=name)
    if validate:
        check_tree(tree)
    return tree


def load_devicetree_blob(data: bytes, name: str = "<blob>", *, validate: bool = True) -> DeviceTree:
    tree = _from_dtb(bytes(data), name)
    if validate:
        check_tree(tree)
    return tree


# -- DTS -------------------------------------------------------------------------------------------


def _from_dts(file: str, include_dirs: Iterable[str], display: str | None) -> DeviceTree:
    source = display if display is not None else file
    try:
        parsed = dtlib.DT(file, include_path=list(include_dirs))
    except dtlib.DTError as error:
        raise _dtlib_error(str(error), file, source) from None
    except (OSError, ValueError) as error:  # unreadable include, bytes that are not UTF-8
        raise DeviceTreeError(f"cannot parse: {error}", source=source) from None
    tree = DeviceTree(source)
    tree.memreserves = [(address, size) for _labels, address, size in parsed.memreserves]
    _copy_dtlib(parsed.root, tree.root)
    return tree


def _copy_dtlib(src: dtlib.Node, dst: Node) -> None:
    dst.labels = tuple(src.labels)
    for name, prop in src.props.items():
        dst._set(name, prop.value)
    for name, child in src.nodes.items():
        _copy_dtlib(child, dst._add_child(name))


def _dtlib_error(message: str, file: str, source: str) -> DeviceTreeError:
    parse = _PARSE_ERROR.match(message)
    if parse is not None:
        where = parse["file"]
        shown = source if where == file else where
        line, column = int(parse["line"]), int(parse["column"])
        path = _enclosing_node(where, line, column)
        text = parse["msg"].replace(file, source)
        return DeviceTreeError(f"syntax error: {text}", source=shown, path=path, line=line)
    node = _NODE_ERROR.match(message)
    if node is not None:
        return DeviceTreeError(node["msg"], source=source, path=node["path"])
    found = re.search(r" on (/\S*)", message)  # "Label 'a' appears on /x and on /y"
    return DeviceTreeError(message.replace(file, source), source=source, path=found[1] if found else None)


_LEXEMES = re.compile(
    r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\])*"|'  # comments and strings are skipped
    r"(?P<open>(?P<name>&\{[^}]*\}|&[\w,.+-]+|/|[\w,.+@#-]+)\s*\{)|(?P<close>\})",
    re.S,
)


def _enclosing_node(file: str, line: int, column: int) -> str | None:
    """The path of the node open at ``line``:``column`` of ``file``, by brace matching."""
    try:
        lines = Path(file).read_text(encoding="utf-8").split("\n")
    except (OSError, ValueError):
        return None
    if line <= len(lines):
        lines = [*lines[: line - 1], lines[line - 1][: max(column - 1, 0)]]
    text = "\n".join(lines)
    stack: list[str] = []
    for match in _LEXEMES.finditer(text):
        if match["open"]:
            stack.append(match["name"])
        elif match["close"] and stack:
            stack.pop()
    if not stack:
        return None
    head, rest = stack[0], [part for part in stack[1:] if part != "/"]
    if head == "/":
        return "/" + "/".join(rest)
    return "/".join([head, *rest])


# -- DTB -------------------------------------------------------------------------------------------


def _from_dtb(data: bytes, source: str) -> DeviceTree:
    if len(data) < _HEADER.size:
        raise DeviceTreeError(f"blob of {len(data)} bytes is shorter than a DTB header", source=source)
    magic, totalsize, _struct_off, _strings_off, rsvmap_off, version, *_ = _HEADER.unpack_from(data)
    if magic != DTB_MAGIC:
        raise DeviceTreeError(f"bad DTB magic {magic:#010x} (expected {DTB_MAGIC:#010x})", source=source)
    if totalsize > len(data):
        raise DeviceTreeError(f"header says {totalsize} bytes, the blob has {len(data)}", source=source)
    if version < 16:
        raise DeviceTreeError(f"DTB version {version} is older than 16 and not supported", source=source)
    try:
        parsed = fdt.parse_dtb(data)
        memreserves = _memreserves(data, rsvmap_off)
    except Exception as error:  # fdt reports corruption with bare Exception/struct/index errors
        raise DeviceTreeError(f"corrupt device tree blob: {error}", source=source) from None
    if parsed.root is None:
        raise DeviceTreeError("blob has no root node", source=source)
    tree = DeviceTree(source)
    tree.memreserves = memreserves
    _copy_fdt(parsed.root, tree.root)
    symbols = tree.root.child("__symbols__")
    if symbols is not None:  # labels survive compilation only with dtc -@
        for label, prop in symbols.props.items():
            target = tree.find(prop.raw.rstrip(b"\0").decode("utf-8", "replace"))
            if target is not None and label not in target.labels:
                target.labels = (*target.labels, label)
    return tree


def _memreserves(data: bytes, offset: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    while True:
        address, size = struct.unpack_from(">QQ", data, offset)
        if address == 0 and size == 0:
            return out
        out.append((address, size))
        offset += 16


def _fdt_raw(prop: fdt.Property) -> bytes:
    if isinstance(prop, fdt.PropStrings):
        return b"".join(s.encode("utf-8") + b"\0" for s in prop.data)
    if isinstance(prop, fdt.PropWords):
        return b"".join(int(w).to_bytes(4, "big") for w in prop.data)
    if isinstance(prop, fdt.PropBytes):
        return bytes(prop.data)
    return b""


def _copy_fdt(src: fdt.Node, dst: Node) -> None:
    for prop in src.props:
        dst._set(prop.name, _fdt_raw(prop))
    for child in src.nodes:
        _copy_fdt(child, dst._add_child(child.name))


def to_dtb(tree: DeviceTree) -> bytes:
    """The tree as a flattened blob (version 17), through ``fdt``."""
    blob = fdt.FDT(entries=[{"address": a, "size": s} for a, s in tree.memreserves])
    blob.root = _to_fdt(tree.root)
    return bytes(blob.to_dtb(version=17))


def _to_fdt(node: Node) -> fdt.Node:
    out = fdt.Node(node.name)
    for name, prop in node.props.items():
        out.append(fdt.new_property(name, prop.raw))
    for child in node.children:
        out.append(_to_fdt(child))
    return out
