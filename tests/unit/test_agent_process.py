"""The agent's child reaper, spawn, and stdio plumbing (agent/process.py, agent/stdio.py)."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from agent.errors import FailedPreconditionError
from agent.process import Reaper, exit_status, spawn
from agent.stdio import READ_CHUNK, ConsoleSocket, OutputBuffer, PipeSet, StdinWriter

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def reaper() -> Reaper:
    # waitpid(-1) would also collect children of other tests: run only when there are none.
    if psutil.Process().children():
        pytest.skip("this test process has other children; the reaper would steal them")
    r = Reaper()
    r.start()
    yield r
    r.stop()


async def test_reaper_hands_out_statuses(reaper: Reaper) -> None:
    since = time.monotonic()
    pid = spawn(["sh", "-c", "exit 7"])
    assert await asyncio.wait_for(reaper.watch(pid, since), 5) == 7

    since = time.monotonic()
    pid = spawn(["sleep", "30"])
    exited = reaper.watch(pid, since)
    os.kill(pid, signal.SIGKILL)
    assert await asyncio.wait_for(exited, 5) == 128 + signal.SIGKILL


async def test_reaper_keeps_statuses_nobody_watched_yet(reaper: Reaper) -> None:
    since = time.monotonic()
    pid = spawn(["sh", "-c", "exit 3"])
    # Like an exec whose pid file is read after the process already exited.
    for _ in range(500):
        if not psutil.pid_exists(pid):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    fut = reaper.watch(pid, since)
    assert fut.done() and fut.result() == 3
    # A status older than the watcher's "since" belongs to an earlier process with that pid.
    since = time.monotonic()
    pid = spawn(["true"])
    await asyncio.sleep(0.3)
    stale = reaper.watch(pid, time.monotonic())
    assert not stale.done()
    reaper.forget(pid)
    assert stale.cancelled()


async def test_spawn_restores_default_signal_dispositions(reaper: Reaper) -> None:
    since = time.monotonic()
    r, w = os.pipe()
    pid = spawn(["sh", "-c", "grep SigIgn /proc/self/status"], stdout=w)
    os.close(w)
    assert await asyncio.wait_for(reaper.watch(pid, since), 5) == 0
    with os.fdopen(r, "rb") as f:
        ignored = int(f.read().split()[1], 16)
    # Python ignores SIGPIPE; a container started through crun must not.
    assert not ignored & (1 << (signal.SIGPIPE - 1))


def test_exit_status() -> None:
    assert exit_status(0) == 0
    assert exit_status(5 << 8) == 5
    assert exit_status(signal.SIGKILL) == 137


async def test_output_buffer_back_pressure_and_drain() -> None:
    r, w = os.pipe()
    total = 3 * 1024 * 1024
    limit = 256 * 1024

    def writer() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(b"z" * total)

    thread = threading.Thread(target=writer)
    thread.start()
    buffer = OutputBuffer(r, "test stdout", limit=limit)
    try:
        await asyncio.sleep(0.3)
        # Full: the agent stopped reading, the writer is blocked on the pipe.
        assert limit <= buffer.buffered < limit + READ_CHUNK
        assert thread.is_alive()
        got = 0
        while (data := await asyncio.wait_for(buffer.read(), 5)) is not None:
            assert set(data) == {ord("z")}
            got += len(data)
        assert got == total
        assert buffer.drained
        assert await buffer.read() is None  # stays at the end
    finally:
        thread.join(5)
        buffer.close()


async def test_output_ends_only_after_drain_and_close_discards() -> None:
    r, w = os.pipe()
    buffer = OutputBuffer(r, "test stdout")
    os.write(w, b"before exit")
    os.close(w)  # the process is gone, its output is not
    await asyncio.sleep(0.05)
    assert not buffer.drained
    assert await buffer.read() == b"before exit"
    assert await buffer.read() is None

    r, w = os.pipe()
    buffer = OutputBuffer(r, "test stderr")
    waiting = asyncio.ensure_future(buffer.read())
    await asyncio.sleep(0.05)
    buffer.close()  # container removed: the reader sees the end
    assert await asyncio.wait_for(waiting, 5) is None
    os.close(w)


async def test_stdin_writer_errors() -> None:
    r, w = os.pipe()
    stdin = StdinWriter(w, "c1")
    assert await stdin.write(b"abc") == 3
    assert os.read(r, 10) == b"abc"
    os.close(r)
    with pytest.raises(FailedPreconditionError, match="no longer reads"):
        await stdin.write(b"x")
    stdin.close()
    with pytest.raises(FailedPreconditionError, match="is closed"):
        await stdin.write(b"x")


async def test_pipe_set_child_ends() -> None:
    pipes = PipeSet.create()
    os.write(pipes.child_stdout, b"out")
    pipes.close_child_ends()
    io = pipes.to_io("c1")
    try:
        assert await io.stdout.read() == b"out"
        assert await io.stdout.read() is None  # the child ends are closed: EOF
        assert not io.terminal
        io.resize(10, 10)  # no tty: nothing to do
    finally:
        io.close()


async def test_console_socket_receives_a_pty_master(tmp_path: Path) -> None:
    console = ConsoleSocket(tmp_path / "c.sock")
    master, slave = os.openpty()
    try:
        receiving = asyncio.ensure_future(console.receive(timeout=5))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await asyncio.get_running_loop().run_in_executor(None, client.connect, str(console.path))
        socket.send_fds(client, [b"pty"], [master])
        client.close()
        fd = await receiving
        try:
            assert os.isatty(fd) and not os.get_inheritable(fd)
            os.write(slave, b"through the pty")  # it is the same pty's master
            assert b"through the pty" in os.read(fd, 100)
        finally:
            os.close(fd)
    finally:
        console.close()
        os.close(master)
        os.close(slave)
    assert not console.path.exists()


async def test_stdin_close_during_a_blocked_write() -> None:
    """CloseStdin/RemoveContainer while WriteStdin waits for room: the write fails,
    and the event loop keeps no registration for the closed fd number."""
    r, w = os.pipe()
    stdin = StdinWriter(w, "c1")
    writing = asyncio.ensure_future(stdin.write(b"x" * (1024 * 1024)))  # nobody reads
    await asyncio.sleep(0.05)
    assert not writing.done()
    stdin.close()
    with pytest.raises(FailedPreconditionError, match="is closed"):
        await asyncio.wait_for(writing, 5)
    assert stdin.closed
    with pytest.raises(OSError):
        os.fstat(w)  # closed by the writer on its way out
    os.close(r)
    # The same fd number, reused, can be watched again.
    r2, w2 = os.pipe()
    buffer = OutputBuffer(r2, "reused")
    os.write(w2, b"ok")
    os.close(w2)
    assert await asyncio.wait_for(buffer.read(), 5) == b"ok"
    buffer.close()
