"""`husk exec POD [-- CMD...]`: the operator's end of a pod's debug console.

Connects to the pod's management socket, asks for the "console" stream and
then relays: stdin, its end and terminal sizes up; output and the exit status
down (frames of shim.sandbox.manage). With a terminal the local tty is raw
while the console runs and is restored after, whatever happens.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import struct
import sys
import termios
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from shim import errors
from shim.sandbox.manage import (MANAGE_SOCKET, MAX_FRAME_BYTES, MAX_REQUEST_BYTES,
                                 REQUEST_TIMEOUT_S, Frame, encode_frame, read_frame)

WINSIZE = struct.Struct(">HH")
EXIT_STATUS = struct.Struct(">i")


@dataclass(frozen=True)
class ConsoleOptions:
    argv: tuple[str, ...] = ()  # empty: the guest's shell
    tty: bool = False
    stdin: bool = False


class ConsoleError(errors.HuskError):
    """The pod refused the console or the stream broke."""


def _terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdin.fileno())
    except OSError:
        return 0, 0
    return size.lines, size.columns


@contextlib.contextmanager
def raw_terminal(on: bool) -> Iterator[None]:
    """stdin's tty in raw mode (keys go to the guest as typed), restored on the way out."""
    if not on or not sys.stdin.isatty():
        yield
        return
    saved = termios.tcgetattr(sys.stdin.fileno())
    tty.setraw(sys.stdin.fileno())
    try:
        yield
    finally:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


async def run(run_dir: Path, options: ConsoleOptions, out: BinaryIO, stdin_fd: int = 0) -> int:
    """The guest process's exit status (stdin is read from ``stdin_fd`` if options.stdin).

    :raise ConsoleError: refused (the console is off, a bad command) or broken.
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(run_dir / MANAGE_SOCKET)), REQUEST_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as exc:
        raise ConsoleError(f"pod shim at {run_dir}: {exc or 'no answer'}") from None
    try:
        rows, columns = _terminal_size() if options.tty else (0, 0)
        request = {"op": "console", "argv": list(options.argv), "tty": options.tty,
                   "rows": rows, "columns": columns}
        writer.write(json.dumps(request).encode() + b"\n")
        line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
        try:
            reply = json.loads(line[:MAX_REQUEST_BYTES])
        except ValueError:
            raise ConsoleError(f"pod shim answered {line[:200]!r}") from None
        if not reply.get("ok"):
            raise ConsoleError(str(reply.get("error", "refused"))[:2000])
        with raw_terminal(options.tty):
            return await _relay(reader, writer, options, out, stdin_fd)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
        raise ConsoleError(f"the console broke: {exc or type(exc).__name__}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 options: ConsoleOptions, out: BinaryIO, stdin_fd: int) -> int:
    loop = asyncio.get_running_loop()
    upstream = (asyncio.create_task(_send_stdin(writer, stdin_fd)) if options.stdin
                else None)
    if not options.stdin:
        writer.write(encode_frame(Frame.CLOSE_STDIN))
    if options.tty and sys.stdin.isatty():
        loop.add_signal_handler(signal.SIGWINCH, lambda: writer.write(
            encode_frame(Frame.RESIZE, WINSIZE.pack(*_terminal_size()))))
    try:
        while True:
            try:
                frame = await read_frame(reader)
            except ValueError as exc:
                raise ConsoleError(f"the pod shim sent a bad frame: {exc}") from None
            if frame is None:
                raise ConsoleError("the pod shim closed the console without an exit status")
            kind, payload = frame
            if kind == Frame.OUTPUT:
                out.write(payload)
                out.flush()
            elif kind == Frame.EXIT and len(payload) == EXIT_STATUS.size:
                status: int = EXIT_STATUS.unpack(payload)[0]
                return status
            elif kind == Frame.ERROR:
                raise ConsoleError(payload.decode(errors="replace"))
            else:
                raise ConsoleError(f"the pod shim sent an unexpected {kind.name} frame")
    finally:
        if options.tty and sys.stdin.isatty():
            loop.remove_signal_handler(signal.SIGWINCH)
        if upstream is not None:
            upstream.cancel()


async def _send_stdin(writer: asyncio.StreamWriter, fd: int) -> None:
    """stdin to STDIN frames, then CLOSE_STDIN (also when stdin cannot be read)."""
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            # A file never blocks, and asyncio's pipe transport refuses one.
            while data := await asyncio.to_thread(os.read, fd, MAX_FRAME_BYTES):
                writer.write(encode_frame(Frame.STDIN, data))
                await writer.drain()
        else:
            await _send_stream(writer, fd)
    except OSError as exc:
        print(f"husk exec: reading stdin: {exc}", file=sys.stderr)
    writer.write(encode_frame(Frame.CLOSE_STDIN))
    await writer.drain()


async def _send_stream(writer: asyncio.StreamWriter, fd: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(fd), "rb", 0))
    try:
        while data := await reader.read(MAX_FRAME_BYTES):
            writer.write(encode_frame(Frame.STDIN, data))
            await writer.drain()
    finally:
        transport.close()
