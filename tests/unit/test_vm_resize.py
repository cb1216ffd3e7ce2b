"""In-place resize: the VM follows its containers' limits through the device model."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from shim import errors
from shim.config import HypervisorConfig
from shim.sandbox.resize import Limits, VmResizer
from shim.sandbox.sizing import VmSize
from shim.vm.devices import Devices, SlotMap
from shim.vm.qemu import VmError
from tests.unit.test_vm_devices import RecordingQemu

GIB = 1 << 30
HV = HypervisorConfig(base_vcpus=0, base_memory_mib=256, max_vcpus=4, max_memory_mib=4096)
BOOT = VmSize(1, 512, 4, 4096, "test")


def hotpluggable_cpus(boot: int, possible: int = 4) -> Callable[[list[Any]], list[Any]]:
    """query-hotpluggable-cpus as QEMU answers it (highest socket first), with the
    vCPUs added and not deleted since boot present."""
    def reply(commands: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        present = set(range(boot))
        for command, args in commands:
            if command == "device_add" and "socket-id" in args:
                present.add(args["socket-id"])
            elif command == "device_del" and args["id"].startswith("vcpu-"):
                present.discard(int(args["id"].split("socket")[1].split("-")[0]))
        return [{"type": "max-x86_64-cpu", "vcpus-count": 1,
                 "props": {"socket-id": i, "core-id": 0, "thread-id": 0},
                 **({"qom-path": f"/machine/peripheral/cpu{i}"} if i in present else {})}
                for i in reversed(range(possible))]
    return reply


class Guest:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    async def online_cpu_mem(self, vcpus: int, min_memory_bytes: int) -> tuple[int, int]:
        self.calls.append((vcpus, min_memory_bytes))
        return vcpus, min_memory_bytes


def _resizer() -> tuple[VmResizer, RecordingQemu, Devices, Guest]:
    qemu = RecordingQemu(replies={"query-hotpluggable-cpus": hotpluggable_cpus(1)})
    return VmResizer(HV, BOOT), qemu, Devices(qemu, SlotMap(hotplug_ports=0)), Guest()


@pytest.mark.parametrize("resources, limits", [
    ({"cpu": {"quota": 150_000, "period": 100_000}, "memory": {"limit": GIB}},
     Limits(1500, GIB)),
    ({"cpu": {"quota": -1, "period": 100_000}, "memory": {"limit": 0}}, Limits()),
    ({"cpu": {"quota": True, "period": 100_000}, "memory": {"limit": "1G"}}, Limits()),
    ({"cpu": {"quota": 1, "period": 100_000}}, Limits(1, 0)),
    (None, Limits()), ({"cpu": []}, Limits())])
def test_limits_come_from_oci_resources(resources: Any, limits: Limits) -> None:
    assert Limits.from_resources(resources) == limits


def test_the_target_is_the_limits_plus_the_base_never_below_boot_nor_above_max() -> None:
    resizer = VmResizer(HV, BOOT)
    assert resizer.target() == (1, 512)
    resizer.limits = {"a": Limits(1500, GIB), "b": Limits(600, 0)}
    assert resizer.target() == (3, 1024 + 256)
    resizer.limits = {"a": Limits(64_000, 64 * GIB)}
    assert resizer.target() == (4, 4096)


def test_growing_hot_plugs_vcpus_and_a_dimm_in_whole_blocks_and_onlines_them() -> None:
    resizer, qemu, devices, guest = _resizer()
    resizer.limits["a"] = Limits(2500, 600 << 20)  # 3 vCPUs, 856 MiB
    asyncio.run(resizer.grow(devices, guest))
    adds = [args for command, args in qemu.commands if command == "device_add"]
    assert [a["driver"] for a in adds] == ["max-x86_64-cpu", "max-x86_64-cpu", "pc-dimm"]
    assert adds[0]["socket-id"] == 1, "the lowest free socket first"
    # Shared memory, as virtiofsd maps all of guest RAM (unsplit, the default).
    assert ("object-add", {"qom-type": "memory-backend-memfd", "id": "dimm0-mem",
                           "size": 384 << 20, "share": True}) in qemu.commands
    assert (resizer.vcpus, resizer.memory_mib) == (3, 896)
    assert guest.calls == [(3, (384 + 384) << 20)]


def test_shrinking_offlines_the_extra_vcpus_and_keeps_them_for_the_next_grow() -> None:
    resizer, qemu, devices, guest = _resizer()
    resizer.limits["a"] = Limits(2500, 600 << 20)
    asyncio.run(resizer.grow(devices, guest))
    qemu.commands.clear()
    resizer.limits["a"] = Limits(100, 64 << 20)
    asyncio.run(resizer.shrink(guest))
    assert guest.calls[-1] == (1, 0)
    assert not qemu.commands, "nothing is unplugged"
    assert (resizer.online_vcpus, resizer.vcpus, resizer.memory_mib) == (1, 3, 896)

    resizer.limits["a"] = Limits(2000, 0)
    asyncio.run(resizer.grow(devices, guest))
    assert not [c for c, _ in qemu.commands if c == "device_add"], "offline vCPUs come back"
    assert guest.calls[-1][0] == 2 and resizer.online_vcpus == 2


def test_vcpus_present_from_boot_are_onlined_not_hot_plugged() -> None:
    resizer, qemu, devices, guest = _resizer()
    resizer.present_vcpus = 4
    resizer.limits["a"] = Limits(2500, 0)
    asyncio.run(resizer.grow(devices, guest))
    assert not qemu.commands and guest.calls == [(3, 0)]


def test_a_vm_at_its_maximum_cannot_grow_and_says_so() -> None:
    resizer, qemu, devices, guest = _resizer()
    qemu.replies["query-hotpluggable-cpus"] = hotpluggable_cpus(4)
    resizer.limits["a"] = Limits(3000, 0)
    with pytest.raises(errors.ResourceExhaustedError, match="every possible vCPU is present"):
        asyncio.run(resizer.grow(devices, guest))
