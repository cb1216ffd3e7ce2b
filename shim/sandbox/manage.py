"""The pod's management socket: node tools talk to a running pod's shim.

``husk direct-volume stats|resize`` (what a CSI plugin runs at
NodeGetVolumeStats and NodeExpandVolume, as with Kata's shim-monitor socket)
find the pod from the volume's record and connect to
``<run dir>/manage.sock`` (0600, root only). One JSON request per
connection, one JSON reply: ``{"op": "volume-stats", "volume_path": P}`` →
``{"ok": true, "stats": {...}}``; errors are ``{"ok": false, "error": "..."}``.

A streaming op (``husk exec``'s "console") answers ``{"ok": true}`` and then
carries frames both ways on the same connection: a type byte, a 4-byte
big-endian length, the payload (see Frame).
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim import errors

log = logging.getLogger(__name__)

MANAGE_SOCKET = "manage.sock"
MAX_REQUEST_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 10.0
# How long a stream's connection stays open after its last frame for the client to
# close it (see ManageServer._linger).
STREAM_LINGER_S = 2.0
# A resize waits for QEMU, the guest to see the size and resize2fs.
REPLY_TIMEOUT_S = 180.0

FRAME_HEADER = struct.Struct(">BI")
MAX_FRAME_BYTES = 64 * 1024
_PEERCRED = struct.Struct("3i")


class Frame(enum.IntEnum):
    """What a frame of a streaming op carries."""

    STDIN = 0        # client → shim: bytes for the process
    CLOSE_STDIN = 1  # client → shim: no more input
    RESIZE = 2       # client → shim: ">HH" rows, columns
    OUTPUT = 3       # shim → client: the process's output
    EXIT = 4         # shim → client: ">i" exit status; the last frame
    ERROR = 5        # shim → client: why it ended without an exit status; the last frame


def encode_frame(kind: Frame, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.pack(kind, len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[Frame, bytes] | None:
    """The next frame; None at a clean end of the stream.

    :raise ValueError: an unknown type or an oversized or truncated frame.
    """
    try:
        header = await reader.readexactly(FRAME_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ValueError("truncated frame header") from None
        return None
    kind, length = FRAME_HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes (at most {MAX_FRAME_BYTES})")
    try:
        return Frame(kind), await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ValueError("truncated frame") from None
    except ValueError:
        raise ValueError(f"unknown frame type {kind}") from None


@dataclass
class Stream:
    """A streaming op's connection; accept() answers ok, after which only frames flow."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: str
    accepted: bool = False

    async def accept(self) -> None:
        self.accepted = True
        self.writer.write(json.dumps({"ok": True}).encode() + b"\n")
        await asyncio.wait_for(self.writer.drain(), REQUEST_TIMEOUT_S)


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
# Runs for as long as the stream lasts; raises HuskError to refuse before accept().
StreamHandler = Callable[[dict[str, Any], Stream], Awaitable[None]]


class ManageServer:
    def __init__(self, run_dir: Path, handlers: dict[str, Handler], name: str,
                 stream_handlers: dict[str, StreamHandler] | None = None,
                 quiet: frozenset[str] = frozenset()) -> None:
        """:param quiet: ops logged at DEBUG only (polled ones: a scrape every 15 s
            must not fill the pod's log)."""
        self.path = run_dir / MANAGE_SOCKET
        self._quiet = quiet
        self._handlers = handlers
        self._stream_handlers = stream_handlers or {}
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
            reply = await self._reply(reader, writer)
            if reply is not None:
                writer.write(json.dumps(reply).encode() + b"\n")
                await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
            else:
                await self._linger(reader)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    @staticmethod
    async def _linger(reader: asyncio.StreamReader) -> None:
        """After a stream's last frame, until the client closes (at most STREAM_LINGER_S).

        The client may still be writing (its stdin, its end, a resize) when the last
        frame goes out; closing at once fails those writes (EPIPE), and an asyncio
        client then loses the frames it has not read yet: `husk exec` of a program that
        exits at once reported a broken console instead of the exit status. What the
        client still sends is dropped.
        """
        with contextlib.suppress(asyncio.TimeoutError, asyncio.LimitOverrunError):
            async with asyncio.timeout(STREAM_LINGER_S):
                while await reader.read(MAX_FRAME_BYTES):
                    pass

    async def _reply(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> dict[str, Any] | None:
        """The JSON reply, or None when a streaming op already answered."""
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
            request = json.loads(line[:MAX_REQUEST_BYTES])
            op = request.get("op", "") if isinstance(request, dict) else ""
        except (ValueError, asyncio.TimeoutError, asyncio.LimitOverrunError) as exc:
            return {"ok": False, "error": f"bad request: {exc or 'timed out'}"}
        if op in self._stream_handlers:
            return await self._stream(op, request, Stream(reader, writer, _peer(writer)))
        handler = self._handlers.get(op)
        if handler is None:
            known = sorted([*self._handlers, *self._stream_handlers])
            return {"ok": False, "error": f"unknown op; known: {', '.join(known)}"}
        try:
            result = await handler(request)
        except (errors.HuskError, KeyError, TypeError, ValueError) as exc:
            log.info("%s: %s failed: %s", self._name, request.get("op"), exc)
            return {"ok": False, "error": str(exc)}
        log.log(logging.DEBUG if op in self._quiet else logging.INFO, "%s: %s done",
                self._name, op)
        return {"ok": True, **result}

    async def _stream(self, op: str, request: dict[str, Any], stream: Stream
                      ) -> dict[str, Any] | None:
        try:
            await self._stream_handlers[op](request, stream)
        except (errors.HuskError, KeyError, TypeError, ValueError) as exc:
            log.info("%s: %s (from %s) failed: %s", self._name, op, stream.peer, exc)
            if not stream.accepted:
                return {"ok": False, "error": str(exc)}
            stream.writer.write(encode_frame(Frame.ERROR, str(exc).encode()[:MAX_FRAME_BYTES]))
            await asyncio.wait_for(stream.writer.drain(), REQUEST_TIMEOUT_S)
        return None


def _peer(writer: asyncio.StreamWriter) -> str:
    """"pid N uid U" of the connecting process, for the log."""
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, _ = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except (OSError, AttributeError):
        return "an unknown process"
    return f"pid {pid} uid {uid}"


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
