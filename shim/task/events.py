"""Publisher: task events to containerd, in order, over ttrpc Events/Forward.

publish() only enqueues; one forwarder task sends events one at a time, so
containerd sees create < start < exit < delete. A failed send reconnects and
retries a few times with backoff before the event is dropped (and logged).
Type URLs are bare ("containerd.events.TaskExit"): containerd 1.6 resolves
them by exact name.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from proto.gen.containerd.events import task_pb2 as ev
from proto.gen.containerd.services.events.ttrpc.v1 import events_pb2
from shim.ttrpc.client import Client
from shim.ttrpc.errors import TtrpcError

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
FORWARD_TIMEOUT_S = 5.0
MAX_ATTEMPTS = 5
RETRY_BACKOFF_S = 0.2
QUEUE_SIZE = 1024
DRAIN_TIMEOUT_S = 5.0

TOPICS: dict[type[Message], str] = {
    ev.TaskCreate: "/tasks/create",
    ev.TaskStart: "/tasks/start",
    ev.TaskExit: "/tasks/exit",
    ev.TaskDelete: "/tasks/delete",
    ev.TaskOOM: "/tasks/oom",
    ev.TaskExecAdded: "/tasks/exec-added",
    ev.TaskExecStarted: "/tasks/exec-started",
    ev.TaskPaused: "/tasks/paused",
    ev.TaskResumed: "/tasks/resumed",
}


def now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def envelope(namespace: str, event: Message) -> events_pb2.ForwardRequest:
    request = events_pb2.ForwardRequest()
    env = request.envelope
    env.timestamp.CopyFrom(now())
    env.namespace = namespace
    env.topic = TOPICS[type(event)]
    env.event.type_url = event.DESCRIPTOR.full_name  # bare, no type.googleapis.com/
    env.event.value = event.SerializeToString()
    return request


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue(QUEUE_SIZE)
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._forward(), name="event-forwarder")

    def publish(self, event: Any) -> None:
        """Queue an event; never blocks the RPC that produced it."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            log.error("event queue full; dropping %s", TOPICS[type(event)])

    async def _forward(self) -> None:
        while (event := await self._queue.get()) is not None:
            request = envelope(self.namespace, event)
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    await self._send(request)
                    break
                except (OSError, TtrpcError, asyncio.TimeoutError) as exc:
                    log.warning("publishing %s failed (attempt %d/%d): %s",
                                request.envelope.topic, attempt, MAX_ATTEMPTS, exc)
                    await self._reset()
                    await asyncio.sleep(RETRY_BACKOFF_S * attempt)
            else:
                log.error("dropped event %s after %d attempts", request.envelope.topic,
                          MAX_ATTEMPTS)

    async def _send(self, request: events_pb2.ForwardRequest) -> None:
        if self._client is None or self._client.closed:
            self._client = await Client.connect(self.address, timeout=FORWARD_TIMEOUT_S)
        await self._client.call(EVENTS_SERVICE, "Forward", request, empty_pb2.Empty,
                                timeout=FORWARD_TIMEOUT_S,
                                metadata={NAMESPACE_KEY: [self.namespace]})

    async def _reset(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None

    async def close(self) -> None:
        """Send what is queued (bounded by DRAIN_TIMEOUT_S), then disconnect."""
        if self._task is not None:
            self._queue.put_nowait(None)
            try:
                await asyncio.wait_for(self._task, DRAIN_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.error("gave up sending %d queued events", self._queue.qsize())
                self._task.cancel()
            self._task = None
        await self._reset()
