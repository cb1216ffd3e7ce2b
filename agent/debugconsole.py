"""The debug console: a process in the guest, outside every container (`husk exec`).

Like Kata's debug console, it is off unless the host turned it on at
CreateSandbox (husk.toml [debug] console). The process leads a session of its
own, so ending the console (the host went away, or the process exited)
kills everything it started.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Sequence

from agent.errors import FailedPreconditionError, InvalidArgumentError
from agent.process import Process, Reaper, spawn
from agent.stdio import PipeSet, ProcessIO

log = logging.getLogger(__name__)

DEFAULT_ARGV = ("/bin/sh",)
ARGS_MAX = 256
ARG_BYTES_MAX = 4096
# Consoles open at once; each holds a process, a pty or pipes, and a stream.
MAX_CONSOLES = 4
# After the process exits, how long output from what it left behind may still come.
OUTPUT_GRACE_S = 1.0
WINSIZE_MAX = 0xFFFF
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "HOME": "/root", "LANG": "C.UTF-8"}


def check_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """:raise InvalidArgumentError: too many or too long arguments, or a NUL."""
    if len(argv) > ARGS_MAX:
        raise InvalidArgumentError(f"debug console: {len(argv)} arguments (at most {ARGS_MAX})")
    for arg in argv:
        if len(arg.encode()) > ARG_BYTES_MAX or "\0" in arg:
            raise InvalidArgumentError(f"debug console: invalid argument {arg[:80]!r}")
    if argv and not argv[0]:
        raise InvalidArgumentError("debug console: empty program name")
    return tuple(argv) or DEFAULT_ARGV


def start(reaper: Reaper, name: str, argv: Sequence[str], tty: bool, rows: int = 0,
          columns: int = 0) -> Process:
    """Spawn ``argv`` with a pty (``tty``) or pipes, stderr merged into stdout.

    :raise InvalidArgumentError: bad arguments.
    :raise OSError: the program cannot be started (not found, not executable).
    """
    argv = check_argv(argv)
    since = time.monotonic()
    if tty:
        master, slave = os.openpty()
        try:
            pid = spawn(argv, env={**ENV, "TERM": "xterm"}, terminal=os.ttyname(slave))
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        io = ProcessIO.from_pty(name, master)
        if 0 < rows <= WINSIZE_MAX and 0 < columns <= WINSIZE_MAX:
            io.resize(rows, columns)
    else:
        pipes = PipeSet.create()
        try:
            pid = spawn(argv, stdin=pipes.child_stdin, stdout=pipes.child_stdout,
                        stderr=pipes.child_stdout, env=ENV, new_session=True)
        except BaseException:
            pipes.close_all()
            raise
        pipes.close_child_ends()
        io = pipes.to_io(name)
    return Process("", name, pid, io, reaper.watch(pid, since))


async def feed(inputs: AsyncIterator[tuple[bytes, int, int, bool]], process: Process) -> None:
    """The host's stdin, window sizes and end of stdin, to the process, until the host's end.

    Input the process no longer reads is dropped, so the host's stream is still
    read to its end (the console's end waits for it).
    """
    reads_stdin = True
    async for data, rows, columns, close in inputs:
        if data and reads_stdin:
            try:
                await process.io.stdin.write(data)
            except FailedPreconditionError as e:
                log.info("debug console %s: %s", process.exec_id, e)
                reads_stdin = False
        if 0 < rows <= WINSIZE_MAX and 0 < columns <= WINSIZE_MAX:
            process.io.resize(rows, columns)
        if close:
            process.io.stdin.close()


async def output(process: Process, chunk: int) -> AsyncIterator[bytes]:
    """The process's output until it exits (plus OUTPUT_GRACE_S for what it left behind)."""
    loop = asyncio.get_running_loop()
    process.exited.add_done_callback(
        lambda _: loop.call_later(OUTPUT_GRACE_S, process.io.stdout.close))
    while (data := await process.io.stdout.read(chunk)) is not None:
        yield data


def end(process: Process) -> None:
    """Kill the process's session if it still runs, and close its stdio."""
    if process.running:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    process.io.close()
    log.info("debug console %s ended", process.exec_id)
