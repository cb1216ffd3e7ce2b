"""The debug console end to end without a VM: the real agent service (on this host), the
shim's AgentClient and relay behind a real management socket, and `husk exec`'s client.

What only a VM adds (the guest's shell, the CRI pod found by name) is in
tests/integration/test_cri_operability.py.
"""
from __future__ import annotations

import asyncio
import io
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.container import Runtime
from agent.process import Reaper
from agent.runtime import Crun
from agent.server import start_server
from agent.service import AgentService
from agent.config import AgentConfig
from shim import errors
from shim.agentclient.client import AgentClient
from shim.ops.console import ConsoleError, ConsoleOptions, run
from shim.sandbox.console import ConsoleRequest, run_console
from shim.sandbox.manage import (FRAME_HEADER, MAX_FRAME_BYTES, Frame, ManageServer, Stream,
                                 encode_frame, read_frame)

pytestmark = pytest.mark.timeout(60)


@dataclass
class Console:
    run_dir: Path
    service: AgentService


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    # waitpid(-1) would also collect children of other tests: run only when there are none.
    if psutil.Process().children():
        pytest.skip("this test process has other children; the reaper would steal them")
    reaper = Reaper()
    reaper.start()
    config = AgentConfig(state_dir=tmp_path / "state")
    service = AgentService(Runtime(config, Crun("crun", config.crun_root, reaper), reaper))
    server = await start_server(service, f"unix:{tmp_path}/agent.sock")
    agent = AgentClient(f"unix:{tmp_path}/agent.sock")

    async def open_console(request: dict[str, Any], stream: Stream) -> None:
        await run_console(agent, ConsoleRequest.parse(request), stream, "sandbox test")

    manage = ManageServer(tmp_path, {}, "sandbox test", stream_handlers={"console": open_console})
    await manage.start()
    try:
        yield Console(tmp_path, service)
    finally:
        await manage.stop()
        await agent.close()
        await server.stop(0)
        reaper.stop()


async def test_refused_until_create_sandbox_turns_it_on(console: Console) -> None:
    with pytest.raises(ConsoleError, match=r"debug console is off"):
        await run(console.run_dir, ConsoleOptions(("true",)), io.BytesIO())


@pytest.mark.parametrize("kind", ["file", "pipe"])
async def test_runs_a_command_with_stdin_and_returns_its_status(
        console: Console, tmp_path: Path, kind: str) -> None:
    console.service._debug_console = True  # what CreateSandbox(debug_console=true) does
    if kind == "file":
        (tmp_path / "stdin").write_bytes(b"hello\n")
        stdin = os.open(tmp_path / "stdin", os.O_RDONLY)
    else:
        stdin, write_end = os.pipe()
        os.write(write_end, b"hello\n")
        os.close(write_end)
    try:
        out = io.BytesIO()
        status = await run(console.run_dir, ConsoleOptions(
            ("sh", "-c", "echo out; echo err >&2; read x; echo got $x; cat; exit 7"), stdin=True),
            out, stdin_fd=stdin)
    finally:
        os.close(stdin)
    assert status == 7
    assert out.getvalue().splitlines() == [b"out", b"err", b"got hello"]


async def test_a_terminal_is_a_controlling_tty(console: Console) -> None:
    console.service._debug_console = True
    out = io.BytesIO()
    # Only a session leader with a controlling terminal can open /dev/tty.
    status = await run(console.run_dir, ConsoleOptions(
        ("sh", "-c", "test -t 0 && test -t 1 && : </dev/tty && echo is-a-tty"), tty=True), out)
    assert status == 0, out.getvalue()
    assert b"is-a-tty" in out.getvalue()


async def test_a_missing_program_fails_as_in_a_shell(console: Console) -> None:
    console.service._debug_console = True
    out = io.BytesIO()
    assert await run(console.run_dir, ConsoleOptions(("no-such-program",)), out) == 127
    assert b"no-such-program: No such file or directory" in out.getvalue()


async def test_hanging_up_kills_what_the_console_started(console: Console) -> None:
    console.service._debug_console = True
    seconds = str(random.randint(100_000, 999_999))  # tells our sleep from any other
    task = asyncio.create_task(run(console.run_dir, ConsoleOptions(
        ("sh", "-c", f"sleep {seconds} & wait"),), io.BytesIO()))

    def sleepers() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] == ["sleep", seconds]]

    for _ in range(100):
        if sleepers():
            break
        await asyncio.sleep(0.05)
    assert sleepers(), "the console's process never started"
    task.cancel()  # the operator's client goes away
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if not sleepers():
            break
        await asyncio.sleep(0.05)
    assert not sleepers(), "the console's processes outlived the console"


def test_malformed_requests_are_refused() -> None:
    for bad in ({"argv": "sh"}, {"argv": [""]}, {"argv": ["a\0b"]}, {"argv": ["x"] * 300},
                {"argv": [], "rows": -1}, {"argv": [], "columns": 1 << 20}):
        with pytest.raises(errors.InvalidArgumentError):
            ConsoleRequest.parse(bad)
    assert ConsoleRequest.parse({"argv": ["ls"], "tty": True, "rows": 24, "columns": 80}) == \
        ConsoleRequest(("ls",), True, 24, 80)


async def test_frames_are_bounded_and_typed() -> None:
    def reader(data: bytes) -> asyncio.StreamReader:
        stream = asyncio.StreamReader()
        stream.feed_data(data)
        stream.feed_eof()
        return stream

    assert await read_frame(reader(encode_frame(Frame.OUTPUT, b"hi"))) == (Frame.OUTPUT, b"hi")
    assert await read_frame(reader(b"")) is None
    for bad, why in ((FRAME_HEADER.pack(Frame.STDIN, MAX_FRAME_BYTES + 1), "at most"),
                     (FRAME_HEADER.pack(99, 0), "unknown frame type"),
                     (encode_frame(Frame.STDIN, b"abc")[:-1], "truncated"),
                     (b"\x00\x00", "truncated")):
        with pytest.raises(ValueError, match=why):
            await read_frame(reader(bad))


async def test_the_last_frame_survives_the_clients_late_writes(tmp_path: Path) -> None:
    """A program that exits at once: the shim has sent EXIT and is done before the
    client writes its end of stdin. The connection stays open for that write, so the
    client still reads the status (it got EPIPE, and asyncio dropped the unread EXIT)."""
    done = asyncio.Event()

    async def exits_at_once(request: dict[str, Any], stream: Stream) -> None:
        await stream.accept()
        stream.writer.write(encode_frame(Frame.EXIT, b"\x00\x00\x00\x7f"))
        await stream.writer.drain()
        done.set()

    manage = ManageServer(tmp_path, {}, "sandbox test", stream_handlers={"console": exits_at_once})
    await manage.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(manage.path))
        writer.write(b'{"op": "console"}\n')
        assert b'"ok": true' in await reader.readline()
        await done.wait()
        await asyncio.sleep(0.1)  # the handler has returned and the server moved on
        writer.write(encode_frame(Frame.CLOSE_STDIN))
        await writer.drain()
        await asyncio.sleep(0.1)
        assert await read_frame(reader) == (Frame.EXIT, b"\x00\x00\x00\x7f")
        writer.close()
        await writer.wait_closed()
    finally:
        await manage.stop()
