"""Where devices sit on the VM's PCI Express tree, and the guest-side path to each.

The q35 root bus (pcie.0) has fixed devices at 0x02-0x05 (root disk, shared
filesystem, virtio-serial, vsock), free root ports for hot-plugged devices
from 0x10 up, and the slots left over for devices present at boot (NICs).
One place hands out slots and names the PCI path the agent resolves
("06" on the root bus, "10/00" behind the root port at 0x10), so the slot a
device gets and the path the guest looks for cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ROOT_BUS = "pcie.0"
HOTPLUG_PORT_PREFIX = "hp"
FIRST_HOTPLUG_PORT_ADDR = 0x10
# Root-bus slots for devices present at boot: below the root ports and above
# them, short of 0x1f (q35's LPC bridge).
COLDPLUG_ADDRS = (*range(0x06, 0x10), *range(0x18, 0x1F))
MAX_HOTPLUG_PORTS = 8  # 0x10-0x17


class SlotError(Exception):
    """No free slot for another device."""


@dataclass(frozen=True)
class PciSlot:
    bus: str   # "pcie.0", or a root port's id ("hp0")
    addr: int  # the device's slot on that bus
    path: str  # the PCI path the agent resolves

    @property
    def qemu_args(self) -> str:
        return f"bus={self.bus},addr={self.addr:#x}"


def hotplug_port_id(index: int) -> str:
    return f"{HOTPLUG_PORT_PREFIX}{index}"


def hotplug_port_addr(index: int) -> int:
    return FIRST_HOTPLUG_PORT_ADDR + index


@dataclass
class SlotMap:
    """Free and used slots of one VM; built with its command line, lives as long as it."""

    hotplug_ports: int
    _cold_used: set[int] = field(default_factory=set)
    _ports_used: dict[int, str] = field(default_factory=dict)  # port index -> device id

    def __post_init__(self) -> None:
        if not 0 <= self.hotplug_ports <= MAX_HOTPLUG_PORTS:
            raise SlotError(f"hotplug_ports must be between 0 and {MAX_HOTPLUG_PORTS}")

    def coldplug(self) -> PciSlot:
        """A root-bus slot for a device on the command line."""
        for addr in COLDPLUG_ADDRS:
            if addr not in self._cold_used:
                self._cold_used.add(addr)
                return PciSlot(ROOT_BUS, addr, f"{addr:02x}")
        raise SlotError(f"all {len(COLDPLUG_ADDRS)} root-bus slots for boot-time devices "
                        "are taken")

    def hotplug(self, device_id: str) -> PciSlot:
        """A free root port for ``device_id``; give it back with release()."""
        for index in range(self.hotplug_ports):
            if index not in self._ports_used:
                self._ports_used[index] = device_id
                return PciSlot(hotplug_port_id(index), 0,
                               f"{hotplug_port_addr(index):02x}/00")
        raise SlotError(f"all {self.hotplug_ports} hot-plug ports are in use "
                        "(raise [hypervisor] hotplug_ports in husk.toml)")

    def release(self, device_id: str) -> None:
        for index, owner in list(self._ports_used.items()):
            if owner == device_id:
                del self._ports_used[index]

    def port_args(self) -> list[str]:
        """-device arguments for the root ports."""
        args = []
        for i in range(self.hotplug_ports):
            args += ["-device", f"pcie-root-port,id={hotplug_port_id(i)},bus={ROOT_BUS},"
                                f"chassis={i + 1},slot={i + 1},addr={hotplug_port_addr(i):#x}"]
        return args
