"""QMP over a unix socket through qemu.qmp's async client, with timeouts.

qemu.qmp does the protocol; this module adds what the shim needs on top:
waiting for QEMU to create its socket (while noticing if QEMU died first)
and a deadline on every command.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient

log = logging.getLogger(__name__)

QMP_TIMEOUT_S = 5.0
SOCKET_POLL_S = 0.01


class QmpError(Exception):
    """A QMP command failed or QEMU stopped answering."""


class Qmp:
    def __init__(self, name: str) -> None:
        self._client = QMPClient(name)

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
