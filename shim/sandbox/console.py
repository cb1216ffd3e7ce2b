"""`husk exec`'s shim side: a management-socket stream relayed to the agent's debug console.

The operator's client sends frames (stdin, its end, window sizes); the guest's
output comes back as frames, then the exit status. The guest's bytes are
relayed, never interpreted, in frames of at most MAX_FRAME_BYTES, and the
relay waits for the client to take each before reading more from the guest
(gRPC's flow control carries the back-pressure into the VM).
"""
from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import dataclass
from typing import Any

from proto.gen import agent_pb2 as pb
from shim import errors
from shim.agentclient.client import AgentClient, ConsoleStream
from shim.sandbox.manage import MAX_FRAME_BYTES, Frame, Stream, encode_frame, read_frame
from shim.util.tasks import cancel_and_wait

log = logging.getLogger(__name__)

ARGS_MAX = 256
ARG_BYTES_MAX = 4096
WINSIZE = struct.Struct(">HH")
EXIT_STATUS = struct.Struct(">i")
# The agent says the process runs (or why not) within this long.
START_TIMEOUT_S = 30.0
# The client must take each output frame within this long, or the console ends.
CLIENT_WRITE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ConsoleRequest:
    """``{"op": "console", "argv": [...], "tty": bool, "rows": N, "columns": N}``."""

    argv: tuple[str, ...]
    tty: bool
    rows: int
    columns: int

    @classmethod
    def parse(cls, request: dict[str, Any]) -> ConsoleRequest:
        """:raise errors.InvalidArgumentError: a malformed request."""
        argv = request.get("argv", [])
        if (not isinstance(argv, list) or len(argv) > ARGS_MAX
                or not all(isinstance(a, str) and 0 < len(a.encode()) <= ARG_BYTES_MAX
                           and "\0" not in a for a in argv)):
            raise errors.InvalidArgumentError(
                f"argv must be a list of at most {ARGS_MAX} non-empty strings")
        sizes = [request.get(k, 0) for k in ("rows", "columns")]
        if not all(isinstance(v, int) and 0 <= v <= 0xFFFF for v in sizes):
            raise errors.InvalidArgumentError("rows and columns must be 0..65535")
        return cls(tuple(argv), bool(request.get("tty", False)), sizes[0], sizes[1])


async def run_console(agent: AgentClient, request: ConsoleRequest, stream: Stream,
                      name: str) -> None:
    """Start the process in the guest, relay until it exits or the client goes.

    :raise errors.HuskError: the agent refused (before the stream was accepted,
        it becomes the JSON error; after, an ERROR frame).
    """
    console = agent.debug_console()
    started = time.monotonic()
    what = " ".join(request.argv)[:200] or "a shell"
    try:
        try:
            await asyncio.wait_for(console.send(pb.ConsoleInput(
                argv=list(request.argv), tty=request.tty, rows=request.rows,
                columns=request.columns)), START_TIMEOUT_S)
            await asyncio.wait_for(console.started(), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise errors.DeadlineExceededError(
                f"the guest did not start the console within {START_TIMEOUT_S:.0f}s") from None
        log.warning("%s: debug console opened by %s: %s%s", name, stream.peer, what,
                    " (tty)" if request.tty else "")
        await stream.accept()
        upstream = asyncio.create_task(_client_to_guest(stream, console), name="console-in")
        try:
            status = await _guest_to_client(console, stream)
        finally:
            await cancel_and_wait(upstream, errors.HuskError)
        log.warning("%s: debug console (%s) exited with status %d after %.1fs", name, what,
                    status, time.monotonic() - started)
    except BaseException as exc:
        if stream.accepted:
            log.warning("%s: debug console (%s) ended after %.1fs: %s", name, what,
                        time.monotonic() - started, exc or type(exc).__name__)
        raise
    finally:
        console.cancel()  # the agent kills what is left of the process's session


async def _guest_to_client(console: ConsoleStream, stream: Stream) -> int:
    while True:
        data, status = await console.read()
        if status is not None:
            stream.writer.write(encode_frame(Frame.EXIT, EXIT_STATUS.pack(status)))
            await asyncio.wait_for(stream.writer.drain(), CLIENT_WRITE_TIMEOUT_S)
            return status
        for offset in range(0, len(data), MAX_FRAME_BYTES):
            stream.writer.write(encode_frame(Frame.OUTPUT, data[offset:offset + MAX_FRAME_BYTES]))
        await asyncio.wait_for(stream.writer.drain(), CLIENT_WRITE_TIMEOUT_S)


async def _client_to_guest(stream: Stream, console: ConsoleStream) -> None:
    """The client's frames to the agent; the client hanging up ends the console."""
    try:
        while (frame := await read_frame(stream.reader)) is not None:
            kind, payload = frame
            if kind == Frame.STDIN:
                await console.send(pb.ConsoleInput(data=payload))
            elif kind == Frame.CLOSE_STDIN:
                await console.send(pb.ConsoleInput(close_stdin=True))
            elif kind == Frame.RESIZE and len(payload) == WINSIZE.size:
                rows, columns = WINSIZE.unpack(payload)
                await console.send(pb.ConsoleInput(rows=rows, columns=columns))
            else:
                raise ValueError(f"unexpected frame {kind.name} from the client")
    except (ValueError, OSError) as exc:
        log.info("debug console client: %s", exc)
    console.cancel()
