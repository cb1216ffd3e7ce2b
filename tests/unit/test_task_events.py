"""Publisher → a real ttrpc server standing in for containerd's Events service."""
from __future__ import annotations

import asyncio
from pathlib import Path

from google.protobuf import empty_pb2

from proto.gen.containerd.events import task_pb2 as ev
from proto.gen.containerd.services.events.ttrpc.v1 import events_pb2
from shim.task.events import EVENTS_SERVICE, NAMESPACE_KEY, Publisher
from shim.ttrpc.server import Server
from shim.ttrpc.services import ServiceRegistry, current_call


async def _events_server(path: Path, received: list[tuple[str, str, str]]) -> Server:
    async def forward(request: events_pb2.ForwardRequest) -> empty_pb2.Empty:
        env = request.envelope
        received.append((env.topic, env.event.type_url, current_call().get(NAMESPACE_KEY) or ""))
        return empty_pb2.Empty()

    registry = ServiceRegistry()
    registry.register(EVENTS_SERVICE, "Forward", events_pb2.ForwardRequest, forward)
    server = Server(registry)
    await server.listen(str(path))
    return server


async def test_events_arrive_in_order_with_bare_type_urls(tmp_path: Path) -> None:
    received: list[tuple[str, str, str]] = []
    server = await _events_server(tmp_path / "ttrpc.sock", received)
    publisher = Publisher(str(tmp_path / "ttrpc.sock"), "k8s.io")
    publisher.start()
    publisher.publish(ev.TaskCreate(container_id="c", pid=7))
    publisher.publish(ev.TaskStart(container_id="c", pid=7))
    publisher.publish(ev.TaskExit(container_id="c", id="c", pid=7, exit_status=1))
    publisher.publish(ev.TaskDelete(container_id="c", pid=7))
    await publisher.close()
    await server.shutdown()
    assert received == [
        ("/tasks/create", "containerd.events.TaskCreate", "k8s.io"),
        ("/tasks/start", "containerd.events.TaskStart", "k8s.io"),
        ("/tasks/exit", "containerd.events.TaskExit", "k8s.io"),
        ("/tasks/delete", "containerd.events.TaskDelete", "k8s.io"),
    ]


async def test_publisher_retries_until_containerd_is_back(tmp_path: Path) -> None:
    received: list[tuple[str, str, str]] = []
    path = tmp_path / "ttrpc.sock"
    publisher = Publisher(str(path), "default")
    publisher.start()
    publisher.publish(ev.TaskOOM(container_id="c"))
    await asyncio.sleep(0.3)  # first attempts fail: nobody listens yet
    server = await _events_server(path, received)
    await publisher.close()
    await server.shutdown()
    assert [r[0] for r in received] == ["/tasks/oom"]


async def test_an_oom_flood_never_crowds_out_an_exit(tmp_path: Path) -> None:
    """The guest can send OOM events at any rate; TaskExit must still go out."""
    received: list[tuple[str, str, str]] = []
    path = tmp_path / "ttrpc.sock"
    publisher = Publisher(str(path), "k8s.io")
    publisher.start()
    for _ in range(50_000):
        publisher.publish(ev.TaskOOM(container_id="c"))
    publisher.publish(ev.TaskExit(container_id="c", id="c", pid=7, exit_status=137))
    for i in range(50_000):
        publisher.publish(ev.TaskOOM(container_id=f"other{i}"))
    assert publisher.pending <= 2 + 64, "the queue grew with the flood"
    server = await _events_server(path, received)  # containerd comes up late
    await publisher.close()
    await server.shutdown()
    topics = [r[0] for r in received]
    assert "/tasks/exit" in topics
    assert topics.count("/tasks/oom") <= 1 + 64
    assert publisher.dropped_oom >= 100_000 - 65
    # What `husk monitor` reports: every event counted once, sent or dropped.
    assert publisher.sent["/tasks/exit"] == 1
    assert publisher.sent["/tasks/oom"] + publisher.dropped["/tasks/oom"] == 100_000


async def test_an_exit_is_retried_until_containerd_is_back(tmp_path: Path) -> None:
    received: list[tuple[str, str, str]] = []
    path = tmp_path / "ttrpc.sock"
    publisher = Publisher(str(path), "k8s.io")
    publisher.start()
    publisher.publish(ev.TaskExit(container_id="c", id="c", pid=7, exit_status=0))
    await asyncio.sleep(3.0)  # more attempts than a TaskOOM gets
    server = await _events_server(path, received)
    await publisher.close()
    await server.shutdown()
    assert [r[0] for r in received] == ["/tasks/exit"]
