"""Guest output (the serial console, the agent's log port), read with bounds.

Everything here comes from the guest and is treated as hostile. QEMU is the
client of a unix socket the shim listens on before QEMU is spawned
(``-chardev socket,...,server=off``): the kernel queues QEMU's connection in
the listener's backlog whether or not we have accepted yet, so QEMU never
waits for the shim and no early byte is lost.

Each stream goes to

- a ring buffer of the newest ``RING_BYTES``, for error messages, and
- a file in the run dir for operators, cut at ``FILE_CAP_BYTES``: past that,
  one line says output is being dropped, and at close one line says how much.

Reads are bounded (``READ_CHUNK_BYTES``) and so are wakeups: past a burst of
``READ_BURST`` reads, one per ``READ_INTERVAL_S``, whatever the size of QEMU's
writes (the emulated UART hands over a byte or a few at a time). Meanwhile
output collects in the socket; once it is full, a flooding guest finds its
port blocked (QEMU's UART and virtio-serial wait for the host) rather than
making the shim spin.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
from dataclasses import dataclass, field
from pathlib import Path

from shim.util.cappedfile import FILE_CAP_BYTES, NOTICE_RESERVE_BYTES, CappedFile
from shim.util.tasks import cancel_and_wait

__all__ = ["FILE_CAP_BYTES", "NOTICE_RESERVE_BYTES", "CappedFile", "GuestLog", "GuestLogError",
           "RingBuffer", "printable"]

log = logging.getLogger(__name__)

# Enough for a kernel panic or the agent's last words; small enough to keep per pod.
RING_BYTES = 64 * 1024
# One recv: bounds the memory a single read costs.
READ_CHUNK_BYTES = 16 * 1024
# Sustained, at most 100 reads a second per stream, so at most 1.6 MiB/s: a
# flood costs the shim about 2% of a CPU. The burst lets a boot through at full
# speed: a debug boot's console is ~750 small reads, and pacing it would cost
# the guest time (backpressure on a UART makes the kernel's printk wait).
READ_INTERVAL_S = 0.01
READ_BURST = 2000
# After QEMU exited: how long to wait for the last bytes still in the socket.
DRAIN_TIMEOUT_S = 1.0
# Tails end up in error messages (containerd, kubelet, a terminal): keep them short.
TAIL_LINES = 5
TAIL_MAX_CHARS = 2048
LISTEN_BACKLOG = 1


class GuestLogError(Exception):
    """A guest output socket cannot be set up."""


def printable(text: str, keep_newlines: bool = False) -> str:
    """``text`` with control characters escaped (no terminal escapes, no forged log lines)."""
    out = []
    for c in text:
        if c.isprintable() or c == "\t" or (keep_newlines and c == "\n"):
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


@dataclass
class RingBuffer:
    """The newest ``capacity`` bytes written."""

    capacity: int = RING_BYTES
    total: int = 0
    _data: bytearray = field(default_factory=bytearray)

    def write(self, data: bytes) -> None:
        self.total += len(data)
        self._data += data[-self.capacity:]
        excess = len(self._data) - self.capacity
        if excess > 0:
            del self._data[:excess]

    def getvalue(self) -> bytes:
        return bytes(self._data)


@dataclass
class ReadPacer:
    """A budget of reads: ``burst`` of them at once, refilled one per ``interval_s``."""

    interval_s: float = READ_INTERVAL_S
    burst: int = READ_BURST
    credit: float = 0.0
    stamp: float | None = None  # None: not used yet, the budget is full

    def delay(self, now: float) -> float:
        """Take one read; how long to wait before making it."""
        if self.stamp is None:
            self.credit, self.stamp = float(self.burst), now
        if self.interval_s <= 0:
            return 0.0
        self.credit = min(float(self.burst), self.credit + (now - self.stamp) / self.interval_s)
        self.stamp = now
        self.credit -= 1
        return 0.0 if self.credit >= 0 else -self.credit * self.interval_s


@dataclass
class GuestLog:
    """One guest output stream: a listening socket, its reader task, a ring and a file."""

    name: str
    socket_path: Path
    file_path: Path
    ring: RingBuffer = field(default_factory=RingBuffer)
    file_cap: int = FILE_CAP_BYTES
    pacer: ReadPacer = field(default_factory=ReadPacer)
    reads: int = 0
    paced: int = 0  # reads that waited for the budget
    _dropped_before: int = 0  # dropped past the cap by a file already closed
    _file: CappedFile | None = None
    _listener: socket.socket | None = None
    _conn: socket.socket | None = None
    _task: asyncio.Task[None] | None = None
    _draining: bool = False

    @property
    def dropped(self) -> int:
        """Bytes kept out of the file by its cap (the ring still saw them)."""
        return self._dropped_before + (self._file.dropped if self._file else 0)

    def open(self) -> None:
        """Listen on ``socket_path``, open the file and start reading (before QEMU starts).

        :raise GuestLogError: the socket or the file cannot be created.
        """
        if self._task is not None:
            raise GuestLogError(f"the {self.name} log is already open")
        try:
            self._file = CappedFile(self.file_path, self.name, self.file_cap)
            self.socket_path.unlink(missing_ok=True)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener = listener
            listener.bind(str(self.socket_path))
            listener.listen(LISTEN_BACKLOG)
            listener.setblocking(False)
        except OSError as exc:
            self._release()
            raise GuestLogError(f"cannot set up the {self.name} log at {self.socket_path}: "
                                f"{exc.strerror or exc}") from exc
        self._task = asyncio.get_running_loop().create_task(
            self._read(listener), name=f"guestlog-{self.name}")

    async def _read(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn, _ = await loop.sock_accept(listener)
        except OSError as exc:
            log.warning("%s log: accept failed: %s", self.name, exc)
            return
        self._conn = conn
        # QEMU connects once and never again; nobody else may feed this stream.
        self._close_listener()
        while True:
            delay = self.pacer.delay(loop.time())
            if delay > 0 and not self._draining:
                self.paced += 1
                await asyncio.sleep(delay)
            try:
                data = await loop.sock_recv(conn, READ_CHUNK_BYTES)
            except OSError as exc:
                log.debug("%s log: %s", self.name, exc)
                return
            if not data:
                return
            self.reads += 1
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        self.ring.write(data)
        if self._file is None:
            return
        try:
            capped = self._file.dropped
            self._file.write(data)
            if not capped and self._file.dropped:
                # Once per stream: the guest decides how much it writes.
                log.warning("%s log: the guest wrote more than %d bytes; the rest is dropped "
                            "(the newest %d bytes stay in memory for error messages)",
                            self.name, self._file.cap, self.ring.capacity)
        except OSError as exc:
            log.warning("%s log: cannot write %s (%s); keeping only the last %d bytes in memory",
                        self.name, self.file_path, exc.strerror or exc, self.ring.capacity)
            self._dropped_before += self._file.dropped
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    async def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """After QEMU exited: read what it left in the socket, unpaced, for up to ``timeout_s``.

        At most a socket buffer's worth is left (QEMU is gone), so this is bounded too.
        """
        task = self._task
        if task is None or task.done():
            return
        if self._conn is None and not self._pending_connection():
            return  # QEMU never connected: nothing to read
        self._draining = True
        # asyncio.wait, not wait_for: a close() cancelling the reader meanwhile
        # must not raise CancelledError in whoever is draining.
        await asyncio.wait({task}, timeout=timeout_s)

    def _pending_connection(self) -> bool:
        if self._listener is None:
            return False
        try:
            readable, _, _ = select.select([self._listener], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    async def close(self) -> None:
        """Stop reading and release the socket, the file and the task; idempotent.

        The ring buffer stays readable.
        """
        task, self._task = self._task, None
        try:
            if task is not None:
                await cancel_and_wait(task)
        finally:
            self._release()  # also when the caller is cancelled while it waits
        if self.ring.total:
            log.debug("%s log: %d bytes from the guest in %d reads (%d paced), %d dropped past "
                      "the file cap", self.name, self.ring.total, self.reads, self.paced,
                      self.dropped)

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.socket_path.unlink(missing_ok=True)

    def _release(self) -> None:
        self._close_listener()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._file is not None:
            self._dropped_before += self._file.dropped
            try:
                self._file.close()
            except OSError as exc:
                log.warning("%s log: closing %s: %s", self.name, self.file_path, exc)
            self._file = None

    def text(self, max_bytes: int = RING_BYTES) -> str:
        """The newest ``max_bytes`` (at most the ring), control characters escaped."""
        data = self.ring.getvalue()[-max_bytes:].replace(b"\r\n", b"\n")
        return printable(data.decode(errors="replace"), keep_newlines=True)

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The last non-empty lines, joined by `` | ``, escaped and at most ``TAIL_MAX_CHARS``."""
        text = self.ring.getvalue().decode(errors="replace")
        kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
        joined = printable(" | ".join(kept))
        if len(joined) > TAIL_MAX_CHARS:
            joined = "…" + joined[-(TAIL_MAX_CHARS - 1):]
        return joined
