"""The DMA-engine driver on a booted native system: copies through stage 1 land in RAM, the
deliberate fault is reported by the engine and logged by arm-smmu-v3, identity domains under
iommu.passthrough=1, polling without an interrupt, strict and lazy unmap."""

from __future__ import annotations

from pathlib import Path

from pkvm_smmu.arch.strtab import STE, SteConfig
from pkvm_smmu.host.drivers.dma_engine import DMA_BITS, DmaEngineDev
from pkvm_smmu.machine.bus import HOST_CPU
from pkvm_smmu.platforms import platform_source
from pkvm_smmu.scenarios.boot import RunOptions
from pkvm_smmu.scenarios.native import NativeSystem, boot_native
from pkvm_smmu.trace import RecordingSink


def boot(**options: object) -> tuple[NativeSystem, RecordingSink]:
    sink = RecordingSink()
    return boot_native(RunOptions(**options), sinks=[sink]), sink  # type: ignore[arg-type]


def ram(system: NativeSystem, address: int, length: int) -> bytes:
    data = system.machine.bus.read_bytes(HOST_CPU, address, length)
    assert isinstance(data, bytes)
    return data


def sid_of(system: NativeSystem, engine: DmaEngineDev) -> int:
    (sid,) = system.host.stream_ids(engine.dev)
    return sid


def test_copies_through_stage1_land_in_ram() -> None:
    system, _ = boot()
    smmu = system.host.smmus[0]
    assert len(system.host.dma_engines) == 4
    for engine in system.host.dma_engines.values():
        assert getattr(engine.dev, "dma_mask") == (1 << DMA_BITS) - 1  # noqa: B009
        assert STE.CONFIG.get(smmu.read_ste(sid_of(system, engine))) == SteConfig.S1_TRANS
        result = engine.copy(3 * 4096 + 123, seed=7, offset=40)
        assert result.ok and result.via_irq and result.done_len == result.size
        assert result.src_dma is not None and result.src_dma & 0xFFF == 40
        assert (result.src_dma, result.dst_dma) != (result.src_pa, result.dst_pa)  # translated
        # The destination in RAM holds the source's bytes (freed pages are not cleared).
        source = ram(system, result.src_pa, result.size)
        assert any(source) and ram(system, result.dst_pa, result.size) == source


def test_the_deliberate_fault_is_reported_and_logged() -> None:
    system, sink = boot()
    engine = system.host.dma_engines["a000000.dma"]
    fault = engine.fault_unmapped()
    assert fault.observed and fault.error == "read-abort" and fault.event == "F_TRANSLATION"
    assert fault.iova is not None and not fault.err_write
    (logged,) = sink.select("arm-smmu-v3.9050000.iommu", "evtq.event")
    assert logged.fields["event"] == "F_TRANSLATION"
    assert logged.fields["sid"] == sid_of(system, engine) == 0x100
    assert logged.fields["inputaddr"] == fault.iova and logged.fields["rnw"] == 1
    assert logged.fields["client"] == "a000000.dma"
    # The engine is usable again afterwards.
    assert engine.copy(4096).ok


def test_unmap_is_strict_by_default_and_lazy_with_strict_0() -> None:
    for cmdline, stale_until_flush in (("", False), ("iommu.strict=0", True)):
        system, _ = boot(cmdline=cmdline)
        engine = system.host.dma_engines["0000:00:01.0"]
        result = engine.copy(4096)
        assert result.ok and result.src_dma is not None
        endpoint = system.machine.dma_device("00:01.0").endpoint
        # The IOVA is unmapped: strict mode invalidated it already; lazy mode may still hit the TLB.
        assert endpoint.read(result.src_dma, 16).ok is stale_until_flush, cmdline
        system.host.cpu.udelay(20_000)
        system.host.run_timers()
        assert not endpoint.read(result.src_dma, 16).ok


def test_passthrough_gives_identity_domains_and_dma_still_works() -> None:
    system, _ = boot(cmdline="iommu.passthrough=1")
    smmu = system.host.smmus[0]
    for engine in system.host.dma_engines.values():
        domain = system.host.domain_of(engine.dev)
        assert domain is not None and domain.type.value == "identity"
        assert STE.CONFIG.get(smmu.read_ste(sid_of(system, engine))) == SteConfig.BYPASS
        result = engine.copy(8192, seed=3)
        assert result.ok and (result.src_dma, result.dst_dma) == (result.src_pa, result.dst_pa)
        assert ram(system, result.dst_pa, 8192) == ram(system, result.src_pa, 8192)
        assert engine.fault_unmapped().skipped == "no translating domain (identity)"


def test_an_engine_without_an_interrupt_polls_status(tmp_path: Path) -> None:
    source = platform_source().replace("interrupts = <0 80 1>;\n", "", 1)
    tree = tmp_path / "noirq.dts"
    tree.write_text(source)
    system, _ = boot(platform=str(tree))
    engine = system.host.dma_engines["a000000.dma"]
    assert engine.irq == 0
    result = engine.copy(5000, seed=1)
    assert result.ok and not result.via_irq
    fault = engine.fault_unmapped()
    assert fault.observed and not fault.via_irq and fault.event == "F_TRANSLATION"


def test_unbinding_frees_the_interrupt() -> None:
    system, _ = boot()
    engine = system.host.dma_engines["0000:00:03.0"]
    desc = system.host.irq.descs[engine.irq]
    assert [a.dev_id for a in desc.actions] == [engine]
    system.host.kernel.device_release_driver(engine.dev)
    assert desc.actions == [] and "0000:00:03.0" not in system.host.dma_engines


def test_a_copy_without_memory_is_reported_not_raised() -> None:
    system, sink = boot()
    mm = system.host.mm
    hog = mm.alloc_pages(mm.pages_free)
    assert hog is not None
    result = system.host.dma_engines["a000000.dma"].copy(4096)
    assert result.state == "no-memory" and not result.ok
    assert sink.select("host.dma_engine", "copy")[-1].fields["state"] == "no-memory"
