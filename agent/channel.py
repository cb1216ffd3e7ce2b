"""The transport bridge: bytes between the host and the local gRPC socket.

gRPC serves on a unix socket; this module splices a host connection to it.

- serial: the virtio-serial port ``io.husk.agent`` (/dev/vportNpM). The port
  is one long-lived fd whose host end comes and goes: while the host is not
  connected read() returns 0 and poll() reports POLLHUP. Each host session gets
  a fresh local connection (so a reconnecting host starts a fresh HTTP/2
  connection); when the host goes away that local connection is closed and
  the bridge waits for the host to come back.
- vsock: listen on AF_VSOCK (CID_ANY, port 1024); one local connection per
  accepted connection.

Also here: sending log lines to the ``io.husk.log`` port.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
from pathlib import Path

from agent.stdio import wait_fd

log = logging.getLogger(__name__)

AGENT_PORT_NAME = "io.husk.agent"
LOG_PORT_NAME = "io.husk.log"
VSOCK_PORT = 1024
SPLICE_CHUNK = 64 * 1024
# While the host is away the port reports POLLHUP continuously, so it is
# polled: quickly at first (first-connect latency), backing off to a slow poll.
HOST_POLL_MIN_S = 0.005
HOST_POLL_MAX_S = 0.1
PORT_WAIT_LOG_EVERY_S = 10.0
VSOCK_BACKLOG = 16


def find_virtio_port(name: str, sysfs_class: Path = Path("/sys/class/virtio-ports"),
                     devfs: Path = Path("/dev")) -> Path | None:
    """The /dev node of the virtio-serial port called ``name``, if it exists."""
    try:
        ports = sorted(sysfs_class.iterdir())
    except OSError:
        return None
    for port in ports:
        try:
            if (port / "name").read_text().strip() == name:
                return devfs / port.name
        except OSError:
            continue
    return None


async def wait_for_port(name: str, sysfs_class: Path = Path("/sys/class/virtio-ports"),
                        devfs: Path = Path("/dev")) -> Path:
    """Wait (forever, logging now and then) until the port and its /dev node exist."""
    loop = asyncio.get_running_loop()
    last_log = loop.time()
    while True:
        path = find_virtio_port(name, sysfs_class, devfs)
        if path is not None and path.exists():
            return path
        if loop.time() - last_log >= PORT_WAIT_LOG_EVERY_S:
            log.warning("still waiting for virtio port %s", name)
            last_log = loop.time()
        await asyncio.sleep(HOST_POLL_MAX_S)


async def _connect_local(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock


class SerialBridge:
    """Splices host sessions on a virtio-serial port to the local gRPC socket."""

    def __init__(self, port: Path | int, local_path: str) -> None:
        """:param port: the port's /dev path, or an open fd (duplicated; tests pass a pty)."""
        self.port = port
        self.local_path = local_path
        self.sessions = 0  # host sessions served so far
        self.in_session = False
        self._fd: int | None = None

    async def run(self) -> None:
        """Serve host sessions until cancelled."""
        if isinstance(self.port, int):
            self._fd = os.dup(self.port)
            os.set_blocking(self._fd, False)
        else:
            self._fd = os.open(self.port, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY)
        log.info("bridging %s to %s", self.port, self.local_path)
        try:
            while True:
                first = await self._wait_for_host()
                self.sessions += 1
                log.info("host session %d on %s", self.sessions, self.port)
                self.in_session = True
                try:
                    await self._session(first)
                finally:
                    self.in_session = False
                log.info("host session %d ended", self.sessions)
        finally:
            os.close(self._fd)
            self._fd = None

    def _read(self) -> bytes | None:
        """Port bytes; b"" when the host is not connected, None when nothing is there."""
        assert self._fd is not None
        try:
            return os.read(self._fd, SPLICE_CHUNK)
        except BlockingIOError:
            return None
        except OSError as e:
            # A pty standing in for the port (tests) reads EIO while its host end is closed.
            if e.errno == errno.EIO:
                return b""
            raise

    def _poll(self) -> int:
        poller = select.poll()
        assert self._fd is not None
        poller.register(self._fd, select.POLLIN)
        events = poller.poll(0)
        return events[0][1] if events else 0

    async def _wait_for_host(self) -> bytes:
        """Wait for a host session to start; returns its first bytes.

        Only once the port no longer reports POLLHUP: a new host's first bytes can
        reach the guest before its kernel has handled that host's "port open"
        message (another queue, seen with restored guests under load); read then
        returns them and next 0, as if the host had left, and the session would
        end under the host's HTTP/2 handshake (gRPC gives up on it after 20 s).
        """
        assert self._fd is not None
        delay = HOST_POLL_MIN_S
        while True:
            events = self._poll()
            if not events & select.POLLHUP:
                if not events & select.POLLIN:
                    await wait_fd(self._fd)  # connected and quiet: sleep in epoll
                    continue
                data = self._read()
                if data:
                    return data
                continue  # nothing after all, or the host left meanwhile
            # The host is away (or not yet known to be there): POLLHUP is
            # level-triggered, so poll with a sleep.
            await asyncio.sleep(delay)
            delay = min(delay * 2, HOST_POLL_MAX_S)

    async def _session(self, first: bytes) -> None:
        try:
            local = await _connect_local(self.local_path)
        except OSError as e:
            log.error("cannot reach the gRPC socket %s: %s", self.local_path, e)
            await self._drain_until_hangup()
            return
        host_left = False
        try:
            await asyncio.get_running_loop().sock_sendall(local, first)
            up = asyncio.create_task(self._port_to_local(local))
            down = asyncio.create_task(self._local_to_port(local))
            try:
                done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (up, down):
                    task.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
            # up returns (rather than fails) exactly when the host hung up.
            host_left = up in done and up.exception() is None
        except OSError as e:
            log.warning("host session %d: %s", self.sessions, e)
        finally:
            local.close()
        if not host_left:
            # The local side ended while the host is still there: drop the host's
            # bytes until it hangs up, so that its next session starts clean.
            await self._drain_until_hangup()

    async def _port_to_local(self, local: socket.socket) -> None:
        assert self._fd is not None
        loop = asyncio.get_running_loop()
        while True:
            await wait_fd(self._fd)
            data = self._read()
            if data is None:
                continue
            if not data:
                return  # the host disconnected
            await loop.sock_sendall(local, data)

    async def _local_to_port(self, local: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while data := await loop.sock_recv(local, SPLICE_CHUNK):
            await self._write_port(data)

    async def _write_port(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                # Also what a port without a host does: the reader sees the hangup.
                await wait_fd(self._fd, write=True)
                continue
            view = view[n:]

    async def _drain_until_hangup(self) -> None:
        assert self._fd is not None
        while True:
            await wait_fd(self._fd)
            data = self._read()
            if data == b"":
                return


async def _pump(src: socket.socket, dst: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    while data := await loop.sock_recv(src, SPLICE_CHUNK):
        await loop.sock_sendall(dst, data)


async def splice_sockets(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until either side closes; then close both."""
    tasks = [asyncio.create_task(_pump(a, b)), asyncio.create_task(_pump(b, a))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        a.close()
        b.close()


class VsockBridge:
    """Accepts host connections on AF_VSOCK and splices each to the gRPC socket."""

    def __init__(self, local_path: str, port: int = VSOCK_PORT) -> None:
        self.local_path = local_path
        self.port = port
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            listener.bind((socket.VMADDR_CID_ANY, self.port))
            listener.listen(VSOCK_BACKLOG)
        except BaseException:
            listener.close()
            raise
        log.info("bridging vsock port %d to %s", self.port, self.local_path)
        await self.serve(listener)

    async def serve(self, listener: socket.socket) -> None:
        """Accept on ``listener`` (closed at the end) until cancelled."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        try:
            while True:
                conn, peer = await loop.sock_accept(listener)
                log.info("host connection from %s", peer or "a local peer")
                task = asyncio.create_task(self._serve(conn))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in list(self._tasks):
                task.cancel()
            listener.close()

    async def _serve(self, conn: socket.socket) -> None:
        try:
            local = await _connect_local(self.local_path)
        except OSError as e:
            log.error("cannot reach the gRPC socket %s: %s", self.local_path, e)
            conn.close()
            return
        with contextlib.suppress(OSError):
            await splice_sockets(conn, local)


class PortLogHandler(logging.Handler):
    """Writes log lines to a virtio-serial port; drops them while the host is away.

    Writes are non-blocking: logging must never stall the agent.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.dropped = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode(errors="replace")
            os.write(self._fd, line)
        except OSError:
            self.dropped += 1
        except Exception:  # noqa: BLE001 - a bad record must not break logging
            self.handleError(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        super().close()
