"""ttrpc server and client over real unix sockets in a private temp dir."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
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
from shim.ttrpc.framing import HEADER_LENGTH, FrameTimeoutError, encode_frame, read_frame
from shim.ttrpc.server import (
    FRAME_READ_TIMEOUT_S,
    MAX_CONNECTIONS,
    MAX_IN_FLIGHT_REQUESTS,
    MAX_PENDING_WRITE_BYTES,
    Limits,
    _RateLimitedWarning,
)

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


# Section: bounds on what a peer can make the server hold


async def serve_with(sock_dir: Path, *, allowed_uid: int | None = None,
                     limits: Limits | None = None) -> Served:
    task = FakeTask()
    registry = ServiceRegistry()
    registry.register_service(TASK, task)
    closed: list[ConnectionInfo] = []
    server = Server(registry, on_connection_closed=closed.append, allowed_uid=allowed_uid,
                    limits=limits)
    path = str(sock_dir / "bounded.sock")
    await server.listen(path)
    return Served(server, task, path, closed)


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(int(STEP_S / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {STEP_S}s: {what}")


async def assert_closed_by_server(reader: asyncio.StreamReader) -> None:
    try:
        assert await asyncio.wait_for(reader.read(), STEP_S) == b""
    except ConnectionError:
        pass  # reset (our bytes unread) or a failed write of ours: just as closed


def state_frame(stream_id: int, container_id: str) -> bytes:
    req = ttrpc_pb2.Request(service=SVC, method="State",
                            payload=shim_pb2.StateRequest(id=container_id).SerializeToString())
    return encode_frame(stream_id, MessageType.REQUEST, 0, req.SerializeToString())


def wait_frame(stream_id: int, container_id: str = "c1") -> bytes:
    req = ttrpc_pb2.Request(service=SVC, method="Wait",
                            payload=shim_pb2.WaitRequest(id=container_id).SerializeToString())
    return encode_frame(stream_id, MessageType.REQUEST, 0, req.SerializeToString())


def test_limits_default_to_the_module_constants_and_must_be_positive() -> None:
    limits = Limits()
    assert (limits.max_connections, limits.max_in_flight_requests,
            limits.max_pending_write_bytes, limits.frame_read_timeout_s) == (
        MAX_CONNECTIONS, MAX_IN_FLIGHT_REQUESTS, MAX_PENDING_WRITE_BYTES, FRAME_READ_TIMEOUT_S)
    assert (MAX_CONNECTIONS, MAX_IN_FLIGHT_REQUESTS, MAX_PENDING_WRITE_BYTES) == (
        64, 256, 16 << 20)
    # One whole frame must always fit.
    assert MAX_PENDING_WRITE_BYTES > HEADER_LENGTH + MESSAGE_LENGTH_MAX
    with pytest.raises(ValueError, match="max_connections"):
        Limits(max_connections=0)


async def test_peer_that_never_reads_is_cut_off_at_the_write_bound(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limit = 256 << 10
    served = await serve_with(sock_dir, limits=Limits(max_pending_write_bytes=limit))
    loop = asyncio.get_running_loop()
    # A raw socket that is never read from, not even into a client-side buffer.
    flooder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flooder.setblocking(False)
    try:
        await loop.sock_connect(flooder, served.path)
        # A Wait that blocks: it must be cancelled when the connection is dropped.
        await loop.sock_sendall(flooder, wait_frame(1))
        await asyncio.wait_for(served.task.wait_started.wait(), STEP_S)
        (conn,) = served.server._connections
        # State answers echo the 4 KiB id: ~40 MB of answers if the server kept them all.
        big_id = "x" * 4096
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for stream_id in range(3, 20_000, 2):
                await asyncio.wait_for(
                    loop.sock_sendall(flooder, state_frame(stream_id, big_id)), STEP_S)
        await eventually(lambda: len(served.closed) == 1, "the flooding connection closed")
        assert served.task.wait_cancelled.is_set()
        assert limit // 2 < conn.peak_pending_write_bytes <= limit
        assert served.server.connection_count == 0
        assert any("not reading its responses" in r.getMessage() and str(limit) in r.getMessage()
                   for r in caplog.records)
        # The shim itself is fine: others are still served.
        async with await Client.connect(served.path) as c:
            await c.call(SVC, "State", shim_pb2.StateRequest(id="ok"), shim_pb2.StateResponse)
    finally:
        flooder.close()
        await served.server.shutdown(timeout=0.1)


async def test_peer_that_reads_its_answers_is_not_cut_off(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Far more than the bound in total, but never that much waiting at once.
    limit = 64 << 10
    served = await serve_with(sock_dir, limits=Limits(max_pending_write_bytes=limit))
    try:
        async with await Client.connect(served.path) as c:
            for batch in range(8):
                states = await asyncio.gather(*(
                    c.call(SVC, "State", shim_pb2.StateRequest(id=f"{batch}-{i}" + "y" * 4000),
                           shim_pb2.StateResponse)
                    for i in range(10)))
                assert len(states) == 10
        assert not any("not reading" in r.getMessage() for r in caplog.records)
    finally:
        await served.server.shutdown(timeout=0.1)


async def test_shutdown_does_not_hang_on_a_peer_that_never_reads(sock_dir: Path) -> None:
    served = await serve_with(sock_dir)
    loop = asyncio.get_running_loop()
    flooder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flooder.setblocking(False)
    try:
        await loop.sock_connect(flooder, served.path)
        # Enough answers to fill the kernel and transport buffers, well under the bound.
        for stream_id in range(1, 400, 2):
            await loop.sock_sendall(flooder, state_frame(stream_id, "z" * 4096))
        await eventually(lambda: served.server.connection_count == 1, "connection accepted")
        (conn,) = served.server._connections
        await eventually(lambda: conn.pending_write_bytes > 0, "answers stuck in the buffers")
        await asyncio.wait_for(served.server.shutdown(timeout=0.1), 3 * STEP_S)
        assert served.server.connection_count == 0 and len(served.closed) == 1
    finally:
        flooder.close()


async def test_in_flight_cap_answers_resource_exhausted_without_a_task(sock_dir: Path) -> None:
    served = await serve_with(sock_dir, limits=Limits(max_in_flight_requests=3))
    reader, writer = await asyncio.open_unix_connection(served.path)
    try:
        for stream_id in (1, 3, 5):
            writer.write(wait_frame(stream_id))
        await eventually(lambda: served.server.connection_count == 1, "connection accepted")
        (conn,) = served.server._connections
        await eventually(lambda: len(conn.request_tasks()) == 3, "three Waits in flight")
        tasks_before = len(asyncio.all_tasks())
        writer.write(wait_frame(7))
        await writer.drain()
        stream_id, resp = await raw_response(reader)
        assert stream_id == 7 and resp.status.code == Code.RESOURCE_EXHAUSTED
        assert "too many requests in flight" in resp.status.message
        assert "at most 3" in resp.status.message
        assert len(asyncio.all_tasks()) == tasks_before
        # Once the three complete, there is room again, on the same connection.
        served.task.release.set()
        answers = {sid: r.status.code for sid, r in [await raw_response(reader) for _ in range(3)]}
        assert answers == {1: Code.OK, 3: Code.OK, 5: Code.OK}
        writer.write(state_frame(9, "again"))
        await writer.drain()
        stream_id, resp = await raw_response(reader)
        assert stream_id == 9 and resp.status.code == Code.OK
    finally:
        writer.close()
        await served.server.shutdown(timeout=0.1)


async def test_in_flight_request_bytes_are_bounded(sock_dir: Path) -> None:
    served = await serve_with(sock_dir, limits=Limits(max_in_flight_request_bytes=1000))
    reader, writer = await asyncio.open_unix_connection(served.path)
    try:
        writer.write(wait_frame(1, "a" * 600))
        await asyncio.wait_for(served.task.wait_started.wait(), STEP_S)
        writer.write(wait_frame(3, "b" * 600))
        await writer.drain()
        stream_id, resp = await raw_response(reader)
        assert stream_id == 3 and resp.status.code == Code.RESOURCE_EXHAUSTED
        assert "over the bound of 1000" in resp.status.message
        # Small requests still fit beside the big one.
        writer.write(state_frame(5, "small"))
        await writer.drain()
        stream_id, resp = await raw_response(reader)
        assert stream_id == 5 and resp.status.code == Code.OK
    finally:
        writer.close()
        await served.server.shutdown(timeout=0.1)


async def test_connection_cap_refuses_the_65th(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    served = await serve_with(sock_dir)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            conns.append(await asyncio.open_unix_connection(served.path))
        await eventually(lambda: served.server.connection_count == MAX_CONNECTIONS,
                         f"{MAX_CONNECTIONS} connections served")
        caplog.clear()
        refused = [await asyncio.open_unix_connection(served.path) for _ in range(3)]
        for reader, writer in refused:
            await assert_closed_by_server(reader)
            writer.close()
        assert served.server.connection_count == MAX_CONNECTIONS
        # One warning for the three: refusals are rate-limited.
        warnings = [r.getMessage() for r in caplog.records
                    if "refusing connection" in r.getMessage()]
        assert len(warnings) == 1 and f"{MAX_CONNECTIONS} connections are open" in warnings[0]
        # The open ones still work; once one closes, a new one is served.
        reader, writer = conns[-1]
        writer.write(state_frame(1, "last"))
        assert (await raw_response(reader))[1].status.code == Code.OK
        conns.pop()[1].close()
        await eventually(lambda: served.server.connection_count == MAX_CONNECTIONS - 1,
                         "a connection closed")
        async with await Client.connect(served.path) as c:
            await c.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)
    finally:
        for _, writer in conns:
            writer.close()
        await served.server.shutdown(timeout=0.1)


def test_refusal_warnings_are_rate_limited_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    limiter = _RateLimitedWarning(interval=5.0)
    assert limiter.warning(100.0, "refused %d", 1)
    assert not limiter.warning(101.0, "refused %d", 2)
    assert not limiter.warning(104.9, "refused %d", 3)
    assert limiter.warning(105.0, "refused %d", 4)
    assert limiter.warning(200.0, "refused %d", 5)
    assert [r.getMessage() for r in caplog.records] == [
        "refused 1", "refused 4 (2 more like this not logged)", "refused 5"]


@pytest.mark.parametrize("partial", [
    encode_frame(1, MessageType.REQUEST, 0, b"x" * 100)[:5],    # header cut
    encode_frame(1, MessageType.REQUEST, 0, b"x" * 100)[:60],   # payload cut
], ids=["header", "payload"])
async def test_half_sent_frame_is_cut_after_the_deadline(
    sock_dir: Path, caplog: pytest.LogCaptureFixture, partial: bytes
) -> None:
    served = await serve_with(sock_dir, limits=Limits(frame_read_timeout_s=0.2))
    reader, writer = await asyncio.open_unix_connection(served.path)
    try:
        loop = asyncio.get_running_loop()
        writer.write(partial)
        await writer.drain()
        sent_at = loop.time()
        await assert_closed_by_server(reader)
        assert loop.time() - sent_at >= 0.15
        await eventually(lambda: len(served.closed) == 1, "connection closed")
        assert any("frame not complete 0.2s after its first byte" in r.getMessage()
                   for r in caplog.records)
    finally:
        writer.close()
        await served.server.shutdown(timeout=0.1)


async def test_trickled_frame_is_cut_after_the_deadline(sock_dir: Path) -> None:
    # Every byte arrives quickly, but the frame as a whole does not.
    served = await serve_with(sock_dir, limits=Limits(frame_read_timeout_s=0.3))
    reader, writer = await asyncio.open_unix_connection(served.path)
    try:
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for byte in state_frame(1, "slow"):
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
        await assert_closed_by_server(reader)
    finally:
        writer.close()
        await served.server.shutdown(timeout=0.1)


async def test_idle_connection_outlives_the_deadline(sock_dir: Path) -> None:
    served = await serve_with(sock_dir, limits=Limits(frame_read_timeout_s=0.1))
    try:
        async with await Client.connect(served.path) as c:
            await asyncio.sleep(0.4)  # idle before the first frame
            await c.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)
            await asyncio.sleep(0.4)  # idle between frames
            await c.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)
            assert served.server.connection_count == 1 and not served.closed
    finally:
        await served.server.shutdown(timeout=0.1)


async def test_read_frame_deadline_starts_with_the_first_byte() -> None:
    reader = asyncio.StreamReader()
    pending = asyncio.create_task(read_frame(reader, frame_timeout=0.05))
    await asyncio.sleep(0.2)
    assert not pending.done()  # nothing yet: no deadline
    frame = encode_frame(3, MessageType.REQUEST, 0, b"late")
    reader.feed_data(frame[:4])
    with pytest.raises(FrameTimeoutError) as info:
        await asyncio.wait_for(pending, STEP_S)
    assert info.value.timeout == 0.05
    # Without a deadline the same wait is fine.
    reader = asyncio.StreamReader()
    pending = asyncio.create_task(read_frame(reader))
    reader.feed_data(frame[:4])
    await asyncio.sleep(0.1)
    reader.feed_data(frame[4:])
    assert (await asyncio.wait_for(pending, STEP_S)).payload == b"late"


async def test_peer_of_another_uid_is_refused(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other_uid = os.geteuid() + 12345
    served = await serve_with(sock_dir, allowed_uid=other_uid)
    try:
        reader, writer = await asyncio.open_unix_connection(served.path)
        writer.write(state_frame(1, "intruder"))
        await assert_closed_by_server(reader)
        writer.close()
        assert served.server.connection_count == 0 and not served.closed
        (msg,) = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
        assert f"pid {os.getpid()} uid {os.geteuid()}" in msg and f"only uid {other_uid}" in msg
    finally:
        await served.server.shutdown(timeout=0.1)


def test_allowed_uid_defaults_to_the_effective_uid() -> None:
    assert Server(ServiceRegistry()).allowed_uid == os.geteuid()


_CONNECT_AS_NOBODY = """
import os, socket, sys
os.setgid(65534)
os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect("\\0" + sys.argv[1])
try:
    print("closed" if s.recv(1) == b"" else "open")
except ConnectionResetError:
    print("closed")
except TimeoutError:
    print("open")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to setuid to nobody")
async def test_real_peer_of_another_uid_is_refused_on_an_abstract_socket(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Abstract sockets have no file permissions: the uid check is all there is.
    name = f"husk-ttrpc-test-{os.getpid()}"
    registry = ServiceRegistry()
    registry.register_service(TASK, FakeTask())
    server = Server(registry)
    await server.listen("\0" + name)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CONNECT_AS_NOBODY, name,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 4 * STEP_S)
        assert proc.returncode == 0, err.decode()
        assert out.decode().strip() == "closed"
        assert any("uid 65534" in r.getMessage() and "refusing" in r.getMessage()
                   for r in caplog.records)
        # Root (the server's uid) is still served on the same socket.
        async with await Client.connect("\0" + name) as c:
            await c.call(SVC, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)
    finally:
        await server.shutdown(timeout=0.1)
