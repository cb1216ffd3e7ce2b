"""Helper processes (QEMU, virtiofsd) owned by the shim.

Each child gets PR_SET_PDEATHSIG(SIGKILL), so it cannot outlive a shim that is
killed; its stdout and stderr go to a log file whose tail explains a failure.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 5.0
LOG_TAIL_LINES = 5

_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the shim dies (it must not outlive it)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


async def spawn(argv: list[str], log_path: Path, pass_fds: tuple[int, ...] = ()
                ) -> asyncio.subprocess.Process:
    """Start ``argv`` with stdin closed and output appended to ``log_path``.

    :raise OSError: the program cannot be executed.
    """
    with open(log_path, "ab") as out:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            pass_fds=pass_fds, preexec_fn=die_with_parent, start_new_session=True)


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
    """The last lines of a child's log, for error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])
