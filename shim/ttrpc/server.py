"""ttrpc server on a unix socket (asyncio).

Owns listening, connections and their tasks. Per connection: one reader task
that decodes frames, one task per request (a Wait that blocks for hours never
stalls the other streams on the connection) and one writer task draining a
queue, so frames are written whole and in one place. Request routing and error
→ status mapping are in `services`; bytes are in `framing`.

Whoever can connect must not be able to exhaust the shim, so everything a peer
can make the server hold has a bound (`Limits`, defaults below): connections,
requests in flight per connection and the bytes they hold, responses waiting
for a peer that does not read them, and the time a frame may take once it has
started. Peers whose uid is not the server's are refused outright.
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
from dataclasses import dataclass, field

from google.protobuf import message as pb_message

from proto.gen import ttrpc_pb2

from .errors import Code
from .framing import (
    FrameTimeoutError,
    MessageType,
    OversizedFrameError,
    PeerClosedError,
    TruncatedFrameError,
    encode_frame,
    read_frame,
)
from .services import Call, ServiceRegistry

__all__ = [
    "FRAME_READ_TIMEOUT_S",
    "MAX_CONNECTIONS",
    "MAX_IN_FLIGHT_REQUESTS",
    "MAX_IN_FLIGHT_REQUEST_BYTES",
    "MAX_PENDING_WRITE_BYTES",
    "SHUTDOWN_TIMEOUT_S",
    "ConnectionInfo",
    "Limits",
    "Server",
]

logger = logging.getLogger(__name__)

# How long shutdown() lets in-flight requests finish before cancelling them.
SHUTDOWN_TIMEOUT_S = 5.0
# How long a closing connection may take to flush responses already queued;
# after that the peer is not reading and what is left is dropped.
FLUSH_TIMEOUT_S = 1.0

# Bounds on what a peer can make the server hold. containerd opens one or a few
# connections and has a handful of calls in flight, so these are far above
# normal use: they only stop a peer that floods.
#
# Connections open at once; each costs two tasks and its buffers.
MAX_CONNECTIONS = 64
# Requests being served per connection; each is a task holding its request.
MAX_IN_FLIGHT_REQUESTS = 256
# Request bytes those tasks may hold per connection (otherwise up to
# MAX_IN_FLIGHT_REQUESTS × MESSAGE_LENGTH_MAX = 1 GiB).
MAX_IN_FLIGHT_REQUEST_BYTES = 16 << 20
# Response bytes queued for writing plus those in the transport's buffer, per
# connection: a peer that sends requests but never reads the answers is cut
# off here instead of growing the shim. Must exceed one whole frame.
MAX_PENDING_WRITE_BYTES = 16 << 20
# Once a frame's first byte is in, the rest of it must follow within this, so
# that a peer cannot hold a connection and its read buffer with a frame it never
# finishes. Idle connections are not timed: containerd keeps its own open for
# the pod's life.
FRAME_READ_TIMEOUT_S = 10.0
# asyncio's StreamReader stops reading the socket above twice this, except
# while one frame's payload (at most MESSAGE_LENGTH_MAX) is being read whole.
READ_BUFFER_LIMIT = 64 << 10
# Refused connections are logged at most once per this many seconds (per
# reason), with a count of the ones not logged: refusals must not flood the log.
REFUSAL_LOG_INTERVAL_S = 5.0

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class ConnectionInfo:
    """Identifies a connection in hooks and logs."""

    id: int
    peer_pid: int | None = None
    peer_uid: int | None = None


ConnectionHook = Callable[[ConnectionInfo], None]


@dataclass(frozen=True)
class Limits:
    """A server's bounds; the defaults are the module constants."""

    max_connections: int = MAX_CONNECTIONS
    max_in_flight_requests: int = MAX_IN_FLIGHT_REQUESTS
    max_in_flight_request_bytes: int = MAX_IN_FLIGHT_REQUEST_BYTES
    max_pending_write_bytes: int = MAX_PENDING_WRITE_BYTES
    frame_read_timeout_s: float = FRAME_READ_TIMEOUT_S

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"ttrpc server limit {name} must be positive, not {value}")


@dataclass
class _RateLimitedWarning:
    """Logs at most one warning per `interval` seconds and counts the ones it drops."""

    interval: float
    _next_at: float = field(default=float("-inf"), init=False)
    _suppressed: int = field(default=0, init=False)

    def warning(self, now: float, msg: str, *args: object) -> bool:
        """Log unless one was logged less than `interval` ago; return whether it was."""
        if now < self._next_at:
            self._suppressed += 1
            return False
        if self._suppressed:
            msg += " (%d more like this not logged)"
            args = (*args, self._suppressed)
        logger.warning(msg, *args)
        self._next_at = now + self.interval
        self._suppressed = 0
        return True


class Server:
    """Serves a ServiceRegistry over ttrpc.

    Call `listen(path)` or `serve_socket(sock)` once, then `shutdown()`.
    `on_connection_closed` runs (in the event loop) after each connection has
    closed, whichever side closed it; not for connections refused at once.

    Only peers whose uid (SO_PEERCRED) is `allowed_uid` are served, by default
    the server's effective uid (as containerd's shims do). `limits` bounds what
    peers can make the server hold.
    """

    def __init__(
        self,
        registry: ServiceRegistry,
        *,
        on_connection_closed: ConnectionHook | None = None,
        allowed_uid: int | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.registry = registry
        self._on_connection_closed = on_connection_closed
        self.allowed_uid = os.geteuid() if allowed_uid is None else allowed_uid
        self.limits = limits if limits is not None else Limits()
        self._refused_uid_log = _RateLimitedWarning(REFUSAL_LOG_INTERVAL_S)
        self._refused_full_log = _RateLimitedWarning(REFUSAL_LOG_INTERVAL_S)
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
        self._server = await asyncio.start_unix_server(
            self._accept, path=path, limit=READ_BUFFER_LIMIT)
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
        self._server = await asyncio.start_unix_server(
            self._accept, sock=sock, limit=READ_BUFFER_LIMIT)
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
        now = asyncio.get_running_loop().time()
        if info.peer_uid != self.allowed_uid:
            # Unknown credentials (None) are refused too.
            self._refused_uid_log.warning(
                now, "refusing connection %d from pid %s uid %s: only uid %d may connect",
                info.id, info.peer_pid, info.peer_uid, self.allowed_uid)
            writer.close()
            return
        if self._shutting_down:
            writer.close()
            return
        if len(self._connections) >= self.limits.max_connections:
            self._refused_full_log.warning(
                now, "refusing connection %d from pid %s: %d connections are open, "
                "the maximum (MAX_CONNECTIONS)", info.id, info.peer_pid, len(self._connections))
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
        self._limits = server.limits
        # Unbounded as a queue, but bounded in bytes by _send_response.
        self._outgoing: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._queued_bytes = 0  # of the frames in _outgoing
        # The most ever pending (queued + transport buffer): for logs and tests.
        self.peak_pending_write_bytes = 0
        # Stream id → its request task; a task removes itself when done.
        self._requests: dict[int, asyncio.Task[None]] = {}
        self._in_flight_bytes = 0  # of the requests in _requests
        self._last_stream_id = 0
        self._accepting = True
        self._aborted = False  # dropped by _abort(): nothing more is read or written
        self._writer_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()  # set when run() has cleaned up

    def request_tasks(self) -> list[asyncio.Task[None]]:
        return list(self._requests.values())

    def stop_accepting(self) -> None:
        self._accepting = False

    @property
    def pending_write_bytes(self) -> int:
        """Response bytes not yet handed to the kernel: queued, or in the transport's buffer."""
        return self._queued_bytes + self._writer.transport.get_write_buffer_size()

    async def close(self) -> None:
        """Flush the responses already queued, close, and return once run() has finished."""
        self._accepting = False
        self._outgoing.put_nowait(None)  # the writer stops after what is queued before it
        if self._writer_task is not None:
            _, pending = await asyncio.wait([self._writer_task], timeout=FLUSH_TIMEOUT_S)
            if pending:
                # The peer is not reading: what is queued cannot go out.
                logger.info("connection %d: dropping %d response bytes the peer did not read",
                            self.info.id, self.pending_write_bytes)
                self._abort()
        await self._close_transport()  # the reader loop then sees EOF and run() winds down
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
            await self._close_transport()
            self._closed.set()

    async def _close_transport(self) -> None:
        """Close, letting the transport flush its buffer for up to FLUSH_TIMEOUT_S.

        A peer that does not read would otherwise keep the connection, and the
        buffer, forever: a transport's close() completes once its buffer is written.
        """
        self._writer.close()
        closed = asyncio.create_task(self._writer.wait_closed())
        _, pending = await asyncio.wait([closed], timeout=FLUSH_TIMEOUT_S)
        if pending:
            self._writer.transport.abort()
        with contextlib.suppress(OSError):
            await closed

    def _abort(self) -> None:
        """Drop the connection now, with whatever is queued or buffered for it.

        The reader loop then sees end of stream (or the flag) and run() cancels
        the requests in flight.
        """
        if self._aborted:
            return
        self._aborted = True
        self._accepting = False
        while not self._outgoing.empty():
            self._outgoing.get_nowait()
        self._queued_bytes = 0
        if self._writer_task is not None:
            self._writer_task.cancel()
        self._writer.transport.abort()

    # Section: reading

    async def _read_loop(self) -> None:
        while not self._aborted:
            try:
                frame = await read_frame(self._reader, self._limits.frame_read_timeout_s)
            except OversizedFrameError as exc:
                # Already discarded; the connection survives, the stream gets an error.
                logger.warning("connection %d: %s", self.info.id, exc)
                if exc.msg_type == MessageType.REQUEST:
                    self._send_status(exc.stream_id, Code.RESOURCE_EXHAUSTED, str(exc))
                continue
            except PeerClosedError:
                return
            except FrameTimeoutError as exc:
                logger.warning("connection %d (peer pid %s): %s (FRAME_READ_TIMEOUT_S); closing it",
                               self.info.id, self.info.peer_pid, exc)
                return
            except (TruncatedFrameError, OSError) as exc:
                if not self._aborted:  # an abort has been logged already
                    logger.warning("connection %d lost: %s", self.info.id, exc)
                return
            if self._aborted:
                return  # frames read before the abort took effect are dropped
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
        # Over a bound: answered here, without a task, and the connection goes on.
        limit = self._limits.max_in_flight_requests
        if len(self._requests) >= limit:
            logger.debug("connection %d: stream %d refused: %d requests in flight",
                         self.info.id, stream_id, len(self._requests))
            self._send_status(
                stream_id, Code.RESOURCE_EXHAUSTED,
                f"too many requests in flight on this connection (at most {limit}); "
                "retry once some have completed",
            )
            return
        size = len(payload)
        byte_limit = self._limits.max_in_flight_request_bytes
        if self._in_flight_bytes + size > byte_limit:
            logger.debug("connection %d: stream %d refused: %d request bytes in flight",
                         self.info.id, stream_id, self._in_flight_bytes)
            self._send_status(
                stream_id, Code.RESOURCE_EXHAUSTED,
                f"requests in flight on this connection would hold "
                f"{self._in_flight_bytes + size} bytes, over the bound of {byte_limit}; "
                "retry once some have completed",
            )
            return
        call = Call.from_request(request, stream_id, asyncio.get_running_loop().time())
        task = asyncio.create_task(
            self._serve(stream_id, request, call),
            name=f"ttrpc-{self.info.id}-{stream_id}-{request.method}",
        )
        self._requests[stream_id] = task
        self._in_flight_bytes += size
        task.add_done_callback(lambda _: self._request_done(stream_id, size))

    def _request_done(self, stream_id: int, size: int) -> None:
        self._requests.pop(stream_id, None)
        self._in_flight_bytes -= size

    async def _serve(self, stream_id: int, request: ttrpc_pb2.Request, call: Call) -> None:
        response = await self._server.registry.handle(request, call)
        self._send_response(stream_id, response)

    # Section: writing

    def _send_status(self, stream_id: int, code: Code, message: str) -> None:
        self._send_response(
            stream_id, ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=code, message=message))
        )

    def _send_response(self, stream_id: int, response: ttrpc_pb2.Response) -> None:
        if self._aborted:
            return  # nobody will read it
        try:
            frame = encode_frame(stream_id, MessageType.RESPONSE, 0, response.SerializeToString())
        except OversizedFrameError as exc:
            logger.warning("connection %d: response on stream %d: %s", self.info.id, stream_id, exc)
            status = ttrpc_pb2.Status(code=Code.RESOURCE_EXHAUSTED, message=f"response: {exc}")
            frame = encode_frame(
                stream_id, MessageType.RESPONSE, 0,
                ttrpc_pb2.Response(status=status).SerializeToString(),
            )
        pending = self.pending_write_bytes + len(frame)
        limit = self._limits.max_pending_write_bytes
        if pending > limit:
            # Checked before queueing, so the bound is never exceeded, not even by one frame.
            logger.warning(
                "connection %d (peer pid %s) is not reading its responses: %d bytes would be "
                "waiting, over the bound of %d (MAX_PENDING_WRITE_BYTES); closing it",
                self.info.id, self.info.peer_pid, pending, limit)
            self._abort()
            return
        self._queued_bytes += len(frame)
        self.peak_pending_write_bytes = max(self.peak_pending_write_bytes, pending)
        self._outgoing.put_nowait(frame)

    async def _write_loop(self) -> None:
        try:
            while (frame := await self._outgoing.get()) is not None:
                # From the queue to the transport's buffer: still pending, counted there.
                self._queued_bytes -= len(frame)
                self._writer.write(frame)
                await self._writer.drain()
        except OSError as exc:
            if self._aborted:
                return
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
