"""Guest mounts: the sandbox's shared filesystem and block volumes.

mount(2) and umount2(2) are called through ctypes: the guest has no mount
binary we could rely on, and a syscall gives a precise errno.

Drivers (the Storage.driver strings, as in Kata):
- ``virtio-fs``: source is the virtiofs tag, fstype virtiofs.
- ``9p``: source is the 9p mount tag, options like trans=virtio,version=9p2000.L,msize=N.
- ``blk``: source is a PCI path "port/slot" (two hex digits each, the first
  may name a function: "10.3/00") under the root bus; it is resolved to
  /dev/vdX and mounted with ``fstype``.
- ``ephemeral``: a tmpfs in guest memory (the pod's shared /dev/shm).
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.errors import DeadlineError, GuestError, InvalidArgumentError
from agent.spec import check_absolute_path

log = logging.getLogger(__name__)

BLOCK_DEVICE_WAIT_S = 10.0
BLOCK_DEVICE_POLL_S = 0.05
PCI_ROOT_BUS = "pci0000:00"
# A slot, with the function on the root bus (a root port at 00:10.3 is "10.3").
PCI_SLOT = re.compile(r"^[0-9a-fA-F]{2}(\.[0-7])?$")

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2
# A symlink put where a mount point was is not followed out of it.
UMOUNT_NOFOLLOW = 8

# Option → (flags to set, flags to clear); everything else goes to the fs as data.
FLAG_OPTIONS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0), "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0),
    "defaults": (0, 0),
}
DRIVER_FSTYPES = {"virtio-fs": "virtiofs", "9p": "9p", "blk": "", "ephemeral": "tmpfs"}
NINEP_DEFAULTS = (("trans=", "trans=virtio"), ("version=", "version=9p2000.L"))

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def split_options(options: list[str]) -> tuple[int, str]:
    """mount(8)-style options → (mount flags, fs data string)."""
    flags = 0
    data: list[str] = []
    for option in options:
        if option in FLAG_OPTIONS:
            add, clear = FLAG_OPTIONS[option]
            flags = (flags | add) & ~clear
        elif option:
            data.append(option)
    return flags, ",".join(data)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """:raise OSError: mount(2) failed (the message names source, target and type)."""
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} (type {fstype}): {os.strerror(err)}")


def umount(target: str) -> None:
    """Unmount ``target``; lazily when busy. A target that is not mounted is fine."""
    if _libc.umount2(target.encode(), UMOUNT_NOFOLLOW) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return
    if err == errno.EBUSY and _libc.umount2(target.encode(), MNT_DETACH | UMOUNT_NOFOLLOW) == 0:
        log.warning("%s was busy: detached it", target)
        return
    err = ctypes.get_errno()
    raise OSError(err, f"umount {target}: {os.strerror(err)}")


class SubmountHolds:
    """The agent's own mounts of the virtio-fs submounts its containers use.

    virtiofsd announces each host mount inside the shared directory (a
    container's rootfs, a volume) as a submount, which the guest kernel mounts
    in the namespace of whoever first crosses it: crun, in the container's. The
    container's last exit then tears that superblock down, and when a read was
    still in flight (a page fault cut short by SIGKILL) Linux 6.1 frees inodes
    under it ("VFS: Busy inodes after unmount of virtiofs"), then its completion
    worker faults on freed memory and the guest's virtio-fs is dead. Crossing
    them first here keeps each superblock until the agent lets it go, once the
    last container using it is gone.
    """

    def __init__(self) -> None:
        self._users: dict[str, set[str]] = {}

    def hold(self, container_id: str, paths: list[str]) -> None:
        """Mount here the submounts at ``paths`` (directories; anything else is skipped)."""
        for path in paths:
            if path in self._users:
                self._users[path].add(container_id)
            elif is_submount_root(path):
                self._users[path] = {container_id}
                log.debug("holding the submount at %s", path)

    def release(self, container_id: str) -> None:
        """Unmount the submounts no container but ``container_id`` used."""
        for path, users in list(self._users.items()):
            users.discard(container_id)
            if not users:
                self._let_go(path)

    def release_all(self) -> None:
        for path in list(self._users):
            self._let_go(path)

    def _let_go(self, path: str) -> None:
        del self._users[path]
        try:
            umount(path)
        except OSError as e:
            log.warning("releasing the submount: %s", e)

    @property
    def paths(self) -> list[str]:
        return sorted(self._users)


def is_submount_root(path: str) -> bool:
    """Open ``path`` as a directory (which mounts an automount there in our
    namespace) and tell whether it is the root of another mount than its parent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.fstat(fd).st_dev != os.stat(os.path.dirname(path)).st_dev
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Storage:
    """A filesystem the host asks the agent to mount (agent.proto Storage)."""

    driver: str
    source: str
    fstype: str
    options: list[str] = field(default_factory=list)
    mount_point: str = ""
    create_filesystem: bool = False

    def check(self) -> Storage:
        """:raise InvalidArgumentError: unknown driver, bad mount point or source."""
        if self.driver not in DRIVER_FSTYPES:
            raise InvalidArgumentError(
                f"storage driver {self.driver!r} is not supported (use one of "
                f"{', '.join(sorted(DRIVER_FSTYPES))})")
        check_absolute_path(self.mount_point, f"{self.driver} storage mount_point")
        if self.mount_point == "/":
            raise InvalidArgumentError("a storage cannot be mounted on /")
        if not self.source:
            raise InvalidArgumentError(f"{self.driver} storage on {self.mount_point} has no source")
        if self.driver == "blk":
            parse_pci_path(self.source)
            if not self.fstype:
                raise InvalidArgumentError(f"blk storage {self.source} needs an fstype")
            if self.create_filesystem and self.fstype not in MKFS:
                raise InvalidArgumentError(f"cannot create a {self.fstype} filesystem (the "
                                           f"guest makes {', '.join(sorted(MKFS))})")
        elif self.create_filesystem:
            raise InvalidArgumentError(f"create_filesystem needs a blk storage, not {self.driver}")
        return self


def parse_pci_path(pci_path: str) -> list[str]:
    """"02/01" → ["02", "01"]: the slot of each bridge (or port), then the device's;
    a slot may name its function ("10.3"; else function 0).

    :raise InvalidArgumentError: not slash-separated two-digit hex slots.
    """
    slots = pci_path.split("/")
    if not all(PCI_SLOT.match(s) for s in slots) or len(slots) > 8:
        raise InvalidArgumentError(f"invalid PCI path {pci_path!r}: expected e.g. '02/01'")
    return [s.lower() for s in slots]


def resolve_pci_path(pci_path: str, sysfs: Path = Path("/sys")) -> Path | None:
    """The sysfs directory of the device at ``pci_path``, or None while it is absent."""
    bus = "0000:00"
    here = sysfs / "devices" / PCI_ROOT_BUS
    slots = parse_pci_path(pci_path)
    for i, slot in enumerate(slots):
        here = here / f"{bus}:{slot if '.' in slot else slot + '.0'}"
        if not here.is_dir():
            return None
        if i < len(slots) - 1:
            # A bridge: its secondary bus is the one listed under pci_bus/.
            buses = sorted((here / "pci_bus").glob("*")) if (here / "pci_bus").is_dir() else []
            if not buses:
                return None
            bus = buses[0].name
    return here


def find_block_device(device_dir: Path) -> str | None:
    """The block device name (e.g. "vda") of a virtio-blk PCI device directory."""
    for block in sorted(device_dir.glob("virtio*/block/*")):
        return block.name
    for block in sorted(device_dir.glob("block/*")):
        return block.name
    return None


async def wait_for_block_device(pci_path: str, *, sysfs: Path = Path("/sys"),
                                devfs: Path = Path("/dev"),
                                timeout: float = BLOCK_DEVICE_WAIT_S) -> Path:
    """The /dev node of the virtio-blk disk at ``pci_path``, once it exists.

    :raise DeadlineError: it did not appear within ``timeout`` (a hotplug that
        failed, or a wrong PCI path).
    """
    deadline = time.monotonic() + timeout
    while True:
        device_dir = resolve_pci_path(pci_path, sysfs)
        name = find_block_device(device_dir) if device_dir is not None else None
        if name is not None and (devfs / name).exists():
            return devfs / name
        if time.monotonic() >= deadline:
            where = device_dir or f"{sysfs}/devices/{PCI_ROOT_BUS} (PCI path {pci_path})"
            raise DeadlineError(f"no block device appeared for PCI path {pci_path} at {where} "
                                f"within {timeout:.0f} s")
        await asyncio.sleep(BLOCK_DEVICE_POLL_S)


async def wait_for_virtiofs(*, sysfs: Path = Path("/sys"),
                            timeout: float = BLOCK_DEVICE_WAIT_S) -> None:
    """Wait until a virtio-fs device is bound to its driver (its tag is known then):
    after a restore from a template the host hot-plugs it just before CreateSandbox.

    :raise DeadlineError: none appeared within ``timeout``.
    """
    driver = sysfs / "bus" / "virtio" / "drivers" / "virtiofs"
    deadline = time.monotonic() + timeout
    while not any(driver.glob("virtio*")):
        if time.monotonic() >= deadline:
            raise DeadlineError(f"no virtio-fs device appeared within {timeout:.0f} s")
        await asyncio.sleep(BLOCK_DEVICE_POLL_S)


async def mount_virtiofs(tag: str, target: str, flags: int, data: str,
                         timeout: float = BLOCK_DEVICE_WAIT_S) -> None:
    """Mount virtio-fs ``tag``, retrying while the kernel does not know the tag yet.

    The driver's sysfs link (what wait_for_virtiofs sees) appears before the
    driver's probe registers the tag, and until then mount(2) says EINVAL; on a
    busy host (ten VMs booting) that window lasts long enough to be hit.

    :raise OSError: the last mount(2) error once ``timeout`` has passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            mount(tag, target, "virtiofs", flags, data)
            return
        except OSError as e:
            if e.errno != errno.EINVAL or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(BLOCK_DEVICE_POLL_S)


# Filesystems the guest can make and grow (e2fsprogs is in the guest image).
MKFS = {"ext4": ("mkfs.ext4", "-q", "-F"), "ext3": ("mkfs.ext3", "-q", "-F"),
        "ext2": ("mkfs.ext2", "-q", "-F")}
GROWFS = {"ext4": "resize2fs", "ext3": "resize2fs", "ext2": "resize2fs"}
BLKID_NOTHING_FOUND = 2
TOOL_TIMEOUT_S = 120.0
RESIZE_WAIT_S = 10.0
SECTOR_BYTES = 512


class Tools(Protocol):
    """The guest programs storage needs (agent.volumes runs them)."""

    async def make_filesystem_if_blank(self, device: str, fstype: str) -> None: ...


@dataclass
class MountedStorage:
    storage: Storage
    device: str

    def unmount(self) -> None:
        umount(self.storage.mount_point)
        log.info("unmounted %s", self.storage.mount_point)


async def mount_storage(storage: Storage, *, sysfs: Path = Path("/sys"),
                        devfs: Path = Path("/dev"), tools: Tools | None = None) -> MountedStorage:
    """Mount ``storage`` at its mount point (created if needed).

    :raise InvalidArgumentError: the storage is malformed.
    :raise DeadlineError: a block device did not appear.
    :raise GuestError: the mount point or mount(2) failed.
    """
    storage.check()
    options = list(storage.options)
    if storage.driver == "blk":
        source = str(await wait_for_block_device(storage.source, sysfs=sysfs, devfs=devfs))
        if storage.create_filesystem:
            if tools is None:
                raise GuestError("cannot create filesystems here (no guest tools)")
            await tools.make_filesystem_if_blank(source, storage.fstype)
    else:
        source = storage.source
        if storage.driver == "virtio-fs":
            await wait_for_virtiofs(sysfs=sysfs)
        if storage.driver == "9p":
            for prefix, default in NINEP_DEFAULTS:
                if not any(o.startswith(prefix) for o in options):
                    options.append(default)
    fstype = storage.fstype or DRIVER_FSTYPES[storage.driver]
    flags, data = split_options(options)
    try:
        os.makedirs(storage.mount_point, exist_ok=True)
        if storage.driver == "virtio-fs":
            await mount_virtiofs(source, storage.mount_point, flags, data)
        else:
            mount(source, storage.mount_point, fstype, flags, data)
    except OSError as e:
        raise GuestError(f"{storage.driver} storage {storage.source}: {e}") from e
    log.info("mounted %s %s on %s (type %s, options %s)", storage.driver, source,
             storage.mount_point, fstype, ",".join(options) or "-")
    return MountedStorage(storage, source)
