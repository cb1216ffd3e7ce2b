"""The AgentService RPCs: one method per RPC, and the only place errors become status codes.

Domain errors map to codes (InvalidArgument, NotFound, AlreadyExists,
FailedPrecondition...); anything else is a bug: logged with its traceback and
returned as INTERNAL. No request can take the agent down.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import platform
import time
from pathlib import Path
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from agent import __version__
from agent import debugconsole, identity, network
from agent.cgroups import CgroupStats
from agent.metrics import guest_usage
from agent.container import Container, Runtime
from agent.hotplug import Hotplug
from agent.errors import (AgentError, AlreadyExistsError, CommandError, DeadlineError,
                          FailedPreconditionError, GuestError, InvalidArgumentError,
                          NotFoundError)
from agent.process import Process
from agent.runtime import run_program
from agent.sandbox import Sandbox
from agent.spec import check_id, parse_json_object, rewrite_process
from agent.stdio import OutputBuffer
from agent.storage import MountedStorage, Storage
from agent.volumes import VolumeTools, usage
from agent.testhooks import Hooks
from proto.gen import agent_pb2 as pb
from proto.gen import agent_pb2_grpc

log = logging.getLogger(__name__)

OUTPUT_CHUNK = 64 * 1024
# Reading memory.events of a few containers twice a second costs next to nothing.
OOM_POLL_S = 0.5
SIGNAL_MAX = 64
# A hot-plugged NIC shows up some time after the host asked for it.
NIC_WAIT_S = 20.0
# Each port-forward stream holds a socket and a task; kubectl opens one per connection.
MAX_PORT_FORWARDS = 64
PORT_FORWARD_CHUNK = 64 * 1024
PORT_CONNECT_TIMEOUT_S = 5.0
LOOPBACKS = ("127.0.0.1", "::1")
WINSIZE_MAX = 0xFFFF
# After the exit status, how long the console waits for the host to stop writing: a
# host's write that crosses the end of the call turns gRPC's status into an internal
# error on the host, and the exit status with it is lost.
CONSOLE_HALF_CLOSE_WAIT_S = 5.0

_CODES: dict[type[AgentError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    DeadlineError: grpc.StatusCode.DEADLINE_EXCEEDED,
    CommandError: grpc.StatusCode.UNKNOWN,
    GuestError: grpc.StatusCode.UNKNOWN,
}

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def status_code(error: AgentError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.UNKNOWN


async def _abort(context: grpc.aio.ServicerContext, rpc: str, error: Exception) -> None:
    if isinstance(error, AgentError):
        code = status_code(error)
        log.info("%s: %s: %s", rpc, code.name, error)
        await context.abort(code, str(error))
    log.error("%s: unexpected error", rpc, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"{rpc}: internal agent error: {type(error).__name__}: {error}")


def unary(method: Callable[[Any, Req], Awaitable[Resp]]) -> Callable[..., Awaitable[Resp]]:
    """Run one unary RPC, turning its exceptions into a gRPC status."""
    rpc = method.__name__

    @functools.wraps(method)
    async def handler(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        started = time.monotonic()
        try:
            return await method(self, request)
        except Exception as e:  # noqa: BLE001 - every error must become a status
            await _abort(context, rpc, e)
            raise  # unreachable: abort raises
        finally:
            log.debug("%s took %.1f ms", rpc, (time.monotonic() - started) * 1000)

    return handler


class AgentService(agent_pb2_grpc.AgentServiceServicer):
    """The agent's gRPC API; holds the (at most one) sandbox."""

    def __init__(self, runtime: Runtime, hooks: Hooks | None = None,
                 on_first_sandbox: Callable[[], None] | None = None) -> None:
        """:param hooks: test hooks (husk.test_hooks=1 only), else None.
        :param on_first_sandbox: called once, when the first sandbox has been created."""
        self._runtime = runtime
        self._on_first_sandbox = on_first_sandbox
        self._hooks = hooks
        self._sandbox: Sandbox | None = None
        self._sandbox_lock = asyncio.Lock()
        self._oci_version: str | None = None
        self._oom_kills: dict[str, int] = {}  # OOM kills already reported, per container
        self._port_forwards = 0  # open PortForward streams
        self._debug_console = False  # CreateSandbox turns it on (husk.toml [debug] console)
        self._consoles = 0  # open DebugConsole streams
        self._tools = VolumeTools(runtime.reaper, runtime.config.sysfs)
        self._hotplug = Hotplug(runtime.config.sysfs)

    # Section: lookups

    def _sandbox_of(self, container_id: str) -> Sandbox:
        if self._sandbox is None:
            raise NotFoundError(f"container {container_id!r} not found (no sandbox)")
        return self._sandbox

    def _container(self, container_id: str) -> Container:
        return self._sandbox_of(container_id).container(container_id)

    def _process(self, container_id: str, exec_id: str) -> Process:
        return self._container(container_id).process(exec_id)

    async def shutdown(self) -> None:
        """Best effort: remove every container and unmount (the agent is stopping)."""
        async with self._sandbox_lock:
            if self._sandbox is not None:
                await self._sandbox.destroy()
                self._sandbox = None

    # Section: sandbox

    @unary
    async def CreateSandbox(self, request: pb.CreateSandboxRequest) -> pb.Empty:
        async with self._sandbox_lock:
            if self._sandbox is not None:
                raise AlreadyExistsError(f"sandbox {self._sandbox.id} already exists")
            if request.random_seed:
                identity.mix_in_entropy(request.random_seed)
            if request.clock_ns:
                identity.set_clock(request.clock_ns)
            self._debug_console = request.debug_console
            storages = [Storage(s.driver, s.source, s.fstype, list(s.options), s.mount_point)
                        for s in request.storages]
            network.check(request.network)
            sandbox = await Sandbox.create(self._runtime, request.sandbox_id,
                                           request.hostname, list(request.dns), storages,
                                           dict(request.sysctls))
            try:
                await self._configure_network(request.network)
            except BaseException:
                await sandbox.destroy()
                raise
            self._sandbox = sandbox
        if self._on_first_sandbox is not None:
            on_first, self._on_first_sandbox = self._on_first_sandbox, None
            on_first()
        return pb.Empty()

    async def _configure_network(self, config: pb.NetworkConfig) -> None:
        if config.interfaces or config.routes or config.neighbors:
            reaper = self._runtime.reaper

            async def run_ip(args: list[str], stdin: int | None) -> str:
                return await run_program(reaper, [network.IP, *args], network.IP_TIMEOUT_S,
                                         f"{network.IP} {args[0]}", stdin=stdin)

            class_net = Path(self._runtime.config.sysfs) / "class" / "net"
            await network.configure(config, NIC_WAIT_S, run_ip,
                                    functools.partial(network.sysfs_links, class_net))

    # Section: block volumes

    def _volume(self, mount_point: str) -> MountedStorage:
        sandbox = self._sandbox
        for container in list(sandbox.containers.values()) if sandbox else []:
            for volume in container.volumes:
                if volume.storage.driver == "blk" and volume.storage.mount_point == mount_point:
                    return volume
        raise NotFoundError(f"no block volume is mounted at {mount_point[:200]!r}")

    @unary
    async def GetVolumeStats(self, request: pb.VolumeRequest) -> pb.VolumeStats:
        volume = self._volume(request.mount_point)
        try:
            return usage(volume.storage.mount_point)
        except OSError as e:
            raise GuestError(f"statvfs {volume.storage.mount_point}: {e.strerror}") from e

    @unary
    async def ResizeVolume(self, request: pb.ResizeVolumeRequest) -> pb.Empty:
        await self._tools.grow(self._volume(request.mount_point), request.size_bytes)
        return pb.Empty()

    # Section: network

    async def PortForward(self, requests: AsyncIterator[pb.PortForwardData],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PortForwardData]:
        """Splice the host's stream to a port on the guest's loopback (the pod's localhost)."""
        if self._port_forwards >= MAX_PORT_FORWARDS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{MAX_PORT_FORWARDS} port-forward streams are open already")
        self._port_forwards += 1
        upstream: asyncio.Task[None] | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            first = await anext(aiter(requests), None)
            if first is None:
                return
            reader, writer = await connect_local_port(first.port)
            if first.data:
                writer.write(first.data)
            upstream = asyncio.create_task(_host_to_port(requests, writer))
            while data := await reader.read(PORT_FORWARD_CHUNK):
                yield pb.PortForwardData(data=data)
        except Exception as e:  # noqa: BLE001 - every error must become a status
            await _abort(context, "PortForward", e)
        finally:
            self._port_forwards -= 1
            if upstream is not None:
                upstream.cancel()
            if writer is not None:
                writer.close()

    @unary
    async def UpdateNetwork(self, request: pb.NetworkConfig) -> pb.Empty:
        network.check(request)
        if self._sandbox is None:
            raise FailedPreconditionError("no sandbox: the network comes with CreateSandbox")
        await self._configure_network(request)
        return pb.Empty()

    @unary
    async def DestroySandbox(self, request: pb.DestroySandboxRequest) -> pb.Empty:
        async with self._sandbox_lock:
            sandbox = self._sandbox
            if sandbox is None or (request.sandbox_id and request.sandbox_id != sandbox.id):
                raise NotFoundError(f"sandbox {request.sandbox_id!r} not found")
            await sandbox.destroy()
            self._sandbox = None
        return pb.Empty()

    # Section: containers

    @unary
    async def CreateContainer(self, request: pb.CreateContainerRequest) -> pb.ProcessResponse:
        if self._sandbox is None:
            raise FailedPreconditionError("no sandbox: CreateSandbox must come first")
        storages = [Storage(s.driver, s.source, s.fstype, list(s.options), s.mount_point,
                            s.create_filesystem) for s in request.storages]
        container = await self._sandbox.create_container(request.container_id,
                                                         request.oci_spec_json, storages)
        if request.close_stdin:
            container.init.io.stdin.close()
        return pb.ProcessResponse(pid=container.init.pid)

    @unary
    async def StartContainer(self, request: pb.ContainerRequest) -> pb.ProcessResponse:
        return pb.ProcessResponse(pid=await self._container(request.container_id).start())

    @unary
    async def RemoveContainer(self, request: pb.RemoveContainerRequest) -> pb.Empty:
        sandbox = self._sandbox_of(request.container_id)
        await sandbox.remove_container(request.container_id, float(request.timeout_s))
        return pb.Empty()

    @unary
    async def PauseContainer(self, request: pb.ContainerRequest) -> pb.Empty:
        await self._container(request.container_id).pause()
        return pb.Empty()

    @unary
    async def ResumeContainer(self, request: pb.ContainerRequest) -> pb.Empty:
        await self._container(request.container_id).resume()
        return pb.Empty()

    @unary
    async def UpdateContainer(self, request: pb.UpdateContainerRequest) -> pb.Empty:
        container = self._container(request.container_id)
        await container.update(parse_json_object(request.resources_json, "resources"))
        return pb.Empty()

    @unary
    async def StatsContainer(self, request: pb.ContainerRequest) -> pb.StatsContainerResponse:
        return _stats_message(self._container(request.container_id).stats())

    @unary
    async def ListProcesses(self, request: pb.ContainerRequest) -> pb.ListProcessesResponse:
        return pb.ListProcessesResponse(pids=self._container(request.container_id).pids())

    # Section: processes

    @unary
    async def ExecProcess(self, request: pb.ExecProcessRequest) -> pb.ProcessResponse:
        container = self._container(request.container_id)
        check_id("exec id", request.exec_id)
        process = rewrite_process(request.process_json)
        proc = await container.exec(request.exec_id, process)
        if request.close_stdin:
            proc.io.stdin.close()
        return pb.ProcessResponse(pid=proc.pid)

    @unary
    async def SignalProcess(self, request: pb.SignalProcessRequest) -> pb.Empty:
        if not 0 < request.signal <= SIGNAL_MAX:
            raise InvalidArgumentError(f"invalid signal {request.signal}")
        container = self._container(request.container_id)
        await container.signal(request.exec_id, request.signal, request.all)
        return pb.Empty()

    @unary
    async def WaitProcess(self, request: pb.ProcessRequest) -> pb.WaitProcessResponse:
        proc = self._process(request.container_id, request.exec_id)
        status = await proc.wait()
        oom_kills = 0
        if not request.exec_id:
            with contextlib.suppress(AgentError):  # removed meanwhile: no cgroup to read
                oom_kills = self._container(request.container_id).cgroup.oom_kills()
        return pb.WaitProcessResponse(exit_status=status, oom_kills=oom_kills)

    # Section: stdio

    @unary
    async def WriteStdin(self, request: pb.WriteStdinRequest) -> pb.WriteStdinResponse:
        proc = self._process(request.container_id, request.exec_id)
        return pb.WriteStdinResponse(written=await proc.io.stdin.write(request.data))

    @unary
    async def CloseStdin(self, request: pb.ProcessRequest) -> pb.Empty:
        self._process(request.container_id, request.exec_id).io.stdin.close()
        return pb.Empty()

    async def ReadOutput(self, request: pb.ReadOutputRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.OutputChunk]:
        try:
            buffer = self._output(request)
            while (data := await buffer.read(OUTPUT_CHUNK)) is not None:
                yield pb.OutputChunk(data=data)
        except Exception as e:  # noqa: BLE001 - every error must become a status
            await _abort(context, "ReadOutput", e)

    def _output(self, request: pb.ReadOutputRequest) -> OutputBuffer:
        io = self._process(request.container_id, request.exec_id).io
        if request.stream == pb.STDOUT:
            return io.stdout
        if request.stream == pb.STDERR:
            return io.stderr
        raise InvalidArgumentError(f"unknown output stream {request.stream}")

    @unary
    async def TtyWinResize(self, request: pb.TtyWinResizeRequest) -> pb.Empty:
        if request.rows > WINSIZE_MAX or request.columns > WINSIZE_MAX:
            raise InvalidArgumentError(f"window size {request.rows}x{request.columns} is too big")
        proc = self._process(request.container_id, request.exec_id)
        proc.io.resize(request.rows, request.columns)
        return pb.Empty()

    # Section: guest

    @unary
    async def GetOOMEvent(self, request: pb.Empty) -> pb.OOMEvent:
        """Return the next container whose OOM-kill count went up (polls the cgroups)."""
        while True:
            if self._hooks is not None and (flooded := self._hooks.take_oom_event()) is not None:
                return pb.OOMEvent(container_id=flooded)
            sandbox = self._sandbox
            for container in list(sandbox.containers.values()) if sandbox else []:
                kills = container.cgroup.oom_kills()
                if kills > self._oom_kills.get(container.id, 0):
                    self._oom_kills[container.id] = kills
                    log.info("container %s: OOM kill (%d so far)", container.id, kills)
                    return pb.OOMEvent(container_id=container.id)
            await asyncio.sleep(OOM_POLL_S)

    @unary
    async def Check(self, request: pb.CheckRequest) -> pb.CheckResponse:
        return pb.CheckResponse(status=pb.CheckResponse.SERVING)

    @unary
    async def OnlineCPUMem(self, request: pb.OnlineCPUMemRequest) -> pb.GuestResources:
        now = await self._hotplug.settle(request.vcpus, request.min_memory_bytes)
        return pb.GuestResources(online_vcpus=now.online_vcpus, memory_bytes=now.memory_bytes)

    @unary
    async def GetGuestDetails(self, request: pb.Empty) -> pb.GuestDetails:
        oci_version = self._oci_version
        if oci_version is None:
            # Details for the log: a crun that is slow to answer (ten TCG guests booting
            # at once) must not fail the pod's start.
            try:
                oci_version = self._oci_version = await self._runtime.crun.version()
            except AgentError as exc:
                log.warning("crun --version: %s", exc)
                oci_version = "unknown"
        return pb.GuestDetails(
            agent_version=__version__, kernel_release=os.uname().release,
            python_version=platform.python_version(), oci_runtime_version=oci_version,
            cpus=os.cpu_count() or 0, memory_bytes=_memory_total())

    # Section: node tools

    @unary
    async def GetMetrics(self, request: pb.Empty) -> pb.GuestMetrics:
        usage = guest_usage(sysfs=self._runtime.config.sysfs)
        reply = pb.GuestMetrics(**dataclasses.asdict(usage))
        for container in list(self._sandbox.containers.values()) if self._sandbox else []:
            try:
                stats = container.stats()
            except AgentError as exc:  # removed meanwhile, or its cgroup is gone
                log.debug("metrics: container %s: %s", container.id, exc)
                continue
            reply.containers.add(container_id=container.id, stats=_stats_message(stats))
        return reply

    async def DebugConsole(self, requests: AsyncIterator[pb.ConsoleInput],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ConsoleOutput]:
        """Run a process in the guest outside the containers, for `husk exec`.

        The first request is read before anything is refused or started: ending a
        stream whose first message is still in flight makes gRPC report an internal
        error instead of ours.
        """
        first = await anext(aiter(requests), None)
        if first is None:
            return
        if not self._debug_console:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the debug console is off (husk.toml [debug] console)")
        if self._consoles >= debugconsole.MAX_CONSOLES:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{debugconsole.MAX_CONSOLES} debug consoles are open already")
        self._consoles += 1
        process: Process | None = None
        feeder: asyncio.Task[None] | None = None
        try:
            name = f"console-{self._consoles}-{time.monotonic_ns()}"
            try:
                process = debugconsole.start(self._runtime.reaper, name, list(first.argv),
                                             first.tty, first.rows, first.columns)
            except OSError as e:
                # As a shell says it: 127 not found, 126 found but not runnable.
                program = list(first.argv)[:1] or list(debugconsole.DEFAULT_ARGV)
                yield pb.ConsoleOutput(started=True)
                yield pb.ConsoleOutput(data=f"husk-agent: {program[0][:200]}: "
                                       f"{e.strerror or e}\n".encode())
                not_found = isinstance(e, FileNotFoundError)
                yield pb.ConsoleOutput(exited=True, exit_status=127 if not_found else 126)
                feeder = asyncio.create_task(_drain(requests))
                await asyncio.wait({feeder}, timeout=CONSOLE_HALF_CLOSE_WAIT_S)
                return
            log.info("debug console %s: pid %d runs %s%s", name, process.pid,
                     list(first.argv)[:8] or list(debugconsole.DEFAULT_ARGV),
                     " (tty)" if first.tty else "")
            yield pb.ConsoleOutput(started=True)
            if first.data:
                await process.io.stdin.write(first.data)
            feeder = asyncio.create_task(debugconsole.feed(_console_inputs(requests), process))
            async for data in debugconsole.output(process, OUTPUT_CHUNK):
                yield pb.ConsoleOutput(data=data)
            yield pb.ConsoleOutput(exited=True, exit_status=await process.wait())
            await asyncio.wait({feeder}, timeout=CONSOLE_HALF_CLOSE_WAIT_S)
        except Exception as e:  # noqa: BLE001 - every error must become a status
            await _abort(context, "DebugConsole", e)
        finally:
            self._consoles -= 1
            if feeder is not None:
                feeder.cancel()
            if process is not None:
                debugconsole.end(process)


async def connect_local_port(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``port`` on the loopback, IPv4 first then IPv6, as containerd does for runc pods.

    :raise InvalidArgumentError: not a TCP port number.
    :raise GuestError: nothing listens there.
    """
    if not 0 < port < 65536:
        raise InvalidArgumentError(f"port-forward: {port} is not a TCP port")
    failures = []
    for host in LOOPBACKS:
        try:
            return await asyncio.wait_for(asyncio.open_connection(host, port),
                                          PORT_CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:
            failures.append(f"{host}: {exc.strerror if isinstance(exc, OSError) else 'timeout'}")
    raise GuestError(f"port-forward: cannot connect to port {port} in the pod "
                     f"({'; '.join(failures)})")


async def _host_to_port(requests: AsyncIterator[pb.PortForwardData],
                        writer: asyncio.StreamWriter) -> None:
    """The host's bytes to the port; the host's half-close becomes ours."""
    with contextlib.suppress(OSError, grpc.aio.AioRpcError):
        async for message in requests:
            writer.write(message.data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


def _stats_message(s: CgroupStats) -> pb.StatsContainerResponse:
    return pb.StatsContainerResponse(
        cpu_usage_ns=s.cpu_usage_ns, cpu_user_ns=s.cpu_user_ns, cpu_system_ns=s.cpu_system_ns,
        memory_usage_bytes=s.memory_usage_bytes, memory_limit_bytes=s.memory_limit_bytes,
        memory_max_usage_bytes=s.memory_max_usage_bytes, pids_current=s.pids_current,
        pids_limit=s.pids_limit, memory_cache_bytes=s.memory_cache_bytes,
        memory_rss_bytes=s.memory_rss_bytes, oom_kills=s.oom_kills)


async def _drain(requests: AsyncIterator[Any]) -> None:
    async for _ in requests:
        pass


async def _console_inputs(requests: AsyncIterator[pb.ConsoleInput]
                          ) -> AsyncIterator[tuple[bytes, int, int, bool]]:
    async for message in requests:
        yield message.data, message.rows, message.columns, message.close_stdin


def _memory_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
