"""Publisher: task events to containerd, in order, over ttrpc Events/Forward.

publish() only enqueues; one forwarder task sends events one at a time, so
containerd sees create < start < exit < delete. A failed send reconnects and
retries with backoff (see Publisher for what may be dropped: only TaskOOM).
Type URLs are bare ("containerd.events.TaskExit"): containerd 1.6 resolves
them by exact name.
"""
from __future__ import annotations

import asyncio
import collections
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
from shim.util.tasks import cancel_and_wait

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
FORWARD_TIMEOUT_S = 5.0
# TaskOOM only: lifecycle events are retried until containerd takes them.
MAX_ATTEMPTS = 5
RETRY_BACKOFF_S = 0.2
RETRY_BACKOFF_MAX_S = 2.0
RETRY_LOG_EVERY = 10
MAX_QUEUED_OOM = 64
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
    """Events in order, each sent until containerd takes it.

    Lifecycle events (create, start, exit, delete, exec...) are never dropped:
    there are only as many as containerd asked for, and a lost TaskExit leaves
    a container running forever in the kubelet's eyes. They are retried, with
    a capped backoff, until containerd is back. TaskOOM is what the guest can
    trigger at will: at most one per container waits in the queue, and at most
    MAX_QUEUED_OOM in all; the rest are counted and dropped.
    """

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._queue: collections.deque[Message] = collections.deque()
        self._ready = asyncio.Event()
        self._closing = False
        self._queued_oom: set[str] = set()
        self.dropped_oom = 0
        # By topic, for `husk monitor`.
        self.sent: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._forward(), name="event-forwarder")

    def publish(self, event: Any) -> None:
        """Queue an event; never blocks the RPC that produced it."""
        if isinstance(event, ev.TaskOOM):
            if event.container_id in self._queued_oom or len(self._queued_oom) >= MAX_QUEUED_OOM:
                self.dropped_oom += 1
                self._count(self.dropped, TOPICS[ev.TaskOOM])
                return
            self._queued_oom.add(event.container_id)
        self._queue.append(event)
        self._ready.set()

    @staticmethod
    def _count(counts: dict[str, int], topic: str) -> None:
        counts[topic] = counts.get(topic, 0) + 1

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def _next(self) -> Message | None:
        while not self._queue:
            if self._closing:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._queue[0]

    async def _forward(self) -> None:
        while (event := await self._next()) is not None:
            request = envelope(self.namespace, event)
            droppable = isinstance(event, ev.TaskOOM)
            attempt = 0
            while True:
                attempt += 1
                try:
                    await self._send(request)
                    self._count(self.sent, request.envelope.topic)
                    break
                except (OSError, TtrpcError, asyncio.TimeoutError) as exc:
                    if attempt == 1 or attempt % RETRY_LOG_EVERY == 0:
                        log.warning("publishing %s failed (attempt %d): %s",
                                    request.envelope.topic, attempt, exc)
                    await self._reset()
                    if droppable and attempt >= MAX_ATTEMPTS:
                        log.error("dropped event %s after %d attempts", request.envelope.topic,
                                  attempt)
                        self._count(self.dropped, request.envelope.topic)
                        break
                    await asyncio.sleep(min(RETRY_BACKOFF_S * attempt, RETRY_BACKOFF_MAX_S))
            self._queue.popleft()
            if droppable:
                self._queued_oom.discard(event.container_id)  # type: ignore[attr-defined]

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
            self._closing = True
            self._ready.set()
            try:
                await asyncio.wait_for(self._task, DRAIN_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.error("gave up sending %d queued events", len(self._queue))
                await cancel_and_wait(self._task)
            self._task = None
        if self.dropped_oom:
            log.warning("%d TaskOOM events were not sent: one was already queued for the "
                        "container", self.dropped_oom)
        await self._reset()
