"""Sandbox: one pod's VM, its shared directory and its agent connection.

Owns the pod's run directory (``<state_dir>/sb/<id>``; short, as socket paths in it have a length limit) and the order
of bring-up and teardown: accelerator → VM (+ virtiofsd) → agent channel →
CreateSandbox. Every step registers its undo, so a failure at any point
leaves nothing behind. Containers live in shim.sandbox.container.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from shim import errors
from shim.agentclient.client import AgentClient, Storage
from shim.agentclient.transport import VsockBridge
from shim.cgroups.host import SandboxCgroup
from shim.config import Config
from shim.util.mount import mounts_under
from shim.storage.share import GUEST_SHARED_DIR, SharedDir, check_id
from shim.vm.accel import AccelChoice, choose_accel
from shim.vm.cmdline import (AGENT_CHARDEV, SHARED_FS_TAG, AgentTransport, SharedFsType, VmPaths,
                             VmSpec)
from shim.vm.qemu import Vm, VmError
from shim.vm.vsock import VsockError, allocate_cid, vhost_vsock_available

log = logging.getLogger(__name__)

SANDBOXES_DIR = "sb"
DESTROY_TIMEOUT_S = 10.0
# The pod's /dev/shm: one tmpfs in guest memory that all its containers bind.
POD_SHM_STORAGE = Storage("ephemeral", "shm", "tmpfs", "/run/husk/pod-shm",
                          ("nosuid", "nodev", "noexec", "mode=1777", "size=64m"))
GUEST_LOG_TAIL_LINES = 8
KEPT_GUEST_LOG_BYTES = 64 * 1024


@dataclass
class StartTimes:
    """Seconds from QEMU spawn; filled in as the sandbox comes up."""

    qmp_ready_s: float = 0.0
    agent_ready_s: float = 0.0
    sandbox_ready_s: float = 0.0


@dataclass
class Sandbox:
    sandbox_id: str
    config: Config
    accel: AccelChoice | None = None
    times: StartTimes = field(default_factory=StartTimes)
    vm: Vm | None = None
    agent: AgentClient | None = None
    cgroup_path: str = ""  # the pod's cgroup (pause container's linux.cgroupsPath)
    _bridge: VsockBridge | None = None
    _undo: AsyncExitStack | None = None

    def __post_init__(self) -> None:
        check_id("sandbox", self.sandbox_id)
        self.run_dir = Path(self.config.runtime.state_dir) / SANDBOXES_DIR / self.sandbox_id
        self.shared = SharedDir(self.run_dir)

    @property
    def transport(self) -> AgentTransport:
        mode = self.config.agent.transport
        if mode == "vsock" or (mode == "auto" and vhost_vsock_available()):
            return AgentTransport.VSOCK
        return AgentTransport.SERIAL

    def _shared_storage(self) -> Storage:
        if self.config.shared_fs.type == SharedFsType.VIRTIO_FS.value:
            return Storage("virtio-fs", SHARED_FS_TAG, "virtiofs", str(GUEST_SHARED_DIR))
        options = ("trans=virtio", "version=9p2000.L", "cache=mmap",
                   f"msize={self.config.shared_fs.msize_9p}")
        return Storage("9p", SHARED_FS_TAG, "9p", str(GUEST_SHARED_DIR), options)

    def _vm_alive(self) -> str | None:
        assert self.vm is not None
        return None if self.vm.running else self.vm.failure_reason()

    async def start(self, hostname: str = "", dns: list[str] | None = None,
                    sysctls: Mapping[str, str] | None = None) -> None:
        """Boot the VM and prepare the agent.

        :raise errors.UnavailableError: the VM or the agent failed, with the reason.
        """
        hv = self.config.hypervisor
        async with AsyncExitStack() as undo:
            undo.callback(self._remove_run_dir)
            if self.config.runtime.debug:
                undo.callback(self._keep_guest_logs)  # LIFO: after the VM stopped, before removal
            self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                self.shared.create()
            except OSError as exc:
                raise errors.UnavailableError(f"cannot set up the shared directory: {exc}") from exc
            self.accel = await choose_accel(hv.accel, hv.qemu_path,
                                            Path(self.config.runtime.state_dir))
            for path in (hv.kernel_path, hv.initrd_path, hv.image_path):
                if not path.exists():
                    raise errors.UnavailableError(
                        f"guest image file {path} is missing (run `make guest-image`, "
                        "or set [hypervisor] guest_dir in husk.toml)")
            transport = self.transport
            cid, vhost_fd = 0, -1
            if transport is AgentTransport.VSOCK:
                try:
                    reserved = allocate_cid()
                except VsockError as exc:
                    raise errors.UnavailableError(str(exc)) from exc
                undo.callback(reserved.close)
                cid, vhost_fd = reserved.cid, reserved.fd
            paths = VmPaths(self.run_dir)
            spec = VmSpec(
                name=self.sandbox_id[:32], paths=paths, qemu_path=hv.qemu_path,
                kernel=hv.kernel_path, initrd=hv.initrd_path, image=hv.image_path,
                vcpus=hv.vcpus, memory_mib=hv.memory_mib, accel=self.accel,
                shared_fs=SharedFsType(self.config.shared_fs.type),
                shared_dir=self.shared.host_dir, transport=transport, vsock_cid=cid,
                vhost_fd=vhost_fd, hotplug_ports=hv.hotplug_ports,
                msize_9p=self.config.shared_fs.msize_9p, kernel_params=hv.kernel_params,
                debug=self.config.runtime.debug,
                extra_fds=[vhost_fd] if vhost_fd >= 0 else [])
            self.vm = Vm(spec, self.config.shared_fs.virtiofsd_path,
                         self.config.shared_fs.virtiofs_cache)
            cgroup = SandboxCgroup.from_spec_path(self.cgroup_path)
            if cgroup is not None:
                undo.callback(cgroup.remove)  # runs after vm.stop (LIFO)
            try:
                await self.vm.start()
            except VmError as exc:
                raise errors.UnavailableError(f"cannot start the VM: {exc}") from exc
            undo.push_async_callback(self.vm.stop)
            if cgroup is not None:
                cgroup.join([self.vm.pid, self.vm.virtiofsd_pid])
            self.times.qmp_ready_s = self.vm.times.qmp_ready_s
            if transport is AgentTransport.VSOCK:
                self._bridge = VsockBridge(paths.agent_socket, cid)
                await self._bridge.start()
                undo.push_async_callback(self._bridge.stop)
                target = f"unix:{paths.agent_socket}"
            else:
                try:
                    await self.vm.wait_guest_open(AGENT_CHARDEV, self.config.agent.dial_timeout_s)
                except VmError as exc:
                    raise errors.UnavailableError(f"{exc}; {self._guest_logs()}") from exc
                target = f"unix:{paths.agent_serial_socket}"
            self.agent = AgentClient(target, self.config.agent.request_timeout_s)
            undo.push_async_callback(self.agent.close)
            try:
                await self.agent.wait_ready(self.config.agent.dial_timeout_s, self._vm_alive)
            except errors.UnavailableError as exc:
                raise errors.UnavailableError(f"{exc}; {self._guest_logs()}") from exc
            self.times.agent_ready_s = time.monotonic() - self.vm.times.spawned_at
            details = await self.agent.guest_details()
            log.info("sandbox %s: agent ready after %.3fs (%s)", self.sandbox_id,
                     self.times.agent_ready_s, details)
            await self.agent.create_sandbox(self.sandbox_id, hostname, dns or [],
                                            [self._shared_storage(), POD_SHM_STORAGE], sysctls)
            self.times.sandbox_ready_s = time.monotonic() - self.vm.times.spawned_at
            self._undo = undo.pop_all()

    async def stop(self) -> None:
        """Tear everything down; safe to call more than once and after failures."""
        if self.agent is not None and self.vm is not None and self.vm.running:
            with contextlib.suppress(errors.HuskError, asyncio.TimeoutError):
                await asyncio.wait_for(self.agent.destroy_sandbox(self.sandbox_id),
                                       DESTROY_TIMEOUT_S)
        if self._undo is not None:
            undo, self._undo = self._undo, None
            await undo.aclose()
        self._remove_run_dir()

    def _guest_logs(self) -> str:
        """The end of the guest's console and agent logs, for error messages and the shim log."""
        vm = self.vm
        console = vm.console.tail(GUEST_LOG_TAIL_LINES) if vm is not None else ""
        agent = vm.guest_log.tail(GUEST_LOG_TAIL_LINES) if vm is not None else ""
        log.error("sandbox %s guest console: %s", self.sandbox_id, console or "(empty)")
        log.error("sandbox %s agent log: %s", self.sandbox_id, agent or "(empty)")
        return f"guest console: {console or '(empty)'}; agent log: {agent or '(empty)'}"

    def _keep_guest_logs(self) -> None:
        """Debug: copy the end of the guest's logs into the shim log before they go."""
        if self.vm is None:
            return
        for name, stream in (("console", self.vm.console), ("agent", self.vm.guest_log)):
            text = stream.text(KEPT_GUEST_LOG_BYTES)
            if text:
                log.debug("sandbox %s guest %s log:\n%s", self.sandbox_id, name, text)

    def _remove_run_dir(self) -> None:
        left = self.shared.destroy() or mounts_under(self.run_dir)
        if left:
            # rmtree would walk into a mount it cannot see the end of: keep the files.
            log.error("keeping %s: still mounted below it: %s", self.run_dir,
                      ", ".join(map(str, left)))
            return
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def pids(self) -> dict[str, int]:
        """Host pids of the VM's processes (for stats, leak checks and benchmarks)."""
        if self.vm is None:
            return {}
        return {"qemu": self.vm.pid, "virtiofsd": self.vm.virtiofsd_pid}
