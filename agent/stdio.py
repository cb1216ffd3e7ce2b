"""A process's stdio on the agent side: pipes or a pty, output buffers, stdin.

Output is read continuously into a bounded buffer per stream. When a buffer is
full the agent stops reading that pipe, so a host that reads slowly
back-pressures the container instead of growing the agent's memory. A stream
ends for the host only when the process closed it and the buffer is drained,
so nothing is lost when a process exits quickly.
"""
from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import logging
import os
import socket
import struct
import termios
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from agent.errors import CommandError, DeadlineError, FailedPreconditionError

log = logging.getLogger(__name__)

OUTPUT_BUFFER_MAX = 1024 * 1024
READ_CHUNK = 64 * 1024
CONSOLE_RECEIVE_TIMEOUT_S = 30.0


def set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


async def wait_fd(fd: int, *, write: bool = False) -> None:
    """Wait until ``fd`` is readable (or writable); hang-ups count as ready."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


class OutputBuffer:
    """One output stream of a process: bytes read from its fd until the host takes them."""

    def __init__(self, fd: int | None, name: str, limit: int = OUTPUT_BUFFER_MAX) -> None:
        self.name = name
        self._fd = fd
        self._limit = limit
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = fd is None
        self._reading = False
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if fd is not None:
            set_nonblocking(fd)
            self._resume()

    @property
    def buffered(self) -> int:
        return self._size

    @property
    def drained(self) -> bool:
        """The process closed the stream and the host has read everything."""
        return self._eof and not self._chunks

    def _resume(self) -> None:
        if self._fd is not None and not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _pause(self) -> None:
        if self._fd is not None and self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            # A pty master reads EIO once the last slave fd is closed: end of stream.
            if e.errno != errno.EIO:
                log.warning("%s: read failed: %s", self.name, e)
            data = b""
        if not data:
            self._finish()
            return
        self._chunks.append(data)
        self._size += len(data)
        self._changed.set()
        if self._size >= self._limit:
            self._pause()

    def _finish(self) -> None:
        self._pause()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._eof = True
        self._changed.set()

    async def read(self, max_bytes: int = READ_CHUNK) -> bytes | None:
        """The next bytes, at most ``max_bytes``; None at the end of the stream."""
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                if len(data) > max_bytes:
                    self._chunks.appendleft(data[max_bytes:])
                    data = data[:max_bytes]
                self._size -= len(data)
                if self._size < self._limit and not self._eof:
                    self._resume()
                return data
            if self._eof:
                return None
            self._changed.clear()
            await self._changed.wait()

    def close(self) -> None:
        """Stop reading and drop what is buffered; readers see the end of the stream."""
        self._chunks.clear()
        self._size = 0
        self._finish()


class StdinWriter:
    """The write end of a process's stdin (a pipe, or a dup of the pty master)."""

    def __init__(self, fd: int, name: str) -> None:
        self.name = name
        self._fd: int | None = fd
        self._lock = asyncio.Lock()
        # close() during a write that waits for room: the writer closes the fd
        # itself once it has left the event loop's registration, so the loop
        # never holds a closed (and maybe reused) fd number.
        self._closing = False
        self._writable: asyncio.Future[None] | None = None
        set_nonblocking(fd)

    @property
    def closed(self) -> bool:
        return self._fd is None or self._closing

    async def write(self, data: bytes) -> int:
        """Write all of ``data``, waiting while the pipe is full; returns len(data).

        :raise FailedPreconditionError: stdin was closed, or the process stopped reading.
        """
        async with self._lock:  # one writer at a time, so writes never interleave
            try:
                view = memoryview(data)
                while view:
                    if self.closed:
                        raise FailedPreconditionError(f"stdin of {self.name} is closed")
                    try:
                        view = view[os.write(self._fd, view):]  # type: ignore[arg-type]
                    except BlockingIOError:
                        await self._wait_writable()
                    except OSError as e:
                        if e.errno in (errno.EPIPE, errno.EIO):
                            raise FailedPreconditionError(
                                f"stdin of {self.name} is closed: the process no longer reads it"
                            ) from e
                        raise
                return len(data)
            finally:
                if self._closing:
                    self._close_fd()

    async def _wait_writable(self) -> None:
        assert self._fd is not None
        loop = asyncio.get_running_loop()
        self._writable = loop.create_future()
        loop.add_writer(self._fd, self._wake)
        try:
            await self._writable
        finally:
            loop.remove_writer(self._fd)
            self._writable = None

    def _wake(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def close(self) -> None:
        if self._fd is None:
            return
        if self._lock.locked():
            self._closing = True  # the writer closes it on its way out
            self._wake()
        else:
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._closing = False


class ProcessIO:
    """The agent's ends of one process's stdio."""

    def __init__(self, name: str, stdin: StdinWriter, stdout: OutputBuffer,
                 stderr: OutputBuffer, pty_master: int | None = None) -> None:
        self.name = name
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._pty = pty_master

    @property
    def terminal(self) -> bool:
        return self._pty is not None

    @property
    def drained(self) -> bool:
        return self.stdout.drained and self.stderr.drained

    def resize(self, rows: int, columns: int) -> None:
        """Set the terminal size (TIOCSWINSZ on the pty master); no-op without a tty."""
        if self._pty is None:
            return
        fcntl.ioctl(self._pty, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def close(self) -> None:
        self.stdin.close()
        self.stdout.close()
        self.stderr.close()
        if self._pty is not None:
            os.close(self._pty)
            self._pty = None

    @classmethod
    def from_pty(cls, name: str, master: int) -> ProcessIO:
        """Wrap a pty master: one fd each for output, stdin and resizing (dups share
        the open file, so each owner can close its own). A tty has no stderr."""
        try:
            out = OutputBuffer(os.dup(master), f"{name} stdout")
            stdin = StdinWriter(os.dup(master), name)
        except BaseException:
            os.close(master)
            raise
        return cls(name, stdin, out, OutputBuffer(None, f"{name} stderr"), master)


@dataclass
class PipeSet:
    """Pipes for a non-tty process: ``child`` fds go to crun, the others stay here."""

    child_stdin: int
    child_stdout: int
    child_stderr: int
    stdin: int
    stdout: int
    stderr: int

    @classmethod
    def create(cls) -> PipeSet:
        fds: list[int] = []
        try:
            for _ in range(3):
                fds.extend(os.pipe())  # close-on-exec: only the spawned crun gets its ends
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        in_r, in_w, out_r, out_w, err_r, err_w = fds
        return cls(in_r, out_w, err_w, in_w, out_r, err_r)

    @property
    def child_fds(self) -> tuple[int, int, int]:
        return self.child_stdin, self.child_stdout, self.child_stderr

    def close_child_ends(self) -> None:
        """After the spawn: the child has its copies; EOF needs ours closed."""
        for fd in self.child_fds:
            os.close(fd)

    def close_all(self) -> None:
        self.close_child_ends()
        for fd in (self.stdin, self.stdout, self.stderr):
            os.close(fd)

    def to_io(self, name: str) -> ProcessIO:
        return ProcessIO(name, StdinWriter(self.stdin, name),
                         OutputBuffer(self.stdout, f"{name} stdout"),
                         OutputBuffer(self.stderr, f"{name} stderr"))


class ConsoleSocket:
    """The unix socket crun's --console-socket sends the pty master to (SCM_RIGHTS)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(str(path))
            self._sock.listen(1)
            self._sock.setblocking(False)
        except BaseException:
            self.close()
            raise

    async def receive(self, timeout: float = CONSOLE_RECEIVE_TIMEOUT_S) -> int:
        """The pty master fd crun sends (close-on-exec, owned by the caller)."""
        loop = asyncio.get_running_loop()
        try:
            conn, _ = await asyncio.wait_for(loop.sock_accept(self._sock), timeout)
        except TimeoutError as e:
            raise DeadlineError(f"crun did not connect to the console socket within {timeout} s") from e
        with conn:
            fds = array.array("i")
            while True:
                try:
                    _, ancdata, _, _ = conn.recvmsg(
                        1024, socket.CMSG_SPACE(fds.itemsize), socket.MSG_CMSG_CLOEXEC)
                    break
                except BlockingIOError:
                    await asyncio.wait_for(wait_fd(conn.fileno()), timeout)
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if not fds:
            raise CommandError("crun closed the console socket without sending a pty")
        for extra in fds[1:]:
            os.close(extra)
        return fds[0]

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)
