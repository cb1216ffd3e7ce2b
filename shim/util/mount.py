"""Mounting without following paths someone else can change.

The shim mounts into directories that a hostile guest can see (through the
shared filesystem), so every target is an fd: opened with openat2(2)
(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, never crossing a mount), mounted
through /proc/self/fd/N or with the mount API (open_tree, mount_setattr,
move_mount), and unmounted only after its mount id matched the one recorded
when it was made. Python has no bindings for these syscalls: ctypes.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

# Syscalls numbered 424 and up are the same on every Linux architecture.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
# What every lookup below a directory the guest can see must obey.
RESOLVE_STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def open_beneath(dir_fd: int, relative: str, flags: int = os.O_PATH,
                 resolve: int = RESOLVE_STRICT, mode: int = 0) -> int:
    """openat2(2): ``relative`` below ``dir_fd``; no symlink, no "..", no mount crossed.

    :raise OSError: ELOOP for a symlink, EXDEV for an escape or a mount on the way.
    """
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    return _check(_libc.syscall(_SYS_OPENAT2, dir_fd, relative.encode(), ctypes.byref(how),
                                ctypes.sizeof(how)), f"open {relative}")


def mount_id(fd: int) -> int:
    """The id of the mount ``fd`` lives on (as /proc/self/mountinfo numbers them)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(f"no mnt_id for fd {fd}")


def mount(source: str, target: str | Path, fstype: str = "", flags: int = 0,
          data: str = "") -> None:
    """mount(2); pass ``fd_path(fd)`` as the target to mount on an opened directory.

    :raise OSError: with the errno and both paths.
    """
    rc = _libc.mount(source.encode(), str(target).encode(), fstype.encode() or None,
                     flags, data.encode() or None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype or 'bind'}): {os.strerror(err)}")


def set_propagation(target: str | Path, flag: int) -> None:
    mount("", target, flags=flag)


def bind_onto(source: str | Path, target_fd: int, readonly: bool = False,
              recursive: bool = True, extra_attrs: int = 0,
              propagation: int = 0) -> None:
    """Bind ``source`` onto the opened directory or file ``target_fd``.

    The clone gets its attributes before it is attached (open_tree, then
    mount_setattr, then move_mount), so a copy that propagates to a slave
    (the guest's read-only view) is read-only from its first moment. ``ro``
    applies to the top mount only, as runc's non-recursive ``ro`` does.

    :raise OSError: the source cannot be cloned or the target not mounted on.
    """
    flags = _OPEN_TREE_CLONE | os.O_CLOEXEC | (_AT_RECURSIVE if recursive else 0)
    tree = _check(_libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, str(source).encode(), flags),
                  f"clone {source}")
    try:
        attrs = (MOUNT_ATTR_RDONLY if readonly else 0) | extra_attrs
        if attrs or propagation:
            attr = _MountAttr(attrs, 0, propagation, 0)
            _check(_libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH,
                                 ctypes.byref(attr), ctypes.sizeof(attr)),
                   f"set attributes of {source}")
        _check(_libc.syscall(_SYS_MOVE_MOUNT, tree, b"", target_fd, b"",
                             _MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH),
               f"bind {source}")
    finally:
        os.close(tree)


def detach(fd: int) -> None:
    """Lazily unmount the mount whose root ``fd`` is (the fd keeps it until closed)."""
    if _libc.umount2(fd_path(fd).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount: {os.strerror(err)}")


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    point: str
    readonly: bool = False


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def mount_table() -> list[MountEntry]:
    with open("/proc/self/mountinfo") as f:
        return [MountEntry(int(fields[0]), _unescape(fields[4]), "ro" in fields[5].split(","))
                for fields in (line.split() for line in f)]


def submounts(root: str | Path) -> list[MountEntry]:
    """The mounts strictly below ``root`` (as the kernel names them), shallowest first."""
    prefix = os.path.normpath(str(root)) + "/"
    below = [m for m in mount_table() if m.point.startswith(prefix)]
    return sorted(below, key=lambda m: m.point.count("/"))


def mounts_under(root: str | Path) -> list[Path]:
    """Mount points at or below ``root`` as the kernel names them, deepest first.

    ``root`` is compared as given, never resolved: resolving a path that
    a guest may have replaced by a symlink is how "/" ends up in the list.
    """
    prefix = os.path.normpath(str(root))
    found = [Path(m.point) for m in mount_table()
             if m.point == prefix or m.point.startswith(prefix + "/")]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)
