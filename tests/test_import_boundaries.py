"""DESIGN.md's trust boundaries, checked as import rules on the source (parsed with ``ast``, not imported)."""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = "pkvm_smmu"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# Modules of pkvm_smmu.hyp / pkvm_smmu.machine that host/ may import, each with the reason it is an
# interface rather than an internal. Empty: nothing has earned an exception yet.
HOST_INTERFACE_ALLOWLIST: dict[str, str] = {}

# Only the command line talks to the terminal.
OUTPUT_MODULES = frozenset({f"{PACKAGE}.cli"})


@dataclass(frozen=True)
class Rule:
    """Imports of package modules from ``layer``: none may fall under ``forbidden``, and when
    ``allowed_only`` is set, every one must fall under it (the layer itself is always allowed)."""

    layer: str
    why: str
    forbidden: tuple[str, ...] = ()
    allowed_only: tuple[str, ...] | None = None
    exceptions: Mapping[str, str] = field(default_factory=dict)

    def applies_to(self, module: str) -> bool:
        return is_under(module, self.layer)

    def breaks(self, target: str) -> bool:
        if not is_under(target, PACKAGE) or is_under(target, self.layer):
            return False
        if any(is_under(target, allowed) for allowed in self.exceptions):
            return False
        if any(is_under(target, banned) for banned in self.forbidden):
            return True
        return self.allowed_only is not None and not any(is_under(target, ok) for ok in self.allowed_only)


def package_rules(host_exceptions: Mapping[str, str] = HOST_INTERFACE_ALLOWLIST) -> list[Rule]:
    p = PACKAGE
    return [
        Rule(f"{p}.arch", "arch/ holds encodings only and imports nothing else", allowed_only=()),
        Rule(
            f"{p}.host",
            "the untrusted host reaches hardware only through the EL1 access path",
            forbidden=(f"{p}.hyp", f"{p}.machine"),
            exceptions=host_exceptions,
        ),
        Rule(
            f"{p}.machine",
            "hardware knows nothing of the software above it",
            forbidden=(f"{p}.hyp", f"{p}.host", f"{p}.guest", f"{p}.verify"),
        ),
        Rule(
            f"{p}.pgtable",
            "the page-table library needs encodings and memory, nothing more",
            allowed_only=(f"{p}.arch", f"{p}.machine.memory", f"{p}.machine.bus"),
        ),
        Rule(f"{p}.trace", "every layer imports trace, so trace imports none of them", allowed_only=()),
        Rule(
            f"{p}.smmu_lib",
            "code both the host and the hyp run holds no state of either: encodings only",
            allowed_only=(f"{p}.arch",),
        ),
    ]


def is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@dataclass(frozen=True)
class Import:
    """An imported name, absolute; for ``from m import n`` it is ``m.n`` (n may be a submodule)."""

    target: str
    line: int


BEYOND_PACKAGE = "<beyond the top package>"


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str | None:
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(package):
        return None
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _dynamic_import_target(call: ast.Call) -> str | None:
    function = call.func
    name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
    if name in ("import_module", "__import__") and call.args:
        first = call.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


def imports_of(tree: ast.AST, module: str, is_package: bool) -> Iterator[Import]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                resolved = _resolve_relative(module, is_package, node.level, node.module)
                base = resolved if resolved is not None else BEYOND_PACKAGE
            for alias in node.names:
                yield Import(base if alias.name == "*" else f"{base}.{alias.name}", node.lineno)
        elif isinstance(node, ast.Call) and (target := _dynamic_import_target(node)):
            yield Import(target, node.lineno)


def print_calls(tree: ast.AST) -> Iterator[int]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            function = node.func
            if (isinstance(function, ast.Name) and function.id == "print") or (
                isinstance(function, ast.Attribute)
                and function.attr == "print"
                and isinstance(function.value, ast.Name)
                and function.value.id == "builtins"
            ):
                yield node.lineno


def check_source(
    source: str, module: str, filename: str, is_package: bool = False, rules: list[Rule] | None = None
) -> list[str]:
    """Every boundary violation in one module, as ``file:line: message``."""
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as error:
        return [f"{filename}:{error.lineno}: cannot parse: {error.msg}"]
    active = [rule for rule in (rules if rules is not None else package_rules()) if rule.applies_to(module)]
    found: list[tuple[int, str]] = []
    for imported in imports_of(tree, module, is_package):
        line, target = imported.line, imported.target
        if is_under(target, BEYOND_PACKAGE):
            found.append((line, f"relative import climbs above {PACKAGE}"))
        found += [(line, f"imports {target} ({rule.why})") for rule in active if rule.breaks(target)]
        if is_under(target, "rich") and module not in OUTPUT_MODULES:
            found.append((line, f"imports {target} (only cli.py uses rich)"))
    if module not in OUTPUT_MODULES:
        found += [(line, "calls print (only cli.py prints)") for line in print_calls(tree)]
    return [f"{filename}:{line}: {message}" for line, message in sorted(found)]


def module_name(path: Path) -> tuple[str, bool]:
    relative = path.relative_to(SRC.parent).with_suffix("")
    parts = relative.parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def package_sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


# -- the rules, applied to the package ---------------------------------------------------------------


def test_package_respects_trust_boundaries() -> None:
    sources = package_sources()
    assert SRC / "cli.py" in sources and SRC / "machine" / "bus.py" in sources  # the walk found the package
    violations: list[str] = []
    for path in sources:
        module, is_package = module_name(path)
        shown = str(path.relative_to(SRC.parents[1]))
        violations += check_source(path.read_text(encoding="utf-8"), module, shown, is_package)
    assert not violations, "trust-boundary violations:\n" + "\n".join(violations)


def test_allowlist_names_real_modules_with_reasons() -> None:
    for module, reason in HOST_INTERFACE_ALLOWLIST.items():
        assert is_under(module, f"{PACKAGE}.hyp") or is_under(module, f"{PACKAGE}.machine"), module
        assert reason.strip(), f"{module} needs a reason"
        relative = Path(*module.split(".")[1:])
        assert (SRC / relative).with_suffix(".py").exists() or (SRC / relative / "__init__.py").exists()


# -- the checker can fail -----------------------------------------------------------------------------


def lines_flagged(
    source: str, module: str, is_package: bool = False, rules: list[Rule] | None = None
) -> list[int]:
    violations = check_source(source, module, "synthetic.py", is_package, rules)
    return [int(violation.split(":")[1]) for violation in violations]


BAD_ARCH = """\
from __future__ import annotations
from enum import IntEnum
from pkvm_smmu.arch._bitfield import Field
from . import registers
from pkvm_smmu.machine.bus import Region
from ..trace import TraceBus
import pkvm_smmu
"""


def test_checker_flags_arch_importing_other_layers_absolute_and_relative() -> None:
    assert lines_flagged(BAD_ARCH, "pkvm_smmu.arch.strtab") == [5, 6, 7]


def test_violation_message_names_file_line_target_and_rule() -> None:
    (first, *_) = check_source(BAD_ARCH, "pkvm_smmu.arch.strtab", "src/pkvm_smmu/arch/strtab.py")
    assert first.startswith("src/pkvm_smmu/arch/strtab.py:5: imports pkvm_smmu.machine.bus.Region (arch/")


def test_relative_imports_resolve_from_a_package_init() -> None:
    source = "from . import _bitfield\nfrom .. import hyp\n"
    assert lines_flagged(source, "pkvm_smmu.arch", is_package=True) == [2]
    assert lines_flagged("from .... import x\n", "pkvm_smmu.arch.strtab") == [1]


BAD_HOST = """\
import pkvm_smmu.hyp.mem_protect
from pkvm_smmu import machine
from pkvm_smmu.machine.smmu import device as smmu
from pkvm_smmu.trace import TraceBus
from pkvm_smmu.arch.strtab import Ste
import importlib
mod = importlib.import_module("pkvm_smmu.hyp.iommu")
"""


def test_checker_flags_host_reaching_into_hyp_or_machine() -> None:
    assert lines_flagged(BAD_HOST, "pkvm_smmu.host.arm_smmu_v3") == [1, 2, 3, 7]


def test_host_allowlist_entries_are_honoured() -> None:
    allowed = {"pkvm_smmu.machine.smmu": "synthetic interface"}
    rules = package_rules(host_exceptions=allowed)
    assert lines_flagged(BAD_HOST, "pkvm_smmu.host.arm_smmu_v3", rules=rules) == [1, 2, 7]


def test_checker_flags_machine_importing_software() -> None:
    source = (
        "from pkvm_smmu.arch import Field\nfrom pkvm_smmu.trace import TraceBus\n"
        "from pkvm_smmu.hyp import x\nimport pkvm_smmu.host\nfrom pkvm_smmu.guest import g\n"
        "__import__('pkvm_smmu.verify.oracle')\n"
    )
    assert lines_flagged(source, "pkvm_smmu.machine.smmu.walker") == [3, 4, 5, 6]


def test_checker_limits_pgtable_to_arch_and_memory_types() -> None:
    source = (
        "from pkvm_smmu.arch.vmsa import Granule\nfrom pkvm_smmu.machine.memory import Ram\n"
        "from pkvm_smmu.machine import bus\nfrom pkvm_smmu.pgtable.memory import TableMemory\n"
        "from pkvm_smmu.machine.smmu import Smmu\nfrom pkvm_smmu.machine import SystemBus\n"
        "from pkvm_smmu.hyp import pool\n"
    )
    assert lines_flagged(source, "pkvm_smmu.pgtable.arm_lpae") == [5, 6, 7]


def test_checker_keeps_trace_independent() -> None:
    source = "from pkvm_smmu.trace.bus import TraceEvent\nfrom pkvm_smmu.arch import Field\n"
    assert lines_flagged(source, "pkvm_smmu.trace.counters") == [2]


def test_only_cli_prints_or_uses_rich() -> None:
    source = (
        "import rich\nfrom rich.console import Console\nimport builtins\nprint('x')\n"
        "builtins.print('y')\nconsole.print('z')\nlog = 'print(1)'\n"
    )
    assert lines_flagged(source, "pkvm_smmu.verify.fuzz") == [1, 2, 4, 5]
    assert lines_flagged(source, "pkvm_smmu.cli") == []


def test_unparsable_module_is_reported_not_skipped() -> None:
    assert lines_flagged("def broken(:\n", "pkvm_smmu.hyp.x") == [1]


@pytest.mark.parametrize("layer", ["arch", "host", "machine", "pgtable", "trace"])
def test_every_layer_may_import_itself_and_the_standard_library(layer: str) -> None:
    source = f"import os\nfrom typing import Any\nfrom pkvm_smmu.{layer}.a import b\nfrom . import c\n"
    assert lines_flagged(source, f"pkvm_smmu.{layer}.module") == []
