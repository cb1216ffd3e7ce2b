"""Pod: the containers of one sandbox VM, as the task service sees them.

The pod's sandbox (pause) task does not run inside the guest: its process is
the VM itself (pid = QEMU's), it "exits" when killed, and deleting it tears
the VM down. Other containers get their rootfs and host-path mounts shared
into the guest and run there through the agent. Verbs here match the task
RPCs; events are the task service's business (it passes ``on_exit``).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim import errors
from shim.agentclient.client import ContainerStats, Storage
from shim.sandbox.process import Process, ProcessState
from shim.sandbox.resize import Limits, VmResizer
from shim.sandbox.sandbox import POD_SHM_STORAGE, Sandbox
from shim.storage.blockvolume import PodVolumes
from shim.storage.directvolume import DirectVolumes
from shim.storage.share import RootfsMount, check_id
from shim.sandbox.console import ConsoleRequest, run_console
from shim.sandbox.manage import ManageServer, Stream
from shim.util.procstats import host_usage, process_usage, vm_memory_bytes
from shim.vm.devices import DeviceError, Devices
from shim.sandbox.stdio import ProcessIO
from shim.util.mount import submounts
from shim.util.ratelimit import PerKeyRateLimit
from shim.util.stackdump import await_chain

log = logging.getLogger(__name__)

BIND_TYPES = ("bind", "rbind")
# Exit status reported when the VM disappears under a running process.
VM_GONE_STATUS = 255
# The guest decides when OOM events come: one TaskOOM per container per
# interval reaches containerd; after a flood of them, each read waits a little.
OOM_EVENT_INTERVAL_S = 1.0
OOM_FLOOD_EVENTS = 1000
OOM_FLOOD_PAUSE_S = 0.01
OOM_SUMMARY_EVERY_S = 10.0
# Mounts below one recursive bind volume that get a bind of their own.
MAX_SUBMOUNTS = 64
# A process that has not exited this long after SIGKILL never will: its guest is sick
# (seen under TCG: the guest kernel hit a BUG in the dying process). The VM is stopped
# so that every process of the pod is reported gone and StopPodSandbox can finish.
KILL_EXIT_TIMEOUT_S = 30.0
# The pod's own tasks (watchers, process monitors) end this long after being
# cancelled at shutdown, or are left behind (logged) so the pod still goes.
TASK_CANCEL_TIMEOUT_S = 5.0
CONTAINER_NAME = "io.kubernetes.cri.container-name"
NAME_MAX = 253

ExitCallback = Callable[[Process], None]
OomCallback = Callable[[str], None]
# The shim's own figures (RPCs, events) for `husk monitor`.
ShimMetrics = Callable[[], dict[str, Any]]


@dataclass
class Container:
    id: str
    bundle: str
    init: Process
    is_sandbox: bool
    execs: dict[str, Process] = field(default_factory=dict)
    name: str = ""  # the CRI container name, for metrics labels

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise errors.NotFoundError(f"exec {exec_id} of container {self.id} not found") from None


def _is_bind(mount: dict[str, Any]) -> bool:
    options = mount.get("options") or []
    return mount.get("type") in BIND_TYPES or any(o in BIND_TYPES for o in options)


class Pod:
    def __init__(self, sandbox: Sandbox, on_exit: ExitCallback,
                 on_oom: OomCallback = lambda container_id: None,
                 shim_metrics: ShimMetrics = dict) -> None:
        self.sandbox = sandbox
        self._shim_metrics = shim_metrics
        self.containers: dict[str, Container] = {}
        self._on_exit = on_exit
        self._on_oom = on_oom
        self._ooms_reported: dict[str, int] = {}  # TaskOOM events sent, per container
        self._monitors: set[asyncio.Task[None]] = set()
        self._watchers: list[asyncio.Task[None]] = []
        self._oom_limiter = PerKeyRateLimit(OOM_EVENT_INTERVAL_S)
        self._oom_events = 0  # from the guest, in all
        self._oom_summary_at = 0.0
        self._manage: ManageServer | None = None
        self.kill_exit_timeout_s = KILL_EXIT_TIMEOUT_S
        self.resizer = VmResizer(sandbox.config.hypervisor, sandbox.size)
        self.volumes = PodVolumes(
            DirectVolumes(Path(sandbox.config.storage.direct_volumes_dir)),
            sandbox.sandbox_id, sandbox.run_dir, sandbox.config.storage.disk_iothreads)

    @property
    def agent(self) -> Any:
        if self.sandbox.agent is None:
            raise errors.UnavailableError(f"sandbox {self.sandbox.sandbox_id} has no VM")
        return self.sandbox.agent

    @property
    def vm_pid(self) -> int:
        return self.sandbox.vm.pid if self.sandbox.vm else 0

    def get(self, container_id: str) -> Container:
        try:
            return self.containers[container_id]
        except KeyError:
            raise errors.NotFoundError(f"container {container_id} not found") from None

    # Section: lifecycle of the VM

    async def boot(self) -> None:
        await self.sandbox.start()
        assert self.sandbox.vm is not None
        self.resizer.present_vcpus = self.sandbox.present_vcpus
        self._manage = ManageServer(self.sandbox.run_dir, {
            "volume-stats": self._volume_stats, "volume-resize": self._volume_resize,
            "metrics": self._metrics, "info": self._info}, f"sandbox {self.sandbox.sandbox_id}",
            stream_handlers={"console": self._console},
            quiet=frozenset({"metrics", "info", "volume-stats"}))
        try:
            await self._manage.start()
        except OSError as exc:
            log.error("sandbox %s: no management socket (direct-volume stats and resize will "
                      "not reach this pod): %s", self.sandbox.sandbox_id, exc)
        self._watchers = [asyncio.create_task(self._watch_vm(), name="vm-watch"),
                          asyncio.create_task(self._watch_oom(), name="oom-watch"),
                          asyncio.create_task(self._keepalive(), name="agent-keepalive")]

    async def _keepalive(self) -> None:
        """Turn an agent that stopped answering into a VM death everyone sees.

        Waits on the guest (WaitProcess, ReadOutput, GetOOMEvent) have no
        deadline of their own; stopping the VM ends all of them at once.
        """
        interval = self.sandbox.config.agent.keepalive_interval_s
        allowed = self.sandbox.config.agent.keepalive_misses
        misses = 0
        while True:
            await asyncio.sleep(interval)
            try:
                await self.agent.check(interval)
                misses = 0
                continue
            except errors.HuskError as exc:
                misses += 1
                log.warning("sandbox %s: agent keepalive %d/%d failed: %s",
                            self.sandbox.sandbox_id, misses, allowed, exc)
            if misses >= allowed:
                break
        log.error("sandbox %s: the agent did not answer %d checks in a row (%.0fs); "
                  "stopping its VM", self.sandbox.sandbox_id, misses, misses * interval)
        vm = self.sandbox.vm
        if vm is not None:
            await vm.stop()

    async def _watch_oom(self) -> None:
        while True:
            try:
                container_id = await self.agent.get_oom_event()
            except errors.HuskError as exc:
                log.debug("no more OOM events from the guest: %s", exc)
                return
            # From the guest: only a container we know is worth an event,
            # and no more than one per container per OOM_EVENT_INTERVAL_S.
            self._oom_events += 1
            if container_id in self.containers:
                self._report_oom(container_id)
            else:
                self._oom_limiter.suppressed += 1
            now = asyncio.get_running_loop().time()
            if self._oom_limiter.suppressed and now - self._oom_summary_at >= OOM_SUMMARY_EVERY_S:
                self._oom_summary_at = now
                log.warning("sandbox %s: the guest sent %d OOM events (%d suppressed: repeats "
                            "within %.0fs or unknown containers)", self.sandbox.sandbox_id,
                            self._oom_events, self._oom_limiter.take_summary(),
                            OOM_EVENT_INTERVAL_S)
            if self._oom_events > OOM_FLOOD_EVENTS:
                await asyncio.sleep(OOM_FLOOD_PAUSE_S)  # the guest sets the pace no longer

    def _report_oom(self, container_id: str, *, at_exit: bool = False) -> None:
        if not at_exit and not self._oom_limiter.allow(container_id):
            return
        log.warning("container %s: the guest's OOM killer took a process", container_id)
        self._ooms_reported[container_id] = self._ooms_reported.get(container_id, 0) + 1
        self._on_oom(container_id)

    async def _watch_vm(self) -> None:
        assert self.sandbox.vm is not None
        status = await self.sandbox.vm.wait()
        log.error("the VM of sandbox %s exited (status %d): %s", self.sandbox.sandbox_id,
                  status, self.sandbox.vm.failure_reason())
        for container in self.containers.values():
            for proc in [container.init, *container.execs.values()]:
                if proc.state is not ProcessState.CREATED or container.is_sandbox:
                    self._exited(proc, VM_GONE_STATUS)

    async def shutdown(self) -> None:
        if self._manage is not None:
            await self._manage.stop()
        watchers, self._watchers = self._watchers, []
        await self._cancel(watchers)
        await self._cancel(list(self._monitors))
        for container in self.containers.values():
            for proc in [container.init, *container.execs.values()]:
                proc.io.close()
        await self.sandbox.stop()
        self.volumes.release_all()  # the disks went with the VM

    async def _cancel(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Cancel the pod's own tasks and wait for them, for at most TASK_CANCEL_TIMEOUT_S:
        one that does not end (it swallowed its cancellation, or waits in something
        that cannot be cancelled) is logged with where it waits and left behind, so
        the VM and the rest of the pod still go."""
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=TASK_CANCEL_TIMEOUT_S)
        for task in pending:
            log.error("sandbox %s: task %s did not end %.0fs after it was cancelled; the pod "
                      "goes without waiting for it; it waits in: %s", self.sandbox.sandbox_id,
                      task.get_name(), TASK_CANCEL_TIMEOUT_S,
                      " <- ".join(await_chain(task.get_coro())) or "(nothing)")

    def _exited(self, proc: Process, status: int) -> None:
        if proc.set_exited(status):
            log.info("%s exited with status %d", proc.name, status)
            self._on_exit(proc)

    # Section: containers

    def add_sandbox_container(self, container_id: str, bundle: str, io: ProcessIO) -> Container:
        proc = Process(container_id, "", io, pid=self.vm_pid)
        container = Container(container_id, bundle, proc, is_sandbox=True)
        self.containers[container_id] = container
        return container

    async def create_container(self, container_id: str, bundle: str, rootfs: list[RootfsMount],
                               io: ProcessIO) -> Container:
        """Share the rootfs and mounts, then create the container in the guest.

        :raise errors.InvalidArgumentError: a malformed config.json or mount.
        """
        check_id("container", container_id)
        if container_id in self.containers:
            raise errors.AlreadyExistsError(f"container {container_id} already exists")
        spec = _read_spec(Path(bundle))
        share = self.sandbox.shared
        try:
            if rootfs:
                root = share.mount_rootfs(container_id, rootfs)
            else:
                root = share.bind_rootfs(container_id, Path(bundle) / "rootfs")
            spec.setdefault("root", {})["path"] = root
            mounts = spec.get("mounts") or []
            storages, direct = await self._attach_direct_volumes(container_id, mounts)
            # A container whose limits need more than the VM has grows it first.
            self.resizer.limits[container_id] = Limits.from_resources(
                (spec.get("linux") or {}).get("resources"))
            await self._grow()
            spec["mounts"] = self._share_mounts(container_id, mounts, direct)
            await io.open()
            proc = Process(container_id, "", io, pid=self.vm_pid)
            annotations = spec.get("annotations")
            name = annotations.get(CONTAINER_NAME) if isinstance(annotations, dict) else ""
            container = Container(container_id, bundle, proc, is_sandbox=False,
                                  name=name[:NAME_MAX] if isinstance(name, str) else "")
            # Every guest process gets a stdin pipe: without one of ours it must read EOF.
            proc.guest_pid = await self.agent.create_container(
                container_id, spec, storages, close_stdin=not io.stdin)
            # The agent buffers output from creation on: nothing is lost by starting here.
            io.start_output(self.agent)
        except BaseException:
            self.resizer.forget(container_id)
            io.close()
            share.release(container_id)
            await self.volumes.detach_container(self._devices(), container_id)
            raise
        self.containers[container_id] = container
        return container

    # Section: direct volumes, from the management socket

    async def _volume_stats(self, request: dict[str, Any]) -> dict[str, Any]:
        volume = self.volumes.find(str(request["volume_path"]))
        return {"volume-type": volume.info.volume_type,
                "stats": await self.agent.volume_stats(volume.guest_path)}

    async def _volume_resize(self, request: dict[str, Any]) -> dict[str, Any]:
        """Grow the disk (QEMU) and then its filesystem (the agent)."""
        size = request["size"]
        if not isinstance(size, int) or size <= 0:
            raise errors.InvalidArgumentError(f"size must be a positive byte count, not {size!r}")
        volume = self.volumes.find(str(request["volume_path"]))
        devices = self._devices()
        if devices is None:
            raise errors.UnavailableError(f"sandbox {self.sandbox.sandbox_id} has no VM")
        try:
            await devices.resize_disk(volume.disk_id, size)
        except DeviceError as exc:
            raise errors.FailedPreconditionError(
                f"{exc} (a block volume's host device must be grown first: lvextend, "
                "rbd resize, losetup -c)") from exc
        await self.agent.resize_volume(volume.guest_path, size)
        return {"stats": await self.agent.volume_stats(volume.guest_path)}

    def _devices(self) -> Devices | None:
        vm = self.sandbox.vm
        return vm.devices if vm is not None and vm.running else None

    async def _attach_direct_volumes(self, container_id: str, mounts: Any
                                     ) -> tuple[list[Storage], dict[int, dict[str, Any]]]:
        """Disks for the bind mounts whose source has a direct-volume record.

        :return: the storages the agent mounts, and the container's mounts that
            replace those binds (by index), bound from the disks' guest mounts.
        """
        storages: list[Storage] = []
        direct: dict[int, dict[str, Any]] = {}
        for index, mount in enumerate(mounts if isinstance(mounts, list) else []):
            source = mount.get("source") if isinstance(mount, dict) else None
            if not isinstance(source, str) or not source.startswith("/") or not _is_bind(mount):
                continue
            info = self.volumes.record(source)
            if info is None:
                continue
            devices = self._devices()
            if devices is None:
                raise errors.UnavailableError(f"sandbox {self.sandbox.sandbox_id} has no VM")
            options = mount.get("options") or []
            storage = await self.volumes.attach(devices, container_id, source, info,
                                                "ro" in options)
            storages.append(storage)
            direct[index] = {**mount, "type": "bind", "source": storage.mount_point,
                             "options": [o for o in options if o != "rbind"] + ["bind"]}
        return storages, direct

    def _share_mounts(self, container_id: str, mounts: list[Any],
                      direct: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Rewrite host bind sources into the shared directory (direct volumes: their disk)."""
        if not isinstance(mounts, list):
            raise errors.InvalidArgumentError("config.json: mounts must be a list")
        shared: list[dict[str, Any]] = []
        for index, mount in enumerate(mounts):
            if not isinstance(mount, dict) or not isinstance(mount.get("destination"), str):
                raise errors.InvalidArgumentError(f"config.json: mount {index} is malformed")
            if direct and index in direct:
                shared.append(direct[index])
                continue
            if not _is_bind(mount):
                shared.append(mount)
                continue
            if mount["destination"] == "/dev/shm":
                # The host's per-pod shm would not be shared memory across a VM
                # boundary: the pod's own tmpfs in the guest stands in for it.
                shared.append({"destination": "/dev/shm", "type": "bind",
                               "source": POD_SHM_STORAGE.mount_point,
                               "options": ["rbind", "nosuid", "nodev", "noexec"]})
                continue
            source = mount.get("source")
            if not isinstance(source, str) or not source.startswith("/"):
                raise errors.InvalidArgumentError(
                    f"config.json: bind mount {mount['destination']} needs an absolute source")
            options = mount.get("options") or []
            guest = self.sandbox.shared.share_path(container_id, index, Path(source),
                                                   "ro" in options)
            shared.append({**mount, "source": guest})
            if mount.get("type") == "rbind" or "rbind" in options:
                shared += self._share_submounts(container_id, index, mount)
        return shared

    def _share_submounts(self, container_id: str, index: int,
                         mount: dict[str, Any]) -> list[dict[str, Any]]:
        """The mounts below a recursive bind's source, each with its own flags.

        Volumes are shared without what is mounted below them (see share_path).
        Each mount below gets its own bind, made after the volume's, with its own
        flags: "ro" is not recursive, as with runc. (A virtio-fs automount in the
        guest would also inherit a read-only parent's flags.)
        """
        source = os.path.realpath(mount["source"])
        below = submounts(source)[:MAX_SUBMOUNTS]
        extra = []
        for n, sub in enumerate(below):
            relative = os.path.relpath(sub.point, source)
            guest = self.sandbox.shared.share_path(container_id, f"{index}-{n}",
                                                   Path(sub.point), sub.readonly)
            options = [o for o in mount.get("options") or [] if o not in ("ro", "rw")]
            extra.append({"destination": os.path.join(mount["destination"], relative),
                          "type": "bind", "source": guest,
                          "options": [*options, "ro" if sub.readonly else "rw"]})
        return extra

    async def start(self, container_id: str, exec_id: str) -> Process:
        container = self.get(container_id)
        proc = container.process(exec_id)
        proc.require(ProcessState.CREATED, action="start")
        if container.is_sandbox:
            proc.transition(ProcessState.RUNNING)
            return proc
        if exec_id:
            assert proc.spec is not None
            try:
                proc.guest_pid = await self.agent.exec_process(
                    container_id, exec_id, proc.spec, close_stdin=not proc.io.stdin)
                proc.io.start_output(self.agent)
            except BaseException:
                proc.io.close()
                raise
        else:
            proc.guest_pid = await self.agent.start_container(container_id)
        proc.transition(ProcessState.RUNNING)
        proc.io.start_stdin(self.agent)
        task = asyncio.create_task(self._monitor(proc), name=f"wait-{proc.name}")
        self._monitors.add(task)
        task.add_done_callback(self._monitors.discard)
        return proc

    async def _monitor(self, proc: Process) -> None:
        try:
            status, oom_kills = await self.agent.wait_exit(proc.container_id, proc.exec_id)
        except errors.HuskError as exc:
            log.error("waiting for %s failed: %s", proc.name, exc)
            status, oom_kills = VM_GONE_STATUS, 0
        # An init killed by SIGKILL may be an OOM kill the watcher has not seen yet:
        # containerd deletes the task right after its exit, so it is reported now.
        if (status == 128 + signal.SIGKILL and not proc.exec_id
                and oom_kills > self._ooms_reported.get(proc.container_id, 0)):
            self._report_oom(proc.container_id, at_exit=True)
        await proc.io.finish()
        self._exited(proc, status)

    async def add_exec(self, container_id: str, exec_id: str, spec: dict[str, Any],
                       io: ProcessIO) -> Process:
        container = self.get(container_id)
        if container.is_sandbox:
            raise errors.FailedPreconditionError("cannot exec in the sandbox container")
        container.init.require(ProcessState.RUNNING, action="exec in")
        if exec_id in container.execs:
            raise errors.AlreadyExistsError(f"exec {exec_id} already exists in {container_id}")
        await io.open()
        proc = Process(container_id, exec_id, io, spec=spec, pid=self.vm_pid)
        container.execs[exec_id] = proc
        return proc

    async def kill(self, container_id: str, exec_id: str, sig: int, all_procs: bool) -> None:
        container = self.get(container_id)
        proc = container.process(exec_id)
        if proc.state is ProcessState.STOPPED:
            raise errors.NotFoundError(f"process {proc.name} has already exited")
        if container.is_sandbox:
            if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
                self._exited(proc, 128 + sig)
            return
        if proc.state is ProcessState.CREATED and not exec_id:
            # Never started: nothing runs in the guest yet but crun's waiting init.
            await self.agent.signal_process(container_id, "", signal.SIGKILL, True)
            await proc.io.finish()
            self._exited(proc, 128 + signal.SIGKILL)
            return
        await self.agent.signal_process(container_id, exec_id, sig, all_procs)
        if sig == signal.SIGKILL and proc.state is ProcessState.RUNNING:
            self._watch_kill(proc)

    def _watch_kill(self, proc: Process) -> None:
        async def watch() -> None:
            try:
                await asyncio.wait_for(proc.wait(), self.kill_exit_timeout_s)
                return
            except asyncio.TimeoutError:
                pass
            log.error("sandbox %s: %s has not exited %.0fs after SIGKILL: its guest cannot end "
                      "it (the guest's logs follow); stopping the VM", self.sandbox.sandbox_id,
                      proc.name, self.kill_exit_timeout_s)
            self.sandbox.guest_logs()
            vm = self.sandbox.vm
            if vm is not None:
                await vm.stop()

        task = asyncio.create_task(watch(), name=f"kill-watch-{proc.name}")
        self._monitors.add(task)
        task.add_done_callback(self._monitors.discard)

    async def delete(self, container_id: str, exec_id: str) -> Process:
        container = self.get(container_id)
        proc = container.process(exec_id)
        proc.require(ProcessState.STOPPED, ProcessState.CREATED, action="delete")
        if exec_id:
            del container.execs[exec_id]
            proc.io.close()
            return proc
        if not container.is_sandbox:
            with contextlib.suppress(errors.HuskError):
                await self.agent.remove_container(container_id)  # unmounts its volumes
            self.sandbox.shared.release(container_id)
            await self.volumes.detach_container(self._devices(), container_id)
            self.resizer.forget(container_id)
        proc.io.close()
        del self.containers[container_id]
        return proc

    async def pause(self, container_id: str) -> None:
        container = self.get(container_id)
        container.init.require(ProcessState.RUNNING, action="pause")
        if not container.is_sandbox:
            await self.agent.pause_container(container_id)
        container.init.transition(ProcessState.PAUSED)

    async def resume(self, container_id: str) -> None:
        container = self.get(container_id)
        container.init.require(ProcessState.PAUSED, action="resume")
        if not container.is_sandbox:
            await self.agent.resume_container(container_id)
        container.init.transition(ProcessState.RUNNING)

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        """New limits for a container: the VM grows first when their sum needs it, the
        container's cgroup in the guest follows, then what is no longer needed goes."""
        container = self.get(container_id)
        if container.is_sandbox:
            return  # the kubelet resizes containers; a pod-level update never reaches a shim
        before = self.resizer.limits.get(container_id, Limits())
        self.resizer.limits[container_id] = Limits.from_resources(resources)
        try:
            await self._grow()
            await self.agent.update_container(container_id, resources)
        except BaseException:
            self.resizer.limits[container_id] = before  # the update did not happen
            raise
        await self.resizer.shrink(self.agent)

    async def _grow(self) -> None:
        if (devices := self._devices()) is not None:  # else the agent call after says why
            await self.resizer.grow(devices, self.agent)

    async def stats(self, container_id: str) -> ContainerStats | None:
        """A container's from its cgroup in the guest; the sandbox's is the VM's on the
        host (QEMU and virtiofsd), what the pod costs the node."""
        container = self.get(container_id)
        if container.is_sandbox:
            return self._vm_usage()
        stats: ContainerStats = await self.agent.stats_container(container_id)
        return stats

    # Section: node tools (husk monitor, husk exec)

    async def _info(self, request: dict[str, Any]) -> dict[str, Any]:
        """Who this pod is (for `husk exec POD` to find it by name)."""
        return {"sandbox_id": self.sandbox.sandbox_id,
                "pod": dataclasses.asdict(self.sandbox.pod.kubernetes)}

    async def _metrics(self, request: dict[str, Any]) -> dict[str, Any]:
        """Everything `husk monitor` reports about this pod, in one reply."""
        sandbox = self.sandbox
        containers = {c.id: c.name for c in self.containers.values() if not c.is_sandbox}
        reply: dict[str, Any] = {
            "sandbox_id": sandbox.sandbox_id,
            "pod": dataclasses.asdict(sandbox.pod.kubernetes),
            "accel": sandbox.accel.accel.value if sandbox.accel else "",
            "shim": self._shim_metrics(),
            "host": host_usage({"shim": os.getpid(), "qemu": self.vm_pid,
                                "virtiofsd": sandbox.vm.virtiofsd_pid if sandbox.vm else 0}),
            "container_names": containers,
        }
        try:
            guest = await self.agent.guest_metrics(set(containers))
        except errors.HuskError as exc:
            reply["guest_error"] = str(exc)[:500]
        else:
            guest["containers"] = {cid: dataclasses.asdict(stats)
                                   for cid, stats in guest["containers"].items()}
            reply["guest"] = guest
        return reply

    async def _console(self, request: dict[str, Any], stream: Stream) -> None:
        """`husk exec`: a process in the guest, outside the containers, when husk.toml allows."""
        if not self.sandbox.config.debug.console:
            raise errors.FailedPreconditionError(
                "the debug console is off for this pod: set [debug] console = true in "
                "husk.toml (new pods get it)")
        await run_console(self.agent, ConsoleRequest.parse(request), stream,
                          f"sandbox {self.sandbox.sandbox_id}")

    def _vm_usage(self) -> ContainerStats | None:
        vm = self.sandbox.vm
        if vm is None or not vm.running:
            return None
        user = system = 0.0
        pids = [pid for pid in (vm.pid, vm.virtiofsd_pid) if pid > 0]
        for pid in pids:
            usage = process_usage(pid)
            if usage is not None:  # else gone meanwhile: the exit path reports it
                user, system = user + usage.cpu_user_s, system + usage.cpu_system_s
        # Not the processes' RSS: that counts guest RAM twice (QEMU and virtiofsd both
        # map it) and leaves out a restored guest's RAM that nobody has touched yet.
        rss = vm_memory_bytes(pids)
        ns = 1_000_000_000
        return ContainerStats(
            cpu_usage_ns=int((user + system) * ns), cpu_user_ns=int(user * ns),
            cpu_system_ns=int(system * ns), memory_usage_bytes=int(rss), memory_limit_bytes=0,
            memory_max_usage_bytes=0, memory_cache_bytes=0, memory_rss_bytes=int(rss),
            pids_current=len(pids), pids_limit=0)

    async def guest_pids(self, container_id: str) -> list[int]:
        container = self.get(container_id)
        if container.is_sandbox:
            return [self.vm_pid]
        pids: list[int] = await self.agent.list_processes(container_id)
        return pids

    def running_containers(self) -> list[str]:
        return [c.id for c in self.containers.values()]


def _read_spec(bundle: Path) -> dict[str, Any]:
    """:raise errors.InvalidArgumentError: config.json is missing or not a JSON object."""
    path = bundle / "config.json"
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise errors.InvalidArgumentError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise errors.InvalidArgumentError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise errors.InvalidArgumentError(f"{path} is not a JSON object")
    return spec
