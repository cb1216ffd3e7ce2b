"""ProcessIO without blocking the loop: binary:// loggers and stdin forwarding."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shim import errors
from shim.sandbox import stdio
from shim.sandbox.stdio import ProcessIO
from tests.conftest import open_files
from tests.fakes.agent import FakeAgent

CID = "c1"
T = TypeVar("T")

# The logger scripts: argv holds "key=value" pairs from the URI's query.
PRELUDE = """\
import os, signal, sys, time
opts = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
"""
NEVER_READY = PRELUDE + "time.sleep(60)\n"  # keeps fd 5 open
DIES_EARLY = PRELUDE + "sys.exit(3)\n"
WRITES_FILE = PRELUDE + """\
os.close(5)
with open(opts["out"], "wb") as out:
    out.write(f"{os.environ['CONTAINER_NAMESPACE']}/{os.environ['CONTAINER_ID']}:".encode())
    for fd in (3, 4):
        while data := os.read(fd, 65536):
            out.write(data)
"""
LINGERS = PRELUDE + """\
if opts.get("term") == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.close(5)
while os.read(3, 65536):
    pass
time.sleep(60)  # past EOF: only a signal ends it
"""


def _logger(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "logger.py"
    script.write_text(f"#!{sys.executable}\n{body}")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def _gone(pid: int) -> bool:
    """Exited and reaped: no /proc entry (a zombie would still have one)."""
    return not Path(f"/proc/{pid}").exists()


class LoopWatch:
    """Measures the longest the loop went without running a 10ms ticker."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.worst = max(self.worst, now - last)
            last = now

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def _within(seconds: float, aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, seconds)


async def _until(predicate: object, seconds: float = 5.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[bytes]]:
    """Every process stdio starts during the test."""
    procs: list[subprocess.Popen[bytes]] = []

    class Recording(subprocess.Popen[bytes]):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            procs.append(self)
    monkeypatch.setattr(subprocess, "Popen", Recording)
    return procs


# Section: binary:// loggers


async def test_a_logger_that_never_signals_fails_open_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        spawned: list[subprocess.Popen[bytes]]) -> None:
    monkeypatch.setattr(stdio, "LOGGER_READY_TIMEOUT_S", 0.5)
    script = _logger(tmp_path, NEVER_READY)
    io = ProcessIO(CID, "", "", f"binary://{script}", "", False, "k8s.io")
    before = open_files()
    started = time.monotonic()
    async with LoopWatch() as watch:
        with pytest.raises(errors.InvalidArgumentError) as exc:
            await _within(5, io.open())
    assert time.monotonic() - started < 2.0
    assert str(script) in str(exc.value) and "readiness" in str(exc.value)
    assert watch.worst < 0.25, "the loop was blocked while waiting for the logger"
    assert open_files() - before == set()
    [logger] = spawned
    assert logger.returncode == -signal.SIGKILL and _gone(logger.pid)


async def test_a_logger_that_dies_before_ready_fails_open(
        tmp_path: Path, spawned: list[subprocess.Popen[bytes]]) -> None:
    script = _logger(tmp_path, DIES_EARLY)
    io = ProcessIO(CID, "", "", f"binary://{script}", "", False)
    before = open_files()
    try:
        await _within(5, io.open())
    except errors.InvalidArgumentError as exc:
        assert "exited with status 3" in str(exc)
    else:
        # Rarely, fd 5 closes before the exit can be seen (see _start_logger):
        # the logger is then reaped at close like any other.
        io.close()
        await _within(10, io.wait_logger())
    assert open_files() - before == set()
    [logger] = spawned
    assert logger.returncode == 3 and _gone(logger.pid)


async def test_a_missing_logger_fails_open(tmp_path: Path) -> None:
    io = ProcessIO(CID, "", "", f"binary://{tmp_path}/nope", "", False)
    before = open_files()
    with pytest.raises(errors.InvalidArgumentError, match="cannot start logger"):
        await io.open()
    assert open_files() - before == set()


async def test_a_logger_that_signals_gets_the_output(tmp_path: Path) -> None:
    script = _logger(tmp_path, WRITES_FILE)
    out = tmp_path / "out"
    agent = FakeAgent()
    await agent.create_container(CID, {})
    io = ProcessIO(CID, "", "", f"binary://{script}?out={out}", "", False, "k8s.io")
    before = open_files()
    await _within(5, io.open())
    logger = io._logger
    assert logger is not None
    io.start_output(agent)
    agent.emit(CID, b"hello ")
    agent.emit(CID, b"world\n", stderr=True)
    agent.exit(CID, 0)
    await _within(10, io.finish())
    await _within(10, io.wait_logger())
    assert logger.returncode == 0
    assert out.read_bytes() == b"k8s.io/c1:hello world\n"
    assert open_files() - before == set()


@pytest.mark.parametrize(("term", "status"), [("exit", -signal.SIGTERM),
                                              ("ignore", -signal.SIGKILL)])
async def test_close_does_not_wait_for_a_lingering_logger(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        term: str, status: int) -> None:
    monkeypatch.setattr(stdio, "LOGGER_EXIT_TIMEOUT_S", 0.3)
    monkeypatch.setattr(stdio, "LOGGER_TERM_TIMEOUT_S", 0.3)
    script = _logger(tmp_path, LINGERS)
    io = ProcessIO(CID, "", "", f"binary://{script}?term={term}", "", False)
    await _within(5, io.open())
    logger = io._logger
    assert logger is not None
    caplog.set_level(logging.WARNING, logger="shim.sandbox.stdio")
    async with LoopWatch() as watch:
        started = time.monotonic()
        io.close()
        assert time.monotonic() - started < 0.05, "close() waited for the logger"
        assert logger.poll() is None  # still running: it is reaped in the background
        await _within(10, io.wait_logger())
    assert watch.worst < 0.25, "the loop was blocked while reaping the logger"
    assert logger.returncode == status and _gone(logger.pid)
    assert "sending SIGTERM" in caplog.text
    assert ("killing it" in caplog.text) == (term == "ignore")


async def test_close_without_a_running_loop_still_reaps(tmp_path: Path) -> None:
    script = _logger(tmp_path, WRITES_FILE)
    io = ProcessIO(CID, "", "", f"binary://{script}?out={tmp_path / 'out'}", "", False)
    await _within(5, io.open())
    logger = io._logger
    assert logger is not None
    # A synchronous caller (no loop in this thread) gets a bounded wait instead.
    await asyncio.to_thread(io.close)
    assert logger.returncode == 0


# Section: stdin forwarding


class FlakyAgent(FakeAgent):
    """write_stdin fails ``failures`` times with ``error``, then works (at most ``limit`` bytes)."""

    def __init__(self, failures: int, error: type[errors.HuskError] = errors.DeadlineExceededError,
                 limit: int = 1 << 20, delay_s: float = 0.0) -> None:
        super().__init__()
        self.failures = failures
        self.error = error
        self.limit = limit
        self.delay_s = delay_s
        self.calls = 0

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.failures:
            self.failures -= 1
            raise self.error("agent: WriteStdin timed out")
        return await super().write_stdin(container_id, exec_id, data[:self.limit])


@pytest.fixture
async def stdin_fifo(tmp_path: Path) -> AsyncIterator[tuple[Path, int]]:
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # containerd's end
    yield fifo, writer
    os.close(writer)


async def _forwarding(agent: FakeAgent, fifo: Path, exec_id: str = "") -> ProcessIO:
    await agent.create_container(CID, {})
    if exec_id:
        await agent.exec_process(CID, exec_id, {})
    io = ProcessIO(CID, exec_id, str(fifo), "", "", False)
    await io.open()
    io.start_stdin(agent)
    return io


async def test_stdin_is_retried_after_a_timeout(
        stdin_fifo: tuple[Path, int], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(stdio, "STDIN_RETRY_BACKOFF_S", 0.01)
    fifo, writer = stdin_fifo
    agent = FlakyAgent(failures=1)
    io = await _forwarding(agent, fifo, exec_id="e1")
    caplog.set_level(logging.WARNING, logger="shim.sandbox.stdio")
    os.write(writer, b"hello")
    await _until(lambda: bytes(agent.proc(CID, "e1").stdin) == b"hello")
    assert agent.calls == 2
    assert "c1/e1: stdin write failed" in caplog.text and "timed out" in caplog.text
    os.write(writer, b" again")  # forwarding goes on after a retry
    await _until(lambda: bytes(agent.proc(CID, "e1").stdin) == b"hello again")
    await io.close_stdin(agent)
    assert agent.proc(CID, "e1").stdin_closed
    io.close()


async def test_stdin_partial_writes_are_completed(stdin_fifo: tuple[Path, int]) -> None:
    fifo, writer = stdin_fifo
    agent = FlakyAgent(failures=0, limit=3)
    io = await _forwarding(agent, fifo)
    os.write(writer, b"0123456789")
    await _until(lambda: bytes(agent.proc(CID).stdin) == b"0123456789")
    io.close()


async def test_stdin_forwarding_stops_after_bounded_retries(
        stdin_fifo: tuple[Path, int], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(stdio, "STDIN_RETRY_BACKOFF_S", 0.01)
    fifo, writer = stdin_fifo
    agent = FlakyAgent(failures=1000)
    io = await _forwarding(agent, fifo)
    caplog.set_level(logging.WARNING, logger="shim.sandbox.stdio")
    os.write(writer, b"hello")
    task = io._stdin_task
    assert task is not None
    await _within(5, task)  # ends, and without an exception
    assert agent.calls == stdio.STDIN_ATTEMPTS
    errors_logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors_logged) == 1
    assert "c1/init: stdin forwarding stopped" in errors_logged[0].getMessage()
    assert "5 bytes dropped" in errors_logged[0].getMessage()
    # What arrives later is not forwarded after a gap; closing still sends EOF.
    os.write(writer, b"more")
    await io.close_stdin(agent)
    assert agent.calls == stdio.STDIN_ATTEMPTS and agent.proc(CID).stdin == b""
    assert agent.proc(CID).stdin_closed
    assert "4 more bytes of stdin dropped" in caplog.text
    io.close()


async def test_a_non_timeout_error_stops_stdin_at_once(
        stdin_fifo: tuple[Path, int], caplog: pytest.LogCaptureFixture) -> None:
    fifo, writer = stdin_fifo
    agent = FlakyAgent(failures=1000, error=errors.NotFoundError)
    io = await _forwarding(agent, fifo)
    os.write(writer, b"abc")
    task = io._stdin_task
    assert task is not None
    await _within(5, task)
    assert agent.calls == 1 and "3 bytes dropped" in caplog.text
    io.close()


async def test_close_stdin_waits_for_the_chunk_in_flight(stdin_fifo: tuple[Path, int]) -> None:
    fifo, writer = stdin_fifo
    agent = FlakyAgent(failures=0, delay_s=0.2)
    io = await _forwarding(agent, fifo)
    os.write(writer, b"first")
    await _until(lambda: agent.calls == 1)  # the copy is inside WriteStdin
    os.write(writer, b" second")
    await _within(5, io.close_stdin(agent))
    assert bytes(agent.proc(CID).stdin) == b"first second" and agent.proc(CID).stdin_closed
    io.close()

