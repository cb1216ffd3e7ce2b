"""The sandbox's shared directory, exported to the guest (virtio-fs or 9p).

Host ``<sandbox run dir>/shared/<container id>/rootfs`` appears in the guest
as ``GUEST_SHARED_DIR/<container id>/rootfs``. Container rootfs and host-path
volumes are bind-mounted (or, for containerd's snapshot mounts, mounted)
below it; release() undoes all of it for one container.
"""
from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from shim import errors
from shim.util import mount as mnt

log = logging.getLogger(__name__)

GUEST_SHARED_DIR = PurePosixPath("/run/husk/shared")
# containerd ids are [A-Za-z0-9][A-Za-z0-9_.-]*; also what we accept as a dir name.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_id(kind: str, value: str) -> str:
    """:raise errors.InvalidArgumentError: ``value`` is not a safe identifier."""
    if not _ID.match(value):
        raise errors.InvalidArgumentError(f"invalid {kind} id {value!r}")
    return value


@dataclass(frozen=True)
class RootfsMount:
    """One containerd ``types.Mount`` of a container's rootfs."""

    type: str
    source: str
    options: tuple[str, ...] = ()


class SharedDir:
    def __init__(self, host_dir: Path) -> None:
        self.host_dir = host_dir

    def create(self) -> None:
        self.host_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def container_dir(self, container_id: str) -> Path:
        return self.host_dir / check_id("container", container_id)

    def rootfs(self, container_id: str) -> Path:
        return self.container_dir(container_id) / "rootfs"

    def guest_path(self, host_path: Path) -> str:
        """The guest's path for a file below the shared directory."""
        return str(GUEST_SHARED_DIR / host_path.relative_to(self.host_dir))

    def bind_rootfs(self, container_id: str, source: Path, readonly: bool = False) -> str:
        """Share an existing directory as the container's rootfs; returns its guest path.

        :raise errors.InvalidArgumentError: ``source`` is not a directory.
        """
        if not source.is_dir():
            raise errors.InvalidArgumentError(f"rootfs {source} is not a directory")
        target = self.rootfs(container_id)
        target.mkdir(parents=True, exist_ok=True)
        try:
            mnt.bind(source, target, readonly=readonly)
        except OSError as exc:
            self.release(container_id)
            raise errors.InternalError(f"cannot share rootfs: {exc}") from exc
        return self.guest_path(target)

    def mount_rootfs(self, container_id: str, mounts: list[RootfsMount]) -> str:
        """Mount containerd's rootfs mounts (one overlay or bind) in the share.

        :raise errors.InvalidArgumentError: no mount, or more than one.
        """
        if len(mounts) != 1:
            raise errors.InvalidArgumentError(
                f"expected exactly one rootfs mount, got {len(mounts)}")
        m = mounts[0]
        target = self.rootfs(container_id)
        target.mkdir(parents=True, exist_ok=True)
        try:
            if m.type == "bind" or "bind" in m.options or "rbind" in m.options:
                mnt.bind(m.source, target, readonly="ro" in m.options)
            else:
                data = ",".join(o for o in m.options if o not in ("ro", "rw"))
                flags = mnt.MS_RDONLY if "ro" in m.options else 0
                mnt.mount(m.source, target, m.type, flags, data)
        except OSError as exc:
            self.release(container_id)
            raise errors.InternalError(f"cannot mount rootfs of {container_id}: {exc}") from exc
        return self.guest_path(target)

    def share_path(self, container_id: str, index: int, source: Path,
                   readonly: bool) -> str:
        """Bind a host file or directory (a volume, /etc/hosts...) into the share.

        :raise errors.InvalidArgumentError: ``source`` does not exist.
        """
        if not source.exists():
            raise errors.InvalidArgumentError(f"mount source {source} does not exist")
        target = self.container_dir(container_id) / "mounts" / str(index)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.touch(exist_ok=True)
        try:
            mnt.bind(source, target, readonly=readonly)
        except OSError as exc:
            raise errors.InternalError(f"cannot share {source}: {exc}") from exc
        return self.guest_path(target)

    def release(self, container_id: str) -> None:
        """Unmount and remove everything shared for one container."""
        cdir = self.container_dir(container_id)
        if not cdir.exists():
            return
        for failure in mnt.umount_all(cdir):
            log.error("leaving a mount behind: %s", failure)
        shutil.rmtree(cdir, ignore_errors=True)

    def destroy(self) -> None:
        if not self.host_dir.exists():
            return
        for failure in mnt.umount_all(self.host_dir):
            log.error("leaving a mount behind: %s", failure)
        shutil.rmtree(self.host_dir, ignore_errors=True)
