"""The agent's transport bridge, with a pty standing in for the virtio-serial port.

A pty master behaves like the guest end of a virtio-serial port: while no one
holds the slave (the "host" end) it reports POLLHUP and read() fails (EIO),
and once the slave is opened again data flows. The fake host is a unix socket
server that opens the slave per client connection and closes it when the
client goes, like QEMU's chardev socket does with the port.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pty
import socket
import termios
import tty
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from agent.channel import (PortLogHandler, SerialBridge, VsockBridge, find_virtio_port,
                           splice_sockets)
from agent.config import AgentConfig
from agent.container import Runtime
from agent.process import Reaper
from agent.runtime import Crun
from agent.server import start_server
from agent.service import AgentService
from agent.stdio import wait_fd
from proto.gen import agent_pb2 as pb
from proto.gen import agent_pb2_grpc

pytestmark = pytest.mark.timeout(30)


class FakeHost:
    """The host end of the port: each client connection is one host session."""

    def __init__(self, slave_path: str, listen: Path) -> None:
        self.slave_path = slave_path
        self.listen = listen
        self._server: asyncio.AbstractServer | None = None
        # Like QEMU's chardev socket: one client at a time, the next waits.
        self._one_client = asyncio.Lock()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._session, path=str(self.listen))

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._one_client:
            await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fd = os.open(self.slave_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(fd)
        termios.tcflush(fd, termios.TCIOFLUSH)  # nothing from an earlier session
        pump_out = asyncio.create_task(self._port_to_client(fd, writer))
        try:
            while data := await reader.read(65536):
                view = memoryview(data)
                while view:
                    try:
                        view = view[os.write(fd, view):]
                    except BlockingIOError:
                        await wait_fd(fd, write=True)
        except ConnectionError:
            pass  # the client reset its connection: that ends the session too
        finally:
            # The client may be gone before the port's last bytes reach it
            # (ConnectionResetError in the pump): the port must close all the same,
            # or the bridge never sees this session end.
            pump_out.cancel()
            await asyncio.gather(pump_out, return_exceptions=True)
            os.close(fd)  # the host end goes away: the guest sees POLLHUP
            writer.close()

    @staticmethod
    async def _port_to_client(fd: int, writer: asyncio.StreamWriter) -> None:
        while True:
            await wait_fd(fd)
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                return
            writer.write(data)
            await writer.drain()


@dataclass
class Served:
    bridge: SerialBridge
    host: Path  # the fake host's socket: connect gRPC here
    slave: str  # the pty slave: the raw host end of the "port"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """The agent's gRPC server and a serial bridge on a pty, behind a fake host."""
    config = AgentConfig(state_dir=tmp_path / "state")
    service = AgentService(Runtime(config, Crun("crun", config.crun_root, Reaper()), Reaper()))
    grpc_sock = tmp_path / "agent.sock"
    server = await start_server(service, f"unix:{grpc_sock}")
    master, slave = pty.openpty()
    slave_path = os.ttyname(slave)
    os.close(slave)  # the host starts disconnected
    bridge = SerialBridge(master, str(grpc_sock))
    host = FakeHost(slave_path, tmp_path / "host.sock")
    await host.start()
    task = asyncio.create_task(bridge.run())
    try:
        yield Served(bridge, host.listen, slave_path)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await host.stop()
        await server.stop(0)
        os.close(master)


async def _check(address: Path, timeout: float = 5.0) -> int:
    # A private subchannel pool: every call here opens its own connection.
    async with grpc.aio.insecure_channel(f"unix:{address}",
                                         options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        resp = await stub.Check(pb.CheckRequest(), timeout=timeout)
        return resp.status


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_serial_bridge_recovers_after_host_reconnects(
        served: Served) -> None:
    bridge, host = served.bridge, served.host
    for session in range(1, 4):
        assert await _check(host) == pb.CheckResponse.SERVING
        # The channel is closed: the host end hangs up, the bridge drops its
        # local connection and waits; the next session is a fresh HTTP/2 one.
        await _until(lambda: bridge.sessions == session and not bridge.in_session)


async def test_serial_bridge_survives_a_garbage_session(
        served: Served) -> None:
    """A host session the server rejects (not HTTP/2) is drained until the host
    hangs up; the session after it is clean."""
    bridge, host = served.bridge, served.host
    fd = os.open(served.slave, os.O_RDWR | os.O_NOCTTY)
    try:
        tty.setraw(fd)
        os.write(fd, b"this is not HTTP/2\r\n\r\n" * 4)
        await _until(lambda: bridge.sessions == 1)
        await asyncio.sleep(0.2)  # the server has hung up on it by now
        os.write(fd, b"more bytes of the dead session")
        await asyncio.sleep(0.1)
        assert bridge.in_session  # still waiting for the host to leave
    finally:
        os.close(fd)
    await _until(lambda: not bridge.in_session)
    assert await _check(host) == pb.CheckResponse.SERVING
    await _until(lambda: bridge.sessions == 2 and not bridge.in_session)


async def test_serial_bridge_maps_errors_through_the_port(
        served: Served) -> None:
    """A failing RPC comes back as a status over the port, and the next one still works."""
    host = served.host
    async with grpc.aio.insecure_channel(f"unix:{host}") as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.WaitProcess(pb.ProcessRequest(container_id="nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert (await stub.Check(pb.CheckRequest(), timeout=5)).status == \
            pb.CheckResponse.SERVING


async def test_serial_bridge_waits_quietly_while_host_is_away(
        served: Served) -> None:
    """No busy loop while the port reports POLLHUP: the agent stays mostly idle."""
    before = os.times()
    await asyncio.sleep(1.0)
    after = os.times()
    cpu = (after.user - before.user) + (after.system - before.system)
    assert cpu < 0.3
    bridge = served.bridge
    assert bridge.sessions == 0


async def test_vsock_bridge_serves_each_connection(tmp_path: Path) -> None:
    """The vsock accept loop, fed a unix listener (no vsock transport on this host)."""
    config = AgentConfig(state_dir=tmp_path / "state")
    service = AgentService(Runtime(config, Crun("crun", config.crun_root, Reaper()), Reaper()))
    server = await start_server(service, f"unix:{tmp_path}/agent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "vsock-standin.sock"))
    listener.listen()
    bridge = VsockBridge(str(tmp_path / "agent.sock"))
    task = asyncio.create_task(bridge.serve(listener))
    try:
        # Two host connections at once, each with its own local connection.
        results = await asyncio.gather(_check(tmp_path / "vsock-standin.sock"),
                                       _check(tmp_path / "vsock-standin.sock"))
        assert results == [pb.CheckResponse.SERVING] * 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop(0)
    assert listener.fileno() == -1


async def test_splice_sockets_copies_both_ways() -> None:
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
    task = asyncio.create_task(splice_sockets(a, b))
    loop = asyncio.get_running_loop()
    a_peer.sendall(b"ping")
    assert await loop.run_in_executor(None, b_peer.recv, 10) == b"ping"
    b_peer.sendall(b"pong")
    assert await loop.run_in_executor(None, a_peer.recv, 10) == b"pong"
    a_peer.close()
    await asyncio.wait_for(task, 5)
    assert a.fileno() == -1 and b.fileno() == -1
    b_peer.close()


def test_find_virtio_port_by_name(tmp_path: Path) -> None:
    sysfs = tmp_path / "virtio-ports"
    for port, name in (("vport0p1", "io.husk.log"), ("vport0p2", "io.husk.agent")):
        (sysfs / port).mkdir(parents=True)
        (sysfs / port / "name").write_text(name + "\n")
    assert find_virtio_port("io.husk.agent", sysfs, tmp_path / "dev") == tmp_path / "dev/vport0p2"
    assert find_virtio_port("io.husk.log", sysfs, tmp_path / "dev") == tmp_path / "dev/vport0p1"
    assert find_virtio_port("other", sysfs) is None
    assert find_virtio_port("io.husk.agent", tmp_path / "missing") is None


def test_log_port_handler_drops_lines_when_full(tmp_path: Path) -> None:
    fifo = tmp_path / "log-port"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    handler = PortLogHandler(fifo)
    try:
        handler.setFormatter(logging.Formatter("%(message)s"))
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "line %d", (1,), None)
        handler.emit(record)
        assert os.read(reader, 100) == b"line 1\n"
        big = logging.LogRecord("t", logging.INFO, __file__, 1, "x" * 70000, (), None)
        for _ in range(4):  # more than the pipe holds: dropped, never blocking
            handler.emit(big)
        assert handler.dropped >= 1
    finally:
        handler.close()
        os.close(reader)


async def test_serial_bridge_starts_a_session_only_once_the_host_is_there(
        served: Served) -> None:
    """Bytes can reach the guest before the "port open" that goes with them: while
    the port still reports POLLHUP they are not a session (which would end at once,
    as if the host had left, and strand the host's handshake)."""
    bridge = served.bridge
    fd = os.open(served.slave, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    os.write(fd, b"early bytes")
    os.close(fd)  # the bytes wait in the port, which reports POLLHUP again
    await asyncio.sleep(0.3)
    assert bridge.sessions == 0
    fd = os.open(served.slave, os.O_RDWR | os.O_NOCTTY)
    try:
        await _until(lambda: bridge.sessions == 1 and bridge.in_session)
    finally:
        os.close(fd)
    await _until(lambda: not bridge.in_session)
    assert await _check(served.host) == pb.CheckResponse.SERVING
