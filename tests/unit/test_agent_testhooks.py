"""agent.testhooks: the test-only "compromised agent" hooks, through a real gRPC server.

The agent's server runs in-process on a unix socket with the hooks enabled;
commands go through the FIFO the way a test in the guest sends them (a shell
``echo >``), and a real gRPC client sees the effects.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent import testhooks
from agent.config import AgentConfig
from agent.container import Runtime
from agent.process import Reaper
from agent.runtime import Crun
from agent.server import start_server
from agent.service import AgentService
from agent.testhooks import Hooks, ReplyMode
from proto.gen import agent_pb2 as pb
from proto.gen import agent_pb2_grpc

pytestmark = pytest.mark.timeout(60)

# The shim's own receive limit (shim/agentclient/client.py), which "oversized" must exceed.
SHIM_MAX_MESSAGE_BYTES = 8 << 20
CALL_TIMEOUT_S = 5.0
# Long enough for a normal call on this host, short enough to keep a stall test quick.
STALL_PROBE_S = 0.5
WAIT_TIMEOUT_S = 5.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short temp dir: unix socket paths must fit in sockaddr_un."""
    path = Path(tempfile.mkdtemp(prefix="husk-hooks-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Hooked:
    hooks: Hooks
    socket: Path
    log_read_fd: int  # the test's end of the "log port"

    def channel(self, max_receive: int = SHIM_MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            f"unix:{self.socket}", options=[("grpc.max_receive_message_length", max_receive)])

    async def send(self, command: str) -> None:
        """Write a command the way the VM tests do: one shell ``echo`` per writer."""
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", f'echo "{command}" > {self.hooks.fifo}')
        assert await asyncio.wait_for(proc.wait(), WAIT_TIMEOUT_S) == 0


def _service(state: Path, hooks: Hooks | None) -> AgentService:
    config = AgentConfig(state_dir=state)
    reaper = Reaper()
    return AgentService(Runtime(config, Crun("crun", config.crun_root, reaper), reaper), hooks)


@pytest.fixture
async def hooked(short_dir: Path) -> AsyncIterator[Hooked]:
    """The agent's server with hooks on; its log port is a pipe the test reads."""
    log_read, log_write = os.pipe()
    os.set_blocking(log_write, False)  # like the real port's fd (PortLogHandler)
    hooks = testhooks.from_cmdline({"husk.test_hooks": "1"}, log_fd=log_write,
                                   fifo=short_dir / "run" / "test-hooks")
    assert hooks is not None
    socket = short_dir / "agent.sock"
    server = await start_server(_service(short_dir / "state", hooks), f"unix:{socket}", hooks)
    await hooks.start()
    try:
        yield Hooked(hooks, socket, log_read)
    finally:
        await hooks.stop()
        await server.stop(0)
        os.close(log_read)
        os.close(log_write)


async def until(condition: Callable[[], bool], timeout: float = WAIT_TIMEOUT_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


def stub(channel: Any) -> Any:
    return agent_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]


async def check(channel: grpc.aio.Channel, timeout: float = CALL_TIMEOUT_S) -> int:
    reply = await stub(channel).Check(pb.CheckRequest(), timeout=timeout)
    return int(reply.status)


# Section: off by default


def test_disabled_unless_the_kernel_command_line_says_so(short_dir: Path) -> None:
    fifo = short_dir / "test-hooks"
    for cmdline in ({}, {"husk.test_hooks": "0"}, {"husk.test_hooks": ""},
                    {"husk.test_hooks": "yes"}, {"husk.debug": "1"}):
        assert testhooks.from_cmdline(cmdline, fifo=fifo) is None
    assert not fifo.exists()
    enabled = testhooks.from_cmdline({"husk.test_hooks": "1"}, fifo=fifo)
    assert enabled is not None and enabled.fifo == fifo
    assert not fifo.exists()  # only start() creates it


async def test_without_hooks_the_server_has_no_interceptor(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    real_server = grpc.aio.server

    def spy(**kwargs: Any) -> Any:
        seen.append(kwargs.get("interceptors"))
        return real_server(**kwargs)

    monkeypatch.setattr(grpc.aio, "server", spy)  # what start_server calls
    server = await start_server(_service(short_dir / "state", None), f"unix:{short_dir}/a.sock")
    try:
        async with grpc.aio.insecure_channel(f"unix:{short_dir}/a.sock") as channel:
            assert await check(channel) == pb.CheckResponse.SERVING
    finally:
        await server.stop(0)
    hooks = Hooks(fifo=short_dir / "test-hooks")
    server = await start_server(_service(short_dir / "state", hooks), f"unix:{short_dir}/b.sock",
                                hooks)
    await server.stop(0)
    assert seen[0] is None
    assert len(seen[1]) == 1 and isinstance(seen[1][0], grpc.aio.ServerInterceptor)
    assert not (short_dir / "test-hooks").exists()  # no start(), no FIFO


# Section: the FIFO


async def test_fifo_is_private_and_removed_on_stop(short_dir: Path) -> None:
    hooks = Hooks(fifo=short_dir / "run" / "test-hooks")
    (short_dir / "run").mkdir()
    (short_dir / "run" / "test-hooks").write_text("stale")  # replaced, not reused
    old_umask = os.umask(0)
    try:
        await hooks.start()
    finally:
        os.umask(old_umask)
    mode = hooks.fifo.lstat().st_mode
    assert stat.S_ISFIFO(mode) and stat.S_IMODE(mode) == 0o600
    await hooks.stop()
    assert not hooks.fifo.exists()


async def test_commands_from_successive_writers(hooked: Hooked) -> None:
    for _ in range(3):  # the reader reopens after every writer
        await hooked.send("stall")
        await until(lambda: hooked.hooks.stalled)
        await hooked.send("unstall")
        await until(lambda: not hooked.hooks.stalled)
    # Several commands from one writer, the last without a newline.
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", f"printf 'replies oversized\\noom-flood c9 3\\nreplies garbage' "
                    f"> {hooked.hooks.fifo}")
    assert await proc.wait() == 0
    await until(lambda: hooked.hooks.reply_mode is ReplyMode.GARBAGE)
    assert (hooked.hooks.oom_flood_id, hooked.hooks.oom_flood_left) == ("c9", 3)


async def test_bad_commands_are_logged_and_ignored(hooked: Hooked,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="agent.testhooks")
    for bad in ("reboot", "oom-flood c1", "oom-flood c1 many", "oom-flood c1 10000001",
                "oom-flood c1 -1", "log-flood 0", f"log-flood {(1 << 30) + 1}",
                "replies sideways", "replies", "stall now"):
        await hooked.send(bad)
    await hooked.send("x" * (testhooks.MAX_LINE_BYTES * 3))  # dropped whole
    await hooked.send("stall")  # the reader survived all that
    await until(lambda: hooked.hooks.stalled)
    hooks = hooked.hooks
    assert (hooks.oom_flood_left, hooks.log_flood_left, hooks.reply_mode) == (0, 0,
                                                                              ReplyMode.NORMAL)
    ignored = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(ignored) == 11, ignored
    accepted = [r for r in caplog.records if "stalled" in r.getMessage()]
    assert accepted and accepted[0].levelno == logging.WARNING
    assert accepted[0].getMessage().startswith("test hook: ")


async def test_log_flood_needs_a_log_port(short_dir: Path) -> None:
    hooks = Hooks(fifo=short_dir / "test-hooks", log_fd=None)
    hooks.handle("log-flood 100")
    assert hooks.log_flood_left == 0


# Section: the commands


async def test_oom_flood(hooked: Hooked) -> None:
    count = 2000
    async with hooked.channel() as channel:
        agent = stub(channel)
        waiting = asyncio.ensure_future(agent.GetOOMEvent(pb.Empty(), timeout=CALL_TIMEOUT_S))
        await asyncio.sleep(0.1)  # already polling when the flood starts
        await hooked.send(f"oom-flood victim {count}")
        events = [await waiting]
        events += [await agent.GetOOMEvent(pb.Empty(), timeout=CALL_TIMEOUT_S)
                   for _ in range(count - 1)]
        assert {e.container_id for e in events} == {"victim"} and len(events) == count
        # Then normal polling again: no sandbox, no OOM, no answer.
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await agent.GetOOMEvent(pb.Empty(), timeout=1.0)
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_oom_flood_zero_cancels(hooked: Hooked) -> None:
    await hooked.send("oom-flood victim 10000000")
    await until(lambda: hooked.hooks.oom_flood_left == 10_000_000)
    await hooked.send("oom-flood victim 0")
    await until(lambda: hooked.hooks.oom_flood_left == 0)


def _sync_list_processes(socket: Path, request: pb.ContainerRequest) -> Any:
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        return stub(channel).ListProcesses(request, timeout=CALL_TIMEOUT_S)


async def test_garbage_replies(hooked: Hooked, caplog: pytest.LogCaptureFixture) -> None:
    async with hooked.channel() as channel:
        agent = stub(channel)
        request = pb.ContainerRequest(container_id="c1")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await agent.ListProcesses(request, timeout=CALL_TIMEOUT_S)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND  # normal: there is no c1
        await hooked.send("replies garbage")
        await until(lambda: hooked.hooks.reply_mode is ReplyMode.GARBAGE)
        caplog.set_level(logging.ERROR, logger="grpc._common")
        for _ in range(3):
            # grpc.aio does not raise: a reply that does not parse comes back as None
            # with status OK (and grpc logs "Exception deserializing message!").
            assert await agent.ListProcesses(request, timeout=CALL_TIMEOUT_S) is None
        assert sum("deserializing" in r.getMessage() for r in caplog.records) == 3
        # The synchronous client makes it an error.
        with pytest.raises(grpc.RpcError) as sync_exc:
            await asyncio.to_thread(_sync_list_processes, hooked.socket, request)
        assert sync_exc.value.code() == grpc.StatusCode.INTERNAL
        assert "deserializing" in (sync_exc.value.details() or "")
        assert await check(channel) == pb.CheckResponse.SERVING  # the keepalive is spared
        await hooked.send("replies normal")
        await until(lambda: hooked.hooks.reply_mode is ReplyMode.NORMAL)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await agent.ListProcesses(request, timeout=CALL_TIMEOUT_S)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_garbage_never_parses() -> None:
    replies: list[Any] = [pb.Empty, pb.ProcessResponse, pb.WaitProcessResponse,
                          pb.WriteStdinResponse, pb.StatsContainerResponse,
                          pb.ListProcessesResponse, pb.OOMEvent, pb.GuestDetails,
                          pb.CheckResponse]
    for _ in range(50):
        data = testhooks.garbage_reply()
        assert len(data) == testhooks.GARBAGE_REPLY_BYTES
        for reply in replies:
            with pytest.raises(Exception, match="Error parsing"):
                reply.FromString(data)


async def test_oversized_replies(hooked: Hooked) -> None:
    await hooked.send("replies oversized")
    await until(lambda: hooked.hooks.reply_mode is ReplyMode.OVERSIZED)
    request = pb.ContainerRequest(container_id="c1")
    async with hooked.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub(channel).ListProcesses(request, timeout=CALL_TIMEOUT_S)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await check(channel) == pb.CheckResponse.SERVING
    # Only the size is wrong: a client without the limit parses it as the reply type.
    async with hooked.channel(max_receive=32 << 20) as channel:
        reply = await stub(channel).ListProcesses(request, timeout=CALL_TIMEOUT_S)
        assert list(reply.pids) == [] and reply.ByteSize() > testhooks.OVERSIZED_REPLY_BYTES


async def test_stall_and_unstall(hooked: Hooked) -> None:
    async with hooked.channel() as channel:
        agent = stub(channel)
        assert await check(channel) == pb.CheckResponse.SERVING
        # In flight when the stall starts: its reply is held back too.
        in_flight = asyncio.ensure_future(agent.GetOOMEvent(pb.Empty(), timeout=2.0))
        await asyncio.sleep(0.1)
        await hooked.send("stall")
        await until(lambda: hooked.hooks.stalled)
        await hooked.send("oom-flood c1 1")
        await until(lambda: hooked.hooks.oom_flood_left == 0)  # taken, never sent
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await check(channel, timeout=STALL_PROBE_S)
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stream = agent.ReadOutput(pb.ReadOutputRequest(container_id="c1"), timeout=STALL_PROBE_S)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            _ = [chunk async for chunk in stream]
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await in_flight
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        await hooked.send("unstall")
        await until(lambda: not hooked.hooks.stalled)
        assert await check(channel) == pb.CheckResponse.SERVING
        stream = agent.ReadOutput(pb.ReadOutputRequest(container_id="c1"),
                                  timeout=CALL_TIMEOUT_S)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            _ = [chunk async for chunk in stream]
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


async def test_log_flood(hooked: Hooked) -> None:
    size = 3_000_000
    await hooked.send(f"log-flood {size}")
    await until(lambda: hooked.hooks.log_flood_left > 0)
    async with hooked.channel() as channel:
        # Nobody reads the "port" yet, so the flood is stuck on a full pipe:
        # the agent still answers.
        await asyncio.sleep(0.2)
        assert await check(channel) == pb.CheckResponse.SERVING
    received = bytearray()
    os.set_blocking(hooked.log_read_fd, False)
    while len(received) < size:
        try:
            received += os.read(hooked.log_read_fd, 1 << 16)
        except BlockingIOError:
            await asyncio.sleep(0.001)
    await until(lambda: hooked.hooks.log_flood_left == 0)
    await asyncio.sleep(0.1)
    with pytest.raises(BlockingIOError):
        os.read(hooked.log_read_fd, 1)  # exactly size bytes, no more
    assert len(received) == size == hooked.hooks.log_flood_written
    lines = bytes(received).split(b"\n")
    assert set(lines[:-1]) == {b"x" * 100} and set(lines[-1]) <= {ord("x")}
