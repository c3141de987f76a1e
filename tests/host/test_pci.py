"""The generic ECAM host-bridge driver: enumeration through config space, BAR0, INTx, ATS, and the
enable/bus-master helpers, checked against the machine's PCI functions."""

from __future__ import annotations

from pkvm_smmu.devicetree import Bdf
from pkvm_smmu.host.driver_core import InitcallLevel
from pkvm_smmu.host.irq import HostIrq
from pkvm_smmu.host.kernel import HostKernel
from pkvm_smmu.host.pci import (
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    EcamPciDevice,
    PciEcam,
    pci_disable_ats,
    pci_enable_ats,
    pci_enable_device,
    pci_read_config_word,
    pci_set_master,
)
from pkvm_smmu.machine.pci import DMA_ENGINE_DEVICE_ID, PCI_CLASS_DMA_CONTROLLER, PKVM_SMMU_VENDOR_ID
from pkvm_smmu.machine.platform import Machine, build_machine
from pkvm_smmu.platforms import default_platform
from pkvm_smmu.scenarios.boot import wire_host_interrupts
from pkvm_smmu.trace import RecordingSink

ECAM = 0x3F00_0000  # the default platform's


def boot(*devices: str, until: InitcallLevel | None = None) -> tuple[Machine, HostKernel, RecordingSink]:
    tree = default_platform()
    machine = build_machine(tree, extra_devices=devices)
    sink = machine.trace.attach(RecordingSink())
    host = HostKernel(machine.host_cpu(), tree, trace=machine.trace, now_ns=lambda: machine.clock.now_ns)

    wire_host_interrupts(machine, host.irq)
    if until is None:
        host.boot()
    else:
        host.kernel.run_initcalls(until=until)
    return machine, host, sink


def pci_devices(host: HostKernel) -> dict[str, EcamPciDevice]:
    return {dev.name: dev for dev in host.pci_host.devices}


def test_enumeration_finds_each_function_with_its_ids_bar_irq_and_ats() -> None:
    machine, host, sink = boot("dma-engine,bdf=00:07.0,ats=on")
    found = pci_devices(host)
    assert sorted(found) == ["0000:00:01.0", "0000:00:02.0", "0000:00:03.0", "0000:00:07.0"]
    bridge = next(iter(machine.pci_bridges.values()))
    for name, dev in found.items():
        function = bridge.functions[dev.bdf]
        assert (dev.vendor, dev.device) == (PKVM_SMMU_VENDOR_ID, DMA_ENGINE_DEVICE_ID)
        assert dev.class_code == PCI_CLASS_DMA_CONTROLLER and dev.is_pcie
        assert dev.rid == dev.bdf.rid and name == f"0000:{dev.bdf}"
        assert dev.bar0 == (bridge.cpu_address_of(function.bar0_address), function.bar0_size)
        assert function.bar0_address and function.bar0_size == 0x1000  # sizing restored the BAR
        assert dev.ats_supported == function.ats
        # INTx routed by interrupt-map: the IRQ maps the line the machine pulses.
        mapping = host.irq.mapping(dev.irq)
        assert mapping is not None and mapping.hwirq == machine.dma_device(str(dev.bdf)).irq_line
    assert [d.name for d in found.values() if d.ats_supported] == ["0000:00:02.0", "0000:00:07.0"]
    # Functions hang off the root bus device, itself a child of the host bridge's platform device.
    root = found["0000:00:01.0"].parent
    assert root is not None and root.name == "pci0000:00" and root.parent is not None
    assert root.parent.name == "3f000000.pcie"
    scans = [e for e in sink.select("host.pci", "scan")]
    assert len(scans) == 1 and scans[0].fields["found"] == sorted(found)


def test_empty_slots_read_all_ones_and_are_skipped() -> None:
    machine, host, _ = boot()
    ecam = PciEcam(machine.host_cpu(), ECAM, 0x100_0000, (0, 15))
    assert ecam.read(0, Bdf(0, 9, 0).devfn, 0, 2) == 0xFFFF  # nothing at 00:09.0
    assert ecam.read(16, 0, 0, 4) == 0xFFFF_FFFF  # beyond the bus range
    assert "0000:00:09.0" not in pci_devices(host)


def test_drivers_enable_decoding_and_bus_mastering_through_config_writes() -> None:
    machine, host, _ = boot()
    bridge = next(iter(machine.pci_bridges.values()))
    for dev in pci_devices(host).values():
        function = bridge.functions[dev.bdf]
        assert function.memory_enabled and function.bus_master_enabled  # the DMA driver bound
        assert dev.is_busmaster and dev.enable_cnt == 1


def test_bus_master_is_off_until_a_driver_asks() -> None:
    machine, host, _ = boot(until=InitcallLevel.DEVICE_SYNC)  # the bridge waits for the SMMU
    functions = next(iter(machine.pci_bridges.values())).functions
    assert pci_devices(host) == {} and not any(f.bus_master_enabled for f in functions.values())
    host.kernel.run_initcalls()
    dev = pci_devices(host)["0000:00:01.0"]
    function = functions[dev.bdf]
    assert function.bus_master_enabled
    # Unbinding the driver turns mastering and decoding back off.
    host.kernel.device_release_driver(dev)
    assert not function.bus_master_enabled and not function.memory_enabled
    assert pci_read_config_word(dev, PCI_COMMAND) & (PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY) == 0
    assert pci_enable_device(dev) == 0 and function.memory_enabled and not function.bus_master_enabled
    pci_set_master(dev)
    assert function.bus_master_enabled


def test_ats_enable_and_disable_reach_the_function() -> None:
    machine, host, _ = boot()
    dev = pci_devices(host)["0000:00:02.0"]
    function = next(iter(machine.pci_bridges.values())).functions[dev.bdf]
    # arm-smmu-v3 enabled ATS when it attached the default domain (the SMMU has ATS).
    assert dev.ats_enabled and function.ats_enabled and dev.ats_stu == 12
    pci_disable_ats(dev)
    assert not function.ats_enabled
    assert pci_enable_ats(dev, 11) < 0  # below the 4 KiB minimum STU
    assert pci_enable_ats(dev, 12) == 0 and function.ats_enabled
    plain = pci_devices(host)["0000:00:01.0"]
    assert not plain.ats_cap and pci_enable_ats(plain, 12) < 0


def test_shared_intx_lines_take_one_action_per_device() -> None:
    # Device 5's INTA rotates onto the same SPI as device 1's (interrupt-map-mask 0x1800).
    _, host, _ = boot("dma-engine,bdf=00:05.0")
    found = pci_devices(host)
    assert found["0000:00:05.0"].irq == found["0000:00:01.0"].irq != 0
    desc = host.irq.descs[found["0000:00:01.0"].irq]
    assert len(desc.actions) == 2 and all(a.shared for a in desc.actions)
    engines = host.dma_engines
    assert engines["0000:00:05.0"].copy(4096).ok and engines["0000:00:01.0"].copy(4096).ok
    assert engines["0000:00:05.0"].irqs == 1 and engines["0000:00:01.0"].irqs == 1
    assert desc.unhandled == 0


def test_irq_layer_refuses_a_second_unshared_handler() -> None:
    irq = HostIrq()
    number = irq.irq_create_mapping("intid:40")
    assert irq.irq_create_mapping("intid:40") == number and number > 0
    assert irq.request_irq(number, lambda: True, "a") == 0
    assert irq.request_irq(number, lambda: True, "b", object(), shared=True) < 0
    assert irq.request_irq(999, lambda: True, "c") < 0
    irq.free_irq(number)
    assert irq.request_irq(number, lambda: True, "b", object(), shared=True) == 0
    assert not irq.generic_handle_irq(irq.irq_create_mapping("intid:41"))  # nobody asked: masked
