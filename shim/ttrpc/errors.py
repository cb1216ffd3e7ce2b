"""ttrpc errors: the status codes on the wire and the exceptions that carry them.

A handler raises `TtrpcError(Code.NOT_FOUND, "...")` to choose the status it
returns. A client call raises `TtrpcError` when the server answers with a
non-OK status, `ConnectError` when it cannot reach the server and
`ConnectionClosedError` when the connection is gone; both of the latter carry
Code.UNAVAILABLE, so "reconnect and retry" is one check on `.code`.
"""
from __future__ import annotations

import enum
from collections.abc import Sequence

from google.protobuf import any_pb2

__all__ = ["Code", "ConnectError", "ConnectionClosedError", "TtrpcError"]


class Code(enum.IntEnum):
    """gRPC status codes (google.rpc.Code), which ttrpc uses unchanged."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def from_wire(cls, value: int) -> Code:
        """Map a wire value to a Code; values outside the table become UNKNOWN."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class TtrpcError(Exception):
    """A call's non-OK status: raised by handlers, and by clients on error replies."""

    def __init__(
        self, code: Code, message: str, details: Sequence[any_pb2.Any] = ()
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.details = tuple(details)


class ConnectError(TtrpcError):
    """The client could not connect to the server."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.UNAVAILABLE, message)


class ConnectionClosedError(TtrpcError):
    """The connection is closed, or was lost before the call completed."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.UNAVAILABLE, message)
