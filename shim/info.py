"""The shim's ``-info`` answer: containerd 2.x introspection.

containerd 2.x runs ``containerd-shim-husk-v2 -info`` with the handler's runtime
options (a proto-marshalled ``google.protobuf.Any``, possibly empty) on stdin and
reads a proto-marshalled ``containerd.types.RuntimeInfo`` from stdout: the CRI
plugin once per runtime handler when it starts, the task manager once per runtime
before its first task (for the ``containerd.io/runtime-allow-mounts`` annotation).

husk sends no ``features``: that document describes a runc-compatible runtime on
the host, and husk's containers run in a VM under the guest's crun. Without it
containerd treats husk as it treats any non-runc runtime: the CRI handler offers
no recursive read-only mounts and no user namespaces, and a task with idmapped
mounts is refused at create instead of reaching a runtime that cannot honour it.
"""
from __future__ import annotations

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from proto.gen.containerd.types import introspection_pb2
from shim import RUNTIME_TYPE as RUNTIME_NAME, SHIM_VERSION


class InfoError(ValueError):
    """stdin is not a runtime options Any."""


def runtime_info(options: bytes) -> bytes:
    """The marshalled RuntimeInfo for ``options`` (stdin: a marshalled Any, or nothing).

    The options come back as given, as containerd's own shims echo theirs.

    :raise InfoError: ``options`` is not a protobuf Any.
    """
    info = introspection_pb2.RuntimeInfo(
        name=RUNTIME_NAME, version=introspection_pb2.RuntimeVersion(version=SHIM_VERSION))
    if options:
        parsed = any_pb2.Any()
        try:
            parsed.ParseFromString(options)
        except DecodeError as exc:
            raise InfoError(f"runtime options on stdin are not a protobuf Any: {exc}") from None
        info.options.CopyFrom(parsed)
    return info.SerializeToString()
