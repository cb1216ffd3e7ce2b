"""ttrpc dispatch: "service/method" names to handlers, and exceptions to status.

Owns the handler registry, the per-call context (`Call`, reachable from a
handler through `current_call()`), the deadline taken from timeout_nano and the
single exception → Status mapping. Knows nothing about frames or sockets: the
server hands `ServiceRegistry.handle` a decoded Request and sends back the
Response it returns.

A handler is ``async def handler(request) -> response`` taking and returning
protobuf messages. Raise `TtrpcError` to pick the status code; raise
`NotImplementedError` for Unimplemented.
"""
from __future__ import annotations

import asyncio
import bisect
import contextvars
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import message as pb_message
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from proto.gen import ttrpc_pb2

from .errors import Code, TtrpcError

__all__ = [
    "Call",
    "Handler",
    "Method",
    "MethodStats",
    "ServiceRegistry",
    "current_call",
    "method_attribute",
    "status_from_exception",
]

logger = logging.getLogger(__name__)

Message = pb_message.Message
# Handlers take their own request subtype, hence Any rather than Message.
Handler = Callable[[Any], Awaitable[Message]]

_NANOS_PER_SECOND = 1_000_000_000
# Upper bounds (seconds) of the latency histogram's buckets; a last one is +Inf.
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Calls to names nobody registered are counted together (their names are the caller's).
UNREGISTERED = "unregistered"


@dataclass(frozen=True)
class Method:
    """One registered RPC."""

    service: str
    name: str
    request_type: type[Message]
    handler: Handler
    response_type: type[Message] | None = None  # checked when known

    @property
    def full_name(self) -> str:
        return f"{self.service}/{self.name}"


@dataclass(frozen=True)
class Call:
    """What a handler may want to know about the request it serves."""

    service: str
    method: str
    stream_id: int
    # Every value received for a key, in order (ttrpc allows repeated keys).
    metadata: Mapping[str, list[str]] = field(default_factory=dict)
    # Absolute deadline on the event loop clock (loop.time()), None = no deadline.
    deadline: float | None = None

    @classmethod
    def from_request(cls, request: ttrpc_pb2.Request, stream_id: int, now: float) -> Call:
        """Build the context for `request`, which arrived at loop time `now`."""
        metadata: dict[str, list[str]] = {}
        for kv in request.metadata:
            metadata.setdefault(kv.key, []).append(kv.value)
        deadline = None
        if request.timeout_nano > 0:
            deadline = now + request.timeout_nano / _NANOS_PER_SECOND
        return cls(request.service, request.method, stream_id, metadata, deadline)

    def get(self, key: str) -> str | None:
        """The first metadata value for `key`, or None."""
        values = self.metadata.get(key)
        return values[0] if values else None

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (may be negative), None without one."""
        if self.deadline is None:
            return None
        return self.deadline - asyncio.get_running_loop().time()


_current_call: contextvars.ContextVar[Call] = contextvars.ContextVar("ttrpc_call")


def current_call() -> Call:
    """The Call being served by the running handler.

    :raise RuntimeError: not called from inside a ttrpc handler.
    """
    try:
        return _current_call.get()
    except LookupError:
        raise RuntimeError("current_call() used outside a ttrpc handler") from None


def status_from_exception(exc: BaseException) -> ttrpc_pb2.Status:
    """The one place where an exception becomes a wire status.

    TtrpcError → its code; NotImplementedError → Unimplemented; TimeoutError
    (asyncio's included) → DeadlineExceeded; anything else → Unknown with the
    message. CancelledError is never passed here: it propagates.
    """
    if isinstance(exc, TtrpcError):
        return ttrpc_pb2.Status(code=exc.code, message=exc.message, details=exc.details)
    if isinstance(exc, NotImplementedError):
        return ttrpc_pb2.Status(code=Code.UNIMPLEMENTED, message=str(exc) or "not implemented")
    if isinstance(exc, TimeoutError):
        return ttrpc_pb2.Status(code=Code.DEADLINE_EXCEEDED, message=str(exc) or "timed out")
    return ttrpc_pb2.Status(code=Code.UNKNOWN, message=str(exc) or type(exc).__name__)


def method_attribute(rpc_name: str) -> str:
    """The Python attribute serving an RPC: "CloseIO" → "close_io", "ResizePty" → "resize_pty"."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", rpc_name).lower()


@dataclass
class MethodStats:
    """Calls of one method: how many ended with each status, and how long they took."""

    codes: dict[str, int] = field(default_factory=dict)
    seconds_sum: float = 0.0
    # Per bucket of DURATION_BUCKETS_S, then +Inf; not cumulative.
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS_S) + 1))

    def observe(self, code: Code, seconds: float) -> None:
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        self.seconds_sum += seconds
        self.buckets[bisect.bisect_left(DURATION_BUCKETS_S, seconds)] += 1


class ServiceRegistry:
    """A table of "service/method" → Method. Register everything before serving."""

    def __init__(self) -> None:
        self._methods: dict[tuple[str, str], Method] = {}
        # By method name ("Create"), for `husk monitor`.
        self.stats: dict[str, MethodStats] = {}

    def register(
        self,
        service: str,
        method: str,
        request_type: type[Message],
        handler: Handler,
        response_type: type[Message] | None = None,
    ) -> None:
        """Add one RPC.

        :raise ValueError: the method is already registered.
        """
        key = (service, method)
        if key in self._methods:
            raise ValueError(f"{service}/{method} is already registered")
        self._methods[key] = Method(service, method, request_type, handler, response_type)

    def register_service(self, descriptor: ServiceDescriptor, servicer: object) -> list[str]:
        """Register every RPC of a generated service that `servicer` implements.

        RPC "CloseIO" is served by ``servicer.close_io``; RPCs without a
        matching attribute are left out, so calls to them get Unimplemented.
        Returns the names of the RPCs left out.
        """
        missing = []
        for rpc in descriptor.methods:
            handler = getattr(servicer, method_attribute(rpc.name), None)
            if handler is None:
                missing.append(rpc.name)
                continue
            self.register(
                descriptor.full_name,
                rpc.name,
                message_factory.GetMessageClass(rpc.input_type),
                handler,
                message_factory.GetMessageClass(rpc.output_type),
            )
        return missing

    def lookup(self, service: str, method: str) -> Method:
        """:raise TtrpcError: Unimplemented for an unknown service or method."""
        found = self._methods.get((service, method))
        if found is not None:
            return found
        if any(s == service for s, _ in self._methods):
            raise TtrpcError(Code.UNIMPLEMENTED, f"method {service}/{method} is not implemented")
        raise TtrpcError(Code.UNIMPLEMENTED, f"service {service!r} is not registered")

    @property
    def methods(self) -> Sequence[str]:
        return sorted(m.full_name for m in self._methods.values())

    async def handle(self, request: ttrpc_pb2.Request, call: Call) -> ttrpc_pb2.Response:
        """Run one unary call to completion and return the Response to send.

        Every failure becomes a status; only CancelledError propagates (the
        connection or server is going away and nobody is waiting for an answer).
        """
        started = time.monotonic()
        known = (request.service, request.method) in self._methods
        stats = self.stats.setdefault(request.method if known else UNREGISTERED, MethodStats())
        try:
            payload = await self._invoke(request, call)
        except asyncio.CancelledError:
            stats.observe(Code.CANCELLED, time.monotonic() - started)
            raise
        except Exception as exc:
            status = status_from_exception(exc)
            code = Code.from_wire(status.code)
            stats.observe(code, time.monotonic() - started)
            if code == Code.UNKNOWN:
                logger.error("%s/%s failed", request.service, request.method, exc_info=exc)
            else:
                logger.debug("%s/%s: %s %s", request.service, request.method, code.name,
                             status.message)
            return ttrpc_pb2.Response(status=status)
        stats.observe(Code.OK, time.monotonic() - started)
        return ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=Code.OK), payload=payload)

    async def _invoke(self, request: ttrpc_pb2.Request, call: Call) -> bytes:
        method = self.lookup(request.service, request.method)
        try:
            message = method.request_type.FromString(request.payload)
        except pb_message.DecodeError as exc:
            raise TtrpcError(
                Code.INVALID_ARGUMENT, f"cannot decode {method.full_name} request: {exc}"
            ) from exc
        token = _current_call.set(call)
        deadline = asyncio.timeout_at(call.deadline)
        try:
            async with deadline:
                response = await method.handler(message)
        except TimeoutError as exc:
            if deadline.expired():  # ours, not a timeout inside the handler
                raise TimeoutError(f"{method.full_name}: the caller's deadline expired") from exc
            raise
        finally:
            _current_call.reset(token)
        if method.response_type is not None and not isinstance(response, method.response_type):
            raise TypeError(
                f"{method.full_name} returned {type(response).__name__}, "
                f"expected {method.response_type.__name__}"
            )
        return response.SerializeToString()
