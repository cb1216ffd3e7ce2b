"""QMP over a unix socket through qemu.qmp's async client, with timeouts.

qemu.qmp does the protocol; this module adds what the shim needs on top:
waiting for QEMU to create its socket (while noticing if QEMU died first),
a deadline on every command, and bounds on what QEMU can make us hold.

qemu.qmp's QMPClient feeds every event to a default listener whose queue and
history grow without limit unless someone reads them; nothing in the shim
does, and a guest can make QEMU emit events at will (200k of them grew the
shim from 20 to 294 MiB). So events are counted by name and dropped. Each incoming
message is also limited to QMP_MAX_MESSAGE_BYTES (qemu.qmp's default is
10 MiB): a longer line fails the connection, and with it the command.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, Message, QMPClient

log = logging.getLogger(__name__)

QMP_TIMEOUT_S = 5.0
SOCKET_POLL_S = 0.01
# The shim's largest reply (query-chardev and the like) is a few KiB. The stream
# reader buffers up to twice this before it gives up on a line.
QMP_MAX_MESSAGE_BYTES = 1024 * 1024
# Distinct event names counted one by one; QEMU has a few dozen, the rest is "other".
EVENT_NAMES_MAX = 64
EVENT_NAME_MAX_CHARS = 64
OTHER_EVENTS = "(other)"
MAX_EVENT_WAITERS = 64


class QmpError(Exception):
    """A QMP command failed or QEMU stopped answering."""

    def __init__(self, message: str, error_class: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class  # QEMU's ("DeviceNotFound"...), "" if it never answered


@dataclass
class _EventWaiter:
    name: str
    device: str  # the event's data.device, or "" for any
    future: asyncio.Future[dict[str, Any]]


class _CountingClient(QMPClient):
    """A QMPClient that counts events instead of queueing them.

    No listener is ever fed, the default one included, so nothing grows. The
    only events kept are the ones somebody waits for right now (wait_event),
    at most MAX_EVENT_WAITERS of them.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name, readbuflen=QMP_MAX_MESSAGE_BYTES)
        self.event_counts: Counter[str] = Counter()
        self.waiters: list[_EventWaiter] = []

    async def _event_dispatch(self, msg: Message) -> None:
        name = msg.get("event")
        key = OTHER_EVENTS
        if isinstance(name, str) and name.isprintable():
            key = name[:EVENT_NAME_MAX_CHARS]
        if key not in self.event_counts and len(self.event_counts) >= EVENT_NAMES_MAX:
            key = OTHER_EVENTS
        self.event_counts[key] += 1
        if not self.waiters:
            return
        data = msg.get("data")
        device = data.get("device") if isinstance(data, dict) else None
        for waiter in list(self.waiters):
            if waiter.name == key and waiter.device in ("", device) and not waiter.future.done():
                waiter.future.set_result(data if isinstance(data, dict) else {})


class Qmp:
    def __init__(self, name: str) -> None:
        self._client = _CountingClient(name)
        self._fd_lock = asyncio.Lock()  # an fd and the getfd that names it go together

    @property
    def events_dropped(self) -> int:
        """QMP events received and dropped unread."""
        return sum(self._client.event_counts.values())

    async def connect(self, path: Path, proc: asyncio.subprocess.Process,
                      timeout_s: float) -> None:
        """Connect once QEMU has created ``path``.

        :raise QmpError: QEMU exited first, or the socket did not appear in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if proc.returncode is not None:
                raise QmpError(f"QEMU exited with status {proc.returncode} before QMP was ready")
            if path.exists():
                try:
                    await asyncio.wait_for(self._client.connect(str(path)), QMP_TIMEOUT_S)
                    return
                except (OSError, asyncio.TimeoutError, ConnectError) as exc:
                    # QEMU may be dying as we connect: the loop's exit check names that.
                    await asyncio.sleep(SOCKET_POLL_S)
                    if proc.returncode is None and loop.time() > deadline:
                        raise QmpError(f"cannot connect to QMP at {path}: {exc}") from exc
                    continue
            if loop.time() > deadline:
                raise QmpError(f"QEMU did not create its QMP socket {path} within {timeout_s:.0f}s")
            await asyncio.sleep(SOCKET_POLL_S)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout_s: float = QMP_TIMEOUT_S) -> Any:
        """Run one QMP command.

        :raise QmpError: QEMU answered with an error, or not within ``timeout_s``.
        """
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout_s)
        except ExecuteError as exc:
            raise QmpError(f"QMP {command} failed: {exc} ({exc.error_class})",
                           exc.error_class) from exc
        except asyncio.TimeoutError:
            raise QmpError(f"QMP {command} got no answer within {timeout_s:.0f}s") from None
        except Exception as exc:  # connection lost, protocol errors
            raise QmpError(f"QMP {command}: {exc}") from exc

    async def pass_fd(self, name: str, fd: int, timeout_s: float = QMP_TIMEOUT_S) -> None:
        """Give QEMU a copy of ``fd``, known as ``name`` to later commands (getfd).

        :raise QmpError: QEMU refused it or did not answer.
        """
        async with self._fd_lock:
            try:
                self._client.send_fd_scm(fd)
            except Exception as exc:  # noqa: BLE001 - no connection, not a unix socket
                raise QmpError(f"cannot pass an fd to QEMU: {exc}") from exc
            await self.execute("getfd", {"fdname": name}, timeout_s)

    def expect_event(self, name: str, device: str = "") -> asyncio.Future[dict[str, Any]]:
        """A future for the next event ``name`` (about ``device``); register it before
        the command that causes the event, then await it with a timeout.

        :raise QmpError: too many waiters already.
        """
        if len(self._client.waiters) >= MAX_EVENT_WAITERS:
            raise QmpError(f"more than {MAX_EVENT_WAITERS} QMP events awaited at once")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiter = _EventWaiter(name, device, future)
        self._client.waiters.append(waiter)
        future.add_done_callback(lambda _: self._client.waiters.remove(waiter))
        return future

    async def close(self) -> None:
        for waiter in list(self._client.waiters):
            waiter.future.cancel()
        try:
            await asyncio.wait_for(self._client.disconnect(), QMP_TIMEOUT_S)
        except Exception as exc:  # already gone: nothing to release
            log.debug("QMP disconnect: %s", exc)
        counts = self._client.event_counts
        if counts:
            log.debug("QMP: %d events dropped unread (%s)", self.events_dropped,
                      ", ".join(f"{name}: {n}" for name, n in counts.most_common(8)))
