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


class QmpError(Exception):
    """A QMP command failed or QEMU stopped answering."""


class _CountingClient(QMPClient):
    """A QMPClient that counts events instead of queueing them.

    No listener is ever fed, the default one included, so nothing grows.
    Whoever needs events one day should add a listener with a bounded queue.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name, readbuflen=QMP_MAX_MESSAGE_BYTES)
        self.event_counts: Counter[str] = Counter()

    async def _event_dispatch(self, msg: Message) -> None:
        name = msg.get("event")
        key = OTHER_EVENTS
        if isinstance(name, str) and name.isprintable():
            key = name[:EVENT_NAME_MAX_CHARS]
        if key not in self.event_counts and len(self.event_counts) >= EVENT_NAMES_MAX:
            key = OTHER_EVENTS
        self.event_counts[key] += 1


class Qmp:
    def __init__(self, name: str) -> None:
        self._client = _CountingClient(name)

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
            raise QmpError(f"QMP {command} failed: {exc} ({exc.error_class})") from exc
        except asyncio.TimeoutError:
            raise QmpError(f"QMP {command} got no answer within {timeout_s:.0f}s") from None
        except Exception as exc:  # connection lost, protocol errors
            raise QmpError(f"QMP {command}: {exc}") from exc

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._client.disconnect(), QMP_TIMEOUT_S)
        except Exception as exc:  # already gone: nothing to release
            log.debug("QMP disconnect: %s", exc)
        counts = self._client.event_counts
        if counts:
            log.debug("QMP: %d events dropped unread (%s)", self.events_dropped,
                      ", ".join(f"{name}: {n}" for name, n in counts.most_common(8)))
