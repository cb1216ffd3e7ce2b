"""The sandbox's shared directory, exported to the guest (virtio-fs or 9p).

Two directories in the sandbox's run dir (the layout Kata uses, for the same
reason):

- ``mounts/``: where the shim mounts each container's rootfs
  (``mounts/<cid>/rootfs``) and host-path volumes (``mounts/<cid>/volumes/<n>``).
  Only the shim writes here.
- ``shared/``: a read-only, no-suid/dev/exec bind of ``mounts/`` that receives
  its submounts by propagation (a slave). This is what virtiofsd serves.

So the guest can write inside the mounts it was given (a writable rootfs),
but cannot create, rename, replace or remove anything in the structure around
them. The shim itself never follows a path it did not make: targets are
opened below ``mounts/`` with openat2 (no symlinks, no mount crossed), mounted
through their fds, and every mount is recorded by mount id in
``share-mounts.json`` (the run dir is never exported), so that teardown, even
``delete`` after a dead shim, unmounts exactly what was mounted here.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from shim import errors
from shim.ids import is_valid_id
from shim.util import mount as mnt

log = logging.getLogger(__name__)

GUEST_SHARED_DIR = PurePosixPath("/run/husk/shared")
MOUNTS_DIR = "mounts"
SHARED_DIR = "shared"
ROOTFS = "rootfs"
VOLUMES = "volumes"
RECORD_FILE = "share-mounts.json"
# mount(2) copies its data argument into one page: longer overlay options are
# compacted (lowerdirs passed as /proc/self/fd/N) as containerd compacts them.
MOUNT_DATA_MAX = 4096 - 64
# The view the guest gets of the structure around its mounts.
VIEW_ATTRS = (mnt.MOUNT_ATTR_RDONLY | mnt.MOUNT_ATTR_NOSUID | mnt.MOUNT_ATTR_NODEV
              | mnt.MOUNT_ATTR_NOEXEC)
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY
_SLOT = re.compile(r"[0-9]{1,6}(-[0-9]{1,6})?")


def check_id(kind: str, value: str) -> str:
    """:raise errors.InvalidArgumentError: ``value`` is not a safe identifier."""
    if not is_valid_id(value):
        raise errors.InvalidArgumentError(f"invalid {kind} id {value!r}")
    return value


@dataclass(frozen=True)
class RootfsMount:
    """One containerd ``types.Mount`` of a container's rootfs."""

    type: str
    source: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class MountRecord:
    """A mount the shim made: its place (relative to the run dir), the kernel's id
    for it and the device/inode of its root (mount ids are reused once freed)."""

    path: str
    mount_id: int
    dev: int = 0
    ino: int = 0

    @classmethod
    def of(cls, path: str, fd: int) -> MountRecord:
        st = os.fstat(fd)
        return cls(path, mnt.mount_id(fd), st.st_dev, st.st_ino)


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


@dataclass
class SharedDir:
    run_dir: Path
    records: list[MountRecord] = field(default_factory=list)

    @property
    def mounts_dir(self) -> Path:
        return self.run_dir / MOUNTS_DIR

    @property
    def host_dir(self) -> Path:
        """The exported directory (virtiofsd's source, 9p's path)."""
        return self.run_dir / SHARED_DIR

    @classmethod
    def load(cls, run_dir: Path) -> SharedDir:
        """The share of a sandbox whose shim is gone, from its record file."""
        share = cls(run_dir)
        try:
            raw = json.loads((run_dir / RECORD_FILE).read_text())
            share.records = [MountRecord(str(r["path"]), int(r["mount_id"]), int(r["dev"]),
                                         int(r["ino"])) for r in raw]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("cannot read %s: %s; unmounting nothing", run_dir / RECORD_FILE, exc)
        return share

    # Section: setup

    def create(self) -> None:
        """Make ``mounts/`` (a shared mount of its own) and its read-only view ``shared/``.

        :raise OSError: the kernel refused a mount.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _fd(os.open(self.run_dir, _DIR_FLAGS | os.O_NOFOLLOW)) as run_fd:
            for name in (MOUNTS_DIR, SHARED_DIR):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=run_fd)
            with _fd(mnt.open_beneath(run_fd, MOUNTS_DIR, _DIR_FLAGS)) as target:
                mnt.mount(str(self.mounts_dir), mnt.fd_path(target), flags=mnt.MS_BIND)
            self._record_at(run_fd, MOUNTS_DIR)
            # Private first: the bind must not propagate to the parent's peers.
            mnt.set_propagation(self.mounts_dir, mnt.MS_PRIVATE)
            mnt.set_propagation(self.mounts_dir, mnt.MS_SHARED)
            with _fd(mnt.open_beneath(run_fd, SHARED_DIR, _DIR_FLAGS)) as target:
                mnt.bind_onto(self.mounts_dir, target, recursive=False, extra_attrs=VIEW_ATTRS,
                              propagation=mnt.MS_SLAVE)
            self._record_at(run_fd, SHARED_DIR)

    def _record_at(self, parent_fd: int, name: str, prefix: str = "") -> None:
        with _fd(os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)) as fd:
            self.records.append(MountRecord.of(f"{prefix}{name}", fd))
        self._save()

    def _save(self) -> None:
        tmp = self.run_dir / f".{RECORD_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps([asdict(r) for r in self.records]))
        tmp.replace(self.run_dir / RECORD_FILE)

    @contextlib.contextmanager
    def _mounts_root(self) -> Iterator[int]:
        """An fd on ``mounts/``, checked to be the bind this share made."""
        expected = self._record(MOUNTS_DIR)
        fd = os.open(self.mounts_dir, _DIR_FLAGS | os.O_NOFOLLOW | os.O_CLOEXEC)
        with _fd(fd):
            if expected is None or MountRecord.of(MOUNTS_DIR, fd) != expected:
                raise errors.InternalError(f"{self.mounts_dir} is not this sandbox's share")
            yield fd

    def _record(self, path: str) -> MountRecord | None:
        return next((r for r in self.records if r.path == path), None)

    @contextlib.contextmanager
    def _target(self, container_id: str, parts: tuple[str, ...], is_dir: bool
                ) -> Iterator[tuple[int, int, str]]:
        """Create ``mounts/<cid>/<parts...>`` and yield (parent fd, target fd, record path).

        Every step is a mkdirat/openat2 below the previous fd: nothing on the
        way can be a symlink, leave ``mounts/`` or be a mount already.
        """
        names = (check_id("container", container_id), *parts)
        with self._mounts_root() as root, contextlib.ExitStack() as fds:
            parent = root
            for name in names[:-1]:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=parent)
                parent = fds.enter_context(_fd(mnt.open_beneath(parent, name, _DIR_FLAGS)))
            last = names[-1]
            if is_dir:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(last, 0o700, dir_fd=parent)
            else:
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(last, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, 0o600, dir_fd=parent))
            target = fds.enter_context(_fd(mnt.open_beneath(
                parent, last, _DIR_FLAGS if is_dir else os.O_PATH)))
            yield parent, target, f"{MOUNTS_DIR}/{'/'.join(names)}"

    def _mounted(self, parent_fd: int, record_path: str) -> None:
        """Record the mount just made at ``record_path``."""
        prefix, _, name = record_path.rpartition("/")
        with _fd(os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)) as fd:
            record = MountRecord.of(record_path, fd)
        if record.mount_id == mnt.mount_id(parent_fd):
            raise OSError(errno.EINVAL, f"nothing was mounted at {record_path}")
        self.records.append(record)
        self._save()

    def guest_path(self, container_id: str, *parts: str) -> str:
        return str(GUEST_SHARED_DIR.joinpath(container_id, *parts))

    # Section: containers

    def bind_rootfs(self, container_id: str, source: Path, readonly: bool = False) -> str:
        """Share an existing directory as the container's rootfs; returns its guest path.

        :raise errors.InvalidArgumentError: ``source`` is not a directory.
        """
        if not source.is_dir():
            raise errors.InvalidArgumentError(f"rootfs {source} is not a directory")
        try:
            with self._target(container_id, (ROOTFS,), is_dir=True) as (parent, target, path):
                mnt.bind_onto(source, target, readonly=readonly)
                self._mounted(parent, path)
        except OSError as exc:
            self.release(container_id)
            raise errors.InternalError(f"cannot share rootfs: {exc}") from exc
        return self.guest_path(container_id, ROOTFS)

    def mount_rootfs(self, container_id: str, mounts: list[RootfsMount]) -> str:
        """Mount containerd's rootfs mounts (one overlay or bind) in the share.

        :raise errors.InvalidArgumentError: no mount, or more than one.
        """
        if len(mounts) != 1:
            raise errors.InvalidArgumentError(
                f"expected exactly one rootfs mount, got {len(mounts)}")
        m = mounts[0]
        try:
            with self._target(container_id, (ROOTFS,), is_dir=True) as (parent, target, path):
                if m.type == "bind" or "bind" in m.options or "rbind" in m.options:
                    mnt.bind_onto(m.source, target, readonly="ro" in m.options)
                else:
                    _mount_fs(m, mnt.fd_path(target))
                self._mounted(parent, path)
        except OSError as exc:
            self.release(container_id)
            raise errors.InternalError(f"cannot mount rootfs of {container_id}: {exc}") from exc
        return self.guest_path(container_id, ROOTFS)

    def share_path(self, container_id: str, index: int | str, source: Path,
                   readonly: bool) -> str:
        """Bind a host file or directory (a volume, /etc/hosts...) into the share.

        ``index`` names its slot: the mount's place in the spec, or "<place>-<n>" for
        the n-th mount below it. The bind is not recursive: mounts below ``source``
        get slots of their own (a recursive clone would pin their mount points in
        the host's namespace, and the host could not remove them while the pod runs).

        :raise errors.InvalidArgumentError: ``source`` does not exist.
        """
        if not _SLOT.fullmatch(str(index)):
            raise errors.InvalidArgumentError(f"invalid volume slot {index!r}")
        try:
            is_dir = stat.S_ISDIR(os.stat(source).st_mode)
        except OSError:
            raise errors.InvalidArgumentError(f"mount source {source} does not exist") from None
        try:
            with self._target(container_id, (VOLUMES, str(index)), is_dir) as (parent, target,
                                                                                path):
                mnt.bind_onto(source, target, readonly=readonly, recursive=False)
                self._mounted(parent, path)
        except OSError as exc:
            raise errors.InternalError(f"cannot share {source}: {exc}") from exc
        return self.guest_path(container_id, VOLUMES, str(index))

    # Section: teardown

    def _unmount(self, record: MountRecord) -> None:
        """Unmount ``record`` if what is there now is still that mount; otherwise leave it."""
        parent, _, name = record.path.rpartition("/")
        try:
            with _fd(os.open(self.run_dir, _DIR_FLAGS | os.O_NOFOLLOW | os.O_CLOEXEC)) as run_fd:
                resolve = mnt.RESOLVE_STRICT & ~mnt.RESOLVE_NO_XDEV  # mounts/ is a mount
                with _fd(mnt.open_beneath(run_fd, parent, _DIR_FLAGS, resolve)
                         if parent else os.dup(run_fd)) as parent_fd:
                    with _fd(os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     dir_fd=parent_fd)) as fd:
                        found = MountRecord.of(record.path, fd)
                        if found != record:
                            log.error("not unmounting %s: what is mounted there (mount %d) "
                                      "is not ours (mount %d)", record.path, found.mount_id,
                                      record.mount_id)
                            return
                        mnt.detach(fd)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.error("cannot unmount %s: %s", record.path, exc)
                return
        self.records.remove(record)

    def _unmount_below(self, prefix: str) -> None:
        below = [r for r in self.records if r.path == prefix or r.path.startswith(prefix + "/")]
        for record in sorted(below, key=lambda r: r.path.count("/"), reverse=True):
            self._unmount(record)
        self._save_if_possible()

    def _save_if_possible(self) -> None:
        try:
            self._save()
        except OSError as exc:
            log.debug("cannot update %s: %s", RECORD_FILE, exc)

    def release(self, container_id: str) -> None:
        """Unmount and remove everything shared for one container."""
        check_id("container", container_id)
        self._unmount_below(f"{MOUNTS_DIR}/{container_id}")
        try:
            with self._mounts_root() as root:
                _remove_structure(root, container_id)
        except (OSError, errors.HuskError) as exc:
            log.debug("share of %s: %s", container_id, exc)

    def destroy(self) -> list[Path]:
        """Unmount everything this share made; returns what is still mounted below it."""
        containers = {r.path.split("/")[1] for r in self.records
                      if r.path.startswith(MOUNTS_DIR + "/")}
        for container_id in sorted(containers):
            self._unmount_below(f"{MOUNTS_DIR}/{container_id}")
        self._unmount_below(SHARED_DIR)
        self._unmount_below(MOUNTS_DIR)
        left = mnt.mounts_under(self.mounts_dir) + mnt.mounts_under(self.host_dir)
        for point in left:
            log.error("leaving a mount behind: %s", point)
        return left


def _remove_structure(root_fd: int, container_id: str) -> None:
    """rmdir/unlink the entries share made for one container; never recursive.

    If something is still mounted, rmdir fails and the data below stays.
    """
    with contextlib.ExitStack() as fds:
        try:
            cdir = fds.enter_context(_fd(mnt.open_beneath(root_fd, container_id, _DIR_FLAGS)))
        except FileNotFoundError:
            return
        with contextlib.suppress(FileNotFoundError):
            vdir = fds.enter_context(_fd(os.open(VOLUMES, os.O_RDONLY | os.O_DIRECTORY
                                                 | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cdir)))
            for entry in os.listdir(vdir):
                _remove_entry(vdir, entry)
            _remove_entry(cdir, VOLUMES)
        _remove_entry(cdir, ROOTFS)
    _remove_entry(root_fd, container_id)


def _remove_entry(dir_fd: int, name: str) -> None:
    try:
        if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("leaving %s in the share: %s", name, exc)


def _mount_fs(m: RootfsMount, target: str) -> None:
    """mount(2) a filesystem (overlay) with its options, compacting long lowerdirs."""
    flags = mnt.MS_RDONLY if "ro" in m.options else 0
    options = [o for o in m.options if o not in ("ro", "rw")]
    with contextlib.ExitStack() as fds:
        data = ",".join(options)
        if len(data) > MOUNT_DATA_MAX:
            options = [_compact_lowerdir(o, fds) for o in options]
            data = ",".join(options)
        if len(data) > MOUNT_DATA_MAX:
            raise OSError(errno.E2BIG, f"{m.type} options are {len(data)} bytes even compacted")
        mnt.mount(m.source, target, m.type, flags, data)


def _compact_lowerdir(option: str, fds: contextlib.ExitStack) -> str:
    """``lowerdir=a:b:...`` → ``lowerdir=/proc/self/fd/N:...`` (fds stay open until mounted)."""
    key, eq, value = option.partition("=")
    if key != "lowerdir" or not eq:
        return option
    paths = []
    for layer in value.split(":"):
        fd = fds.enter_context(_fd(os.open(layer, _DIR_FLAGS | os.O_CLOEXEC)))
        paths.append(mnt.fd_path(fd))
    return f"lowerdir={':'.join(paths)}"
