"""mount(2)/umount2(2) through libc, and what /proc/self/mountinfo says is mounted."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)


def mount(source: str, target: str | Path, fstype: str = "", flags: int = 0,
          data: str = "") -> None:
    """:raise OSError: with the errno and both paths."""
    rc = _libc.mount(source.encode(), str(target).encode(), fstype.encode() or None,
                     flags, data.encode() or None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype or 'bind'}): {os.strerror(err)}")


def bind(source: str | Path, target: str | Path, readonly: bool = False) -> None:
    mount(str(source), target, flags=MS_BIND | MS_REC)
    if readonly:
        mount("", target, flags=MS_BIND | MS_REMOUNT | MS_RDONLY)


def umount(target: str | Path, lazy: bool = False) -> None:
    rc = _libc.umount2(str(target).encode(), MNT_DETACH if lazy else 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def mounts_under(root: str | Path) -> list[Path]:
    """Mount points at or below ``root``, deepest first."""
    prefix = os.path.realpath(root)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def umount_all(root: str | Path) -> list[str]:
    """Unmount everything below ``root`` (lazily as a last resort); returns failures."""
    failures = []
    for point in mounts_under(root):
        try:
            umount(point)
        except OSError:
            try:
                umount(point, lazy=True)
            except OSError as exc:
                failures.append(str(exc))
    return failures
