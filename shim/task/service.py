"""TaskService: containerd.task.v2.Task, one method per RPC.

Each method finds its target, calls the pod verb of the same name, publishes
the matching event and answers. Domain errors become ttrpc status codes in
one place (the @rpc decorator). The first task created in this shim decides
the pod: a CRI sandbox, or a standalone container that gets a VM of its own.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import empty_pb2

from proto.gen.containerd.cgroups.v1 import metrics_pb2
from proto.gen.containerd.events import task_pb2 as ev
from proto.gen.containerd.runtimeoptions.v1 import api_pb2 as runtimeoptions
from proto.gen.containerd.task.v2 import shim_pb2 as api
from proto.gen.containerd.types.task import task_pb2 as task_types
from shim import SHIM_VERSION, errors
from shim.config import Config, ConfigError, load_config
from shim.manager import RUN_DIR_FILE
from shim.sandbox.pod import Pod
from shim.sandbox.process import Process, ProcessState
from shim.sandbox.description import PodDescription
from shim.sandbox.sandbox import Sandbox
from shim.storage.share import RootfsMount
from shim.task.events import Publisher
from shim.sandbox.stdio import ProcessIO
from shim.ttrpc.errors import Code, TtrpcError
from shim.ttrpc.services import MethodStats

log = logging.getLogger(__name__)

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
RUNTIME_OPTIONS_TYPE = "runtimeoptions.v1.Options"

_CODES: dict[type[errors.HuskError], Code] = {
    errors.NotFoundError: Code.NOT_FOUND,
    errors.AlreadyExistsError: Code.ALREADY_EXISTS,
    errors.InvalidArgumentError: Code.INVALID_ARGUMENT,
    errors.FailedPreconditionError: Code.FAILED_PRECONDITION,
    errors.UnavailableError: Code.UNAVAILABLE,
    errors.DeadlineExceededError: Code.DEADLINE_EXCEEDED,
    errors.ResourceExhaustedError: Code.RESOURCE_EXHAUSTED,
    errors.UnimplementedError: Code.UNIMPLEMENTED,
    errors.InternalError: Code.INTERNAL,
}

_STATUS = {
    ProcessState.CREATED: task_types.CREATED,
    ProcessState.RUNNING: task_types.RUNNING,
    ProcessState.PAUSED: task_types.PAUSED,
    ProcessState.STOPPED: task_types.STOPPED,
}

R = TypeVar("R")


def to_status(exc: errors.HuskError) -> TtrpcError:
    code = next((c for cls, c in _CODES.items() if isinstance(exc, cls)), Code.UNKNOWN)
    return TtrpcError(code, str(exc))


def rpc(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Log the call and its duration; map domain errors to status codes."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: "TaskService", request: Any) -> R:
        started = time.monotonic()
        target = getattr(request, "id", "")
        exec_id = getattr(request, "exec_id", "")
        log.debug("%s %s%s", name, target, f"/{exec_id}" if exec_id else "")
        try:
            return await method(self, request)
        except errors.HuskError as exc:
            # containerd routinely kills what already exited: not worth a warning.
            level = logging.INFO if isinstance(exc, errors.NotFoundError) else logging.WARNING
            log.log(level, "%s %s failed: %s", name, target, exc)
            raise to_status(exc) from exc
        except ConfigError as exc:
            log.warning("%s %s failed: %s", name, target, exc)
            raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from exc
        finally:
            log.debug("%s %s took %.3fs", name, target, time.monotonic() - started)
    return wrapper


def _bundle_spec(bundle: str) -> dict[str, Any]:
    """config.json of a bundle; {} when unreadable (Create reports the real error later)."""
    try:
        spec = json.loads((Path(bundle) / "config.json").read_text())
        return spec if isinstance(spec, dict) else {}
    except (OSError, ValueError):
        return {}


def _annotations(spec: dict[str, Any]) -> dict[str, str]:
    annotations = spec.get("annotations")
    if not isinstance(annotations, dict):
        return {}
    return {str(k): str(v) for k, v in annotations.items()}


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    """:raise errors.InvalidArgumentError: ``data`` is not a JSON object."""
    try:
        value = json.loads(data or b"{}")
    except ValueError as exc:
        raise errors.InvalidArgumentError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise errors.InvalidArgumentError(f"{what} is not a JSON object")
    return value


def _config_path(options: Any) -> str | None:
    """ConfigPath from CRI's runtime options (an Any holding runtimeoptions.v1.Options)."""
    if not options.value:
        return None
    if options.type_url.rsplit("/", 1)[-1] != RUNTIME_OPTIONS_TYPE:
        return None
    parsed = runtimeoptions.Options()
    parsed.ParseFromString(options.value)
    return parsed.config_path or None


class TaskService:
    def __init__(self, shim_id: str, namespace: str, publisher: Publisher,
                 on_shutdown: Callable[[], None], config_path: str | None = None,
                 sandbox_factory: Callable[[PodDescription, Config], Sandbox] = Sandbox,
                 rpc_stats: Mapping[str, MethodStats] | None = None) -> None:
        """:param rpc_stats: the ttrpc server's per-method figures, for `husk monitor`."""
        self.shim_id = shim_id
        self._rpc_stats = rpc_stats if rpc_stats is not None else {}
        self.namespace = namespace
        self.publisher = publisher
        self.pod: Pod | None = None
        self._config_path = config_path
        self._on_shutdown = on_shutdown
        self._sandbox_factory = sandbox_factory  # tests substitute a VM-less sandbox
        self._lock = asyncio.Lock()  # guards pod creation

    # Section: helpers

    def _pod(self) -> Pod:
        if self.pod is None:
            raise errors.NotFoundError("no task has been created in this shim")
        return self.pod

    def _process(self, container_id: str, exec_id: str) -> Process:
        return self._pod().get(container_id).process(exec_id)

    def _publish_exit(self, proc: Process) -> None:
        assert proc.exited_at is not None
        self.publisher.publish(ev.TaskExit(
            container_id=proc.container_id, id=proc.exec_id or proc.container_id,
            pid=proc.pid, exit_status=proc.exit_status, exited_at=proc.exited_at))

    def _io(self, request: Any, container_id: str, exec_id: str = "") -> ProcessIO:
        return ProcessIO(container_id, exec_id, request.stdin, request.stdout, request.stderr,
                         request.terminal, self.namespace)

    async def _new_pod(self, request: api.CreateTaskRequest, spec: dict[str, Any]) -> Pod:
        annotations = _annotations(spec)
        config: Config = load_config(_config_path(request.options) or self._config_path)
        overrides = config.size_overrides(annotations)
        if log.isEnabledFor(logging.DEBUG) and not config.runtime.debug:
            config = _with_debug(config)
        # Checked before anything exists.
        description = PodDescription.from_spec(
            request.id, spec, annotations, cri_sandbox=annotations.get(CONTAINER_TYPE) == "sandbox",
            size_overrides=overrides)
        sandbox = self._sandbox_factory(description, config)
        _note_run_dir(request.bundle, sandbox.run_dir)
        pod = Pod(sandbox, self._publish_exit,
                  lambda cid: self.publisher.publish(ev.TaskOOM(container_id=cid)),
                  self.shim_metrics)
        try:
            await pod.boot()
        except BaseException:
            await pod.shutdown()
            raise
        return pod

    def shim_metrics(self) -> dict[str, Any]:
        """This shim's RPCs and events, for `husk monitor`."""
        return {"pid": os.getpid(),
                "rpc": {name: dataclasses.asdict(stats) for name, stats in self._rpc_stats.items()},
                "events": {"sent": dict(self.publisher.sent),
                           "dropped": dict(self.publisher.dropped),
                           "pending": self.publisher.pending}}

    # Section: RPCs

    @rpc
    async def create(self, request: api.CreateTaskRequest) -> api.CreateTaskResponse:
        spec = _bundle_spec(request.bundle)
        annotations = _annotations(spec)
        kind = annotations.get(CONTAINER_TYPE, "")
        rootfs = [RootfsMount(m.type, m.source, tuple(m.options)) for m in request.rootfs]
        async with self._lock:
            if self.pod is None:
                if kind == "container":
                    raise errors.FailedPreconditionError(
                        f"sandbox {annotations.get(SANDBOX_ID, '?')} of container {request.id} "
                        "is not running in this shim")
                self.pod = await self._new_pod(request, spec)
                if kind == "sandbox":
                    io = self._io(request, request.id)
                    await io.open()
                    container = self.pod.add_sandbox_container(request.id, request.bundle, io)
                else:  # a plain container (ctr run): the VM is its own
                    container = await self.pod.create_container(
                        request.id, request.bundle, rootfs, self._io(request, request.id))
            else:
                _note_run_dir(request.bundle, self.pod.sandbox.run_dir)
                container = await self.pod.create_container(
                    request.id, request.bundle, rootfs, self._io(request, request.id))
        pid = container.init.pid
        self.publisher.publish(ev.TaskCreate(
            container_id=request.id, bundle=request.bundle, rootfs=request.rootfs,
            io=ev.TaskIO(stdin=request.stdin, stdout=request.stdout, stderr=request.stderr,
                         terminal=request.terminal), pid=pid))
        return api.CreateTaskResponse(pid=pid)

    @rpc
    async def start(self, request: api.StartRequest) -> api.StartResponse:
        proc = await self._pod().start(request.id, request.exec_id)
        if request.exec_id:
            self.publisher.publish(ev.TaskExecStarted(container_id=request.id,
                                                      exec_id=request.exec_id, pid=proc.pid))
        else:
            self.publisher.publish(ev.TaskStart(container_id=request.id, pid=proc.pid))
        return api.StartResponse(pid=proc.pid)

    async def _tear_down(self, pod: Pod, sandbox_id: str) -> None:
        """The VM goes with the sandbox; containers still listed went with it.

        Shielded from the caller: containerd gives up on a Delete at its deadline (CRI:
        10 s), and a teardown cut short there would leave the VM running. containerd
        then sends no Shutdown either, so the daemon ends itself once the pod is gone.
        """
        async def tear_down() -> None:
            await pod.shutdown()
            pod.containers.clear()

        teardown = asyncio.ensure_future(tear_down())
        try:
            await asyncio.shield(teardown)
        except asyncio.CancelledError:
            log.warning("sandbox %s: containerd stopped waiting for its delete; the teardown "
                        "goes on and the shim exits after it", sandbox_id)
            teardown.add_done_callback(lambda done: self._exit_after_abandoned_delete(pod, done))
            raise

    def _exit_after_abandoned_delete(self, pod: Pod, teardown: asyncio.Future[None]) -> None:
        if not teardown.cancelled() and teardown.exception() is not None:
            log.error("the teardown nobody waited for failed: %r", teardown.exception())
        if self.pod is pod and not pod.containers:
            self.pod = None
            self._on_shutdown()

    @rpc
    async def delete(self, request: api.DeleteRequest) -> api.DeleteResponse:
        pod = self._pod()
        container = pod.get(request.id)
        proc = await pod.delete(request.id, request.exec_id)
        response = api.DeleteResponse(pid=proc.pid, exit_status=proc.exit_status)
        if proc.exited_at is not None:
            response.exited_at.CopyFrom(proc.exited_at)
        if not request.exec_id:
            if container.is_sandbox or not pod.containers:
                await self._tear_down(pod, request.id)
            self.publisher.publish(ev.TaskDelete(
                container_id=request.id, pid=proc.pid, exit_status=proc.exit_status,
                exited_at=response.exited_at, id=request.id))
        return response

    @rpc
    async def exec(self, request: api.ExecProcessRequest) -> empty_pb2.Empty:
        spec = _json_object(request.spec.value, "exec spec")
        await self._pod().add_exec(request.id, request.exec_id, spec,
                                   self._io(request, request.id, request.exec_id))
        self.publisher.publish(ev.TaskExecAdded(container_id=request.id,
                                                exec_id=request.exec_id))
        return empty_pb2.Empty()

    @rpc
    async def resize_pty(self, request: api.ResizePtyRequest) -> empty_pb2.Empty:
        proc = self._process(request.id, request.exec_id)
        proc.require(ProcessState.RUNNING, action="resize the terminal of")
        await self._pod().agent.tty_resize(request.id, request.exec_id, request.height,
                                           request.width)
        return empty_pb2.Empty()

    @rpc
    async def state(self, request: api.StateRequest) -> api.StateResponse:
        container = self._pod().get(request.id)
        proc = container.process(request.exec_id)
        io = proc.io
        response = api.StateResponse(
            id=request.id, bundle=container.bundle, pid=proc.pid, status=_STATUS[proc.state],
            stdin=io.stdin, stdout=io.stdout, stderr=io.stderr, terminal=io.terminal,
            exit_status=proc.exit_status, exec_id=request.exec_id)
        if proc.exited_at is not None:
            response.exited_at.CopyFrom(proc.exited_at)
        return response

    @rpc
    async def pause(self, request: api.PauseRequest) -> empty_pb2.Empty:
        await self._pod().pause(request.id)
        self.publisher.publish(ev.TaskPaused(container_id=request.id))
        return empty_pb2.Empty()

    @rpc
    async def resume(self, request: api.ResumeRequest) -> empty_pb2.Empty:
        await self._pod().resume(request.id)
        self.publisher.publish(ev.TaskResumed(container_id=request.id))
        return empty_pb2.Empty()

    @rpc
    async def kill(self, request: api.KillRequest) -> empty_pb2.Empty:
        await self._pod().kill(request.id, request.exec_id, request.signal, request.all)
        return empty_pb2.Empty()

    @rpc
    async def pids(self, request: api.PidsRequest) -> api.PidsResponse:
        pids = await self._pod().guest_pids(request.id)
        return api.PidsResponse(processes=[task_types.ProcessInfo(pid=p) for p in pids])

    @rpc
    async def close_io(self, request: api.CloseIORequest) -> empty_pb2.Empty:
        proc = self._process(request.id, request.exec_id)
        if request.stdin and proc.state is ProcessState.RUNNING:
            await proc.io.close_stdin(self._pod().agent)
        return empty_pb2.Empty()

    @rpc
    async def checkpoint(self, request: api.CheckpointTaskRequest) -> empty_pb2.Empty:
        raise errors.UnimplementedError("husk cannot checkpoint a container inside a VM")

    @rpc
    async def update(self, request: api.UpdateTaskRequest) -> empty_pb2.Empty:
        resources = _json_object(request.resources.value, "resources")
        await self._pod().update(request.id, resources)
        return empty_pb2.Empty()

    @rpc
    async def wait(self, request: api.WaitRequest) -> api.WaitResponse:
        status, exited_at = await self._process(request.id, request.exec_id).wait()
        return api.WaitResponse(exit_status=status, exited_at=exited_at)

    @rpc
    async def stats(self, request: api.StatsRequest) -> api.StatsResponse:
        stats = await self._pod().stats(request.id)
        metrics = metrics_pb2.Metrics()
        if stats is not None:
            metrics.cpu.usage.total = stats.cpu_usage_ns
            metrics.cpu.usage.user = stats.cpu_user_ns
            metrics.cpu.usage.kernel = stats.cpu_system_ns
            metrics.memory.usage.usage = stats.memory_usage_bytes
            metrics.memory.usage.limit = stats.memory_limit_bytes
            metrics.memory.usage.max = stats.memory_max_usage_bytes
            metrics.memory.cache = stats.memory_cache_bytes
            metrics.memory.rss = stats.memory_rss_bytes
            metrics.memory.total_cache = stats.memory_cache_bytes
            metrics.memory.total_rss = stats.memory_rss_bytes
            metrics.pids.current = stats.pids_current
            metrics.pids.limit = stats.pids_limit
        response = api.StatsResponse()
        response.stats.type_url = metrics.DESCRIPTOR.full_name
        response.stats.value = metrics.SerializeToString()
        return response

    @rpc
    async def connect(self, request: api.ConnectRequest) -> api.ConnectResponse:
        pod = self._pod()
        pod.get(request.id)
        return api.ConnectResponse(shim_pid=os.getpid(), task_pid=pod.vm_pid,
                                   version=SHIM_VERSION)

    @rpc
    async def shutdown(self, request: api.ShutdownRequest) -> empty_pb2.Empty:
        # containerd 1.6/1.7 sends Shutdown after every container's Delete.
        if self.pod is not None and self.pod.containers and not request.now:
            return empty_pb2.Empty()
        if self.pod is not None:
            await self.pod.shutdown()
            self.pod = None
        self._on_shutdown()
        return empty_pb2.Empty()


def _note_run_dir(bundle: str, run_dir: Path) -> None:
    """Before anything exists: `delete` finds what to clean up from here if this daemon dies."""
    try:
        (Path(bundle) / RUN_DIR_FILE).write_text(str(run_dir))
    except OSError as exc:
        raise errors.InvalidArgumentError(f"cannot write to bundle {bundle}: {exc}") from exc


def _with_debug(config: Config) -> Config:
    import dataclasses
    return dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, debug=True))
