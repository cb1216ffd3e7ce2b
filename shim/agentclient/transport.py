"""How the shim's gRPC client reaches the agent in the guest.

- virtio-serial: QEMU listens on a unix socket for the port's host end, so the
  gRPC client dials that socket directly and QEMU moves the bytes.
- vsock: gRPC wheels cannot dial AF_VSOCK, so a local unix listener splices
  each connection to (guest CID, AGENT_VSOCK_PORT).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from shim.vm.cmdline import AGENT_VSOCK_PORT

log = logging.getLogger(__name__)

SPLICE_CHUNK = 64 * 1024
VSOCK_CONNECT_TIMEOUT_S = 2.0


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(SPLICE_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def dial_vsock(cid: int, port: int) -> Streams:
    """:raise OSError: the guest does not accept on (cid, port) (yet)."""
    vsock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    vsock.setblocking(False)
    try:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(vsock, (cid, port)), VSOCK_CONNECT_TIMEOUT_S)
        return await asyncio.open_connection(sock=vsock)
    except BaseException:
        vsock.close()
        raise


class VsockBridge:
    """Unix socket → AF_VSOCK splice for one VM."""

    def __init__(self, listen_path: Path, cid: int, port: int = AGENT_VSOCK_PORT,
                 dial: Callable[[int, int], Awaitable[Streams]] = dial_vsock) -> None:
        self.listen_path = listen_path
        self.cid = cid
        self.port = port
        self._dial = dial  # tests dial a unix socket instead
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.listen_path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.listen_path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            g_reader, g_writer = await self._dial(self.cid, self.port)
        except (OSError, asyncio.TimeoutError) as exc:
            log.debug("vsock %d:%d not reachable yet: %s", self.cid, self.port, exc)
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(_pump(reader, g_writer), _pump(g_reader, writer))
        finally:
            g_writer.close()
            writer.close()
            self._tasks.discard(task)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.listen_path.unlink(missing_ok=True)
