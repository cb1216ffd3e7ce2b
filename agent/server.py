"""The gRPC server: AgentService on a local unix socket (the transport bridge feeds it)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc

from agent.service import AgentService
from agent.testhooks import Hooks
from proto.gen import agent_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "unix:/run/husk/agent.sock"
# WriteStdin carries the host's chunks; allow more than gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # The host may keep an idle connection alive with pings; do not answer
    # them with GOAWAY "too_many_pings".
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 0),
]


def unix_path(address: str) -> Path:
    """The socket path of a "unix:/path" (or "unix:///path") address."""
    if not address.startswith("unix:"):
        raise ValueError(f"listen address {address!r} is not unix:<path>")
    path = address.removeprefix("unix:")
    if path.startswith("//"):
        path = path[2:]
    if not path.startswith("/"):
        raise ValueError(f"listen address {address!r} needs an absolute path")
    return Path(path)


async def start_server(service: AgentService, address: str = DEFAULT_LISTEN,
                       hooks: Hooks | None = None) -> grpc.aio.Server:
    """Listen on ``address`` (unix:<path>) and serve ``service``.

    ``hooks`` (test only) are applied to every call by an interceptor; without
    them the server has no interceptor at all.

    :raise RuntimeError: the socket could not be bound.
    """
    path = unix_path(address)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a stale socket from an earlier agent
    interceptors = [hooks.interceptor()] if hooks is not None else None
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]  # generated
    if server.add_insecure_port(f"unix:{path}") == 0:
        raise RuntimeError(f"cannot listen on {address}")
    await server.start()
    os.chmod(path, 0o600)
    log.info("serving on unix:%s", path)
    return server
