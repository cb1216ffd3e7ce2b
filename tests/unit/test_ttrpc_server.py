"""ttrpc server and client over real unix sockets in a private temp dir."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from proto.gen import ttrpc_pb2
from proto.gen.containerd.task.v2 import shim_pb2
from proto.gen.containerd.types.task import task_pb2
from shim.ttrpc import (
    MESSAGE_LENGTH_MAX,
    Client,
    Code,
    ConnectError,
    ConnectionClosedError,
    ConnectionInfo,
    MessageType,
    Server,
    ServiceRegistry,
    TtrpcError,
    current_call,
)
from shim.ttrpc.framing import encode_frame, read_frame

TASK = shim_pb2.DESCRIPTOR.services_by_name["Task"]
SVC = TASK.full_name
NS_KEY = "containerd-namespace-ttrpc"
STEP_S = 2.0  # upper bound for anything that should be immediate


class FakeTask:
    """A Task service whose Wait blocks until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.wait_started = asyncio.Event()
        self.wait_cancelled = asyncio.Event()
        self.metadata: dict[str, list[str]] = {}

    async def state(self, req: shim_pb2.StateRequest) -> shim_pb2.StateResponse:
        return shim_pb2.StateResponse(id=req.id, pid=42, status=task_pb2.RUNNING)

    async def wait(self, req: shim_pb2.WaitRequest) -> shim_pb2.WaitResponse:
        self.wait_started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.wait_cancelled.set()
            raise
        return shim_pb2.WaitResponse(exit_status=7)

    async def connect(self, req: shim_pb2.ConnectRequest) -> shim_pb2.ConnectResponse:
        self.metadata = dict(current_call().metadata)
        return shim_pb2.ConnectResponse(shim_pid=os.getpid(), version=current_call().get(NS_KEY) or "")

    async def kill(self, req: shim_pb2.KillRequest) -> empty_pb2.Empty:
        raise TtrpcError(Code.NOT_FOUND, f"container {req.id} not found")

    async def pids(self, req: shim_pb2.PidsRequest) -> shim_pb2.PidsResponse:
        raise RuntimeError(f"agent exploded for {req.id}")

    async def pause(self, req: shim_pb2.PauseRequest) -> empty_pb2.Empty:
        raise NotImplementedError("pause is not supported")

    async def stats(self, req: shim_pb2.StatsRequest) -> shim_pb2.StatsResponse:
        # An answer larger than a frame may carry.
        response = shim_pb2.StatsResponse()
        response.stats.value = bytes(MESSAGE_LENGTH_MAX + 1)
        return response


@dataclass
class Served:
    server: Server
    task: FakeTask
    path: str
    closed: list[ConnectionInfo] = field(default_factory=list)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Not tmp_path: unix socket paths must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="husk-ttrpc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def served(sock_dir: Path) -> AsyncIterator[Served]:
    task = FakeTask()
    registry = ServiceRegistry()
    registry.register_service(TASK, task)
    closed: list[ConnectionInfo] = []
    server = Server(registry, on_connection_closed=closed.append)
    path = str(sock_dir / "shim.sock")
    await server.listen(path)
    try:
        yield Served(server, task, path, closed)
    finally:
        await server.shutdown(timeout=0.2)


@pytest.fixture
async def client(served: Served) -> AsyncIterator[Client]:
    async with await Client.connect(served.path) as c:
        yield c


async def test_round_trip(served: Served, client: Client) -> None:
    resp = await client.call(SVC, "State", shim_pb2.StateRequest(id="c1"), shim_pb2.StateResponse)
    assert resp == shim_pb2.StateResponse(id="c1", pid=42, status=task_pb2.RUNNING)
    assert served.server.connection_count == 1


async def test_unix_scheme_address_is_accepted(served: Served) -> None:
    async with await Client.connect("unix://" + served.path) as c:
        await c.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)


async def test_blocked_stream_does_not_stall_others(served: Served, client: Client) -> None:
    wait = asyncio.create_task(
        client.call(SVC, "Wait", shim_pb2.WaitRequest(id="c1"), shim_pb2.WaitResponse))
    await asyncio.wait_for(served.task.wait_started.wait(), STEP_S)
    states = await asyncio.wait_for(asyncio.gather(*(
        client.call(SVC, "State", shim_pb2.StateRequest(id=f"c{i}"), shim_pb2.StateResponse)
        for i in range(50))), STEP_S)
    assert [s.id for s in states] == [f"c{i}" for i in range(50)]
    assert not wait.done()
    served.task.release.set()
    assert (await asyncio.wait_for(wait, STEP_S)).exit_status == 7


async def test_metadata_reaches_the_handler(served: Served, client: Client) -> None:
    resp = await client.call(SVC, "Connect", shim_pb2.ConnectRequest(), shim_pb2.ConnectResponse,
                             metadata={NS_KEY: "k8s.io", "multi": ["a", "b"]})
    assert resp.version == "k8s.io" and resp.shim_pid == os.getpid()
    assert served.task.metadata == {NS_KEY: ["k8s.io"], "multi": ["a", "b"]}


@pytest.mark.parametrize("method, request_msg, code, message", [
    ("Kill", shim_pb2.KillRequest(id="c9"), Code.NOT_FOUND, "container c9 not found"),
    ("Pids", shim_pb2.PidsRequest(id="c9"), Code.UNKNOWN, "agent exploded for c9"),
    ("Pause", shim_pb2.PauseRequest(), Code.UNIMPLEMENTED, "pause is not supported"),
    ("Checkpoint", shim_pb2.CheckpointTaskRequest(), Code.UNIMPLEMENTED,
     "method containerd.task.v2.Task/Checkpoint is not implemented"),
    ("Stats", shim_pb2.StatsRequest(), Code.RESOURCE_EXHAUSTED, "exceeds the maximum message size"),
])
async def test_errors_come_back_as_status(
    client: Client, method: str, request_msg: object, code: Code, message: str
) -> None:
    with pytest.raises(TtrpcError) as info:
        await client.call(SVC, method, request_msg, empty_pb2.Empty)  # type: ignore[arg-type]
    assert info.value.code == code and message in info.value.message
    # The connection is still fine afterwards.
    await client.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)


async def test_unknown_service_is_unimplemented(client: Client) -> None:
    with pytest.raises(TtrpcError) as info:
        await client.call("containerd.task.v3.Task", "State", shim_pb2.StateRequest(),
                          shim_pb2.StateResponse)
    assert info.value.code == Code.UNIMPLEMENTED
    assert "'containerd.task.v3.Task' is not registered" in info.value.message


async def raw_request(writer: asyncio.StreamWriter, stream_id: int, method: str,
                      timeout_nano: int = 0) -> None:
    req = ttrpc_pb2.Request(service=SVC, method=method, timeout_nano=timeout_nano,
                            payload=shim_pb2.StateRequest(id=method).SerializeToString())
    writer.write(encode_frame(stream_id, MessageType.REQUEST, 0, req.SerializeToString()))
    await writer.drain()


async def raw_response(reader: asyncio.StreamReader) -> tuple[int, ttrpc_pb2.Response]:
    frame = await asyncio.wait_for(read_frame(reader), STEP_S)
    assert frame.type == MessageType.RESPONSE and frame.flags == 0
    return frame.stream_id, ttrpc_pb2.Response.FromString(frame.payload)


async def test_timeout_nano_cancels_handler_with_deadline_exceeded(served: Served) -> None:
    # A raw request, so that only the server's deadline is in play.
    reader, writer = await asyncio.open_unix_connection(served.path)
    try:
        await raw_request(writer, 1, "Wait", timeout_nano=100_000_000)
        stream_id, resp = await raw_response(reader)
        assert stream_id == 1 and resp.status.code == Code.DEADLINE_EXCEEDED
        assert "Wait" in resp.status.message
        assert served.task.wait_cancelled.is_set()
    finally:
        writer.close()


async def test_protocol_violations_are_answered_and_connection_survives(served: Served) -> None:
    reader, writer = await asyncio.open_unix_connection(served.path)
    try:
        oversized = MESSAGE_LENGTH_MAX + 1
        writer.write(oversized.to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x01\x00")
        writer.write(bytes(oversized))
        writer.write(encode_frame(3, 0x42, 0, b"future frame type"))   # ignored
        writer.write(encode_frame(3, MessageType.DATA, 1, b"stray"))   # ignored
        writer.write(encode_frame(3, MessageType.REQUEST, 0, b"\xff\xff"))  # not a Request
        await raw_request(writer, 4, "State")                           # even id
        await raw_request(writer, 5, "State")                           # fine
        await raw_request(writer, 5, "State")                           # reused id
        answers = [await raw_response(reader) for _ in range(5)]
        codes = {(sid, r.status.code) for sid, r in answers}
        assert codes == {(1, Code.RESOURCE_EXHAUSTED), (3, Code.INVALID_ARGUMENT),
                         (4, Code.INVALID_ARGUMENT), (5, Code.OK), (5, Code.INVALID_ARGUMENT)}
    finally:
        writer.close()


async def test_client_timeout_leaves_connection_usable(served: Served, client: Client) -> None:
    with pytest.raises(TtrpcError) as info:
        await client.call(SVC, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse, timeout=0.05)
    assert info.value.code == Code.DEADLINE_EXCEEDED
    await client.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)


async def test_connection_loss_fails_pending_calls(sock_dir: Path) -> None:
    got_request = asyncio.Event()

    async def drop_after_first_frame(reader: asyncio.StreamReader,
                                     writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        got_request.set()
        writer.close()

    path = str(sock_dir / "flaky.sock")
    fake = await asyncio.start_unix_server(drop_after_first_frame, path=path)
    try:
        client = await Client.connect(path)
        pending = asyncio.create_task(
            client.call(SVC, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse))
        with pytest.raises(ConnectionClosedError, match="closed by the server"):
            await asyncio.wait_for(pending, STEP_S)
        assert got_request.is_set() and client.closed
        with pytest.raises(ConnectionClosedError) as info:
            await client.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)
        assert info.value.code == Code.UNAVAILABLE
        await client.close()
    finally:
        fake.close()
        await fake.wait_closed()


async def test_closing_the_client_fails_its_pending_calls(served: Served) -> None:
    client = await Client.connect(served.path)
    pending = asyncio.create_task(
        client.call(SVC, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse))
    await asyncio.wait_for(served.task.wait_started.wait(), STEP_S)
    await client.close()
    with pytest.raises(ConnectionClosedError, match="client closed"):
        await pending
    # The server notices, cancels the handler and reports the closed connection.
    await asyncio.wait_for(served.task.wait_cancelled.wait(), STEP_S)
    for _ in range(100):
        if served.closed:
            break
        await asyncio.sleep(0.01)
    assert len(served.closed) == 1 and served.closed[0].peer_pid == os.getpid()
    assert served.server.connection_count == 0


async def test_connect_failure_is_clear(sock_dir: Path) -> None:
    with pytest.raises(ConnectError, match="cannot connect to ttrpc server at .*nothing.sock"):
        await Client.connect(str(sock_dir / "nothing.sock"))


async def test_graceful_shutdown(served: Served, client: Client) -> None:
    wait = asyncio.create_task(
        client.call(SVC, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse))
    await asyncio.wait_for(served.task.wait_started.wait(), STEP_S)
    shutdown = asyncio.create_task(served.server.shutdown(timeout=STEP_S))
    await asyncio.sleep(0.05)
    # No new connections, and new requests on open ones are turned away...
    assert not os.path.exists(served.path)
    with pytest.raises(ConnectError):
        await Client.connect(served.path)
    with pytest.raises(TtrpcError) as info:
        await client.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)
    assert info.value.code == Code.UNAVAILABLE and "shutting down" in info.value.message
    # ...but the in-flight request still gets its answer.
    served.task.release.set()
    assert (await asyncio.wait_for(wait, STEP_S)).exit_status == 7
    await asyncio.wait_for(shutdown, STEP_S)
    assert served.server.connection_count == 0
    with pytest.raises(ConnectionClosedError):
        await client.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)


async def test_shutdown_timeout_cancels_stuck_requests(served: Served, client: Client) -> None:
    wait = asyncio.create_task(
        client.call(SVC, "Wait", shim_pb2.WaitRequest(), shim_pb2.WaitResponse))
    await asyncio.wait_for(served.task.wait_started.wait(), STEP_S)
    await asyncio.wait_for(served.server.shutdown(timeout=0.1), STEP_S)
    assert served.task.wait_cancelled.is_set()
    with pytest.raises(ConnectionClosedError):
        await asyncio.wait_for(wait, STEP_S)


async def test_serve_an_already_bound_socket(sock_dir: Path) -> None:
    path = str(sock_dir / "prebound.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    registry = ServiceRegistry()
    registry.register_service(TASK, FakeTask())
    server = Server(registry)
    await server.serve_socket(sock)
    try:
        async with await Client.connect(path) as c:
            resp = await c.call(SVC, "State", shim_pb2.StateRequest(id="p"), shim_pb2.StateResponse)
        assert resp.id == "p"
        with pytest.raises(RuntimeError, match="already serving"):
            await server.listen(str(sock_dir / "other.sock"))
    finally:
        await server.shutdown(timeout=0.1)
    assert os.path.exists(path)  # the owner of a handed-over socket removes its file
