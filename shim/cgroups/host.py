"""SandboxCgroup: puts the VM's host processes into the pod's cgroup.

containerd hands the pause container a ``linux.cgroupsPath`` (the kubelet's
pod cgroup plus the sandbox id). Like Kata's sandbox_cgroup_only, QEMU and
virtiofsd join that cgroup in every v1 controller (or the v2 unified tree),
so the pod's limits and accounting cover its VM. The guest RAM the shim writes
for a VM restored from a template is charged there too: the shim joins the
pod's memory cgroup while it writes it (memory is charged to the cgroup of the
process that allocates it, and stays there). Both cgroup drivers are
understood:

* cgroupfs: an absolute path, "/kubepods/burstable/pod<uid>/<id>";
* systemd (containerd's ``SystemdCgroup = true``): "slice:prefix:name",
  expanded the way runc's systemd driver does, e.g.
  "kubepods-burstable-pod1234.slice:cri-containerd:<id>" is
  "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/
  cri-containerd-<id>.scope".

The shim has no systemd D-Bus connection, so a systemd scope is not started
as a unit: its directory is created directly in each hierarchy, below the
slices the kubelet already made. Every part of a path is validated first
(anything odd is logged and the VM stays in the shim's cgroup), directories
are created without following symlinks, and the ones created here are
removed at teardown.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cgroupspy.controllers import Controller
from cgroupspy.nodes import Node

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1's memory.limit_in_bytes without a limit (PAGE_COUNTER_MAX pages);
# anything this large is no limit.
NO_MEMORY_LIMIT = 1 << 62
RMDIR_ATTEMPTS = 50
RMDIR_RETRY_S = 0.02
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer")

SLICE_SUFFIX = ".slice"
SCOPE_SUFFIX = ".scope"
DEFAULT_SLICE = "system.slice"  # runc's default when the slice part is empty
ROOT_SLICE = "-.slice"
# systemd's limit for a unit name (UNIT_NAME_MAX less the NUL); also within NAME_MAX.
UNIT_NAME_MAX = 255
# The characters systemd allows in unit names, less ":" (our separator).
_UNIT_CHARS = re.compile(r"[A-Za-z0-9_.\\-]+")
CGROUP_DIR_MODE = 0o755


class CgroupPathError(ValueError):
    """A ``linux.cgroupsPath`` this module will not follow."""


def _check_unit_part(what: str, value: str) -> None:
    if not value:
        raise CgroupPathError(f"empty {what}")
    if len(value) > UNIT_NAME_MAX:
        raise CgroupPathError(f"{what} longer than {UNIT_NAME_MAX} characters")
    if "/" in value or ".." in value:
        raise CgroupPathError(f"{what} {value!r} contains '/' or '..'")
    if not _UNIT_CHARS.fullmatch(value):
        raise CgroupPathError(f"{what} {value!r} has characters systemd does not allow")


def expand_slice(slice_name: str) -> PurePosixPath:
    """A slice's cgroup path: "a-b-c.slice" is /a.slice/a-b.slice/a-b-c.slice.

    Each "-" in a slice name nests it in a parent slice; "-.slice" is the root.

    :raise CgroupPathError: not a valid slice name.
    """
    _check_unit_part("slice", slice_name)
    if not slice_name.endswith(SLICE_SUFFIX) or slice_name == SLICE_SUFFIX:
        raise CgroupPathError(f"slice {slice_name!r} does not end in {SLICE_SUFFIX}")
    if slice_name == ROOT_SLICE:
        return PurePosixPath("/")
    path = PurePosixPath("/")
    prefix = ""
    for component in slice_name[:-len(SLICE_SUFFIX)].split("-"):
        if not component:  # "-a.slice", "a--b.slice", "a-.slice"
            raise CgroupPathError(f"slice {slice_name!r} has an empty component")
        path /= f"{prefix}{component}{SLICE_SUFFIX}"
        prefix += f"{component}-"
    return path


def expand_systemd_path(cgroups_path: str) -> PurePosixPath:
    """The cgroup path of a systemd-style "slice:prefix:name".

    The unit is the scope "<prefix>-<name>.scope", or ``name`` itself when it
    is a slice; an empty slice means system.slice (both as in runc).

    :raise CgroupPathError: not three parts, or a part is invalid.
    """
    parts = cgroups_path.split(":")
    if len(parts) != 3:
        raise CgroupPathError(f"expected slice:prefix:name, got {len(parts)} parts")
    slice_name, prefix, name = parts
    parent = expand_slice(slice_name or DEFAULT_SLICE)
    _check_unit_part("name", name)
    if name.endswith(SLICE_SUFFIX):
        if name == ROOT_SLICE:
            raise CgroupPathError("the root slice cannot be a container's unit")
        expand_slice(name)  # validated as a slice, placed as is under the parent
        unit = name
    else:
        _check_unit_part("prefix", prefix)
        unit = f"{prefix}-{name}{SCOPE_SUFFIX}"
        _check_unit_part("unit", unit)
    return parent / unit


def _controller(path: Path) -> Controller:
    """cgroupspy's controller for an existing directory below CGROUP_ROOT.

    cgroupspy has no class for some v1 controllers (pids, freezer) nor for v2;
    their generic files (cgroup.procs) are the same, so the base class serves.
    """
    node = Node(bytes(CGROUP_ROOT) + b"/")
    for part in path.relative_to(CGROUP_ROOT).parts:
        node = Node(part.encode(), parent=node)
    return node.controller or Controller(node)


def cgroup_layout() -> str:
    """"v2" (unified), "hybrid" (v1 controllers and a cgroup2 at ./unified), "v1" or "none"."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return "v2"
    if not any((CGROUP_ROOT / c / "tasks").exists() for c in V1_CONTROLLERS):
        return "none"
    return "hybrid" if (CGROUP_ROOT / "unified" / "cgroup.controllers").exists() else "v1"


def _hierarchies() -> list[Path]:
    """v1 controller mount points, or the v2 root when the host is unified.

    On a hybrid host (v1 controllers plus an empty cgroup2 at ./unified) the
    v1 controllers are what limit and account, so those are joined.
    """
    if cgroup_layout() == "v2":
        return [CGROUP_ROOT]
    return [CGROUP_ROOT / c for c in V1_CONTROLLERS if (CGROUP_ROOT / c / "tasks").exists()]


def _memory_hierarchy() -> tuple[Path, str] | None:
    """Where memory is charged: the memory controller's hierarchy (the v2 root when
    unified) and this process's cgroup in it; None without a memory controller."""
    unified = cgroup_layout() == "v2"
    hierarchy = CGROUP_ROOT if unified else CGROUP_ROOT / "memory"
    if not (hierarchy / "cgroup.procs").exists():
        return None
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if (unified and controllers == "") or (not unified and "memory" in controllers.split(",")):
                return hierarchy, path
    return None


def _move_self(cgroup: Path) -> bool:
    """Move this process (all its threads) into ``cgroup``; False (logged) when it cannot."""
    try:
        _controller(cgroup).procs = [os.getpid()]
        return True
    except OSError as exc:
        log.warning("cannot move the shim back to cgroup %s: %s", cgroup, exc)
        return False


def _has_child_cgroups(path: Path) -> bool:
    try:
        return any(entry.is_dir(follow_symlinks=False) for entry in os.scandir(path))
    except OSError:
        return False


def _copy_file(name: str, src_dir: int, dst_dir: int) -> None:
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        value = os.read(src, 4096)
    finally:
        os.close(src)
    dst = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dst_dir)
    try:
        os.write(dst, value)
    finally:
        os.close(dst)


@dataclass
class SandboxCgroup:
    path: str  # below each hierarchy's root, e.g. "/kubepods/pod1/<id>"
    _created: list[Path] = field(default_factory=list)
    # Where the shim belongs when charging_memory() could not move it back: the
    # pod's memory cgroup cannot be removed while the shim is in it.
    _shim_home: Path | None = None

    @classmethod
    def from_spec_path(cls, cgroups_path: str) -> "SandboxCgroup | None":
        """The cgroup for a spec's ``linux.cgroupsPath``, or None to leave the VM alone."""
        if not cgroups_path:
            return None
        if cgroups_path.startswith("/"):
            clean = PurePosixPath(os.path.normpath(cgroups_path))
            if ".." in clean.parts or clean == PurePosixPath("/"):
                log.warning("cgroup path %r is not a pod's cgroup; the VM stays in the "
                            "shim's cgroup", cgroups_path)
                return None
            return cls(str(clean))
        if ":" not in cgroups_path:
            log.warning("cgroup path %r is neither absolute nor slice:prefix:name; "
                        "the VM stays in the shim's cgroup", cgroups_path)
            return None
        try:
            expanded = expand_systemd_path(cgroups_path)
        except CgroupPathError as exc:
            log.warning("invalid systemd cgroup path %r (%s); the VM stays in the shim's cgroup",
                        cgroups_path, exc)
            return None
        log.debug("systemd cgroup path %r is %s", cgroups_path, expanded)
        return cls(str(expanded))

    def join(self, pids: list[int]) -> None:
        """Create the cgroup where missing and move ``pids`` into it (best effort)."""
        relative = PurePosixPath(self.path.lstrip("/"))
        for hierarchy in _hierarchies():
            target = hierarchy / relative
            try:
                self._mkdirs(hierarchy, relative)
                # _mkdirs checked every level is a real directory; cgroupfs itself
                # cannot hold symlinks, so the path stays what was checked.
                controller = _controller(target)
                for pid in pids:
                    if pid:
                        controller.procs = [pid]  # one write per pid: the kernel takes one
            except OSError as exc:
                log.warning("cannot put the VM into cgroup %s: %s", target, exc)

    def memory_headroom(self) -> int | None:
        """Bytes this cgroup may still be charged before a limit (its own or an
        ancestor's) is reached; None when nothing limits it (or it cannot be read)."""
        where = _memory_hierarchy()
        if where is None:
            return None
        hierarchy = where[0]
        unified = hierarchy == CGROUP_ROOT
        limit_file, usage_file = (("memory.max", "memory.current") if unified
                                  else ("memory.limit_in_bytes", "memory.usage_in_bytes"))
        headroom: int | None = None
        level = hierarchy / self.path.lstrip("/")
        while level != hierarchy and level.is_relative_to(hierarchy):
            try:
                text = (level / limit_file).read_text().strip()
                # v1 writes "no limit" as a huge page-aligned number, v2 as "max".
                limit = NO_MEMORY_LIMIT if text == "max" else int(text)
                usage = int((level / usage_file).read_text())
            except (OSError, ValueError):
                limit = NO_MEMORY_LIMIT  # not made yet: its parent's limit applies
            if limit < NO_MEMORY_LIMIT:
                room = max(limit - usage, 0)
                headroom = room if headroom is None else min(headroom, room)
            level = level.parent
        return headroom

    @contextlib.contextmanager
    def charging_memory(self) -> Iterator[None]:
        """Memory this process allocates meanwhile (a restored VM's guest RAM, written
        into QEMU's memfd) is charged to this cgroup: the shim joins its memory cgroup
        (with all of its threads) and goes back to its own after. Best effort: when
        it cannot, the memory is charged to the shim's cgroup (logged)."""
        where = _memory_hierarchy()
        if where is None:
            yield
            return
        hierarchy, own = where
        relative = PurePosixPath(self.path.lstrip("/"))
        target = hierarchy / relative
        try:
            self._mkdirs(hierarchy, relative)
            _controller(target).procs = [os.getpid()]
        except OSError as exc:
            log.warning("cannot charge the guest RAM to cgroup %s (it stays with the "
                        "shim's): %s", target, exc)
            yield
            return
        try:
            yield
        finally:
            back = hierarchy / own.lstrip("/")
            if not _move_self(back):
                self._shim_home = back  # remove() tries again

    def _mkdirs(self, hierarchy: Path, relative: PurePosixPath) -> None:
        """Create ``hierarchy/relative`` level by level, never leaving the hierarchy.

        Each level is opened relative to its parent's fd with O_NOFOLLOW, so a
        symlink (or a file) anywhere below the hierarchy fails the walk instead
        of being followed. Directories made here are recorded for remove().

        :raise OSError: a level cannot be created or is not a plain directory.
        """
        is_cpuset = (hierarchy / "cpuset.cpus").exists() and hierarchy != CGROUP_ROOT
        fd = os.open(hierarchy, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            current = hierarchy
            for part in relative.parts:
                if part in ("", ".", "..", "/") or "/" in part:
                    raise OSError(errno.EINVAL, f"bad cgroup path component {part!r}")
                current = current / part
                try:
                    os.mkdir(part, CGROUP_DIR_MODE, dir_fd=fd)
                    created = True
                except FileExistsError:
                    created = False
                if created:
                    self._created.append(current)
                try:
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                    | os.O_CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise OSError(exc.errno, f"{current} is not a directory "
                                      "(a symlink or a file); not following it") from exc
                    raise
                try:
                    if created and is_cpuset:
                        # A v1 cpuset cgroup is unusable until it has cpus and mems.
                        for name in ("cpuset.cpus", "cpuset.mems"):
                            _copy_file(name, fd, child)
                except BaseException:
                    os.close(child)
                    raise
                os.close(fd)
                fd = child
        finally:
            os.close(fd)

    def remove(self) -> None:
        """Remove the directories join() created (empty once the VM is gone)."""
        if self._shim_home is not None and _move_self(self._shim_home):
            self._shim_home = None
        for d in sorted(self._created, key=lambda p: len(p.parts), reverse=True):
            for attempt in range(RMDIR_ATTEMPTS):
                try:
                    d.rmdir()
                    break
                except OSError as exc:
                    if exc.errno == errno.EBUSY and _has_child_cgroups(d):
                        # A parent made here that others use now (another pod's
                        # cgroup below it): theirs to remove, no point waiting.
                        log.info("cgroup %s still has child cgroups; left in place", d)
                        break
                    # A just-reaped process can keep the cgroup busy for a moment.
                    if exc.errno != errno.EBUSY or attempt == RMDIR_ATTEMPTS - 1:
                        log.warning("cannot remove cgroup %s: %s", d, exc)
                        break
                    time.sleep(RMDIR_RETRY_S)
        self._created = []
