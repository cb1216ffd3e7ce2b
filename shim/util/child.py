"""Helper processes (QEMU, virtiofsd) owned by the shim.

Each child gets PR_SET_PDEATHSIG(SIGKILL), so it cannot outlive a shim that is
killed; its stdout and stderr go through a pipe the shim reads into a capped
log file (a guest can make QEMU and virtiofsd print), whose tail explains a failure.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from shim.util.cappedfile import CappedFile

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_THP_DISABLE = 41
STOP_GRACE_S = 5.0
LOG_TAIL_LINES = 5
# Bounds on one wakeup of a child's log pipe: the loop serves others in between.
PUMP_CHUNK_BYTES = 16 * 1024
PUMP_READS_PER_WAKEUP = 8

_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the shim dies (it must not outlive it)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _die_with_parent_without_huge_pages() -> None:
    """preexec_fn: as die_with_parent, and no transparent huge pages for the program
    (the flag survives execve, and madvise(MADV_HUGEPAGE) no longer overrides it)."""
    die_with_parent()
    _libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)


@dataclass
class _ChildLog:
    """The read end of a child's stdout/stderr pipe and the capped file it fills."""

    fd: int
    file: CappedFile


# Open child logs by path; an entry goes when its pipe reaches EOF (the child
# and every process that inherited the pipe are gone).
_logs: dict[Path, _ChildLog] = {}


def _pump(path: Path) -> None:
    """Move what is in the pipe to the file (past the cap it is read and dropped:
    a child blocked on a full stderr would stop serving its VM)."""
    entry = _logs.get(path)
    if entry is None:
        return
    for _ in range(PUMP_READS_PER_WAKEUP):
        try:
            data = os.read(entry.fd, PUMP_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("reading %s: %s", path, exc)
            data = b""
        if not data:
            _close_log(path)
            return
        try:
            entry.file.write(data)
        except OSError as exc:
            log.warning("writing %s: %s", path, exc)


def _close_log(path: Path) -> None:
    entry = _logs.pop(path, None)
    if entry is None:
        return
    with contextlib.suppress(RuntimeError, ValueError):
        asyncio.get_running_loop().remove_reader(entry.fd)
    os.close(entry.fd)
    with contextlib.suppress(OSError):
        entry.file.close()


async def spawn(argv: list[str], log_path: Path, pass_fds: tuple[int, ...] = (),
                huge_pages: bool = True) -> asyncio.subprocess.Process:
    """Start ``argv`` with stdin closed and output going to ``log_path``, capped;
    ``huge_pages=False`` keeps transparent huge pages from it.

    :raise OSError: the program cannot be executed.
    """
    _close_log(log_path)  # an earlier child's, if any
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        os.set_blocking(read_fd, False)
        capped = CappedFile(log_path, log_path.stem)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
                pass_fds=pass_fds, start_new_session=True,
                preexec_fn=die_with_parent if huge_pages else _die_with_parent_without_huge_pages)
        except BaseException:
            capped.close()
            raise
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    _logs[log_path] = _ChildLog(read_fd, capped)
    asyncio.get_running_loop().add_reader(read_fd, _pump, log_path)
    return proc


async def stop(proc: asyncio.subprocess.Process, name: str,
               sig: int = signal.SIGTERM, grace_s: float = STOP_GRACE_S) -> int:
    """Signal ``proc``, wait up to ``grace_s``, then SIGKILL; returns its status."""
    if proc.returncode is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except asyncio.TimeoutError:
            log.warning("%s (pid %d) ignored signal %d for %.0fs; killing it",
                        name, proc.pid, sig, grace_s)
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a child's log, for error messages (what is still in its pipe included)."""
    _pump(path)
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])
