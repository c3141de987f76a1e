"""Initcall levels: Linux order with each _sync level after its level, registration order within a
level, errors logged and not fatal, partial runs, and the trace of each call."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from driver_core_helpers import make_kernel

from pkvm_smmu.host.driver_core import InitcallLevel, Kernel

LINUX_ORDER = [
    "pure_initcall",
    "pure_initcall_sync",
    "core_initcall",
    "core_initcall_sync",
    "postcore_initcall",
    "postcore_initcall_sync",
    "arch_initcall",
    "arch_initcall_sync",
    "subsys_initcall",
    "subsys_initcall_sync",
    "fs_initcall",
    "fs_initcall_sync",
    "rootfs_initcall",
    "rootfs_initcall_sync",
    "device_initcall",
    "device_initcall_sync",
    "late_initcall",
    "late_initcall_sync",
]


def recorder(order: list[str], label: str, ret: int = 0) -> Callable[[], int]:
    def fn() -> int:
        order.append(label)
        return ret

    return fn


def test_levels_run_in_linux_order_each_sync_right_after_its_level() -> None:
    kernel = Kernel()
    order: list[str] = []
    for level in reversed(InitcallLevel):  # registration order must not matter across levels
        kernel.register_initcall(level, recorder(order, level.linux_name))
    kernel.run_initcalls()
    assert order == LINUX_ORDER
    assert kernel.system_state == "running"


def test_within_a_level_registration_order_and_sync_waits_for_all_device_initcalls() -> None:
    kernel = Kernel()
    order: list[str] = []
    kernel.register_initcall("device_sync", recorder(order, "finalize_pkvm"))
    kernel.register_initcall("device", recorder(order, "kvm_arm_init"))
    kernel.module_init(recorder(order, "arm_smmu_driver_init"))
    kernel.register_initcall("device_initcall", recorder(order, "third"))
    kernel.run_initcalls()
    assert order == ["kvm_arm_init", "arm_smmu_driver_init", "third", "finalize_pkvm"]


def test_failing_initcall_is_logged_with_its_error_and_boot_continues() -> None:
    b = make_kernel()
    order: list[str] = []
    b.kernel.register_initcall("subsys", recorder(order, "broken", ret=-12), name="broken_init")
    b.kernel.register_initcall("subsys", recorder(order, "next"), name="next_init")
    b.kernel.run_initcalls()
    assert order == ["broken", "next"]
    spans = {e.fields["fn"]: e.fields for e in b.events("initcall")}
    assert spans["broken_init"]["ret"] == -12
    assert spans["broken_init"]["err"] == "-ENOMEM"
    assert spans["broken_init"]["level"] == "subsys_initcall"
    assert spans["next_init"]["ret"] == 0 and "err" not in spans["next_init"]


def test_every_initcall_is_traced_in_run_order_including_the_core_own() -> None:
    b = make_kernel()
    b.kernel.register_initcall("late", lambda: 0, name="my_late")
    b.kernel.register_initcall("arch", lambda: 0, name="my_arch")
    b.kernel.run_initcalls()
    names = [e.fields["fn"] for e in b.events("initcall")]
    # The driver core's own late_initcall was registered first, so it runs first in its level.
    assert names == ["my_arch", "deferred_probe_initcall", "my_late"]


def test_partial_runs_resume_where_they_stopped() -> None:
    kernel = Kernel()
    order: list[str] = []
    kernel.register_initcall("device", recorder(order, "dev"))
    kernel.register_initcall("device_sync", recorder(order, "dev_sync"))
    kernel.register_initcall("late", recorder(order, "late"))
    kernel.run_initcalls(until="device")
    assert order == ["dev"]
    assert kernel.system_state == "booting"
    kernel.run_initcalls(until=InitcallLevel.DEVICE_SYNC)
    assert order == ["dev", "dev_sync"]
    kernel.run_initcalls()
    assert order == ["dev", "dev_sync", "late"]
    assert kernel.initcalls_done and kernel.system_state == "running"


def test_an_initcall_may_register_a_later_one_but_not_an_earlier_one() -> None:
    kernel = Kernel()
    order: list[str] = []

    def device_init() -> int:
        order.append("device")
        kernel.register_initcall("late_sync", recorder(order, "added-later"))
        with pytest.raises(ValueError, match="core_initcall has already run"):
            kernel.register_initcall("core", recorder(order, "too-late"))
        return 0

    kernel.register_initcall("device", device_init)
    kernel.run_initcalls()
    assert order == ["device", "added-later"]
    with pytest.raises(ValueError, match="already run"):
        kernel.register_initcall("late_sync", recorder(order, "after-boot"))


def test_level_names_parse_and_unknown_levels_name_themselves() -> None:
    assert InitcallLevel.parse("module_init") is InitcallLevel.DEVICE
    assert InitcallLevel.parse("rootfs_initcall") is InitcallLevel.ROOTFS
    assert InitcallLevel.parse("late_initcall_sync") is InitcallLevel.LATE_SYNC
    with pytest.raises(ValueError, match="'early'"):
        InitcallLevel.parse("early")
