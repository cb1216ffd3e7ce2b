"""ttrpc message framing: bytes in, frames out.

Owns the 10-byte header layout, the message size limit and the per-frame read
deadline. Knows nothing about sockets, protobuf or service names: `read_frame`
takes anything with an ``async readexactly(n)`` (an ``asyncio.StreamReader``),
`encode_frame` returns bytes for the caller to write.

Header (big endian): u32 payload length, u32 stream id, u8 message type, u8 flags.
"""
from __future__ import annotations

import asyncio
import enum
import struct
from asyncio import IncompleteReadError
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "DISCARD_CHUNK",
    "HEADER_LENGTH",
    "MESSAGE_LENGTH_MAX",
    "ByteReader",
    "Flags",
    "Frame",
    "FrameTimeoutError",
    "FramingError",
    "MessageType",
    "OversizedFrameError",
    "PeerClosedError",
    "TruncatedFrameError",
    "decode_header",
    "encode_frame",
    "read_frame",
]

HEADER_LENGTH = 10
# ttrpc's messageLengthMax: the payload limit in both directions.
MESSAGE_LENGTH_MAX = 4 << 20
# Oversized payloads are skipped in pieces of this size, never buffered whole.
DISCARD_CHUNK = 64 << 10

_HEADER = struct.Struct(">IIBB")


class MessageType(enum.IntEnum):
    REQUEST = 0x1
    RESPONSE = 0x2
    DATA = 0x3


class Flags(enum.IntFlag):
    """Per-type flags; unary requests and responses carry none."""

    REMOTE_CLOSED = 0x1  # request or data: the sender sends no more data
    REMOTE_OPEN = 0x2  # request: the sender will stream data frames
    NO_DATA = 0x4  # data: the frame carries no payload


@dataclass(frozen=True, slots=True)
class Frame:
    """One message. `type` is a plain int: unknown types are passed up, not rejected here."""

    stream_id: int
    type: int
    flags: int
    payload: bytes


class ByteReader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


class FramingError(Exception):
    """Root of the framing errors."""


class PeerClosedError(FramingError, EOFError):
    """The peer closed the stream cleanly, between two frames."""


class TruncatedFrameError(FramingError, EOFError):
    """The stream ended in the middle of a frame."""


class FrameTimeoutError(FramingError):
    """A frame had started but was not complete within the deadline given to `read_frame`.

    The stream is left in the middle of that frame: the connection cannot go on.
    """

    def __init__(self, timeout: float) -> None:
        super().__init__(f"frame not complete {timeout:g}s after its first byte")
        self.timeout = timeout


class OversizedFrameError(FramingError):
    """A payload exceeds MESSAGE_LENGTH_MAX.

    When raised by `read_frame`, the payload has already been read and dropped,
    so the stream is positioned at the next frame and the connection can go on.
    """

    def __init__(self, stream_id: int, msg_type: int, length: int) -> None:
        super().__init__(
            f"message length {length} exceeds the maximum message size of {MESSAGE_LENGTH_MAX}"
        )
        self.stream_id = stream_id
        self.msg_type = msg_type
        self.length = length


def encode_frame(stream_id: int, msg_type: int, flags: int, payload: bytes = b"") -> bytes:
    """Return the header followed by the payload.

    :raise OversizedFrameError: the payload exceeds MESSAGE_LENGTH_MAX.
    :raise ValueError: a header field is out of range.
    """
    if len(payload) > MESSAGE_LENGTH_MAX:
        raise OversizedFrameError(stream_id, msg_type, len(payload))
    if not 0 <= stream_id <= 0xFFFFFFFF:
        raise ValueError(f"stream id {stream_id} does not fit in 32 bits")
    if not (0 <= msg_type <= 0xFF and 0 <= flags <= 0xFF):
        raise ValueError(f"message type {msg_type} or flags {flags} do not fit in 8 bits")
    return _HEADER.pack(len(payload), stream_id, msg_type, flags) + payload


def decode_header(header: bytes) -> tuple[int, int, int, int]:
    """Split a 10-byte header into (length, stream id, type, flags)."""
    length, stream_id, msg_type, flags = _HEADER.unpack(header)
    return length, stream_id, msg_type, flags


async def read_frame(reader: ByteReader, frame_timeout: float | None = None) -> Frame:
    """Read the next frame.

    Waiting for a frame to start takes as long as it takes (an idle connection
    is fine); once its first byte has arrived, the rest of it (header, then
    payload or the discarding of an oversized one) must follow within
    `frame_timeout` seconds when that is not None.

    :raise PeerClosedError: end of stream before a header byte.
    :raise TruncatedFrameError: end of stream inside a frame.
    :raise FrameTimeoutError: the frame was not complete in time.
    :raise OversizedFrameError: the payload was too long and has been discarded;
        the reader stays usable.
    """
    # One byte first, so that the deadline starts when the frame does.
    try:
        first = await reader.readexactly(1)
    except IncompleteReadError:
        raise PeerClosedError("peer closed the connection") from None
    if frame_timeout is None:
        return await _read_rest(reader, first)
    deadline = asyncio.timeout(frame_timeout)
    try:
        async with deadline:
            return await _read_rest(reader, first)
    except TimeoutError:
        if deadline.expired():
            raise FrameTimeoutError(frame_timeout) from None
        raise


async def _read_rest(reader: ByteReader, first: bytes) -> Frame:
    try:
        header = first + await reader.readexactly(HEADER_LENGTH - 1)
    except IncompleteReadError as exc:
        raise TruncatedFrameError(
            f"connection closed after {1 + len(exc.partial)} of {HEADER_LENGTH} header bytes"
        ) from None
    length, stream_id, msg_type, flags = decode_header(header)
    if length > MESSAGE_LENGTH_MAX:
        await _discard(reader, length)
        raise OversizedFrameError(stream_id, msg_type, length)
    try:
        payload = await reader.readexactly(length) if length else b""
    except IncompleteReadError as exc:
        raise TruncatedFrameError(
            f"connection closed after {len(exc.partial)} of {length} payload bytes "
            f"(stream {stream_id})"
        ) from None
    return Frame(stream_id, msg_type, flags, payload)


async def _discard(reader: ByteReader, length: int) -> None:
    remaining = length
    try:
        while remaining:
            n = min(remaining, DISCARD_CHUNK)
            await reader.readexactly(n)
            remaining -= n
    except IncompleteReadError as exc:
        raise TruncatedFrameError(
            f"connection closed while discarding an oversized message "
            f"({length - remaining + len(exc.partial)} of {length} bytes)"
        ) from None
