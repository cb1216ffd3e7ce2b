"""The VM's device model: slots and PCI paths, and the QMP sequence of a disk's hot-plug."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shim.vm.devices import (COLDPLUG_ADDRS, MAX_HOTPLUG_PORTS, DeviceError, Devices, DiskSpec,
                             SlotError, SlotMap)
from shim.vm.cmdline import NicSpec
from shim.vm.qemu import VmError


def test_coldplug_slots_avoid_fixed_devices_ports_and_the_lpc_bridge() -> None:
    slots = SlotMap(hotplug_ports=MAX_HOTPLUG_PORTS)
    taken = [slots.coldplug() for _ in COLDPLUG_ADDRS]
    addrs = {s.addr for s in taken}
    assert len(addrs) == len(taken)
    assert not addrs & {0x0, 0x2, 0x3, 0x4, 0x5, 0x1F}
    assert not addrs & set(range(0x10, 0x18)), "a boot-time device took a root port's slot"
    assert taken[0].path == "06" and taken[0].qemu_args == "bus=pcie.0,addr=0x6"
    with pytest.raises(SlotError):
        slots.coldplug()


def test_hotplug_ports_are_reused_after_release() -> None:
    slots = SlotMap(hotplug_ports=2)
    first, second = slots.hotplug("a"), slots.hotplug("b")
    assert (first.bus, first.path) == ("hp0", "10.0/00") and second.path == "10.1/00"
    with pytest.raises(SlotError, match="hotplug_ports"):
        slots.hotplug("c")
    slots.release("a")
    assert slots.hotplug("c").bus == "hp0"


def test_port_count_is_bounded() -> None:
    with pytest.raises(SlotError):
        SlotMap(hotplug_ports=MAX_HOTPLUG_PORTS + 1)


def test_dozens_of_ports_fill_functions_then_slots() -> None:
    slots = SlotMap(hotplug_ports=MAX_HOTPLUG_PORTS)
    paths = [slots.hotplug(f"d{i}").path for i in range(MAX_HOTPLUG_PORTS)]
    assert paths[7] == "10.7/00" and paths[8] == "11.0/00" and paths[-1] == "17.7/00"
    args = slots.port_args()
    assert "addr=0x11.0,multifunction=on" in args[17] and "addr=0x11.1" in args[19]


class RecordingQemu:
    """QEMU's side of QMP for the device model: records commands, fails the ones told to,
    and emits DEVICE_DELETED when the guest would let go of a device."""

    def __init__(self, fail: dict[str, VmError] | None = None,
                 replies: dict[str, Any] | None = None) -> None:
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail or {}
        self.replies = replies or {}
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None,
                  timeout_s: float = 0.0) -> Any:
        self.commands.append((command, arguments or {}))
        if command in self.fail:
            raise self.fail[command]
        if command == "device_del" and (waiter := self._waiters.get(arguments["id"])):
            waiter.set_result({"device": arguments["id"]})
        reply = self.replies.get(command, {})
        return reply(self.commands) if callable(reply) else reply

    async def pass_fd(self, name: str, fd: int) -> None:
        self.commands.append(("getfd", {"fdname": name}))

    def expect_event(self, name: str, device: str = "") -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[device] = future
        return future


def _disk(**kwargs: Any) -> DiskSpec:
    return DiskSpec("vol0", {"driver": "host_device", "filename": "/dev/loop7"}, **kwargs)


def test_disk_with_iothread_and_secret_is_added_in_order_and_the_secret_dropped() -> None:
    qemu = RecordingQemu()
    devices = Devices(qemu, SlotMap(hotplug_ports=2))
    disk = _disk(iothread=True, secret={"qom-type": "secret", "id": "vol0-key", "data": "a2V5"})
    slot = asyncio.run(devices.add_disk(disk))
    assert [c for c, _ in qemu.commands] == ["object-add", "object-add", "blockdev-add",
                                            "object-del", "device_add"]
    assert qemu.commands[0][1] == {"qom-type": "iothread", "id": "vol0-io"}
    assert qemu.commands[3][1] == {"id": "vol0-key"}
    device = qemu.commands[4][1]
    assert device["iothread"] == "vol0-io" and device["bus"] == slot.bus == "hp0"

    qemu.commands.clear()
    asyncio.run(devices.remove("vol0"))
    assert qemu.commands == [("device_del", {"id": "vol0"}),
                             ("blockdev-del", {"node-name": "vol0-node"}),
                             ("object-del", {"id": "vol0-io"})]
    assert devices.slots.hotplug("next").bus == "hp0", "the port was not given back"


def test_a_refused_disk_leaves_nothing_behind() -> None:
    qemu = RecordingQemu(fail={"device_add": VmError("refused", "GenericError")})
    devices = Devices(qemu, SlotMap(hotplug_ports=1))
    with pytest.raises(DeviceError, match="refused"):
        asyncio.run(devices.add_disk(_disk(iothread=True)))
    assert qemu.commands[-2:] == [("blockdev-del", {"node-name": "vol0-node"}),
                                  ("object-del", {"id": "vol0-io"})]
    assert devices.slots.hotplug("next").bus == "hp0"


def test_a_disk_the_guest_ejected_is_cleaned_up_on_removal() -> None:
    qemu = RecordingQemu()
    devices = Devices(qemu, SlotMap(hotplug_ports=1))
    asyncio.run(devices.add_disk(_disk()))
    qemu.fail["device_del"] = VmError("Device 'vol0' not found", "DeviceNotFound")
    asyncio.run(devices.remove("vol0"))
    assert ("blockdev-del", {"node-name": "vol0-node"}) in qemu.commands
    assert devices.slots.hotplug("next").bus == "hp0"


def test_a_device_that_will_not_go_keeps_its_slot() -> None:
    qemu = RecordingQemu()
    devices = Devices(qemu, SlotMap(hotplug_ports=1))
    asyncio.run(devices.add_disk(_disk()))
    qemu.fail["device_del"] = VmError("QMP device_del got no answer within 10s")
    with pytest.raises(DeviceError, match="cannot unplug vol0"):
        asyncio.run(devices.remove("vol0"))
    assert ("blockdev-del", {"node-name": "vol0-node"}) not in qemu.commands
    with pytest.raises(SlotError):
        devices.slots.hotplug("next")


def test_a_nic_keeps_only_its_netdev_once_qemu_took_the_fds() -> None:
    qemu = RecordingQemu()
    devices = Devices(qemu, SlotMap(hotplug_ports=1))
    nic = NicSpec("nic1", "02:00:00:00:00:01", 1500, tap_fds=(7, 8))
    asyncio.run(devices.add_nic(nic))
    assert [c for c, _ in qemu.commands] == ["getfd", "getfd", "netdev_add", "device_add"]
    assert qemu.commands[2][1]["fds"] == "nic1-tap0:nic1-tap1"
    assert qemu.commands[3][1]["mq"] is True
    qemu.commands.clear()
    asyncio.run(devices.remove("nic1"))
    assert qemu.commands == [("device_del", {"id": "nic1"}), ("netdev_del", {"id": "nic1"})]


def test_a_refused_nic_gives_its_fds_back() -> None:
    qemu = RecordingQemu(fail={"netdev_add": VmError("tap: bad fd", "GenericError")})
    devices = Devices(qemu, SlotMap(hotplug_ports=1))
    with pytest.raises(DeviceError, match="cannot hot-plug NIC nic1"):
        asyncio.run(devices.add_nic(NicSpec("nic1", "02:00:00:00:00:01", 1500, tap_fds=(7,))))
    assert qemu.commands[-1] == ("closefd", {"fdname": "nic1-tap0"})
    assert devices.slots.hotplug("next").bus == "hp0"


def test_the_shared_filesystem_is_hot_plugged_on_virtiofsd_and_taken_back_if_refused() -> None:
    qemu = RecordingQemu()
    slot = asyncio.run(Devices(qemu, SlotMap(hotplug_ports=1)).add_shared_fs(
        "fs", "/run/husk/sb/p/fs.sock", "husk-shared"))
    (chardev, chardev_args), (device, device_args) = qemu.commands
    assert chardev == "chardev-add" and chardev_args["id"] == "fs"
    assert chardev_args["backend"]["data"]["addr"]["data"]["path"] == "/run/husk/sb/p/fs.sock"
    assert device == "device_add" and device_args["driver"] == "vhost-user-fs-pci"
    assert (device_args["tag"], device_args["bus"]) == ("husk-shared", slot.bus)
    # Rings of more than a page: the guest takes them from its CMA area (split guest RAM).
    assert device_args["queue-size"] == 1024

    refused = RecordingQemu(fail={"device_add": VmError("vhost-user backend refused")})
    devices = Devices(refused, SlotMap(hotplug_ports=1))
    with pytest.raises(DeviceError, match="shared filesystem husk-shared.*refused"):
        asyncio.run(devices.add_shared_fs("fs", "/x/fs.sock", "husk-shared"))
    assert refused.commands[-1] == ("chardev-remove", {"id": "fs"})
    assert devices.slots.hotplug("next").bus == "hp0"  # the port is free again


def test_hot_added_memory_is_private_only_when_guest_ram_is_split() -> None:
    for split, backend in ((True, {"qom-type": "memory-backend-ram", "id": "dimm0-mem",
                                   "size": 256 << 20}),
                           (False, {"qom-type": "memory-backend-memfd", "id": "dimm0-mem",
                                    "size": 256 << 20, "share": True})):
        qemu = RecordingQemu()
        asyncio.run(Devices(qemu, SlotMap(hotplug_ports=1), split_ram=split).add_memory(256))
        assert qemu.commands[0] == ("object-add", backend)
