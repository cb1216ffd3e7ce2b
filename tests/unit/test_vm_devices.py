"""The VM's slot map: boot-time slots, hot-plug ports handed out and taken back, PCI paths."""
from __future__ import annotations

import pytest

from shim.vm.devices import COLDPLUG_ADDRS, MAX_HOTPLUG_PORTS, SlotError, SlotMap


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
