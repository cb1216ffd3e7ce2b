"""Copying a process's stdio between containerd and the agent (one ProcessIO per process).

containerd names each stream by URI: "" (none), a bare path or ``fifo://``
(a FIFO that containerd reads or writes), ``file://`` (append to a file) or
``binary://`` (a logging program that gets pipes as fds 3 and 4).

FIFOs are opened O_RDWR so opening never blocks on a missing peer and a
peer that closes does not end the copy early; stdin therefore never sees EOF
on its own: containerd's CloseIO says when it ends. After the process exits,
the output copies finish on the agent's end-of-stream (bounded by
OUTPUT_DRAIN_S), and every fd is closed so the client's ``task.Delete``,
which waits for its FIFO readers to finish, never hangs.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qs, urlparse

from shim import errors

log = logging.getLogger(__name__)

STDIN_CHUNK = 32 * 1024
OUTPUT_DRAIN_S = 5.0


class StdioAgent(Protocol):
    """The part of AgentClient that stdio needs (a seam for tests)."""

    def read_output(self, container_id: str, exec_id: str, stderr: bool = False
                    ) -> AsyncIterator[bytes]: ...

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int: ...

    async def close_stdin(self, container_id: str, exec_id: str) -> None: ...


async def _wait_fd(fd: int, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else \
        (loop.add_reader, loop.remove_reader)
    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add(fd, wake)
    try:
        await ready
    finally:
        remove(fd)


async def write_all(fd: int, data: bytes) -> None:
    """Write to a non-blocking fd, waiting while it is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await _wait_fd(fd, writable=True)


def _open_output(uri: str) -> int:
    """An fd to write one output stream (a FIFO or a file) to.

    :raise errors.InvalidArgumentError: an unsupported scheme.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("", "fifo"):
        return os.open(parsed.path or uri, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    if parsed.scheme == "file":
        os.makedirs(os.path.dirname(parsed.path) or "/", exist_ok=True)
        return os.open(parsed.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK
                       | os.O_CLOEXEC, 0o640)
    raise errors.InvalidArgumentError(f"unsupported stdio URI scheme {parsed.scheme!r} in {uri}")


def _start_logger(uri: str, container_id: str, namespace: str
                  ) -> tuple[int, int, subprocess.Popen[bytes]]:
    """Start a ``binary://`` logger: its fds 3 and 4 read our stdout and stderr."""
    parsed = urlparse(uri)
    args = [parsed.path]
    for key, values in parse_qs(parsed.query).items():
        args += [f"{key}={v}" if v else key for v in values]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ready_r, ready_w = os.pipe()
    env = dict(os.environ, CONTAINER_ID=container_id, CONTAINER_NAMESPACE=namespace)

    def remap() -> None:
        for target, fd in ((3, out_r), (4, err_r), (5, ready_w)):
            os.dup2(fd, target)
    try:
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=remap, pass_fds=(3, 4, 5), close_fds=True)
    except OSError as exc:
        for fd in (out_r, out_w, err_r, err_w, ready_r, ready_w):
            os.close(fd)
        raise errors.InvalidArgumentError(f"cannot start logger {parsed.path}: {exc}") from exc
    for fd in (out_r, err_r, ready_w):
        os.close(fd)
    # The logger closes fd 5 once it is ready to read.
    os.read(ready_r, 1)
    os.close(ready_r)
    for fd in (out_w, err_w):
        os.set_blocking(fd, False)
    return out_w, err_w, proc


@dataclass
class ProcessIO:
    """The stdio of one process (a container's init or an exec)."""

    container_id: str
    exec_id: str
    stdin: str
    stdout: str
    stderr: str
    terminal: bool
    namespace: str = ""
    _fds: list[int] = field(default_factory=list)
    _out_fd: int = -1
    _err_fd: int = -1
    _in_fd: int = -1
    _copies: list[asyncio.Task[None]] = field(default_factory=list)
    _stdin_task: asyncio.Task[None] | None = None
    _logger: subprocess.Popen[bytes] | None = None

    def open(self) -> None:
        """Open every stream; on failure nothing stays open.

        :raise errors.InvalidArgumentError: a stream cannot be opened.
        """
        try:
            if self.stdout.startswith("binary://"):
                self._out_fd, self._err_fd, self._logger = _start_logger(
                    self.stdout, self.container_id, self.namespace)
                self._fds += [self._out_fd, self._err_fd]
            else:
                if self.stdout:
                    self._out_fd = _open_output(self.stdout)
                    self._fds.append(self._out_fd)
                if self.stderr and not self.terminal:
                    self._err_fd = _open_output(self.stderr)
                    self._fds.append(self._err_fd)
            if self.stdin:
                self._in_fd = os.open(urlparse(self.stdin).path or self.stdin,
                                      os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                self._fds.append(self._in_fd)
        except OSError as exc:
            self.close()
            raise errors.InvalidArgumentError(f"cannot open stdio: {exc}") from exc
        except errors.HuskError:
            self.close()
            raise

    def start_output(self, agent: StdioAgent) -> None:
        """Begin copying stdout and stderr from the agent (before the process starts)."""
        for fd, is_err in ((self._out_fd, False), (self._err_fd, True)):
            if fd >= 0:
                self._copies.append(asyncio.create_task(self._copy_out(agent, fd, is_err)))
            elif not (is_err and self.terminal):
                # Nobody reads this stream: drain it so the agent's buffer never fills.
                self._copies.append(asyncio.create_task(self._copy_out(agent, -1, is_err)))

    async def _copy_out(self, agent: StdioAgent, fd: int, is_err: bool) -> None:
        try:
            async for chunk in agent.read_output(self.container_id, self.exec_id, is_err):
                if fd >= 0 and chunk:
                    await write_all(fd, chunk)
        except (errors.HuskError, OSError) as exc:
            log.warning("%s %s: output copy ended: %s", self.container_id,
                        "stderr" if is_err else "stdout", exc)

    def start_stdin(self, agent: StdioAgent) -> None:
        if self._in_fd >= 0 and self._stdin_task is None:
            self._stdin_task = asyncio.create_task(self._copy_in(agent))

    async def _copy_in(self, agent: StdioAgent) -> None:
        while True:
            try:
                data = os.read(self._in_fd, STDIN_CHUNK)
            except BlockingIOError:
                await _wait_fd(self._in_fd, writable=False)
                continue
            if not data:
                return
            await agent.write_stdin(self.container_id, self.exec_id, data)

    async def close_stdin(self, agent: StdioAgent) -> None:
        """containerd closed its end: forward what is buffered, then EOF."""
        if self._stdin_task is not None:
            self._stdin_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, errors.HuskError):
                await self._stdin_task
            self._stdin_task = None
        if self._in_fd >= 0:
            with contextlib.suppress(OSError):
                while data := os.read(self._in_fd, STDIN_CHUNK):
                    await agent.write_stdin(self.container_id, self.exec_id, data)
        await agent.close_stdin(self.container_id, self.exec_id)

    async def finish(self) -> None:
        """After the process exited: let the output drain, then close everything."""
        if self._copies:
            done, pending = await asyncio.wait(self._copies, timeout=OUTPUT_DRAIN_S)
            for task in pending:
                log.warning("%s/%s: output still open %.0fs after exit; cutting it",
                            self.container_id, self.exec_id or "init", OUTPUT_DRAIN_S)
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._copies = []
        self.close()

    def close(self) -> None:
        if self._stdin_task is not None:
            self._stdin_task.cancel()
            self._stdin_task = None
        for task in self._copies:
            task.cancel()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        self._out_fd = self._err_fd = self._in_fd = -1
        if self._logger is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._logger.wait(timeout=OUTPUT_DRAIN_S)
            self._logger = None
