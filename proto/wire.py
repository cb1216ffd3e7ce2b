"""The few protobuf wire-format pieces written by hand.

Two places cannot use generated messages: the shim's ``delete`` command, which
containerd runs (and waits for) on every task's removal, where importing
protobuf and the shim's descriptors costs more than all the rest of the command;
and the agent's test hooks, which forge replies protobuf would refuse to write.
Encoding only (varint and length-delimited fields); tests check the bytes against
the generated messages.
"""
from __future__ import annotations

WIRE_VARINT = 0
WIRE_LENGTH_DELIMITED = 2


def varint(value: int) -> bytes:
    """``value`` (≥ 0) as a base-128 varint."""
    if value < 0:
        raise ValueError(f"varint of a negative number {value}")
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_field(number: int, value: int) -> bytes:
    """A varint field; proto3 leaves out a zero."""
    return varint(number << 3 | WIRE_VARINT) + varint(value) if value else b""


def length_delimited_field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | WIRE_LENGTH_DELIMITED) + varint(len(payload)) + payload


def timestamp(ns: int) -> bytes:
    """A google.protobuf.Timestamp (seconds = 1, nanos = 2) of ``ns`` since the epoch."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    return varint_field(1, seconds) + varint_field(2, nanos)
