"""ttrpc, containerd's lightweight RPC protocol, in asyncio.

Layers, each in its own module and importing only downwards:
``framing`` (bytes) → ``services`` (names, status) → ``server`` / ``client``
(unix sockets). Imports nothing of the shim beyond ``proto``.

Serving a generated service::

    registry = ServiceRegistry()
    registry.register_service(shim_pb2.DESCRIPTOR.services_by_name["Task"], task_service)
    server = Server(registry, on_connection_closed=...)
    await server.serve_socket(sock)      # or: await server.listen(path)
    ...
    await server.shutdown()
"""
from .client import Client
from .errors import Code, ConnectError, ConnectionClosedError, TtrpcError
from .framing import MESSAGE_LENGTH_MAX, Frame, MessageType
from .server import ConnectionInfo, Server
from .services import Call, ServiceRegistry, current_call, status_from_exception

__all__ = [
    "MESSAGE_LENGTH_MAX",
    "Call",
    "Client",
    "Code",
    "ConnectError",
    "ConnectionClosedError",
    "ConnectionInfo",
    "Frame",
    "MessageType",
    "Server",
    "ServiceRegistry",
    "TtrpcError",
    "current_call",
    "status_from_exception",
]
