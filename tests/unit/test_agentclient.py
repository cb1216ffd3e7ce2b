"""AgentClient against a real gRPC server that plays a hostile agent."""
from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from shim import errors
from proto.gen import agent_pb2 as pb
from shim.agentclient.client import MAX_MESSAGE_BYTES, AgentClient

# Starts with an invalid tag: no message type parses it.
GARBAGE = b"\xff\xff\xff\xff\x0f" + os.urandom(59)

Hostile = Callable[[bytes], Awaitable[AgentClient]]


class _AnswerEverything(grpc.GenericRpcHandler):
    """Every method of every service answers ``reply``, raw."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return self.reply
        return grpc.unary_unary_rpc_method_handler(unary)


@pytest.fixture
async def hostile(tmp_path: Path) -> AsyncIterator[Hostile]:
    servers: list[grpc.aio.Server] = []
    clients: list[AgentClient] = []

    async def start(reply: bytes) -> AgentClient:
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
        server.add_generic_rpc_handlers((_AnswerEverything(reply),))
        path = tmp_path / f"agent{len(servers)}.sock"
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        servers.append(server)
        clients.append(AgentClient(f"unix:{path}", timeout_s=5.0))
        return clients[-1]

    yield start
    for client in clients:
        await client.close()
    for server in servers:
        await server.stop(None)


async def test_garbage_replies_are_errors_not_none(hostile: Hostile) -> None:
    client = await hostile(GARBAGE)
    with pytest.raises(errors.InternalError, match="not a valid message"):
        await client.guest_details()
    with pytest.raises(errors.InternalError, match="not a valid message"):
        await client.wait_process("c1", "")
    with pytest.raises(errors.InternalError, match="not a valid message"):
        await client.get_oom_event()
    with pytest.raises(errors.HuskError):
        await client.check(2.0)


async def test_oversized_replies_are_refused(hostile: Hostile) -> None:
    size = MAX_MESSAGE_BYTES + 1
    # Field 1000 (unknown to every reply type), length-delimited: only the size is wrong.
    field = bytes([0xC2, 0x3E])
    varint = bytearray()
    n = size
    while n > 0x7F:
        varint.append((n & 0x7F) | 0x80)
        n >>= 7
    varint.append(n)
    client = await hostile(field + bytes(varint) + b"x" * size)
    with pytest.raises(errors.InternalError, match="RESOURCE_EXHAUSTED|larger than max"):
        await client.create_container("c1", {})


async def test_out_of_range_values_are_refused(hostile: Hostile) -> None:
    # CreateContainerResponse{pid: 2**30}: a pid no kernel hands out.
    client = await hostile(b"\x08" + bytes([0x80, 0x80, 0x80, 0x80, 0x04]))
    with pytest.raises(errors.InternalError, match="invalid pid"):
        await client.create_container("c1", {})


async def test_volume_stats_that_do_not_add_up_are_refused(hostile: Hostile) -> None:
    honest = pb.VolumeStats(capacity_bytes=100, used_bytes=40, available_bytes=60, inodes=10,
                            inodes_used=4, inodes_free=6)
    assert (await (await hostile(honest.SerializeToString())).volume_stats("/v"))["used_bytes"] == 40
    for lie in (pb.VolumeStats(capacity_bytes=100, used_bytes=101),
                pb.VolumeStats(inodes=1, inodes_free=2),
                pb.VolumeStats(capacity_bytes=1 << 63, used_bytes=1)):
        client = await hostile(lie.SerializeToString())
        with pytest.raises(errors.InternalError, match="inconsistent"):
            await client.volume_stats("/v")


async def test_guest_metrics_cannot_invent_containers_or_impossible_values(
        hostile: Hostile) -> None:
    lie = pb.GuestMetrics(memory_total_bytes=(1 << 64) - 1, load1=float("nan"),
                          load5=float("inf"), load15=-3.0, cpu_user_ns=5)
    lie.containers.add(container_id="known", stats=pb.StatsContainerResponse(cpu_usage_ns=7))
    lie.containers.add(container_id="known", stats=pb.StatsContainerResponse(cpu_usage_ns=99))
    for i in range(1000):  # series a hostile guest would like the monitor to export
        lie.containers.add(container_id=f"invented-{i}")
    figures = await (await hostile(lie.SerializeToString())).guest_metrics({"known", "gone"})
    assert figures["memory_total_bytes"] == (1 << 63) - 1
    assert (figures["load1"], figures["load5"], figures["load15"]) == (0.0, 0.0, 0.0)
    assert figures["cpu_user_ns"] == 5
    assert list(figures["containers"]) == ["known"]
    assert figures["containers"]["known"].cpu_usage_ns == 7  # the first answer, not a later one
