"""``Sanitizer``: attached to a running system as a bus observer, a trace sink and each SMMU's
translation observer, it dispatches what it sees to the four checks and collects their reports."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pkvm_smmu.arch.commands import pretty_command
from pkvm_smmu.arch.registers import CR0, SMMU_MMIO_SIZE
from pkvm_smmu.machine.bus import Access, InitiatorKind, SystemBus
from pkvm_smmu.machine.clock import Clock
from pkvm_smmu.machine.memory import Ram
from pkvm_smmu.machine.smmu.decode import ContextConfig, StreamConfig
from pkvm_smmu.machine.smmu.device import SmmuV3
from pkvm_smmu.machine.smmu.tlb import TlbEntry
from pkvm_smmu.machine.smmu.translate import Observer
from pkvm_smmu.machine.smmu.types import Transaction, TranslationResult
from pkvm_smmu.trace import TraceBus, TraceEvent
from pkvm_smmu.verify.sanitizer._commands import CommandDecoder, is_invalidation, is_sync
from pkvm_smmu.verify.sanitizer._double_fetch import DoubleFetchCheck, HostPages
from pkvm_smmu.verify.sanitizer._hitless import HitlessCheck
from pkvm_smmu.verify.sanitizer._registers import REG_AT, RegisterCheck
from pkvm_smmu.verify.sanitizer._report import Coverage, Location, SanitizerReport
from pkvm_smmu.verify.sanitizer._stale import StaleUseCheck

if TYPE_CHECKING:
    from pkvm_smmu.machine.platform import Machine

_SMMUEN = CR0.SMMUEN.in_place_mask
TRAP_BEGIN = "trap.begin"
TRAP_END = "trap.end"
# The hyp is done with one host command copied out of the host's queue (its verdict).
HYP_COMMAND_DONE = frozenset({"cmd.pass", "cmd.rewrite", "cmd.drop"})


class _SmmuWatch:
    """The checks of one SMMU."""

    def __init__(self, run: Sanitizer, smmu: SmmuV3) -> None:
        self.run = run
        self.smmu = smmu
        decoder = CommandDecoder(smmu)
        self.decoder = decoder
        self.stale = StaleUseCheck(run, smmu, decoder)
        self.hitless = HitlessCheck(run, smmu)
        self.registers = RegisterCheck(run, smmu)
        self._smmu_enabled = smmu.smmu_enabled
        self._fetched_command: tuple[int, int] | None = None  # (command, its queue address)
        if self._smmu_enabled:
            self.hitless.smmu_enabled(True)

    def smmu_read(self, access: Access) -> None:
        if access.initiator.purpose == "cmdq-fetch":
            if isinstance(access.value, bytes):
                self._fetched_command = (int.from_bytes(access.value, "little"), access.address)
            return
        self.stale.smmu_read(access)

    def memory_write(self, access: Access, where: Location) -> None:
        self.stale.write(access, where)
        self.hitless.write(access, where)

    def command_consumed(self, event: TraceEvent) -> None:
        fetched, self._fetched_command = self._fetched_command, None
        if fetched is None or event.fields.get("error") != "NONE":
            return
        command, address = fetched
        where = Location(event.seq, event.time_ns, self.smmu.name, address, pretty_command(command))
        if is_invalidation(command):
            self.run.coverage.invalidations += 1
            self.stale.invalidation_consumed(command, where)
            scope = self.decoder.config_scope(command)
            if scope is not None:
                self.hitless.sync_point(scope, where)
        elif is_sync(command):
            self.stale.sync_consumed()

    def register_updated(self, event: TraceEvent) -> None:
        reg = event.fields.get("reg")
        if not isinstance(reg, str):
            return
        self.registers.updated(reg)
        if reg == "CR0ACK":
            enabled = bool(int(event.fields.get("value", 0)) & _SMMUEN)
            if enabled != self._smmu_enabled:
                self._smmu_enabled = enabled
                self.hitless.smmu_enabled(enabled)

    def translation(
        self,
        txn: Transaction,
        stream: StreamConfig | None,
        context: ContextConfig | None,
        entry: TlbEntry | None,
        result: TranslationResult,
    ) -> None:
        device = f"dma sid={txn.stream_id:#x}"
        if txn.substream_id is not None:
            device += f" ssid={txn.substream_id:#x}"
        at = self.run.location(device, txn.address, "write" if txn.is_write else "read")
        self.run.coverage.translations += 1
        self.registers.translation(at)
        self.stale.translation(txn, stream, context, entry, result, at)
        if stream is not None:
            self.hitless.used(stream.address, stream.ste)
        if context is not None:
            self.hitless.used(context.address, context.cd)


class Sanitizer:
    """Reports software (host driver or hyp) that relies on what the SMMUv3 architecture does not
    guarantee: stale cached configuration or translations used, live STE/CD updates that are not
    hitless, register interface misuse, and hyp double fetches of host memory while handling a
    trap (the last needs ``host_pages``, pKVM's ``MemProtect``).

    It attaches itself on construction; ``reports`` grows as the run goes; ``finish`` also judges
    STE/CD updates still open at the end. It never makes a bus access of its own.
    """

    def __init__(
        self,
        bus: SystemBus,
        trace: TraceBus,
        smmus: Iterable[SmmuV3],
        *,
        clock: Clock | None = None,
        host_pages: HostPages | None = None,
    ) -> None:
        self.bus = bus
        self.trace = trace
        self.smmus = tuple(smmus)
        if clock is None:
            if not self.smmus:
                raise ValueError("a Sanitizer without SMMUs needs the clock")
            clock = self.smmus[0].clock
        self.clock = clock
        self.reports: list[SanitizerReport] = []
        self.coverage = Coverage()
        self._last_seq = -1
        self._trap: Location | None = None
        self._watches = {smmu.name: _SmmuWatch(self, smmu) for smmu in self.smmus}
        self._mmio = [
            (smmu.base, smmu.base + SMMU_MMIO_SIZE, self._watches[smmu.name]) for smmu in self.smmus
        ]
        self._double_fetch = DoubleFetchCheck(self, host_pages) if host_pages is not None else None
        self._sink = self._on_event
        self._observers: dict[str, Observer | None] = {}
        self.attached = False
        self.attach()

    @classmethod
    def for_machine(cls, machine: Machine, *, host_pages: HostPages | None = None) -> Sanitizer:
        """A sanitizer on every SMMU of a platform ``Machine``."""
        return cls(
            machine.bus, machine.trace, machine.smmus.values(), clock=machine.clock, host_pages=host_pages
        )

    # -- attachment --------------------------------------------------------------------------------
    def attach(self) -> None:
        if self.attached:
            return
        self.bus.observers.append(self._on_access)
        self.trace.attach(self._sink)
        for smmu in self.smmus:
            translator = smmu.translator
            previous = translator.observer
            self._observers[smmu.name] = previous
            translator.observer = self._translation_observer(self._watches[smmu.name], previous)
        self.attached = True

    def detach(self) -> None:
        if not self.attached:
            return
        self.bus.observers.remove(self._on_access)
        self.trace.detach(self._sink)
        for smmu in self.smmus:
            smmu.translator.observer = self._observers.pop(smmu.name, None)
        self.attached = False

    @staticmethod
    def _translation_observer(watch: _SmmuWatch, previous: Observer | None) -> Observer:
        def observe(
            txn: Transaction,
            stream: StreamConfig | None,
            context: ContextConfig | None,
            entry: TlbEntry | None,
            result: TranslationResult,
        ) -> None:
            if previous is not None:
                previous(txn, stream, context, entry, result)
            watch.translation(txn, stream, context, entry, result)

        return observe

    # -- what the checks share ---------------------------------------------------------------------
    @property
    def ram(self) -> Ram:
        return self.bus.ram

    def location(self, initiator: str, address: int, what: str = "") -> Location:
        trap = self._trap
        if trap is None:
            return Location(self._last_seq, self.clock.now_ns, initiator, address, what)
        what = f"{what}; in the trap at seq {trap.seq}" if what else f"in the trap at seq {trap.seq}"
        return Location(self._last_seq, self.clock.now_ns, initiator, address, what, trap.seq)

    def add(self, report: SanitizerReport) -> None:
        self.reports.append(report)

    def finish(self) -> list[SanitizerReport]:
        """Judge the STE/CD updates no CFGI has settled yet (as if one did now); all reports."""
        end = self.location("end of run", 0, "no CFGI since")
        for watch in self._watches.values():
            watch.hitless.finish(end)
        return list(self.reports)

    # -- dispatch ----------------------------------------------------------------------------------
    def _mmio_watch(self, address: int) -> _SmmuWatch | None:
        for base, end, watch in self._mmio:
            if base <= address < end:
                return watch
        return None

    def _on_access(self, access: Access) -> None:
        initiator = access.initiator
        if initiator.kind is InitiatorKind.SMMU:
            if not access.is_write:
                watch = self._watches.get(initiator.name)
                if watch is not None:
                    watch.smmu_read(access)
            return
        if access.aborted:
            return
        if access.is_write:
            self._on_write(access)
            return
        double_fetch = self._double_fetch
        in_ram = self.bus.is_ram(access.address, max(access.size, 1))
        if double_fetch is not None and self._trap is not None and in_ram:
            where = self.location(str(initiator), access.address, f"{access.size}-byte read")
            double_fetch.read(access, where)

    def _on_write(self, access: Access) -> None:
        initiator = str(access.initiator)
        watch = self._mmio_watch(access.address)
        if watch is not None:
            where = self.location(initiator, access.address, _register_write(access, watch))
            self.coverage.register_writes += 1
            watch.registers.write(access, where)
            return
        if not self.bus.is_ram(access.address, max(access.size, 1)):
            return
        value = access.value
        what = f"store {value:#x}" if isinstance(value, int) else f"{access.size}-byte write"
        where = self.location(initiator, access.address, what)
        for watch in self._watches.values():
            watch.memory_write(access, where)

    def _on_event(self, event: TraceEvent) -> None:
        self._last_seq = event.seq
        watch = self._watches.get(event.component)
        if watch is not None:
            if event.kind == "cmd":
                watch.command_consumed(event)
            elif event.kind == "reg.update":
                watch.register_updated(event)
            return
        if event.kind in HYP_COMMAND_DONE and self._double_fetch is not None:
            self._double_fetch.command_done()
        elif event.kind == TRAP_BEGIN:
            address = int(event.fields.get("address", 0))
            trapped = self._mmio_watch(address)
            device = trapped.smmu.name if trapped is not None else event.component
            what = f"{event.fields.get('direction', '')} {_register_name(address, trapped)}".strip()
            self._trap = Location(event.seq, event.time_ns, "host", address, what)
            if self._double_fetch is not None:
                self.coverage.traps += 1
                self._double_fetch.trap_begin(self._trap, device)
        elif event.kind == TRAP_END:
            self._trap = None
            if self._double_fetch is not None:
                self._double_fetch.trap_end()


def _register_name(address: int, watch: _SmmuWatch | None) -> str:
    if watch is None:
        return f"{address:#x}"
    located = REG_AT.get(address - watch.smmu.base)
    if located is None:
        return f"{watch.smmu.name}+{address - watch.smmu.base:#x}"
    reg, upper = located
    return f"{watch.smmu.name}.{reg.name}{'[63:32]' if upper else ''}"


def _register_write(access: Access, watch: _SmmuWatch) -> str:
    value = access.value if isinstance(access.value, int) else 0
    return f"{_register_name(access.address, watch)} <- {value:#x}"


__all__ = ["TRAP_BEGIN", "TRAP_END", "Sanitizer"]
