"""What ``delete`` cleans up after a shim daemon that is gone (killed, crashed).

It starts from files only the shim wrote in the sandbox's run dir (never
exported to the guest): the pid files of QEMU and virtiofsd, the share's
mount records and the network record (husk's tc filters, qdiscs and
port-forward rule in the pod's network namespace). A pid is killed only if that process still is ours (its
program is the one we ran and its command line names this run dir); a mount
is unmounted only if it still is the one recorded.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from shim.network.setup import clean_up_record
from shim.storage.share import SharedDir
from shim.util.mount import mounts_under

log = logging.getLogger(__name__)

KILL_WAIT_S = 5.0
# pid file (in the run dir) → what the process's program name starts with.
HELPER_PID_FILES = (("qemu.pid", "qemu-system"), ("virtiofsd.pid", "virtiofsd"))
MAX_PID_FILE_BYTES = 32
MAX_PID = 1 << 22  # the kernel's pid_max limit


@dataclass
class Cleanup:
    vm_pid: int = 0
    warnings: list[str] = field(default_factory=list)


def read_pid(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_PID_FILE_BYTES + 1).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return 0
    if len(text) > MAX_PID_FILE_BYTES or not (text.isascii() and text.isdigit()):
        return 0
    return int(text) if 0 < int(text) < MAX_PID else 0


def ours(pid: int, run_dir: Path, program: str) -> psutil.Process | None:
    """The process ``pid`` if it is a ``program`` started for ``run_dir``."""
    try:
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
    except (psutil.Error, OSError):
        return None
    if not cmdline or not os.path.basename(cmdline[0]).startswith(program):
        return None
    marker = str(run_dir) + "/"
    return proc if any(marker in arg for arg in cmdline[1:]) else None


def kill_helpers(run_dir: Path) -> Cleanup:
    result = Cleanup()
    for name, program in HELPER_PID_FILES:
        pid = read_pid(run_dir / name)
        if not pid:
            continue
        if program == "qemu-system":
            result.vm_pid = pid
        proc = ours(pid, run_dir, program)
        if proc is None:
            continue
        with contextlib.suppress(psutil.Error):
            proc.kill()
            proc.wait(KILL_WAIT_S)
        log.info("killed %s (pid %d) of %s", program, pid, run_dir.name)
    return result


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[bool]:
    """Hold the run dir's lock; yields whether the dir still exists.

    containerd runs the deletes of a dead shim's tasks at the same time: the
    sandbox's removes the run dir while a container's may still be updating
    the mount records in it.
    """
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield os.fstat(fd).st_nlink > 0
    finally:
        os.close(fd)


def clean_up(run_dir: Path, task_id: str) -> Cleanup:
    """Undo what a dead daemon left for ``task_id``: the whole sandbox, or one container."""
    with _locked(run_dir) as present:
        if not present:
            return Cleanup()
        if run_dir.name != task_id:
            SharedDir.load(run_dir).release(task_id)
            return Cleanup()
        result = kill_helpers(run_dir)
        result.warnings += clean_up_record(run_dir)  # after QEMU is gone: its taps went with it
        left = SharedDir.load(run_dir).destroy() or mounts_under(run_dir)
        if left:
            result.warnings.append(f"keeping {run_dir}: still mounted: "
                                   + ", ".join(map(str, left)))
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
        return result
