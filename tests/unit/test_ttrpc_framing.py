"""ttrpc framing: frames built byte by byte, read back from a StreamReader."""
from __future__ import annotations

import asyncio

import pytest

from shim.ttrpc.framing import (
    HEADER_LENGTH,
    MESSAGE_LENGTH_MAX,
    Frame,
    MessageType,
    OversizedFrameError,
    PeerClosedError,
    TruncatedFrameError,
    encode_frame,
    read_frame,
)


def reader_of(*chunks: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=2 * MESSAGE_LENGTH_MAX)
    for chunk in chunks:
        reader.feed_data(chunk)
    if eof:
        reader.feed_eof()
    return reader


def header(length: int, stream_id: int, msg_type: int, flags: int) -> bytes:
    return (length.to_bytes(4, "big") + stream_id.to_bytes(4, "big")
            + bytes([msg_type, flags]))


def test_header_layout_is_length_stream_type_flags_big_endian() -> None:
    frame = encode_frame(0x01020305, MessageType.REQUEST, 0x02, b"abc")
    assert frame == bytes([0, 0, 0, 3, 1, 2, 3, 5, 1, 2]) + b"abc"
    assert HEADER_LENGTH == 10


def test_encode_empty_payload_and_max_stream_id() -> None:
    assert encode_frame(0xFFFFFFFF, MessageType.RESPONSE, 0) == b"\x00" * 4 + b"\xff" * 4 + b"\x02\x00"


def test_encode_rejects_out_of_range_fields() -> None:
    with pytest.raises(ValueError, match="stream id"):
        encode_frame(1 << 32, MessageType.REQUEST, 0)
    with pytest.raises(ValueError, match="8 bits"):
        encode_frame(1, 256, 0)


def test_encode_rejects_oversized_payload() -> None:
    assert len(encode_frame(1, MessageType.DATA, 0, bytes(MESSAGE_LENGTH_MAX))) == (
        HEADER_LENGTH + MESSAGE_LENGTH_MAX)
    with pytest.raises(OversizedFrameError) as info:
        encode_frame(7, MessageType.REQUEST, 0, bytes(MESSAGE_LENGTH_MAX + 1))
    assert (info.value.stream_id, info.value.length) == (7, MESSAGE_LENGTH_MAX + 1)


async def test_read_frames_back_to_back() -> None:
    reader = reader_of(header(2, 1, 1, 0) + b"hi" + header(0, 3, 2, 0) + header(1, 5, 3, 5) + b"x")
    assert await read_frame(reader) == Frame(1, MessageType.REQUEST, 0, b"hi")
    assert await read_frame(reader) == Frame(3, MessageType.RESPONSE, 0, b"")
    assert await read_frame(reader) == Frame(5, MessageType.DATA, 5, b"x")
    with pytest.raises(PeerClosedError):
        await read_frame(reader)


async def test_read_frame_split_across_many_small_writes() -> None:
    data = encode_frame(9, MessageType.REQUEST, 0, b"payload")
    reader = asyncio.StreamReader()

    async def trickle() -> None:
        for byte in data:
            reader.feed_data(bytes([byte]))
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(trickle())
    assert await read_frame(reader) == Frame(9, 1, 0, b"payload")
    await feeder


async def test_unknown_message_type_is_returned_not_rejected() -> None:
    frame = await read_frame(reader_of(header(1, 1, 0x7F, 0x80) + b"z"))
    assert frame == Frame(1, 0x7F, 0x80, b"z")


async def test_oversized_frame_is_discarded_and_reader_stays_usable() -> None:
    length = MESSAGE_LENGTH_MAX + 1
    reader = reader_of(header(length, 11, 1, 0), b"\xaa" * length,
                       header(3, 13, 1, 0) + b"ok!")
    with pytest.raises(OversizedFrameError) as info:
        await read_frame(reader)
    assert (info.value.stream_id, info.value.msg_type, info.value.length) == (11, 1, length)
    assert await read_frame(reader) == Frame(13, 1, 0, b"ok!")


async def test_oversized_frame_cut_short_is_truncated() -> None:
    reader = reader_of(header(MESSAGE_LENGTH_MAX + 100, 1, 1, 0) + b"\x00" * 10)
    with pytest.raises(TruncatedFrameError, match="oversized"):
        await read_frame(reader)


@pytest.mark.parametrize("data", [
    header(4, 1, 1, 0)[:5],                 # header cut
    header(4, 1, 1, 0) + b"ab",             # payload cut
])
async def test_truncated_frame(data: bytes) -> None:
    with pytest.raises(TruncatedFrameError):
        await read_frame(reader_of(data))


async def test_clean_eof_is_peer_closed() -> None:
    with pytest.raises(PeerClosedError):
        await read_frame(reader_of())
