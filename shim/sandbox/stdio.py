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

Nothing here blocks the event loop: a ``binary://`` logger's readiness is
awaited with a deadline (LOGGER_READY_TIMEOUT_S), and a closed logger is
reaped by a background task that stops it if it lingers. A WriteStdin that
times out is retried a few times; if it still fails, forwarding stops and
the bytes dropped are logged.
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
from shim.util.tasks import cancel_and_wait

log = logging.getLogger(__name__)

STDIN_CHUNK = 32 * 1024
OUTPUT_DRAIN_S = 5.0
# A logger that never closes its fd 5 must fail the create, not hang the shim.
LOGGER_READY_TIMEOUT_S = 10.0
# Once its pipes close, a logger may still flush what it read (to a remote, say).
LOGGER_EXIT_TIMEOUT_S = OUTPUT_DRAIN_S
# A logger asked to stop should be quick about it; SIGKILL then.
LOGGER_TERM_TIMEOUT_S = 2.0
# SIGKILL is prompt; bounded anyway so a reaper never lingers (D state, say).
LOGGER_KILL_TIMEOUT_S = 5.0
# How often a reaper looks at its logger: cheap, and there is one per logger.
REAP_POLL_S = 0.05
# A WriteStdin that times out (agent busy, VM paused for a moment) is tried again
# this many times in all, with a doubling backoff, before forwarding stops.
STDIN_ATTEMPTS = 3
STDIN_RETRY_BACKOFF_S = 0.1


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


def _logger_args(uri: str) -> list[str]:
    parsed = urlparse(uri)
    args = [parsed.path]
    for key, values in parse_qs(parsed.query).items():
        args += [f"{key}={v}" if v else key for v in values]
    return args


def _close_fds(fds: tuple[int, ...]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def _start_logger(uri: str, container_id: str, namespace: str
                        ) -> tuple[int, int, subprocess.Popen[bytes]]:
    """Start a ``binary://`` logger: its fds 3 and 4 read our stdout and stderr.

    The logger closes its fd 5 once it reads; that is awaited on the loop for
    at most LOGGER_READY_TIMEOUT_S.

    :raise errors.InvalidArgumentError: the logger cannot be started, exits or
        does not signal readiness in time (it is then killed, nothing stays open).
    """
    args = _logger_args(uri)
    path = args[0]
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
        _close_fds((out_r, out_w, err_r, err_w, ready_r, ready_w))
        raise errors.InvalidArgumentError(f"cannot start logger {path}: {exc}") from exc
    _close_fds((out_r, err_r, ready_w))
    try:
        try:
            # Readable means EOF (fd 5 closed, or the logger died) or a byte: either ends the wait.
            await asyncio.wait_for(_wait_fd(ready_r, writable=False), LOGGER_READY_TIMEOUT_S)
        except TimeoutError:
            raise errors.InvalidArgumentError(
                f"logger {path} did not signal readiness (close fd 5) within "
                f"{LOGGER_READY_TIMEOUT_S:.0f}s; killed it") from None
        # Best effort: the kernel closes a dying logger's fds just before it can be
        # reaped, so one that dies at once may pass here and fail on its first write.
        if (status := proc.poll()) is not None:
            raise errors.InvalidArgumentError(
                f"logger {path} exited with status {status} before it was ready")
    except BaseException as exc:
        _close_fds((out_w, err_w))
        proc.kill()  # a no-op once reaped
        # Gone before create fails, unless this is a cancellation: then in the background.
        if isinstance(exc, asyncio.CancelledError) or not await _exited(
                proc, LOGGER_KILL_TIMEOUT_S):
            _reap_in_background(proc, path, grace_s=LOGGER_KILL_TIMEOUT_S)
        raise
    finally:
        _close_fds((ready_r,))
    for fd in (out_w, err_w):
        os.set_blocking(fd, False)
    return out_w, err_w, proc


async def _exited(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Whether ``proc`` exits (and is reaped) within ``timeout_s``, polled without blocking."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while proc.poll() is None:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(REAP_POLL_S, remaining))
    return True


async def _reap_logger(proc: subprocess.Popen[bytes], path: str, grace_s: float) -> None:
    """Let a logger whose pipes are closed finish, then TERM it, then KILL it."""
    if await _exited(proc, grace_s):
        return
    log.warning("logger %s (pid %d) still running %.1fs after its pipes closed; "
                "sending SIGTERM", path, proc.pid, grace_s)
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    if await _exited(proc, LOGGER_TERM_TIMEOUT_S):
        return
    log.warning("logger %s (pid %d) ignored SIGTERM for %.1fs; killing it",
                path, proc.pid, LOGGER_TERM_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    if not await _exited(proc, LOGGER_KILL_TIMEOUT_S):
        log.error("logger %s (pid %d) survived SIGKILL for %.1fs; leaving it",
                  path, proc.pid, LOGGER_KILL_TIMEOUT_S)


# Reaper tasks: the loop keeps only weak references to tasks.
_reapers: set[asyncio.Task[None]] = set()


def _reap_in_background(proc: subprocess.Popen[bytes], path: str, grace_s: float
                        ) -> asyncio.Task[None] | None:
    """Reap ``proc`` without blocking the caller; the task, or None if already reaped."""
    if proc.poll() is not None:
        return None
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        # No loop to keep responsive (a synchronous caller): reap right here.
        try:
            proc.wait(timeout=grace_s + LOGGER_TERM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=LOGGER_KILL_TIMEOUT_S)
        return None
    task = asyncio.create_task(_reap_logger(proc, path, grace_s), name=f"reap logger {proc.pid}")
    _reapers.add(task)
    task.add_done_callback(_reapers.discard)
    return task


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
    # Held while a chunk is read from stdin and sent, so close_stdin() never cancels
    # the copy with a chunk in hand.
    _stdin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _stdin_failed: bool = False
    _logger: subprocess.Popen[bytes] | None = None
    _logger_reaper: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Open every stream; on failure nothing stays open.

        :raise errors.InvalidArgumentError: a stream cannot be opened, or a
            ``binary://`` logger cannot be started or is not ready in time.
        """
        try:
            if self.stdout.startswith("binary://"):
                self._out_fd, self._err_fd, self._logger = await _start_logger(
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
        except BaseException:
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
        if self._in_fd >= 0 and self._stdin_task is None and not self._stdin_failed:
            self._stdin_task = asyncio.create_task(self._copy_in(agent))

    @property
    def _name(self) -> str:
        return f"{self.container_id}/{self.exec_id or 'init'}"

    async def _copy_in(self, agent: StdioAgent) -> None:
        while True:
            await _wait_fd(self._in_fd, writable=False)
            async with self._stdin_lock:
                try:
                    data = os.read(self._in_fd, STDIN_CHUNK)
                except BlockingIOError:
                    continue
                if not data or not await self._forward_stdin(agent, data):
                    return

    async def _forward_stdin(self, agent: StdioAgent, data: bytes) -> bool:
        """Send ``data`` to the process, retrying a timeout; False once forwarding stopped.

        A retried WriteStdin may repeat bytes the agent took before its reply was
        lost; that is rarer and less harmful than dropping them.
        """
        view = memoryview(data)
        failures = 0
        while view:
            try:
                written = await agent.write_stdin(self.container_id, self.exec_id, bytes(view))
            except (errors.DeadlineExceededError, errors.UnavailableError) as exc:
                cause: errors.HuskError = exc
            except errors.HuskError as exc:
                self._stop_stdin(exc, len(view))
                return False
            else:
                if written > 0:
                    view = view[written:]
                    failures = 0
                    continue
                cause = errors.UnavailableError("the agent took no bytes")
            failures += 1
            if failures >= STDIN_ATTEMPTS:
                self._stop_stdin(cause, len(view))
                return False
            backoff = STDIN_RETRY_BACKOFF_S * 2 ** (failures - 1)
            log.warning("%s: stdin write failed (%s); retrying in %.1fs (attempt %d of %d)",
                        self._name, cause, backoff, failures + 1, STDIN_ATTEMPTS)
            await asyncio.sleep(backoff)
        return True

    def _stop_stdin(self, cause: errors.HuskError, dropped: int) -> None:
        self._stdin_failed = True
        log.error("%s: stdin forwarding stopped: %s; %d bytes dropped, later input is "
                  "not forwarded", self._name, cause, dropped)

    async def close_stdin(self, agent: StdioAgent) -> None:
        """containerd closed its end: forward what is buffered, then EOF."""
        async with self._stdin_lock:
            # The copy is between chunks (waiting for input): cancelling it loses nothing.
            if self._stdin_task is not None:
                await cancel_and_wait(self._stdin_task, errors.HuskError)
                self._stdin_task = None
            if self._in_fd >= 0:
                dropped = 0
                with contextlib.suppress(OSError):
                    while data := os.read(self._in_fd, STDIN_CHUNK):
                        if self._stdin_failed:
                            dropped += len(data)
                        else:
                            await self._forward_stdin(agent, data)
                if dropped:
                    log.error("%s: %d more bytes of stdin dropped at close", self._name,
                              dropped)
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
        """Close every fd now; a logger is reaped in the background (see wait_logger)."""
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
            # Its pipes are closed: it sees EOF, flushes and exits, or is stopped.
            self._logger_reaper = _reap_in_background(
                self._logger, urlparse(self.stdout).path, grace_s=LOGGER_EXIT_TIMEOUT_S)
            self._logger = None

    async def wait_logger(self) -> None:
        """Wait until a closed ``binary://`` logger has exited and been reaped."""
        if self._logger_reaper is not None:
            await asyncio.shield(self._logger_reaper)
