"""The per-sandbox log files in /var/log/husk: kept after their pod for post-mortems,
pruned once old.

A live shim holds a shared flock on its own log file for its whole life, so a
pruner (another shim starting) can tell a file still written to from one left by
a shim that has exited, without reading /proc: the kernel drops the lock with the
last fd, whatever way the shim ended.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400
# However young, no more than this many exited shims' logs are kept (oldest go first).
KEEP_MAX_FILES = 1000
# Shims start by the thousand on a busy node: one of them per hour walks the directory.
PRUNE_INTERVAL_S = 3600.0
PRUNE_STAMP = ".pruned"
LOG_SUFFIX = ".log"


def hold(path: Path) -> int:
    """Open ``path`` and take the shared lock that marks it as in use; the fd is kept
    (close-on-exec) for the life of the process.

    :raise OSError: the file cannot be opened or locked.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class PruneResult:
    removed: list[str] = field(default_factory=list)
    in_use: int = 0


def prune(directory: Path, keep_days: int, *, keep_names: frozenset[str] = frozenset(),
          now: float | None = None, keep_max: int = KEEP_MAX_FILES,
          interval_s: float = PRUNE_INTERVAL_S) -> PruneResult | None:
    """Remove the logs of exited shims older than ``keep_days`` days (0: never by
    age), and the oldest beyond ``keep_max``. A file a live shim holds is never
    removed, nor one named in ``keep_names``. Runs at most once per ``interval_s``
    on the directory (a stamp file records the last run); None when skipped.
    """
    now = time.time() if now is None else now
    stamp = directory / PRUNE_STAMP
    try:
        if now - stamp.stat().st_mtime < interval_s:
            return None
    except FileNotFoundError:
        pass
    try:
        stamp.touch()
        os.utime(stamp, (now, now))
    except OSError as exc:
        log.warning("cannot record log pruning in %s: %s", stamp, exc)
        return None
    result = PruneResult()
    candidates: list[tuple[float, str]] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if (not entry.name.endswith(LOG_SUFFIX) or entry.name in keep_names
                    or not entry.is_file(follow_symlinks=False)):
                continue
            try:
                candidates.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
            except FileNotFoundError:
                continue
    candidates.sort(reverse=True)  # the newest first: they are the ones kept
    too_old = now - keep_days * SECONDS_PER_DAY if keep_days > 0 else float("-inf")
    kept = 0
    for mtime, name in candidates:
        if mtime >= too_old and kept < keep_max:
            kept += 1
            continue
        if _remove_unless_held(directory / name):
            result.removed.append(name)
        else:
            result.in_use += 1
    return result


def _remove_unless_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False  # a live shim's
            raise
        path.unlink()
        return True
    except OSError as exc:
        log.warning("cannot remove old log %s: %s", path, exc)
        return False
    finally:
        os.close(fd)
