"""A pod's direct volumes: a container mount whose source has a record becomes a disk.

For each such mount the record (shim.storage.directvolume) is claimed for the
pod, its backend is opened by QEMU and hot-plugged as a virtio-blk disk
through the VM's device model, and the agent mounts it (by PCI path) at a
guest path the container's bind mount then uses; the host never mounts it.
On the container's removal the disk is unplugged, its backend closed, its
slot freed and the claim released. Backends:

- block / lvm: QEMU's ``host_device`` on the (resolved) block device, which
  must not be in use on the host (mounted, or held by another user);
- rbd: QEMU's own librbd client (``rbd`` driver); the cephx key goes from
  the record's root-only key file to a QMP secret, deleted once the image
  is open, never onto a command line or into a file QEMU reads.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim import errors
from shim.agentclient.client import Storage
from shim.storage.directvolume import (DirectVolumes, MountInfo, VolumeRecordError,
                                       resolve_device)
from shim.storage.publish import check_key_file
from shim.vm.devices import DeviceError, Devices, DiskSpec

log = logging.getLogger(__name__)

GUEST_VOLUMES_DIR = "/run/husk/volumes"
DEFAULT_FSTYPE = "ext4"
# librbd waits client_mount_timeout (300 s by default) for unreachable
# monitors, with QEMU's main loop blocked meanwhile: a pod must fail sooner.
RBD_CONNECT_TIMEOUT_S = 10
RBD_CONF = "rbd-client.conf"
RBD_PROBE_TIMEOUT_S = RBD_CONNECT_TIMEOUT_S + 5
PROBE_SECRET_ID = "probe-key"
QEMU_IMG = "qemu-img"
MAX_KEY_BYTES = 1024
CEPH_DEFAULT_PORT = "3300"


@dataclass
class AttachedVolume:
    volume_path: str
    disk_id: str
    container_id: str
    info: MountInfo
    guest_path: str


def _monitor_entries(monitors: str) -> list[str]:
    """Split on commas outside brackets: "a:3300,[v2:b:3300/0,v1:b:6789/0]" → 2 entries."""
    entries, depth, current = [], 0, ""
    for char in monitors:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            entries.append(current)
            current = ""
        else:
            current += char
    return [e.strip() for e in [*entries, current] if e.strip()]


def _servers(monitors: str) -> list[dict[str, str]]:
    """Monitor addresses as ceph-csi or ``ceph mon dump`` write them ("10.0.0.1:3300",
    "[fd00::1]:6789", "v2:10.0.0.1:3300/0", "[v2:…:3300/0,v1:…:6789/0]") → QEMU's
    InetSocketAddressBase list (the first address of each monitor)."""
    servers = []
    for entry in _monitor_entries(monitors):
        if entry.startswith("[v"):  # one monitor's address vector: take its first
            entry = _monitor_entries(entry[1:-1])[0]
        entry = entry.removeprefix("v2:").removeprefix("v1:").split("/")[0]
        if entry.startswith("["):  # [IPv6]:port or [IPv6]
            host, _, rest = entry[1:].partition("]")
            port = rest.removeprefix(":") or CEPH_DEFAULT_PORT
        elif entry.count(":") == 1:
            host, port = entry.split(":")
        else:  # a bare host name, IPv4 or IPv6 address
            host, port = entry, CEPH_DEFAULT_PORT
        servers.append({"host": host, "port": port})
    return servers


def _read_key(path: str) -> str:
    check_key_file(path)
    with open(path, "rb") as f:
        key = f.read(MAX_KEY_BYTES + 1).decode(errors="replace").strip()
    if not key or len(key) > MAX_KEY_BYTES or any(c.isspace() for c in key):
        raise VolumeRecordError(f"key file {path} does not hold one cephx key")
    return key


async def probe_rbd(backend: dict[str, Any], key: str) -> None:
    """Open the image once in a short-lived ``qemu-img`` before QEMU does.

    QEMU opens a backend on its main loop, which freezes the VM meanwhile, and
    librbd has no deadline for OSDs that stop answering (client_mount_timeout
    covers the monitors only). A probe that opens within RBD_PROBE_TIMEOUT_S
    means QEMU's own open will too; one that does not is killed, and the VM
    never waits. The key goes through a pipe, never the command line.

    :raise DeviceError: the image did not open, with librbd's reason.
    """
    image = f"{backend.get('pool')}/{backend.get('image')}"
    spec = {"driver": "raw", "file": {**backend, "key-secret": PROBE_SECRET_ID}}
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, key.encode())
    finally:
        os.close(write_fd)
    try:
        proc = await asyncio.create_subprocess_exec(
            QEMU_IMG, "info", "--output=json", "--force-share",
            "--object", f"secret,id={PROBE_SECRET_ID},format=base64,file=/dev/fd/{read_fd}",
            "json:" + json.dumps(spec), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            pass_fds=(read_fd,))
    except OSError as exc:
        raise DeviceError(f"cannot run {QEMU_IMG} to check rbd image {image}: "
                          f"{exc.strerror}") from exc
    finally:
        os.close(read_fd)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), RBD_PROBE_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise DeviceError(f"rbd image {image} did not open within {RBD_PROBE_TIMEOUT_S} s "
                          "(monitors or OSDs not answering)") from None
    if proc.returncode != 0:
        reason = err.decode(errors="replace").strip().splitlines()[-1:] or ["no reason given"]
        raise DeviceError(f"rbd image {image}: {reason[0][:500]}")


def _check_not_in_use(device: Path) -> None:
    """An exclusive open fails while the host has it mounted or another user holds it."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise VolumeRecordError(f"device {device} is in use on the host (mounted, or "
                                    "held by another user)") from exc
        raise VolumeRecordError(f"device {device}: {exc.strerror}") from exc
    os.close(fd)


@dataclass
class PodVolumes:
    records: DirectVolumes
    sandbox_id: str
    run_dir: Path
    iothreads: bool = True  # each disk served by an I/O thread of its own
    attached: dict[str, AttachedVolume] = field(default_factory=dict)  # by volume path
    _next_disk: int = 0

    def record(self, source: str) -> MountInfo | None:
        """The record of a mount source, or None (it goes through the shared filesystem).

        :raise errors.InvalidArgumentError: a record exists but is malformed.
        """
        try:
            return self.records.get(os.path.normpath(source))
        except VolumeRecordError as exc:
            raise errors.InvalidArgumentError(f"direct volume {source}: {exc}") from exc

    async def attach(self, devices: Devices, container_id: str, source: str, info: MountInfo,
                     readonly: bool) -> Storage:
        """Hot-plug the volume for ``container_id``; the agent mounts the returned storage.

        :raise errors.InvalidArgumentError: a bad record, a missing or busy device.
        :raise errors.FailedPreconditionError: another pod holds the volume.
        :raise errors.UnavailableError: QEMU could not open or attach it (Ceph refused...).
        """
        path = os.path.normpath(source)
        if path in self.attached:
            raise errors.FailedPreconditionError(
                f"direct volume {path} is already attached for container "
                f"{self.attached[path].container_id}")
        try:
            self.records.claim(path, self.sandbox_id)
        except VolumeRecordError as exc:
            raise errors.FailedPreconditionError(str(exc)) from exc
        disk_id = f"vol{self._next_disk}"
        self._next_disk += 1
        try:
            disk = self._disk(disk_id, info, readonly)
            if disk.secret is not None:
                await probe_rbd(disk.backend, str(disk.secret["data"]))
            slot = await devices.add_disk(disk)
        except VolumeRecordError as exc:
            self.records.release(path, self.sandbox_id)
            raise errors.InvalidArgumentError(f"direct volume {path}: {exc}") from exc
        except DeviceError as exc:
            self.records.release(path, self.sandbox_id)
            raise errors.UnavailableError(f"direct volume {path} ({info.volume_type}): "
                                          f"{exc}") from exc
        guest_path = f"{GUEST_VOLUMES_DIR}/{disk_id}"
        self.attached[path] = AttachedVolume(path, disk_id, container_id, info, guest_path)
        log.info("sandbox %s: direct %s volume %s is disk %s (PCI %s) for container %s",
                 self.sandbox_id, info.volume_type, path, disk_id, slot.path, container_id)
        options = [o for o in info.options if o not in ("ro", "rw")]
        return Storage("blk", slot.path, info.fstype or DEFAULT_FSTYPE, guest_path,
                       (*options, "ro" if readonly else "rw"),
                       create_filesystem=info.create_filesystem and not readonly)

    def _disk(self, disk_id: str, info: MountInfo, readonly: bool) -> DiskSpec:
        serial = f"husk-{disk_id}"
        if info.volume_type in ("block", "lvm"):
            device = resolve_device(info)
            _check_not_in_use(device)
            backend: dict[str, Any] = {"driver": "host_device", "filename": str(device),
                                       "aio": "native", "cache": {"direct": True,
                                                                  "no-flush": False}}
            return DiskSpec(disk_id, backend, readonly, serial, iothread=self.iothreads)
        meta = info.metadata
        secret_id = f"{disk_id}-key"
        backend = {"driver": "rbd", "pool": meta["pool"], "image": meta["image"],
                   "user": meta.get("user", "admin"), "key-secret": secret_id,
                   "auth-client-required": ["cephx"], "conf": str(self._rbd_conf())}
        if servers := _servers(meta.get("monitors", "")):
            backend["server"] = servers
        if meta.get("namespace"):
            backend["namespace"] = meta["namespace"]
        if "keyFile" not in meta:
            raise VolumeRecordError("an rbd volume needs metadata keyFile (a root-only file "
                                    "with the user's cephx key)")
        secret = {"qom-type": "secret", "id": secret_id, "format": "base64",
                  "data": _read_key(meta["keyFile"])}
        return DiskSpec(disk_id, backend, readonly, serial, secret, self.iothreads)

    def _rbd_conf(self) -> Path:
        """librbd's settings for every rbd disk of this pod (no monitors: the record has them)."""
        path = self.run_dir / RBD_CONF
        if not path.exists():
            # Only the first connect: a lasting rados_mon_op_timeout would also fail
            # the monitor requests of a healthy image during an election.
            path.write_text(f"[global]\nclient_mount_timeout = {RBD_CONNECT_TIMEOUT_S}\n")
        return path

    async def detach_container(self, devices: Devices | None, container_id: str) -> None:
        """Unplug the container's disks (after the agent unmounted them); never raises."""
        for volume in [v for v in self.attached.values() if v.container_id == container_id]:
            if devices is not None:
                try:
                    await devices.remove(volume.disk_id)
                except DeviceError as exc:
                    log.error("sandbox %s: direct volume %s stays attached until the VM "
                              "stops: %s", self.sandbox_id, volume.volume_path, exc)
                    continue
            self.records.release(volume.volume_path, self.sandbox_id)
            del self.attached[volume.volume_path]
            log.info("sandbox %s: detached direct volume %s", self.sandbox_id,
                     volume.volume_path)

    def find(self, volume_path: str) -> AttachedVolume:
        """:raise errors.NotFoundError: the volume is not attached to this pod."""
        try:
            return self.attached[os.path.normpath(volume_path)]
        except KeyError:
            raise errors.NotFoundError(f"direct volume {volume_path} is not attached to "
                                       f"sandbox {self.sandbox_id}") from None

    def release_all(self) -> None:
        """The VM is gone, and its disks with it: give the volumes back."""
        for volume in list(self.attached.values()):
            with contextlib.suppress(Exception):
                self.records.release(volume.volume_path, self.sandbox_id)
        self.attached.clear()
