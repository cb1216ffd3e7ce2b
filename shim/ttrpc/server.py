"""ttrpc server on a unix socket (asyncio).

Owns listening, connections and their tasks. Per connection: one reader task
that decodes frames, one task per request (a Wait that blocks for hours never
stalls the other streams on the connection) and one writer task draining a
queue, so frames are written whole and in one place. Request routing and error
→ status mapping are in `services`; bytes are in `framing`.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf import message as pb_message

from proto.gen import ttrpc_pb2

from .errors import Code
from .framing import (
    MessageType,
    OversizedFrameError,
    PeerClosedError,
    TruncatedFrameError,
    encode_frame,
    read_frame,
)
from .services import Call, ServiceRegistry

__all__ = ["SHUTDOWN_TIMEOUT_S", "ConnectionInfo", "Server"]

logger = logging.getLogger(__name__)

# How long shutdown() lets in-flight requests finish before cancelling them.
SHUTDOWN_TIMEOUT_S = 5.0
# How long a closing connection may take to flush responses already queued.
FLUSH_TIMEOUT_S = 1.0

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class ConnectionInfo:
    """Identifies a connection in hooks and logs."""

    id: int
    peer_pid: int | None = None
    peer_uid: int | None = None


ConnectionHook = Callable[[ConnectionInfo], None]


class Server:
    """Serves a ServiceRegistry over ttrpc.

    Call `listen(path)` or `serve_socket(sock)` once, then `shutdown()`.
    `on_connection_closed` runs (in the event loop) after each connection has
    closed, whichever side closed it.
    """

    def __init__(
        self,
        registry: ServiceRegistry,
        *,
        on_connection_closed: ConnectionHook | None = None,
    ) -> None:
        self.registry = registry
        self._on_connection_closed = on_connection_closed
        self._server: asyncio.AbstractServer | None = None
        self._path: str | None = None  # unlinked at shutdown when we created it
        self._connections: set[_Connection] = set()
        self._ids = itertools.count(1)
        self._shutting_down = False

    # Section: lifecycle

    async def listen(self, path: str) -> None:
        """Bind `path` (a leading NUL means an abstract socket) and start serving.

        A stale socket file at `path` is replaced.

        :raise RuntimeError: already serving.
        :raise OSError: the socket cannot be bound.
        """
        self._check_idle()
        self._server = await asyncio.start_unix_server(self._accept, path=path)
        if not path.startswith("\0"):
            self._path = path
        logger.info("ttrpc server listening on %s", path)

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve an already bound AF_UNIX stream socket (e.g. inherited from the shim manager).

        The socket is put in listening state if it is not already; its file is
        not removed at shutdown (the owner of the path decides).

        :raise RuntimeError: already serving.
        """
        self._check_idle()
        self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        logger.info("ttrpc server serving socket %s", sock.getsockname())

    async def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Stop accepting, let in-flight requests finish for up to `timeout`
        seconds, then cancel the rest and close every connection.

        New requests on open connections are answered Unavailable meanwhile.
        Do not await this from inside a handler (it would wait for itself):
        schedule it as a separate task.
        """
        if self._shutting_down:
            return
        self._shutting_down = True
        if self._server is not None:
            self._server.close()
        self._unlink_path()
        connections = list(self._connections)
        for conn in connections:
            conn.stop_accepting()
        in_flight = [t for conn in connections for t in conn.request_tasks()]
        if in_flight:
            logger.info("waiting up to %.1fs for %d in-flight requests", timeout, len(in_flight))
            _, pending = await asyncio.wait(in_flight, timeout=timeout)
            if pending:
                logger.warning("cancelling %d requests still running at shutdown", len(pending))
        await asyncio.gather(*(conn.close() for conn in connections))
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def _check_idle(self) -> None:
        if self._server is not None or self._shutting_down:
            raise RuntimeError("ttrpc server is already serving or has been shut down")

    def _unlink_path(self) -> None:
        path, self._path = self._path, None
        if path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)

    # Section: connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = ConnectionInfo(next(self._ids), *_peer_credentials(writer))
        if self._shutting_down:
            writer.close()
            return
        conn = _Connection(self, info, reader, writer)
        self._connections.add(conn)
        logger.debug("connection %d opened (peer pid %s)", info.id, info.peer_pid)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)
            logger.debug("connection %d closed", info.id)
            if self._on_connection_closed is not None:
                try:
                    self._on_connection_closed(info)
                except Exception:
                    logger.exception("on_connection_closed hook failed")


class _Connection:
    """One client connection: a reader loop, request tasks and a writer task."""

    def __init__(
        self,
        server: Server,
        info: ConnectionInfo,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._server = server
        self.info = info
        self._reader = reader
        self._writer = writer
        self._outgoing: asyncio.Queue[bytes | None] = asyncio.Queue()
        # Stream id → its request task; a task removes itself when done.
        self._requests: dict[int, asyncio.Task[None]] = {}
        self._last_stream_id = 0
        self._accepting = True
        self._writer_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()  # set when run() has cleaned up

    def request_tasks(self) -> list[asyncio.Task[None]]:
        return list(self._requests.values())

    def stop_accepting(self) -> None:
        self._accepting = False

    async def close(self) -> None:
        """Flush the responses already queued, close, and return once run() has finished."""
        self._accepting = False
        self._outgoing.put_nowait(None)  # the writer stops after what is queued before it
        if self._writer_task is not None:
            await asyncio.wait([self._writer_task], timeout=FLUSH_TIMEOUT_S)
        self._writer.close()  # the reader loop then sees EOF and run() winds down
        await self._closed.wait()

    async def run(self) -> None:
        self._writer_task = asyncio.create_task(
            self._write_loop(), name=f"ttrpc-writer-{self.info.id}"
        )
        try:
            await self._read_loop()
        finally:
            self._accepting = False
            tasks = self.request_tasks()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._writer_task.cancel()
            await asyncio.gather(self._writer_task, return_exceptions=True)
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._closed.set()

    # Section: reading

    async def _read_loop(self) -> None:
        while True:
            try:
                frame = await read_frame(self._reader)
            except OversizedFrameError as exc:
                # Already discarded; the connection survives, the stream gets an error.
                logger.warning("connection %d: %s", self.info.id, exc)
                if exc.msg_type == MessageType.REQUEST:
                    self._send_status(exc.stream_id, Code.RESOURCE_EXHAUSTED, str(exc))
                continue
            except PeerClosedError:
                return
            except (TruncatedFrameError, OSError) as exc:
                logger.warning("connection %d lost: %s", self.info.id, exc)
                return
            if frame.type == MessageType.REQUEST:
                self._on_request(frame.stream_id, frame.payload)
            elif frame.type == MessageType.DATA:
                # All our methods are unary; data frames have no stream to go to.
                logger.debug("connection %d: ignoring data frame on stream %d",
                              self.info.id, frame.stream_id)
            else:
                # Ignored rather than fatal, for forward compatibility (as ttrpc does).
                logger.warning("connection %d: ignoring frame of type %d on stream %d",
                               self.info.id, frame.type, frame.stream_id)

    def _on_request(self, stream_id: int, payload: bytes) -> None:
        if stream_id % 2 == 0 or stream_id <= self._last_stream_id:
            self._send_status(
                stream_id, Code.INVALID_ARGUMENT,
                f"stream id {stream_id} must be odd and greater than {self._last_stream_id}",
            )
            return
        self._last_stream_id = stream_id
        try:
            request = ttrpc_pb2.Request.FromString(payload)
        except pb_message.DecodeError as exc:
            self._send_status(stream_id, Code.INVALID_ARGUMENT, f"cannot decode request: {exc}")
            return
        if not self._accepting:
            self._send_status(stream_id, Code.UNAVAILABLE, "ttrpc server is shutting down")
            return
        call = Call.from_request(request, stream_id, asyncio.get_running_loop().time())
        task = asyncio.create_task(
            self._serve(stream_id, request, call),
            name=f"ttrpc-{self.info.id}-{stream_id}-{request.method}",
        )
        self._requests[stream_id] = task
        task.add_done_callback(lambda _: self._requests.pop(stream_id, None))

    async def _serve(self, stream_id: int, request: ttrpc_pb2.Request, call: Call) -> None:
        response = await self._server.registry.handle(request, call)
        self._send_response(stream_id, response)

    # Section: writing

    def _send_status(self, stream_id: int, code: Code, message: str) -> None:
        self._send_response(
            stream_id, ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=code, message=message))
        )

    def _send_response(self, stream_id: int, response: ttrpc_pb2.Response) -> None:
        try:
            frame = encode_frame(stream_id, MessageType.RESPONSE, 0, response.SerializeToString())
        except OversizedFrameError as exc:
            logger.warning("connection %d: response on stream %d: %s", self.info.id, stream_id, exc)
            status = ttrpc_pb2.Status(code=Code.RESOURCE_EXHAUSTED, message=f"response: {exc}")
            frame = encode_frame(
                stream_id, MessageType.RESPONSE, 0,
                ttrpc_pb2.Response(status=status).SerializeToString(),
            )
        self._outgoing.put_nowait(frame)

    async def _write_loop(self) -> None:
        try:
            while (frame := await self._outgoing.get()) is not None:
                self._writer.write(frame)
                await self._writer.drain()
        except OSError as exc:
            logger.warning("connection %d: write failed: %s", self.info.id, exc)
            # Nothing more can be answered; make the reader loop end too.
            self._writer.close()


def _peer_credentials(writer: asyncio.StreamWriter) -> tuple[int | None, int | None]:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None, None
    try:
        pid, uid, _ = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    except OSError:
        return None, None
    return pid, uid
