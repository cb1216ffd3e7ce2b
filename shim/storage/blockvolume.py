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

import contextlib
import errno
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
MAX_KEY_BYTES = 1024
CEPH_DEFAULT_PORT = "3300"


@dataclass
class AttachedVolume:
    volume_path: str
    disk_id: str
    container_id: str
    info: MountInfo
    guest_path: str


def _servers(monitors: str) -> list[dict[str, str]]:
    """"10.0.0.1:3300,[fd00::1]:6789" → QEMU's InetSocketAddressBase list."""
    servers = []
    for monitor in filter(None, (m.strip() for m in monitors.split(","))):
        host, sep, port = monitor.rpartition(":")
        if not sep or (host.count(":") and not host.startswith("[")):
            host, port = monitor, CEPH_DEFAULT_PORT
        servers.append({"host": host.strip("[]"), "port": port})
    return servers


def _read_key(path: str) -> str:
    check_key_file(path)
    with open(path, "rb") as f:
        key = f.read(MAX_KEY_BYTES + 1).decode(errors="replace").strip()
    if not key or len(key) > MAX_KEY_BYTES or any(c.isspace() for c in key):
        raise VolumeRecordError(f"key file {path} does not hold one cephx key")
    return key


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
            return DiskSpec(disk_id, backend, readonly, serial)
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
        return DiskSpec(disk_id, backend, readonly, serial, secret)

    def _rbd_conf(self) -> Path:
        """librbd's settings for every rbd disk of this pod (no monitors: the record has them)."""
        path = self.run_dir / RBD_CONF
        if not path.exists():
            path.write_text(f"[global]\nclient_mount_timeout = {RBD_CONNECT_TIMEOUT_S}\n"
                            f"rados_mon_op_timeout = {RBD_CONNECT_TIMEOUT_S}\n")
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
