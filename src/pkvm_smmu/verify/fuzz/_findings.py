"""What a campaign finds, and the class each finding belongs to.

Kinds:

- ``violation``: the isolation oracle says some StreamID (or the SMMU itself) can reach memory the
  host may not access;
- ``observed``: a device or the SMMU did touch such memory (the oracle's observed mode);
- ``crash``: a Python exception escaped from the model, the hyp or a checker because of a value the
  host chose (DESIGN.md rule 3 says that never happens);
- ``sanitizer``: the sanitizer caught the hyp relying on something the architecture does not
  guarantee (reports whose writer is the host, or the hyp passing on a register write of the
  host's, are the adversary's own doing and are not findings);
- ``stall``: one step took more than ``STALL_NS`` of modeled time (30 s): the hyp or the SMMU
  kept the host's CPU for that long (a denial of service, not an isolation failure);
- ``hang``: one step did not finish within the runner's wall-clock budget (an unbounded loop, or a
  stall so long that simulating it is not worth the wait).

A finding's ``signature`` is its class: stable across runs and independent of addresses, so the
shrinker can ask "does this shorter script still find *that*?" and a campaign reports each class
once.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pkvm_smmu.verify.oracle import ObservedViolation, Violation

KINDS = ("violation", "observed", "crash", "sanitizer", "stall", "hang")
STALL_NS = 30_000_000_000  # modeled time one step may take before it is a stall finding
BOOT = -1  # the step of a finding present before any action

# Frames of these parts of the package are trusted or part of the tools: an exception raised through
# them is a finding. Exceptions raised by the host kernel's own code are the host's problem.
_TRUSTED = ("/pkvm_smmu/hyp/", "/pkvm_smmu/machine/", "/pkvm_smmu/verify/", "/pkvm_smmu/guest/",
            "/pkvm_smmu/scenarios/", "/pkvm_smmu/trace/")  # fmt: skip
_RUNNER = "/pkvm_smmu/verify/fuzz/"
_ADVERSARY = "/pkvm_smmu/verify/adversary/"

# Path steps -> tags; a violation's class is its actor, the owner's kind and these tags.
_TAGS: tuple[tuple[str, str], ...] = (
    (r"ABORT=0, so it bypasses", "gbpa-bypass"),
    (r"ATSCHK=0", "ats-unchecked"),
    (r"EATS=TRANS with", "ats-trans"),
    (r"EATS=S1CHK with", "ats-split"),
    (r"^TLB entry", "tlb"),
    (r"^config cache:", "config-cache"),
    (r"CMDQEN=1", "cmdq"),
    (r"EVENTQEN=1", "eventq"),
    (r"PRIQEN=1", "priq"),
    (r": MSI write$", "irq-msi"),
    (r"^CMD_SYNC in slot", "sync-msi"),
    (r"is MMIO", "mmio-table"),
    (r"^bypass: addresses are physical", "ste-bypass"),
    (r"^S1DSS=BYPASS", "s1dss-bypass"),
    (r"table walks$", "table-walk"),
)
_CONFIG = re.compile(r"^STE of StreamID \S+ at \S+: Config=(\w+)")


def owner_kind(owner: str) -> str:
    """``guest4097`` -> ``guest``: the class of an owner, not the instance."""
    return re.sub(r"\d+$", "", owner) or owner


def violation_tags(path: Iterable[str]) -> list[str]:
    tags: set[str] = set()
    for step in path:
        for pattern, tag in _TAGS:
            if re.search(pattern, step):
                tags.add(tag)
        match = _CONFIG.match(step)
        if match:
            tags.add(f"ste-{match.group(1).lower()}")
    return sorted(tags)


@dataclass(frozen=True)
class Finding:
    """One finding: its class (``signature``), the step after which it appeared (``BOOT``: before
    any action), a one-line summary and the details (violation path, traceback...)."""

    kind: str
    signature: str
    step: int
    summary: str
    details: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "signature": self.signature,
            "step": self.step,
            "summary": self.summary,
            "details": list(self.details),
        }

    @classmethod
    def from_json(cls, data: object) -> Finding:
        """``ValueError`` naming the field at fault."""
        if not isinstance(data, Mapping):
            raise ValueError("a finding is a JSON object")
        out: dict[str, Any] = {}
        for name, kind in (("kind", str), ("signature", str), ("step", int), ("summary", str)):
            value = data.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}")
            out[name] = value
        if out["kind"] not in KINDS:
            raise ValueError(f"kind: unknown finding kind {out['kind']!r} (known: {', '.join(KINDS)})")
        details = data.get("details", [])
        if not isinstance(details, list) or not all(isinstance(d, str) for d in details):
            raise ValueError("details: expected a list of strings")
        return cls(out["kind"], out["signature"], out["step"], out["summary"], tuple(details))

    def __str__(self) -> str:
        where = "at boot" if self.step == BOOT else f"after step {self.step}"
        return f"[{self.signature}] {where}: {self.summary}"


# -- from what the watchers report --------------------------------------------------------------------------


def violation_signature(violation: Violation) -> str:
    """``violation:ACTOR:OWNER-KIND:TAGS``, e.g. ``violation:device:hyp:gbpa-bypass``."""
    tags = violation_tags(violation.path)
    cause = "+".join(tags) or re.sub(r"0x[0-9a-f]+|\d+", "#", violation.path[-1] if violation.path else "")
    return f"violation:{violation.actor}:{owner_kind(violation.owner)}:{cause}"


def from_violation(violation: Violation, step: int) -> Finding:
    signature = violation_signature(violation)
    end = violation.start + violation.size
    summary = (
        f"{violation.smmu}: {violation.stream} can {violation.access} "
        f"[{violation.start:#x}, {end:#x}) owned by {violation.owner}"
    )
    return Finding("violation", signature, step, summary, tuple(violation.path))


def from_observed(observed: ObservedViolation, step: int) -> Finding:
    what = observed.purpose or ("write" if observed.is_write else "read")
    signature = f"observed:{observed.actor}:{what}:{owner_kind(observed.owner)}"
    return Finding("observed", signature, step, str(observed))


_REGISTER_CHECKS = ("guarded-write", "before-ack", "queue-index")


def from_sanitizer(report: Any, step: int, host_registers: Container[int] = ()) -> Finding | None:
    """A sanitizer report about the hyp (its stores, register writes or double fetches), or None.

    A register write the hyp makes on the host's behalf (v4 passes many registers through) breaks
    the register contract on the host's account, not the hyp's: reports whose writer is a write to a
    register the host itself wrote (``host_registers``, physical addresses) are the host's."""
    check = getattr(report.check, "value", str(report.check))
    writer = str(report.writer.initiator)
    if check != "double-fetch" and not writer.startswith("hyp"):
        return None
    if check in _REGISTER_CHECKS and report.writer.address in host_registers:
        return None
    signature = f"sanitizer:{check}:{re.sub(r'0x[0-9a-f]+|[0-9]+', '#', report.structure)}"
    return Finding("sanitizer", signature, step, str(report))


def is_trusted_exception(exc: BaseException) -> bool:
    """Did ``exc`` come out of the model, the hyp, a checker or the adversary's own code (a finding),
    rather than out of the host kernel's code (the host's problem, not isolation's)?"""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "/pkvm_smmu/" in f.filename and _RUNNER not in f.filename and _ADVERSARY not in f.filename
    ]
    if not frames:
        return True  # raised by the adversary's or the runner's own code: a bug in the tool
    return any(any(part in f.filename for part in _TRUSTED) for f in frames)


def from_exception(exc: BaseException, step: int, where: str = "") -> Finding:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/pkvm_smmu/" in f.filename]
    trusted = [
        f for f in frames if any(part in f.filename for part in _TRUSTED) and _RUNNER not in f.filename
    ]
    origin = trusted[-1] if trusted else (frames[-1] if frames else None)
    if origin is not None:
        module = origin.filename.split("/pkvm_smmu/", 1)[1].removesuffix(".py").replace("/", ".")
        place = f"{module}.{origin.name}"
    else:
        place = "?"
    signature = f"crash:{type(exc).__name__}:{place}"
    text = f"{type(exc).__name__}: {exc}"
    summary = f"{text} (in {place}{', ' + where if where else ''})"
    details = tuple("".join(traceback.format_exception(exc)).rstrip().splitlines())
    return Finding("crash", signature, step, summary, details)


def stall(step: int, kind: str, modeled_ns: int) -> Finding:
    seconds = modeled_ns / 1e9
    return Finding("stall", f"stall:{kind}", step, f"the step took {seconds:.1f} s of modeled time")


def hang(step: int, kind: str, seconds: float) -> Finding:
    summary = f"the step ({kind}) did not finish within {seconds:g} s of wall-clock time"
    return Finding("hang", f"hang:{kind}", step, summary)


__all__ = [
    "BOOT",
    "KINDS",
    "STALL_NS",
    "Finding",
    "from_exception",
    "from_observed",
    "from_sanitizer",
    "from_violation",
    "hang",
    "is_trusted_exception",
    "owner_kind",
    "stall",
    "violation_signature",
    "violation_tags",
]
