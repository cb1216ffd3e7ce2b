"""The pod's management socket: node tools talk to a running pod's shim.

``husk direct-volume stats|resize`` (what a CSI plugin runs at
NodeGetVolumeStats and NodeExpandVolume, as with Kata's shim-monitor socket)
find the pod from the volume's record and connect to
``<run dir>/manage.sock`` (0600, root only). One JSON request per
connection, one JSON reply: ``{"op": "volume-stats", "volume_path": P}`` →
``{"ok": true, "stats": {...}}``; errors are ``{"ok": false, "error": "..."}``.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from shim import errors

log = logging.getLogger(__name__)

MANAGE_SOCKET = "manage.sock"
MAX_REQUEST_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 10.0
# A resize waits for QEMU, the guest to see the size and resize2fs.
REPLY_TIMEOUT_S = 180.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ManageServer:
    def __init__(self, run_dir: Path, handlers: dict[str, Handler], name: str) -> None:
        self.path = run_dir / MANAGE_SOCKET
        self._handlers = handlers
        self._name = name
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            sock.listen(8)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await self._reply(reader)
            writer.write(json.dumps(reply).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _reply(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
            request = json.loads(line[:MAX_REQUEST_BYTES])
            handler = self._handlers.get(request.get("op", "")) if isinstance(request, dict) else None
        except (ValueError, asyncio.TimeoutError, asyncio.LimitOverrunError) as exc:
            return {"ok": False, "error": f"bad request: {exc or 'timed out'}"}
        if handler is None:
            return {"ok": False, "error": f"unknown op; known: {', '.join(sorted(self._handlers))}"}
        try:
            result = await handler(request)
        except (errors.HuskError, KeyError, TypeError, ValueError) as exc:
            log.info("%s: %s failed: %s", self._name, request.get("op"), exc)
            return {"ok": False, "error": str(exc)}
        log.info("%s: %s done", self._name, request.get("op"))
        return {"ok": True, **result}


def call(run_dir: Path, request: dict[str, Any], timeout_s: float = REPLY_TIMEOUT_S
         ) -> dict[str, Any]:
    """Send one request to the pod whose run dir is ``run_dir`` (for the CLI).

    :raise errors.UnavailableError: no running shim there, or no answer in time.
    """
    path = run_dir / MANAGE_SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n") and len(data) <= MAX_REQUEST_BYTES:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise errors.UnavailableError(f"pod shim at {path}: {exc}") from exc
    try:
        reply = json.loads(data)
    except ValueError as exc:
        raise errors.UnavailableError(f"pod shim at {path} answered {data[:200]!r}") from exc
    if not isinstance(reply, dict):
        raise errors.UnavailableError(f"pod shim at {path} answered {data[:200]!r}")
    return reply
