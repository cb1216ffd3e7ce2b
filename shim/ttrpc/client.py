"""ttrpc client on a unix socket (asyncio).

Owns one connection: odd stream ids, the table of calls waiting for their
response, and the receive loop that completes them. When the connection ends,
for whatever reason, every waiting call fails with ConnectionClosedError and
later calls fail at once; reconnecting means creating a new Client.

Used by the shim to publish events to containerd
(``containerd.services.events.ttrpc.v1.Events/Forward``, namespace in
metadata key ``containerd-namespace-ttrpc``).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import TypeVar

from google.protobuf import message as pb_message

from proto.gen import ttrpc_pb2

from .errors import Code, ConnectError, ConnectionClosedError, TtrpcError
from .framing import (
    MessageType,
    OversizedFrameError,
    PeerClosedError,
    TruncatedFrameError,
    encode_frame,
    read_frame,
)

__all__ = ["CONNECT_TIMEOUT_S", "Client", "Metadata"]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
_STREAM_ID_MAX = 0xFFFFFFFF
_NANOS_PER_SECOND = 1_000_000_000
_UNIX_SCHEME = "unix://"

M = TypeVar("M", bound=pb_message.Message)
Metadata = Mapping[str, str | Sequence[str]]


class Client:
    """A ttrpc connection. Create it with `await Client.connect(address)`."""

    def __init__(
        self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.address = address
        self._reader = reader
        self._writer = writer
        self._next_stream_id = 1  # client streams are odd
        # Stream id → future of its Response; guarded by running on the loop only.
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._close_reason: str | None = None
        self._receiver = asyncio.create_task(self._receive_loop(), name=f"ttrpc-client-{address}")

    @classmethod
    async def connect(cls, address: str, *, timeout: float = CONNECT_TIMEOUT_S) -> Client:
        """Connect to a unix socket path, with or without a ``unix://`` prefix.

        A path starting with NUL is an abstract socket.

        :raise ConnectError: the socket cannot be reached within `timeout`.
        """
        path = address.removeprefix(_UNIX_SCHEME)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path)
        except (OSError, TimeoutError) as exc:
            reason = f"timed out after {timeout}s" if isinstance(exc, TimeoutError) else str(exc)
            raise ConnectError(f"cannot connect to ttrpc server at {address}: {reason}") from exc
        return cls(address, reader, writer)

    @property
    def closed(self) -> bool:
        return self._close_reason is not None

    async def call(
        self,
        service: str,
        method: str,
        request: pb_message.Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> M:
        """Make one unary call and return its decoded response.

        `timeout` (seconds) is sent as the server-side deadline and also bounds
        the wait here; None waits as long as the server takes.

        :raise TtrpcError: the server answered with a non-OK status, or the
            call timed out (DEADLINE_EXCEEDED), or a message was too large
            (RESOURCE_EXHAUSTED).
        :raise ConnectionClosedError: the connection is, or became, closed.
        """
        if self._close_reason is not None:
            raise ConnectionClosedError(self._close_reason)
        name = f"{service}/{method}"
        stream_id = self._allocate_stream_id()
        envelope = ttrpc_pb2.Request(
            service=service,
            method=method,
            payload=request.SerializeToString(),
            timeout_nano=int(timeout * _NANOS_PER_SECOND) if timeout else 0,
            metadata=_key_values(metadata or {}),
        )
        try:
            frame = encode_frame(stream_id, MessageType.REQUEST, 0, envelope.SerializeToString())
        except OversizedFrameError as exc:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, f"{name} request: {exc}") from exc
        future: asyncio.Future[ttrpc_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(frame)
                await self._writer.drain()
                response = await future
        except TimeoutError:
            raise TtrpcError(
                Code.DEADLINE_EXCEEDED, f"{name} got no response within {timeout}s"
            ) from None
        except OSError as exc:
            self._close(f"write failed: {exc}")
            raise ConnectionClosedError(f"{name}: {self._close_reason}") from exc
        finally:
            self._pending.pop(stream_id, None)
        return _unpack(name, response, response_type)

    async def close(self) -> None:
        """Close the connection; waiting calls fail with ConnectionClosedError."""
        self._close("client closed")
        self._receiver.cancel()
        await asyncio.gather(self._receiver, return_exceptions=True)
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _allocate_stream_id(self) -> int:
        stream_id = self._next_stream_id
        if stream_id > _STREAM_ID_MAX:
            # About 2**31 calls on one connection; a new connection starts over.
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, "stream ids exhausted; reconnect")
        self._next_stream_id += 2
        return stream_id

    async def _receive_loop(self) -> None:
        reason = "connection closed by the server"
        try:
            while True:
                try:
                    frame = await read_frame(self._reader)
                except OversizedFrameError as exc:
                    # Discarded; only the call it belonged to fails.
                    self._fail(exc.stream_id, TtrpcError(Code.RESOURCE_EXHAUSTED, f"response: {exc}"))
                    continue
                if frame.type != MessageType.RESPONSE:
                    logger.debug("ttrpc %s: ignoring frame type %d on stream %d",
                                 self.address, frame.type, frame.stream_id)
                    continue
                try:
                    response = ttrpc_pb2.Response.FromString(frame.payload)
                except pb_message.DecodeError as exc:
                    self._fail(frame.stream_id, TtrpcError(
                        Code.INTERNAL, f"cannot decode response envelope: {exc}"))
                    continue
                future = self._pending.get(frame.stream_id)
                if future is None or future.done():
                    # The caller gave up (timeout or cancellation).
                    logger.debug("ttrpc %s: late response on stream %d",
                                 self.address, frame.stream_id)
                    continue
                future.set_result(response)
        except PeerClosedError:
            pass
        except (TruncatedFrameError, OSError) as exc:
            reason = f"connection lost: {exc}"
        finally:
            self._close(reason)

    def _fail(self, stream_id: int, error: TtrpcError) -> None:
        future = self._pending.get(stream_id)
        if future is not None and not future.done():
            future.set_exception(error)

    def _close(self, reason: str) -> None:
        """Mark closed (first reason wins) and fail every waiting call."""
        if self._close_reason is None:
            self._close_reason = f"ttrpc connection to {self.address}: {reason}"
        self._writer.close()
        for stream_id in list(self._pending):
            self._fail(stream_id, ConnectionClosedError(self._close_reason))


def _key_values(metadata: Metadata) -> list[ttrpc_pb2.KeyValue]:
    pairs = []
    for key, values in metadata.items():
        for value in [values] if isinstance(values, str) else values:
            pairs.append(ttrpc_pb2.KeyValue(key=key, value=value))
    return pairs


def _unpack(name: str, response: ttrpc_pb2.Response, response_type: type[M]) -> M:
    status = response.status
    if status.code != Code.OK:
        raise TtrpcError(Code.from_wire(status.code), status.message, status.details)
    try:
        return response_type.FromString(response.payload)
    except pb_message.DecodeError as exc:
        raise TtrpcError(
            Code.INTERNAL, f"cannot decode {name} response as {response_type.__name__}: {exc}"
        ) from exc
