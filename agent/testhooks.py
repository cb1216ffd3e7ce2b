"""TEST-ONLY hooks: let a test play a compromised agent, to test the host's defences.

Inert unless the guest kernel command line has ``husk.test_hooks=1`` (the host
sets it only in a test config): without it :func:`from_cmdline` returns None,
and the agent creates no FIFO and installs no interceptor.

When enabled, the agent reads newline-separated commands from the FIFO
/run/husk/test-hooks (mode 0600), e.g. from an escaped root in the guest::

    nsenter -t 1 -m -- sh -c 'echo "replies garbage" > /run/husk/test-hooks'

Commands:

- ``oom-flood <container_id> <count>``: the next ``count`` GetOOMEvent calls
  report ``container_id`` at once (0 cancels a flood).
- ``log-flood <bytes>``: write ``bytes`` of filler lines to the log port, as
  fast as it accepts them.
- ``replies garbage|oversized|normal``: every unary RPC but Check answers with
  bytes that are no protobuf, or with a reply over the host's receive limit,
  or normally again. The real handler does not run in the first two modes.
- ``stall`` / ``unstall``: every RPC (Check and streams too) stops answering:
  new calls, replies of calls in flight and further stream messages wait until
  the call is cancelled, even after ``unstall``, which only serves new calls.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import select
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import grpc

from agent.stdio import wait_fd
from proto import wire
from proto.gen import agent_pb2 as pb

log = logging.getLogger(__name__)

CMDLINE_KEY = "husk.test_hooks"
DEFAULT_FIFO = Path("/run/husk/test-hooks")
FIFO_MODE = 0o600
# Commands are short; a writer that never sends a newline must not grow our memory.
MAX_LINE_BYTES = 4096
FIFO_READ_CHUNK = 4096
# If opening the FIFO fails, retry now and then rather than lose the hooks.
FIFO_RETRY_S = 1.0
OOM_FLOOD_MAX = 10_000_000
LOG_FLOOD_MAX_BYTES = 1 << 30
LOG_FLOOD_LINE = b"x" * 100 + b"\n"
# Whole lines, under the 32 KiB a virtio-serial write takes in one go: lines stay whole.
LOG_FLOOD_CHUNK = LOG_FLOOD_LINE * 300
# A port whose host is away polls "hung up" (ready) yet writes EAGAIN: back off
# rather than spin.
LOG_FLOOD_BACKOFF_MIN_S = 0.005
LOG_FLOOD_BACKOFF_MAX_S = 0.1
GARBAGE_REPLY_BYTES = 64
# Field 536870911 with wire type 7, which does not exist: no parser gets past it.
GARBAGE_PREFIX = b"\xff\xff\xff\xff\x0f"
# Over the shim's 8 MiB receive limit, under the agent's own 16 MiB send limit.
OVERSIZED_REPLY_BYTES = 12 << 20
# The oversized reply is one unknown bytes field, so it parses as any reply type:
# only its size is wrong. No agent message has a field this high.
OVERSIZED_FIELD = 1000
_SERVICE = pb.DESCRIPTOR.services_by_name["AgentService"].full_name
# The keepalive: never garbled, or this mode would look like a dead agent.
CHECK_METHOD = f"/{_SERVICE}/Check"


class ReplyMode(enum.Enum):
    NORMAL = "normal"
    GARBAGE = "garbage"
    OVERSIZED = "oversized"


@dataclass(frozen=True)
class RawReply:
    """Bytes sent as they are in place of a serialized reply."""

    data: bytes


def garbage_reply() -> bytes:
    return GARBAGE_PREFIX + os.urandom(GARBAGE_REPLY_BYTES - len(GARBAGE_PREFIX))


def oversized_reply() -> bytes:
    return wire.length_delimited_field(OVERSIZED_FIELD, bytes(OVERSIZED_REPLY_BYTES))


class HookCommandError(ValueError):
    """A malformed hook command (logged and ignored)."""


def _count(text: str, what: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise HookCommandError(f"{what} {text!r} is not a number") from None
    if not low <= value <= high:
        raise HookCommandError(f"{what} {value} is not in {low}..{high}")
    return value


async def _forever() -> None:
    """Wait until cancelled."""
    await asyncio.get_running_loop().create_future()


@dataclass
class Hooks:
    """The hook state, the FIFO reader and the interceptor that applies it."""

    fifo: Path = DEFAULT_FIFO
    # The log port's fd: a virtio-serial port opens only once, so it is shared
    # with the logging handler. None: log-flood is refused.
    log_fd: int | None = None
    reply_mode: ReplyMode = ReplyMode.NORMAL
    stalled: bool = False
    oom_flood_id: str = ""
    oom_flood_left: int = 0
    log_flood_left: int = 0
    log_flood_written: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)
    _log_flood: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    # Section: lifetime

    async def start(self) -> None:
        """Create the FIFO (replacing a stale one) and read commands from it, forever."""
        self.fifo.unlink(missing_ok=True)
        self._ensure_fifo()
        self._spawn(self._read_fifo())
        log.warning("test hooks enabled: commands on %s", self.fifo)

    def _ensure_fifo(self) -> None:
        """(Re)create the FIFO unless it is there: a writer must never create a plain file."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISFIFO(self.fifo.lstat().st_mode):
                return
            self.fifo.unlink()
        self.fifo.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(self.fifo, FIFO_MODE)
        os.chmod(self.fifo, FIFO_MODE)  # mkfifo applied the umask

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(self.fifo.lstat().st_mode):
                self.fifo.unlink()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("test hook task failed", exc_info=task.exception())

    # Section: commands

    async def _read_fifo(self) -> None:
        while True:
            try:
                self._ensure_fifo()
                # Non-blocking: opening needs no writer, and reads never block the loop.
                fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
            except OSError as e:
                log.error("test hook: cannot open %s: %s", self.fifo, e)
                await asyncio.sleep(FIFO_RETRY_S)
                continue
            try:
                await self._read_commands(fd)
            finally:
                os.close(fd)
            # EOF: every writer closed; reopen so the next one finds us waiting.

    async def _read_commands(self, fd: int) -> None:
        pending = b""
        skipping = False  # inside a line that was too long
        while True:
            await wait_fd(fd)
            try:
                data = os.read(fd, FIFO_READ_CHUNK)
            except BlockingIOError:
                continue
            if not data:
                if pending and not skipping:
                    self.handle(pending.decode(errors="replace"))
                return
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                if not skipping:
                    self.handle(line.decode(errors="replace"))
                skipping = False
            if len(pending) > MAX_LINE_BYTES:
                if not skipping:
                    log.warning("test hook: ignoring a command over %d bytes", MAX_LINE_BYTES)
                pending, skipping = b"", True

    def handle(self, line: str) -> None:
        """Apply one command line; a bad one is logged and ignored."""
        words = line.split()
        if not words:
            return
        command = self._COMMANDS.get(words[0])
        try:
            if command is None:
                raise HookCommandError("unknown command")
            command(self, words[1:])
        except HookCommandError as e:
            log.warning("test hook: ignoring %r: %s", line.strip()[:200], e)

    def _oom_flood(self, args: list[str]) -> None:
        if len(args) != 2:
            raise HookCommandError("usage: oom-flood <container_id> <count>")
        self.oom_flood_id = args[0]
        self.oom_flood_left = _count(args[1], "count", 0, OOM_FLOOD_MAX)
        log.warning("test hook: the next %d GetOOMEvent calls report %r",
                    self.oom_flood_left, self.oom_flood_id)

    def _log_flood_command(self, args: list[str]) -> None:
        if len(args) != 1:
            raise HookCommandError("usage: log-flood <bytes>")
        if self.log_fd is None:
            raise HookCommandError("there is no log port")
        size = _count(args[0], "bytes", 1, LOG_FLOOD_MAX_BYTES)
        self.log_flood_left = min(self.log_flood_left + size, LOG_FLOOD_MAX_BYTES)
        log.warning("test hook: flooding the log port with %d bytes", self.log_flood_left)
        if self._log_flood is None or self._log_flood.done():
            self._log_flood = self._spawn(self._flood_log(self.log_fd))

    def _replies(self, args: list[str]) -> None:
        try:
            (mode,) = args
            self.reply_mode = ReplyMode(mode)
        except ValueError:
            raise HookCommandError("usage: replies garbage|oversized|normal") from None
        log.warning("test hook: unary replies are %s", self.reply_mode.value)

    def _stall(self, args: list[str]) -> None:
        if args:
            raise HookCommandError("usage: stall")
        self.stalled = True
        log.warning("test hook: stalled: no RPC answers from now on")

    def _unstall(self, args: list[str]) -> None:
        if args:
            raise HookCommandError("usage: unstall")
        self.stalled = False
        log.warning("test hook: unstalled: new RPCs are answered")

    _COMMANDS: ClassVar[Mapping[str, Callable[[Hooks, list[str]], None]]] = {
        "oom-flood": _oom_flood,
        "log-flood": _log_flood_command,
        "replies": _replies,
        "stall": _stall,
        "unstall": _unstall,
    }

    # Section: effects

    def take_oom_event(self) -> str | None:
        """The container id the next GetOOMEvent reports, while a flood lasts."""
        if self.oom_flood_left <= 0:
            return None
        self.oom_flood_left -= 1
        return self.oom_flood_id

    async def _flood_log(self, fd: int) -> None:
        backoff = LOG_FLOOD_BACKOFF_MIN_S
        while self.log_flood_left > 0:
            # Resume where the last (maybe partial) write stopped, so lines stay whole.
            start = self.log_flood_written % len(LOG_FLOOD_CHUNK)
            chunk = LOG_FLOOD_CHUNK[start:start + self.log_flood_left]
            try:
                n = os.write(fd, chunk)
            except BlockingIOError:
                await wait_fd(fd, write=True)
                if _hung_up(fd):
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, LOG_FLOOD_BACKOFF_MAX_S)
                continue
            except OSError as e:
                if e.errno != errno.ENODEV:  # ENODEV: the host went away mid-write
                    log.warning("test hook: log flood stopped: %s", e)
                    self.log_flood_left = 0
                    return
                await asyncio.sleep(backoff)
                continue
            backoff = LOG_FLOOD_BACKOFF_MIN_S
            self.log_flood_left -= n
            self.log_flood_written += n
            await asyncio.sleep(0)  # a fast reader must not starve the RPCs
        log.warning("test hook: log flood done (%d bytes so far)", self.log_flood_written)

    async def _gate(self) -> None:
        """Hang (until cancelled) while stalled."""
        if self.stalled:
            await _forever()

    def _reply_mode(self, method: str) -> ReplyMode:
        return ReplyMode.NORMAL if method == CHECK_METHOD else self.reply_mode

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _Interceptor(self)

    def wrap(self, handler: Any, method: str) -> Any:
        """``handler`` (a grpc.RpcMethodHandler) with the hooks applied."""
        if handler.unary_unary is not None:
            return self._wrap_unary(handler, method)
        if handler.unary_stream is not None:
            return self._wrap_stream(handler)
        return handler  # the agent has no client-streaming RPCs

    def _wrap_unary(self, handler: Any, method: str) -> Any:
        inner = handler.unary_unary
        serialize = handler.response_serializer

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._gate()
            mode = self._reply_mode(method)
            if mode is ReplyMode.GARBAGE:
                reply: Any = RawReply(garbage_reply())
            elif mode is ReplyMode.OVERSIZED:
                reply = RawReply(oversized_reply())
            else:
                reply = await inner(request, context)
            await self._gate()  # stalled while the handler ran
            return reply

        def serializer(reply: Any) -> bytes:
            if isinstance(reply, RawReply):
                return reply.data
            return serialize(reply) if serialize is not None else bytes(reply)

        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=handler.request_deserializer,
            response_serializer=serializer)

    def _wrap_stream(self, handler: Any) -> Any:
        inner = handler.unary_stream

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._gate()
            async for reply in inner(request, context):
                await self._gate()
                yield reply

        return grpc.unary_stream_rpc_method_handler(
            behavior, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class _Interceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Consulted for every call, so mode changes apply to the next call."""

    def __init__(self, hooks: Hooks) -> None:
        self._hooks = hooks

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._hooks.wrap(handler, handler_call_details.method)


def _hung_up(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def from_cmdline(cmdline: Mapping[str, str], log_fd: int | None = None,
                 fifo: Path = DEFAULT_FIFO) -> Hooks | None:
    """The hooks when the kernel command line enables them (``husk.test_hooks=1``), else None."""
    if cmdline.get(CMDLINE_KEY) != "1":
        return None
    return Hooks(fifo=fifo, log_fd=log_fd)
