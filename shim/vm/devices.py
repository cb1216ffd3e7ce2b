"""Where devices sit on the VM's PCI Express tree, and the guest-side path to each.

The q35 root bus (pcie.0) has fixed devices at 0x02-0x05 (root disk, shared
filesystem, virtio-serial, vsock), free root ports for hot-plugged devices at
0x10-0x17 (eight functions per slot, so up to 64 ports), and the slots left
over for devices present at boot (NICs). One place hands out slots and names
the PCI path the agent resolves ("06" on the root bus, "10.3/00" behind the
root port at 00:10.3), so the slot a device gets and the path the guest looks
for cannot disagree.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from shim.vm.cmdline import NicSpec

log = logging.getLogger(__name__)

ROOT_BUS = "pcie.0"
HOTPLUG_PORT_PREFIX = "hp"
FIRST_HOTPLUG_PORT_ADDR = 0x10
# Root-bus slots for devices present at boot: below the root ports and above
# them, short of 0x1f (q35's LPC bridge).
COLDPLUG_ADDRS = (*range(0x06, 0x10), *range(0x18, 0x1F))
PORT_FUNCTIONS = 8
MAX_HOTPLUG_PORTS = 8 * PORT_FUNCTIONS  # slots 0x10-0x17, functions 0-7


# With split guest RAM, virtio-fs rings of more than a page come from the guest's
# CMA area in the RAM virtiofsd maps (shim.vm.cmdline.RamLayout; the DMA API takes a
# single page from anywhere); 1024 entries make both of its rings ~26 KiB. Unsplit,
# the size does not matter, and one command line for both keeps one code path.
VIRTIO_FS_QUEUE_SIZE = 1024
# QEMU answers device_add at once; the guest acknowledging an unplug (the
# DEVICE_DELETED event) takes its PCIe hot-plug handshake, seconds under TCG.
DEVICE_ADD_TIMEOUT_S = 10.0
DEVICE_DEL_TIMEOUT_S = 20.0
# Opening a backend can wait on the network (Ceph's monitors); librbd's own
# connect timeout is set lower than this (client_mount_timeout).
BACKEND_OPEN_TIMEOUT_S = 30.0


# A QMP command and its arguments that take back one step of a hot-plug.
Undo = tuple[str, dict[str, Any]]


class SlotError(Exception):
    """No free slot for another device."""


class DeviceError(Exception):
    """A device could not be hot-plugged or unplugged; the message says which and why."""


class QmpPort(Protocol):
    """What the device model needs from the VM (shim.vm.qemu.Vm)."""

    def qmp(self, command: str, arguments: dict[str, Any] | None = None,
            timeout_s: float = ...) -> Awaitable[Any]: ...
    def pass_fd(self, name: str, fd: int) -> Awaitable[None]: ...
    def expect_event(self, name: str, device: str = "") -> asyncio.Future[dict[str, Any]]: ...


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


def hotplug_port_addr(index: int) -> tuple[int, int]:
    """(slot, function) of root port ``index`` on the root bus."""
    return FIRST_HOTPLUG_PORT_ADDR + index // PORT_FUNCTIONS, index % PORT_FUNCTIONS


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
                slot, function = hotplug_port_addr(index)
                return PciSlot(hotplug_port_id(index), 0, f"{slot:02x}.{function}/00")
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
            slot, function = hotplug_port_addr(i)
            multifunction = ",multifunction=on" if function == 0 else ""
            args += ["-device", f"pcie-root-port,id={hotplug_port_id(i)},bus={ROOT_BUS},"
                                f"chassis={i + 1},slot={i + 1},addr={slot:#x}.{function}"
                                f"{multifunction}"]
        return args


@dataclass(frozen=True)
class DiskSpec:
    """A virtio-blk disk on a block backend QEMU opens (host_device, rbd...)."""

    id: str                  # the device's id; its block node is "<id>-node"
    backend: dict[str, Any]  # blockdev-add arguments without node-name
    read_only: bool = False
    serial: str = ""
    # An object-add secret the backend names (a cephx key as "data"): only read
    # while the backend opens, so deleted right after.
    secret: dict[str, Any] | None = None
    iothread: bool = False  # served by an I/O thread of its own

    @property
    def node_name(self) -> str:
        return f"{self.id}-node"

    @property
    def iothread_id(self) -> str:
        return f"{self.id}-io"


@dataclass
class Devices:
    """Hot-plug through QMP, in slots from the VM's SlotMap.

    Storage, network and resize code call this, never QMP directly, so a
    device's slot, its QEMU objects and their undo stay in one place.
    """

    vm: QmpPort
    slots: SlotMap
    # Guest RAM split into NUMA nodes (shim.vm.cmdline.RamLayout): hot-added memory is
    # private too; else shared, as virtiofsd maps all of guest RAM.
    split_ram: bool = False
    _backends: dict[str, list[Undo]] = field(default_factory=dict)

    async def add_nic(self, nic: NicSpec) -> PciSlot:
        """Hot-plug a virtio-net NIC on its tap fds (QEMU gets copies; the caller
        still owns and closes its own).

        :raise DeviceError: no free port, or QEMU refused; nothing is left added.
        """
        async def plug(slot: PciSlot, undo: list[Undo]) -> None:
            tap_names = await self._pass_fds(f"{nic.id}-tap", nic.tap_fds, undo)
            vhost_names = await self._pass_fds(f"{nic.id}-vhost", nic.vhost_fds, undo)
            netdev: dict[str, Any] = {"type": "tap", "id": nic.id, "fds": ":".join(tap_names)}
            if vhost_names:
                netdev.update(vhost=True, vhostfds=":".join(vhost_names))
            await self.vm.qmp("netdev_add", netdev, DEVICE_ADD_TIMEOUT_S)
            undo.append(("netdev_del", {"id": nic.id}))
            device: dict[str, Any] = {"driver": "virtio-net-pci", "id": nic.id, "netdev": nic.id,
                                      "mac": nic.mac, "host_mtu": nic.mtu, "romfile": "",
                                      "bus": slot.bus, "addr": "0x0"}
            if len(nic.tap_fds) > 1:
                device.update(mq=True, vectors=2 * len(nic.tap_fds) + 2)
            await self.vm.qmp("device_add", device, DEVICE_ADD_TIMEOUT_S)

        slot = await self._hotplug(nic.id, f"NIC {nic.id} ({nic.mac})", plug)
        log.info("hot-plugged NIC %s (%s) on %s (PCI path %s)", nic.id, nic.mac, slot.bus,
                 slot.path)
        return slot

    async def add_shared_fs(self, chardev: str, socket_path: str, tag: str) -> PciSlot:
        """Hot-plug a virtio-fs device (vhost-user-fs) on virtiofsd's socket.

        :raise DeviceError: no free port, virtiofsd did not take the connection, or
            QEMU refused; nothing is left added.
        """
        device_id = f"{chardev}-dev"

        async def plug(slot: PciSlot, undo: list[Undo]) -> None:
            await self.vm.qmp("chardev-add", {"id": chardev, "backend": {
                "type": "socket", "data": {"server": False, "addr": {
                    "type": "unix", "data": {"path": socket_path}}}}}, DEVICE_ADD_TIMEOUT_S)
            undo.append(("chardev-remove", {"id": chardev}))
            await self.vm.qmp("device_add", {"driver": "vhost-user-fs-pci", "id": device_id,
                                             "chardev": chardev, "tag": tag,
                                             "queue-size": VIRTIO_FS_QUEUE_SIZE,
                                             "bus": slot.bus, "addr": "0x0"}, DEVICE_ADD_TIMEOUT_S)

        slot = await self._hotplug(device_id, f"shared filesystem {tag}", plug)
        log.info("hot-plugged the shared filesystem %s on %s (PCI path %s)", tag, slot.bus,
                 slot.path)
        return slot

    async def add_disk(self, disk: DiskSpec) -> PciSlot:
        """Open the disk's backend and hot-plug a virtio-blk device on it.

        :raise DeviceError: no free port, the backend did not open (the device
            is missing, Ceph refused the key...), or QEMU refused the device;
            nothing is left added.
        """
        async def plug(slot: PciSlot, undo: list[Undo]) -> None:
            if disk.iothread:
                await self.vm.qmp("object-add", {"qom-type": "iothread", "id": disk.iothread_id},
                                  DEVICE_ADD_TIMEOUT_S)
                undo.append(("object-del", {"id": disk.iothread_id}))
            if disk.secret is not None:
                await self.vm.qmp("object-add", disk.secret, DEVICE_ADD_TIMEOUT_S)
                undo.append(("object-del", {"id": disk.secret["id"]}))
            node = {**disk.backend, "node-name": disk.node_name, "read-only": disk.read_only}
            # Queued before the add: if the add times out and completes later, the
            # delete behind it closes the backend instead of leaving it open.
            undo.append(("blockdev-del", {"node-name": disk.node_name}))
            await self.vm.qmp("blockdev-add", node, BACKEND_OPEN_TIMEOUT_S)
            if disk.secret is not None:
                secret_del = ("object-del", {"id": disk.secret["id"]})
                undo.remove(secret_del)
                await self._undo([secret_del])
            device = {"driver": "virtio-blk-pci", "id": disk.id, "drive": disk.node_name,
                      "bus": slot.bus, "addr": "0x0"}
            if disk.serial:
                device["serial"] = disk.serial
            if disk.iothread:
                device["iothread"] = disk.iothread_id
            await self.vm.qmp("device_add", device, DEVICE_ADD_TIMEOUT_S)

        slot = await self._hotplug(disk.id, f"disk {disk.id}", plug)
        log.info("hot-plugged disk %s (%s) on %s (PCI path %s)", disk.id,
                 disk.backend.get("driver"), slot.bus, slot.path)
        return slot

    async def _hotplug(self, device_id: str, what: str,
                       plug: Callable[[PciSlot, list[Undo]], Awaitable[None]]) -> PciSlot:
        """Run ``plug`` on a free port; it records the undo of each step it took. On
        failure those are undone and the port is free again."""
        try:
            slot = self.slots.hotplug(device_id)
        except SlotError as exc:
            raise DeviceError(f"{what}: {exc}") from exc
        undo: list[Undo] = []
        try:
            await plug(slot, undo)
        except Exception as exc:
            await self._undo(undo)
            self.slots.release(device_id)
            raise DeviceError(f"cannot hot-plug {what}: {exc or 'timed out'}") from exc
        # What outlives device_add: its backends. An fd passed with getfd was taken
        # by the backend that named it, and goes with it.
        self._backends[device_id] = [u for u in undo if u[0] != "closefd"]
        return slot

    async def add_vcpu(self) -> str:
        """Hot-plug one vCPU into the lowest free CPU slot; its device id. The guest
        brings it online (the agent's OnlineCPUMem).

        :raise DeviceError: every possible vCPU is present (max_vcpus), or QEMU refused.
        """
        try:
            slots = await self.vm.qmp("query-hotpluggable-cpus", None, DEVICE_ADD_TIMEOUT_S)
            free = [s for s in slots if "qom-path" not in s]
            if not free:
                raise DeviceError("every possible vCPU is present (raise [hypervisor] max_vcpus)")
            slot = min(free, key=lambda s: sorted(s["props"].items()))
            props = {k: int(v) for k, v in slot["props"].items()}
            device_id = "vcpu-" + "-".join(f"{k.removesuffix('-id')}{props[k]}"
                                           for k in sorted(props))
            await self.vm.qmp("device_add", {"driver": str(slot["type"]), "id": device_id,
                                             **props}, DEVICE_ADD_TIMEOUT_S)
        except DeviceError:
            raise
        except Exception as exc:
            raise DeviceError(f"cannot hot-plug a vCPU: {exc or 'timed out'}") from exc
        self._backends[device_id] = []
        log.info("hot-plugged vCPU %s", device_id)
        return device_id

    async def add_memory(self, size_mib: int) -> str:
        """Hot-plug a DIMM of ``size_mib`` (see ``split_ram``); its device id. The guest
        onlines it (the agent's OnlineCPUMem).

        :raise DeviceError: no free DIMM slot or address space (max_memory_mib), or
            QEMU refused.
        """
        index = next(i for i in range(len(self._backends) + 1) if f"dimm{i}" not in self._backends)
        dimm_id, memdev_id = f"dimm{index}", f"dimm{index}-mem"
        undo: list[Undo] = []
        try:
            if self.split_ram:
                backend = {"qom-type": "memory-backend-ram", "id": memdev_id,
                           "size": size_mib << 20}
            else:
                backend = {"qom-type": "memory-backend-memfd", "id": memdev_id,
                           "size": size_mib << 20, "share": True}
            await self.vm.qmp("object-add", backend, DEVICE_ADD_TIMEOUT_S)
            undo.append(("object-del", {"id": memdev_id}))
            await self.vm.qmp("device_add", {"driver": "pc-dimm", "id": dimm_id,
                                             "memdev": memdev_id}, DEVICE_ADD_TIMEOUT_S)
        except Exception as exc:
            await self._undo(undo)
            raise DeviceError(f"cannot hot-plug {size_mib} MiB of memory: "
                              f"{exc or 'timed out'}") from exc
        self._backends[dimm_id] = undo
        log.info("hot-plugged %d MiB of memory as %s", size_mib, dimm_id)
        return dimm_id

    async def resize_disk(self, disk_id: str, size_bytes: int) -> None:
        """:raise DeviceError: QEMU refused (shrinking, a backend that cannot grow)."""
        try:
            await self.vm.qmp("block_resize", {
                "node-name": f"{disk_id}-node", "size": size_bytes}, DEVICE_ADD_TIMEOUT_S)
        except Exception as exc:
            raise DeviceError(f"cannot resize disk {disk_id}: {exc or 'timed out'}") from exc

    async def remove(self, device_id: str) -> None:
        """Unplug a hot-plugged device and its backends, and free its slot.

        :raise DeviceError: QEMU refused, or the guest did not let go in time.
        """
        deleted = self.vm.expect_event("DEVICE_DELETED", device_id)
        try:
            await self.vm.qmp("device_del", {"id": device_id}, DEVICE_ADD_TIMEOUT_S)
            await asyncio.wait_for(deleted, DEVICE_DEL_TIMEOUT_S)
        except Exception as exc:
            deleted.cancel()
            # The guest can eject a device itself (PCIe slot power-off): then only
            # its backends and slot are left to give back.
            if getattr(exc, "error_class", "") != "DeviceNotFound":
                raise DeviceError(f"cannot unplug {device_id}: {exc or 'timed out'}") from exc
            log.warning("device %s was already gone (ejected by the guest)", device_id)
        await self._undo(self._backends.pop(device_id, []))
        self.slots.release(device_id)

    async def _pass_fds(self, prefix: str, fds: tuple[int, ...],
                        undo: list[Undo]) -> list[str]:
        names = []
        for i, fd in enumerate(fds):
            name = f"{prefix}{i}"
            await asyncio.wait_for(self.vm.pass_fd(name, fd), DEVICE_ADD_TIMEOUT_S)
            undo.append(("closefd", {"fdname": name}))
            names.append(name)
        return names

    async def _undo(self, undo: list[Undo]) -> None:
        for command, arguments in reversed(undo):
            try:
                await self.vm.qmp(command, arguments, DEVICE_ADD_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - the rest still goes
                log.warning("QMP %s %s: %s", command, arguments, exc)
