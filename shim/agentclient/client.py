"""AgentClient: typed async calls to husk-agent in the guest.

Every call has a deadline. gRPC status codes from the agent become the shim's
domain errors here. Replies come from inside the guest and are untrusted:
sizes are capped by the channel options and values are range-checked before
the rest of the shim sees them.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from proto.gen import agent_pb2 as pb
from proto.gen import agent_pb2_grpc as pb_grpc
from shim import errors
from shim.network.model import PodNetwork

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 30.0
READY_POLL_S = 0.05
CHECK_TIMEOUT_S = 2.0
# The guest waits up to 20 s (its clock) for hot-plugged CPUs and memory to appear.
HOTPLUG_SETTLE_TIMEOUT_S = 40.0
# A scrape waits this long for the guest's figures, then goes on without them.
METRICS_TIMEOUT_S = 5.0
# Guest figures are clipped to what Prometheus and CRI carry without surprise.
MAX_COUNTER = (1 << 63) - 1
MAX_LOAD = 1e6
# A reply larger than this is a misbehaving guest, not data we want.
MAX_MESSAGE_BYTES = 8 << 20
MAX_PID = 1 << 22
MAX_ID_LENGTH = 128
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_http_proxy", 0),
    # No fast-reconnect tuning: grpc.min_reconnect_backoff_ms is also the connect
    # timeout, and a connection dropped mid-handshake on a virtio-serial port can
    # reach the guest merged with the next one (the port is one byte stream).
    # The sandbox dials only once the guest has opened the port.
    ("grpc.max_reconnect_backoff_ms", 2000),
    # gRPC closes the transport when a ping goes unacknowledged for a minute (its
    # default), which a TCG guest starved by its neighbours' boots has hit in the middle
    # of CreateSandbox. Whether the guest is alive is the pod's keepalive's call and
    # every call has its own deadline; this is only the outer bound.
    ("grpc.http2.ping_timeout_ms", 300_000),
]

_CODE_TO_ERROR: dict[grpc.StatusCode, type[errors.HuskError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: errors.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceededError,
    grpc.StatusCode.UNIMPLEMENTED: errors.UnimplementedError,
}

T = TypeVar("T")


def _translate(method: str, exc: grpc.aio.AioRpcError) -> errors.HuskError:
    kind = _CODE_TO_ERROR.get(exc.code(), errors.InternalError)
    detail = (exc.details() or "")[:2000]
    return kind(f"agent {method}: {detail or exc.code().name}")


def _parsed(method: str, reply: T | None) -> T:
    """grpc.aio hands back None, with status OK, for a reply it could not parse."""
    if reply is None:
        raise errors.InternalError(f"agent {method}: the reply is not a valid message")
    return reply


def _pid(value: int) -> int:
    if not 0 < value < MAX_PID:
        raise errors.InternalError(f"agent returned an invalid pid {value}")
    return value


@dataclass(frozen=True)
class Storage:
    driver: str
    source: str
    fstype: str
    mount_point: str
    options: tuple[str, ...] = ()
    create_filesystem: bool = False

    def to_proto(self) -> pb.Storage:
        return pb.Storage(driver=self.driver, source=self.source, fstype=self.fstype,
                          options=list(self.options), mount_point=self.mount_point,
                          create_filesystem=self.create_filesystem)


@dataclass(frozen=True)
class ContainerStats:
    cpu_usage_ns: int
    cpu_user_ns: int
    cpu_system_ns: int
    memory_usage_bytes: int
    memory_limit_bytes: int
    memory_max_usage_bytes: int
    memory_cache_bytes: int
    memory_rss_bytes: int
    pids_current: int
    pids_limit: int
    oom_kills: int = 0


class PortForwardStream:
    """One port-forward connection through the agent: write() bytes, read() until b""."""

    def __init__(self, call: Any, port: int) -> None:
        self._call = call
        self._port = port
        self._opened = False

    async def write(self, data: bytes) -> None:
        """:raise errors.HuskError: the stream failed (the guest refused the port...)."""
        message = pb.PortForwardData(data=data)
        if not self._opened:
            message.port, self._opened = self._port, True
        try:
            await self._call.write(message)
        except grpc.aio.AioRpcError as exc:
            raise _translate("PortForward", exc) from None
        except grpc.aio.UsageError:  # the call already ended; read() says how
            raise errors.UnavailableError("agent PortForward: the stream is closed") from None

    async def done_writing(self) -> None:
        if not self._opened:
            await self.write(b"")
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            await self._call.done_writing()

    async def read(self) -> bytes:
        """The guest's next bytes; b"" once it closed its side."""
        while True:
            try:
                reply = await self._call.read()
            except grpc.aio.AioRpcError as exc:
                raise _translate("PortForward", exc) from None
            if reply is grpc.aio.EOF:
                return b""
            data: bytes = _parsed("PortForward", reply).data
            if data:
                return data

    def cancel(self) -> None:
        self._call.cancel()


class ConsoleStream:
    """One debug-console process in the guest: send() input, read() output and the exit."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def send(self, message: pb.ConsoleInput) -> None:
        """:raise errors.HuskError: the stream ended (read() says how)."""
        try:
            await self._call.write(message)
        except grpc.aio.AioRpcError as exc:
            raise _translate("DebugConsole", exc) from None
        except (grpc.aio.UsageError, asyncio.InvalidStateError):  # the call ended already
            raise errors.UnavailableError("agent DebugConsole: the stream is closed") from None

    async def done_writing(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            await self._call.done_writing()

    async def read(self) -> tuple[bytes, int | None]:
        """(output, None), or (b"", the exit status) once the process ended.

        :raise errors.HuskError: the agent refused or the stream broke.
        """
        try:
            reply = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise _translate("DebugConsole", exc) from None
        if reply is grpc.aio.EOF:
            raise errors.UnavailableError("agent DebugConsole: the stream ended without an "
                                          "exit status")
        reply = _parsed("DebugConsole", reply)
        if reply.exited:
            return b"", min(max(int(reply.exit_status), 0), 255)
        return bytes(reply.data), None

    async def started(self) -> None:
        """Wait for the agent to say the process runs.

        :raise errors.HuskError: it refused (the console is off, bad arguments...).
        """
        try:
            reply = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise _translate("DebugConsole", exc) from None
        if reply is grpc.aio.EOF or not _parsed("DebugConsole", reply).started:
            raise errors.InternalError("agent DebugConsole: no start message")

    def cancel(self) -> None:
        self._call.cancel()


class AgentClient:
    """One gRPC channel to the agent of one VM."""

    def __init__(self, target: str, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.AgentServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def _call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        """One unary call, its deadline kept on the host.

        No gRPC deadline is sent: the agent would enforce it with the guest's
        clock, which the guest controls and which runs at the wrong rate when
        a TCG guest calibrated its TSC under load (seen: 11× fast).
        """
        rpc: Callable[..., Awaitable[Any]] = getattr(self._stub, method)
        timeout = timeout_s or self.timeout_s
        try:
            return _parsed(method, await asyncio.wait_for(rpc(request), timeout))
        except grpc.aio.AioRpcError as exc:
            raise _translate(method, exc) from None
        except asyncio.TimeoutError:
            raise errors.DeadlineExceededError(
                f"agent {method}: no answer within {timeout:.0f}s") from None

    async def wait_ready(self, timeout_s: float, alive: Callable[[], str | None]) -> None:
        """Poll Check until the agent serves.

        ``alive`` returns None while the VM runs, or why it stopped; a dead VM
        fails at once instead of waiting for the timeout.

        :raise errors.UnavailableError: the VM died or the agent never answered.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last = "no answer"
        while loop.time() < deadline:
            dead = alive()
            if dead:
                raise errors.UnavailableError(f"the VM stopped before its agent answered: {dead}")
            try:
                reply = await asyncio.wait_for(
                    self._stub.Check(pb.CheckRequest(), wait_for_ready=True), CHECK_TIMEOUT_S)
                if reply is not None and reply.status == pb.CheckResponse.SERVING:
                    return
                last = f"agent status {reply.status if reply is not None else 'unreadable'}"
            except grpc.aio.AioRpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            except asyncio.TimeoutError:
                last = f"no answer to a check within {CHECK_TIMEOUT_S:.0f}s"
            await asyncio.sleep(READY_POLL_S)
        raise errors.UnavailableError(f"the agent did not answer within {timeout_s:.0f}s ({last})")

    async def check(self, timeout_s: float) -> None:
        """One keepalive: :raise errors.HuskError: no SERVING answer within ``timeout_s``."""
        reply = await self._call("Check", pb.CheckRequest(), timeout_s)
        if reply.status != pb.CheckResponse.SERVING:
            raise errors.UnavailableError(f"agent status {reply.status}")

    async def guest_metrics(self, known_containers: set[str]) -> dict[str, Any]:
        """The guest's memory, CPU time and load, and the usage of each container in
        ``known_containers`` (a guest cannot invent series: others are dropped)."""
        reply = await self._call("GetMetrics", pb.Empty(), METRICS_TIMEOUT_S)
        figures: dict[str, Any] = {}
        for field in reply.DESCRIPTOR.fields:
            if field.name == "containers":
                continue
            value = getattr(reply, field.name)
            if isinstance(value, float):
                finite = math.isfinite(value) and value > 0
                figures[field.name] = min(value, MAX_LOAD) if finite else 0.0
            else:
                figures[field.name] = min(int(value), MAX_COUNTER)
        containers = {}
        for entry in reply.containers:
            if entry.container_id in known_containers and entry.container_id not in containers:
                containers[entry.container_id] = _container_stats(entry.stats)
        figures["containers"] = containers
        return figures

    async def guest_details(self) -> dict[str, Any]:
        reply = await self._call("GetGuestDetails", pb.Empty())
        # Values from the guest go to logs only; clip them.
        return {"agent_version": reply.agent_version[:64],
                "kernel_release": reply.kernel_release[:128],
                "python_version": reply.python_version[:64],
                "oci_runtime_version": reply.oci_runtime_version[:128],
                "cpus": reply.cpus, "memory_bytes": reply.memory_bytes}

    async def create_sandbox(self, sandbox_id: str, hostname: str, dns: list[str],
                             storages: list[Storage],
                             sysctls: Mapping[str, str] | None = None,
                             network: PodNetwork | None = None, random_seed: bytes = b"",
                             clock_ns: int = 0, debug_console: bool = False) -> None:
        await self._call("CreateSandbox", pb.CreateSandboxRequest(
            sandbox_id=sandbox_id, hostname=hostname, dns=dns,
            storages=[s.to_proto() for s in storages], sysctls=dict(sysctls or {}),
            network=network_proto(network or PodNetwork()), random_seed=random_seed,
            clock_ns=clock_ns, debug_console=debug_console))

    async def update_network(self, network: PodNetwork) -> None:
        """Configure interfaces added after boot (hot-plugged NICs), with their routes."""
        await self._call("UpdateNetwork", network_proto(network))

    async def destroy_sandbox(self, sandbox_id: str, timeout_s: float | None = None) -> None:
        await self._call("DestroySandbox", pb.DestroySandboxRequest(sandbox_id=sandbox_id),
                         timeout_s)

    async def create_container(self, container_id: str, spec: dict[str, Any],
                               storages: list[Storage] = (),  # type: ignore[assignment]
                               close_stdin: bool = False) -> int:
        """:param close_stdin: the init reads EOF on stdin from the start."""
        reply = await self._call("CreateContainer", pb.CreateContainerRequest(
            container_id=container_id, oci_spec_json=json.dumps(spec),
            storages=[s.to_proto() for s in storages], close_stdin=close_stdin))
        return _pid(reply.pid)

    async def start_container(self, container_id: str) -> int:
        reply = await self._call("StartContainer", pb.ContainerRequest(container_id=container_id))
        return _pid(reply.pid)

    async def remove_container(self, container_id: str, timeout_s: int = 10) -> None:
        await self._call("RemoveContainer", pb.RemoveContainerRequest(
            container_id=container_id, timeout_s=timeout_s), timeout_s + self.timeout_s)

    async def exec_process(self, container_id: str, exec_id: str,
                           process: dict[str, Any], close_stdin: bool = False) -> int:
        """:param close_stdin: the process reads EOF on stdin from the start."""
        reply = await self._call("ExecProcess", pb.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id, process_json=json.dumps(process),
            close_stdin=close_stdin))
        return _pid(reply.pid)

    async def signal_process(self, container_id: str, exec_id: str, signal: int,
                             all_processes: bool = False) -> None:
        await self._call("SignalProcess", pb.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal, all=all_processes))

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        """The exit status (128+N for signal N)."""
        return (await self.wait_exit(container_id, exec_id))[0]

    async def wait_exit(self, container_id: str, exec_id: str) -> tuple[int, int]:
        """The exit status (128+N for signal N) and, for a container's init, the OOM
        kills in its cgroup so far.

        No deadline: a process may run for months. The pod's keepalive covers
        a dead or wedged agent (it stops the VM, which ends this call)."""
        try:
            reply = _parsed("WaitProcess", await self._stub.WaitProcess(
                pb.ProcessRequest(container_id=container_id, exec_id=exec_id)))
        except grpc.aio.AioRpcError as exc:
            raise _translate("WaitProcess", exc) from None
        status = int(reply.exit_status)
        if not 0 <= status <= 255:
            raise errors.InternalError(f"agent returned an invalid exit status {status}")
        return status, min(int(reply.oom_kills), MAX_COUNTER)

    async def get_oom_event(self) -> str:
        """The next container the guest's OOM killer hit; no deadline (see wait_process)."""
        try:
            reply = _parsed("GetOOMEvent", await self._stub.GetOOMEvent(pb.Empty()))
        except grpc.aio.AioRpcError as exc:
            raise _translate("GetOOMEvent", exc) from None
        return str(reply.container_id)[:MAX_ID_LENGTH]

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        reply = await self._call("WriteStdin", pb.WriteStdinRequest(
            container_id=container_id, exec_id=exec_id, data=data))
        return min(int(reply.written), len(data))

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        await self._call("CloseStdin", pb.ProcessRequest(container_id=container_id,
                                                          exec_id=exec_id))

    async def read_output(self, container_id: str, exec_id: str,
                          stderr: bool = False) -> AsyncIterator[bytes]:
        """Yield the process's stdout (or stderr) until it closes the stream."""
        stream = pb.STDERR if stderr else pb.STDOUT
        call = self._stub.ReadOutput(pb.ReadOutputRequest(
            container_id=container_id, exec_id=exec_id, stream=stream))
        try:
            async for chunk in call:
                yield _parsed("ReadOutput", chunk).data
        except grpc.aio.AioRpcError as exc:
            raise _translate("ReadOutput", exc) from None
        finally:
            call.cancel()

    def port_forward(self, port: int) -> PortForwardStream:
        """A byte stream to ``port`` on the guest's loopback (the pod's localhost)."""
        return PortForwardStream(self._stub.PortForward(), port)

    async def volume_stats(self, mount_point: str) -> dict[str, int]:
        """statvfs of a guest mount, checked: CSI's NodeGetVolumeStats carries int64s, and
        a part is never more than its whole."""
        reply = await self._call("GetVolumeStats", pb.VolumeRequest(mount_point=mount_point))
        stats = {k: int(getattr(reply, k)) for k in (
            "capacity_bytes", "used_bytes", "available_bytes", "inodes", "inodes_used",
            "inodes_free")}
        if (max(stats.values()) >= 1 << 63
                or max(stats["used_bytes"], stats["available_bytes"]) > stats["capacity_bytes"]
                or max(stats["inodes_used"], stats["inodes_free"]) > stats["inodes"]):
            raise errors.InternalError(f"agent GetVolumeStats: inconsistent figures {stats}")
        return stats

    async def online_cpu_mem(self, vcpus: int, min_memory_bytes: int) -> tuple[int, int]:
        """Have the guest use exactly ``vcpus`` CPUs and all its memory (after a hot-plug);
        (online vCPUs, online memory bytes) as the guest reports them."""
        reply = await self._call("OnlineCPUMem", pb.OnlineCPUMemRequest(
            vcpus=vcpus, min_memory_bytes=min_memory_bytes), timeout_s=HOTPLUG_SETTLE_TIMEOUT_S)
        return int(reply.online_vcpus), int(reply.memory_bytes)

    async def resize_volume(self, mount_point: str, size_bytes: int) -> None:
        await self._call("ResizeVolume", pb.ResizeVolumeRequest(mount_point=mount_point,
                                                                size_bytes=size_bytes))

    async def tty_resize(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        await self._call("TtyWinResize", pb.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, rows=rows, columns=columns))

    async def pause_container(self, container_id: str) -> None:
        await self._call("PauseContainer", pb.ContainerRequest(container_id=container_id))

    async def resume_container(self, container_id: str) -> None:
        await self._call("ResumeContainer", pb.ContainerRequest(container_id=container_id))

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        await self._call("UpdateContainer", pb.UpdateContainerRequest(
            container_id=container_id, resources_json=json.dumps(resources)))

    async def list_processes(self, container_id: str) -> list[int]:
        reply = await self._call("ListProcesses", pb.ContainerRequest(container_id=container_id))
        return [p for p in reply.pids[:65536] if 0 < p < MAX_PID]

    async def stats_container(self, container_id: str) -> ContainerStats:
        return _container_stats(await self._call(
            "StatsContainer", pb.ContainerRequest(container_id=container_id)))

    def debug_console(self) -> ConsoleStream:
        """A process in the guest outside the containers (the agent refuses unless
        CreateSandbox turned the console on)."""
        return ConsoleStream(self._stub.DebugConsole())


def _container_stats(r: pb.StatsContainerResponse) -> ContainerStats:
    return ContainerStats(
        cpu_usage_ns=r.cpu_usage_ns, cpu_user_ns=r.cpu_user_ns,
        cpu_system_ns=r.cpu_system_ns, memory_usage_bytes=r.memory_usage_bytes,
        memory_limit_bytes=r.memory_limit_bytes,
        memory_max_usage_bytes=r.memory_max_usage_bytes,
        memory_cache_bytes=r.memory_cache_bytes, memory_rss_bytes=r.memory_rss_bytes,
        pids_current=r.pids_current, pids_limit=r.pids_limit, oom_kills=r.oom_kills)


def network_proto(network: PodNetwork) -> pb.NetworkConfig:
    return pb.NetworkConfig(
        interfaces=[pb.Interface(name=i.name, mac=i.mac.lower(), mtu=i.mtu, addresses=[
            pb.IPAddress(address=a.address, prefix_len=a.prefix_len) for a in i.addresses])
            for i in network.interfaces],
        routes=[pb.Route(destination=r.destination, gateway=r.gateway, device=r.device,
                         source=r.source, scope=r.scope, metric=r.metric, onlink=r.onlink)
                for r in network.routes],
        neighbors=[pb.Neighbor(ip=n.ip, mac=n.mac.lower(), device=n.device)
                   for n in network.neighbors])
