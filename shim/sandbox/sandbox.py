"""Sandbox: one pod's VM, its network, its shared directory and its agent connection.

Owns the pod's run directory (``<state_dir>/sb/<id>``; short, as socket
paths in it have a length limit) and the order of bring-up and teardown, in
named steps: run directory → accelerator → network (taps, before QEMU takes
their fds) → VM (+ virtiofsd) → agent channel → sandbox (CreateSandbox: the
guest's filesystems, hostname, sysctls and network). Every step pushes its
undo on one exit stack, so a failure at any point leaves nothing behind.
Everything comes from one frozen PodDescription. Containers live in
shim.sandbox.pod.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from shim import __version__, errors
from shim.ids import SANDBOXES_DIR
from shim.agentclient.client import AgentClient, Storage
from shim.agentclient.transport import VsockBridge
from shim.cgroups.host import SandboxCgroup
from shim.config import Config
from shim.network import setup as network_setup
from shim.network.netns import NetnsError
from shim.network.portforward import PortForwarder, PortForwardError
from shim.network.setup import PodNetworking
from shim.network.tcfilter import TapEndpoint, queue_count, vhost_net_available
from shim.network.watch import NetnsWatcher
from shim.ops import imageid
from shim.sandbox.description import PodDescription
from shim.sandbox.sizing import size_vm
from shim.sandbox.template import (RAM_FILE, Template, TemplateError, TemplateId, TemplateStore,
                                   template_spec)
from shim.util.mount import mounts_under
from shim.util.procstats import mergeable_rss_bytes
from shim.storage.share import GUEST_SHARED_DIR, SharedDir, check_id
from shim.vm.accel import Accel, AccelChoice, choose_accel
from shim.vm.cmdline import (AGENT_CHARDEV, PMEM_ALIGN_BYTES, SHARED_FS_TAG, AgentTransport,
                             NicSpec, RamLayout, SharedFsType, VmPaths, VmSpec)
from shim.vm.devices import DeviceError
from shim.vm.qemu import Vm, VmError
from shim.vm.ram import allocated_bytes, allocated_bytes_of, copy_sparse, new_guest_ram
from shim.vm.vsock import VsockError, allocate_cid, vhost_vsock_available

log = logging.getLogger(__name__)

# DestroySandbox (it syncs the pod's volumes) is best effort: the VM goes after it
# either way, and containerd's CRI gives the whole sandbox Delete 10 s.
DESTROY_TIMEOUT_S = 5.0
SECONDS_PER_DAY = 86400
# The pod's /dev/shm: one tmpfs in guest memory that all its containers bind.
POD_SHM_STORAGE = Storage("ephemeral", "shm", "tmpfs", "/run/husk/pod-shm",
                          ("nosuid", "nodev", "noexec", "mode=1777", "size=64m"))
# Entropy the guest mixes in at CreateSandbox: a guest restored from a template
# starts with its template's random state.
RANDOM_SEED_BYTES = 64
# Before a template is saved its guest reports the memory it freed (free page
# reporting runs every ~2 s): saved once its RAM has not shrunk for this long.
TEMPLATE_SETTLE_S = 3.0
TEMPLATE_SETTLE_MAX_S = 20.0
TEMPLATE_SETTLE_POLL_S = 0.25
GUEST_LOG_TAIL_LINES = 8
KEPT_GUEST_LOG_BYTES = 64 * 1024


@dataclass
class StartTimes:
    """Seconds from QEMU spawn; filled in as the sandbox comes up."""

    qmp_ready_s: float = 0.0
    agent_ready_s: float = 0.0
    sandbox_ready_s: float = 0.0
    template: str = ""  # "restored", "built" (then restored) or "" (a cold boot)


@dataclass
class Sandbox:
    """One pod's VM, built from its frozen description."""

    pod: PodDescription
    config: Config
    # This VM only becomes a template (see build_template): no pod devices.
    building_template: bool = False
    accel: AccelChoice | None = None
    times: StartTimes = field(default_factory=StartTimes)
    vm: Vm | None = None
    agent: AgentClient | None = None
    networking: PodNetworking | None = None
    _transport: AgentTransport = AgentTransport.SERIAL
    _vsock: tuple[int, int] = (0, -1)  # (cid, vhost fd) when the agent is on vsock
    _nic_queues: int = 1
    _nic_vhost: bool = False
    _forward_port: int = 0
    _bridge: VsockBridge | None = None
    _template: Template | None = None  # the one this VM was restored from
    _templates_off: bool = False  # a restore failed: this sandbox boots
    _ram_fd: int = -1  # a template's guest RAM (shim.vm.ram), until it is saved
    _undo: AsyncExitStack | None = None

    def __post_init__(self) -> None:
        check_id("sandbox", self.pod.sandbox_id)
        self.run_dir = Path(self.config.runtime.state_dir) / SANDBOXES_DIR / self.sandbox_id
        self.shared = SharedDir(self.run_dir)
        self.size = size_vm(self.config.hypervisor, self.pod.resources, self.pod.size_overrides)

    @property
    def sandbox_id(self) -> str:
        return self.pod.sandbox_id

    @property
    def present_vcpus(self) -> int:
        """vCPUs plugged into the VM at boot, online or not (see VmSpec.all_vcpus_present)."""
        spec = self.vm.spec if self.vm is not None else None
        return spec.max_vcpus if spec is not None and spec.all_vcpus_present else self.size.vcpus

    def _choose_transport(self) -> AgentTransport:
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

    async def start(self) -> None:
        """Bring the sandbox up, step by step; each step pushes its undo on one stack.

        A guest restored from a template whose agent does not come up (a template
        that loads but does not run) costs the template and one retry as a cold boot.

        :raise errors.HuskError: a step failed (UnavailableError for the VM or
            the agent, InvalidArgumentError for a network husk cannot carry),
            with the reason; everything done before it is undone.
        """
        try:
            await self._run_steps()
        except errors.UnavailableError as exc:
            template = self._template
            if template is None or self.agent_ready:
                raise
            log.error("sandbox %s: the guest restored from template %s did not come up (%s); "
                      "discarding the template and booting the VM", self.sandbox_id,
                      template.id.key, exc)
            TemplateStore(Path(self.config.template.dir)).discard(template.id)
            self._template, self._templates_off = None, True
            self.times = StartTimes()
            await self._run_steps()

    async def _run_steps(self) -> None:
        steps: list[tuple[str, Callable[[AsyncExitStack], Awaitable[None]]]] = [
            ("run directory", self._make_run_dir), ("accelerator", self._choose_accelerator),
            ("network", self._connect_network), ("VM", self._start_vm),
            ("agent", self._connect_agent), ("sandbox", self._create_sandbox),
            ("port-forward", self._start_port_forward), ("network watch", self._watch_network)]
        if self.building_template:
            steps = steps[:2] + [steps[3], steps[4]]  # no network, no sandbox
        async with AsyncExitStack() as undo:
            for name, step in steps:
                began = time.monotonic()
                await step(undo)
                log.debug("sandbox %s: step %s done in %.3fs", self.sandbox_id, name,
                          time.monotonic() - began)
            self._undo = undo.pop_all()

    @property
    def agent_ready(self) -> bool:
        return self.times.agent_ready_s > 0

    async def _make_run_dir(self, undo: AsyncExitStack) -> None:
        undo.callback(self._remove_run_dir)
        if self.config.runtime.debug:
            undo.callback(self._keep_guest_logs)  # LIFO: after the VM stopped, before removal
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.shared.create()
        except OSError as exc:
            raise errors.UnavailableError(f"cannot set up the shared directory: {exc}") from exc
        hv = self.config.hypervisor
        for path in (hv.kernel_path, hv.initrd_path, hv.image_path):
            if not path.exists():
                raise errors.UnavailableError(
                    f"guest image file {path} is missing (run `make guest-image`, "
                    "or set [hypervisor] guest_dir in husk.toml)")

    async def _choose_accelerator(self, undo: AsyncExitStack) -> None:
        hv = self.config.hypervisor
        self.accel = await choose_accel(hv.accel, hv.qemu_path,
                                        Path(self.config.runtime.state_dir))

    async def _connect_network(self, undo: AsyncExitStack) -> None:
        """Taps for the pod's CNI interfaces (before QEMU, which gets their fds)."""
        settings = self.config.network
        if settings.model == "none" or not self.pod.netns_path:
            log.info("sandbox %s: no network to carry (%s)", self.sandbox_id,
                     "network.model = none" if self.pod.netns_path else "no network namespace")
            return
        self._nic_vhost = settings.vhost_net == "on" or (settings.vhost_net == "auto"
                                                         and vhost_net_available())
        self._nic_queues = queue_count(self.size.vcpus)
        try:
            self.networking = await network_setup.connect(
                self.pod.netns_path, self._nic_queues, self._nic_vhost)
        except network_setup.NetworkError as exc:
            raise errors.UnavailableError(f"pod network: {exc}") from exc
        undo.push_async_callback(network_setup.disconnect, self.networking)
        undo.callback(self.networking.close_fds)
        self._save_network_record()

    @staticmethod
    def _nic(index: int, endpoint: TapEndpoint) -> NicSpec:
        return NicSpec(f"net{index}", endpoint.link.mac.lower(), endpoint.link.mtu,
                       tuple(endpoint.tap_fds), tuple(endpoint.vhost_fds))

    def _nics(self) -> tuple[NicSpec, ...]:
        if self.networking is None:
            return ()
        return tuple(self._nic(i, e) for i, e in enumerate(self.networking.endpoints))

    def _root_pmem_bytes(self) -> int:
        """The image's size when it goes in as virtio-pmem; 0 for a virtio-blk disk."""
        hv = self.config.hypervisor
        if hv.root_device != "pmem":
            return 0
        size = hv.image_path.stat().st_size
        if size % PMEM_ALIGN_BYTES:
            log.warning("sandbox %s: %s is %d bytes, not whole 128 MiB blocks (built by an "
                        "older husk?): it goes in as a virtio-blk disk; `make guest-image` "
                        "pads it", self.sandbox_id, hv.image_path, size)
            return 0
        return size

    def _vm_spec(self) -> VmSpec:
        hv = self.config.hypervisor
        assert self.accel is not None
        cid, vhost_fd = self._vsock
        return VmSpec(
            name=self.sandbox_id[:32], paths=VmPaths(self.run_dir), qemu_path=hv.qemu_path,
            kernel=hv.kernel_path, initrd=hv.initrd_path, image=hv.image_path,
            root_pmem_bytes=self._root_pmem_bytes(),
            vcpus=self.size.vcpus, memory_mib=self.size.memory_mib,
            max_vcpus=self.size.max_vcpus, max_memory_mib=self.size.max_memory_mib,
            all_vcpus_present=self.accel.accel is Accel.TCG, accel=self.accel,
            shared_fs=SharedFsType(self.config.shared_fs.type),
            shared_dir=self.shared.host_dir, transport=self._transport, vsock_cid=cid,
            vhost_fd=vhost_fd, hotplug_ports=hv.hotplug_ports, tcg_buffer_mib=hv.tcg_buffer_mib,
            msize_9p=self.config.shared_fs.msize_9p, kernel_params=hv.kernel_params,
            debug=self.config.runtime.debug, split_ram=hv.guest_ram == "split",
            extra_fds=[vhost_fd] if vhost_fd >= 0 else [], nics=self._nics())

    async def _start_vm(self, undo: AsyncExitStack) -> None:
        """A VM restored from the template for its shape where there is one (built
        first if need be), else booted; a restore that fails discards the template."""
        self._transport = self._choose_transport()
        if self._transport is AgentTransport.VSOCK:
            try:
                reserved = allocate_cid()
            except VsockError as exc:
                raise errors.UnavailableError(str(exc)) from exc
            undo.callback(reserved.close)
            self._vsock = (reserved.cid, reserved.fd)
        spec = self._vm_spec()
        log.info("sandbox %s: VM of %s", self.sandbox_id, self.size)
        if self.building_template:
            self._ram_fd = self._new_guest_ram(undo)
            await self._run_vm(undo, template_spec(spec, incoming=False, ram_fd=self._ram_fd),
                               self._pod_cgroup(undo), with_virtiofsd=False)
            return
        template = await self._template_for(spec)
        if template is not None:
            try:
                async with AsyncExitStack() as attempt:
                    await self._restore_vm(attempt, spec, template)
                    undo.push_async_callback(attempt.pop_all().aclose)
                return
            except TemplateError as exc:
                log.error("sandbox %s: %s; discarding the template and booting the VM",
                          self.sandbox_id, exc)
                TemplateStore(Path(self.config.template.dir)).discard(template.id)
                self.times.template = ""
        await self._run_vm(undo, spec, self._pod_cgroup(undo))

    def _pod_cgroup(self, undo: AsyncExitStack) -> SandboxCgroup | None:
        """The pod's cgroup on the host (None: the VM stays in the shim's), removed
        with ``undo`` after the VM has stopped (pushed before it starts: LIFO)."""
        cgroup = SandboxCgroup.from_spec_path(self.pod.cgroup_path)
        if cgroup is not None:
            undo.callback(cgroup.remove)
        return cgroup

    async def _run_vm(self, undo: AsyncExitStack, spec: VmSpec, cgroup: SandboxCgroup | None,
                      with_virtiofsd: bool = True) -> None:
        self.vm = Vm(spec, self.config.shared_fs.virtiofsd_path,
                     self.config.shared_fs.virtiofs_cache, with_virtiofsd=with_virtiofsd)
        try:
            await self.vm.start()
        except VmError as exc:
            raise errors.UnavailableError(f"cannot start the VM: {exc}") from exc
        undo.push_async_callback(self.vm.stop)
        if self.networking is not None and spec.nics:
            self.networking.close_fds()  # QEMU holds the taps now
        if cgroup is not None:
            cgroup.join([self.vm.pid, self.vm.virtiofsd_pid])
        self.times.qmp_ready_s = self.vm.times.qmp_ready_s

    async def _restore_vm(self, undo: AsyncExitStack, spec: VmSpec, template: Template) -> None:
        """Start QEMU waiting for the template's state, load it, then hot-plug what is
        the pod's own: the shared filesystem and the NICs.

        :raise TemplateError: the restore failed; ``undo`` stops what started.
        :raise errors.ResourceExhaustedError: the pod's memory limit cannot hold it.
        """
        cgroup = self._pod_cgroup(undo)
        if cgroup is not None:
            _check_room_for_guest_ram(cgroup, template)
        try:
            ram_fd = self._new_guest_ram(undo)
            began = time.monotonic()
            # Charged to the pod, as the RAM a booted guest touches is (QEMU is in its cgroup).
            with cgroup.charging_memory() if cgroup else contextlib.nullcontext():
                copied = await asyncio.to_thread(_copy_file_into, template.ram, ram_fd,
                                                 self._shared_ram_bytes())
            log.debug("sandbox %s: %d MiB of shared guest RAM from the template in %.3fs",
                      self.sandbox_id, copied >> 20, time.monotonic() - began)
            await self._run_vm(undo, template_spec(spec, incoming=True, ram_fd=ram_fd), cgroup)
            assert self.vm is not None
            await self.vm.restore(template.state)
            await self.vm.attach_shared_fs()
            for index, endpoint in enumerate(self.networking.endpoints if self.networking else []):
                await self.vm.devices.add_nic(self._nic(index, endpoint))
        except (errors.HuskError, VmError, DeviceError, OSError) as exc:
            raise TemplateError(f"cannot restore the VM from template {template.id.key}: "
                                f"{exc}") from exc
        if self.networking is not None:
            self.networking.close_fds()  # QEMU has its copies
        self._template = template
        if not self.times.template:
            self.times.template = "restored"
        log.info("sandbox %s: VM restored from template %s in %.3fs", self.sandbox_id,
                 template.id.key, time.monotonic() - self.vm.times.spawned_at)

    async def _template_for(self, spec: VmSpec) -> Template | None:
        """The template for this VM's shape, built now if missing; None: boot cold."""
        settings = self.config.template
        if not settings.enabled or self._templates_off:
            return None
        try:
            tid = TemplateId.of(spec, __version__)
        except TemplateError as exc:
            log.info("sandbox %s: boots without a template: %s", self.sandbox_id, exc)
            return None
        store = TemplateStore(Path(settings.dir))
        template = store.find(tid)
        if template is not None:
            return template
        failed = store.recently_failed(tid)
        if failed is not None:
            log.warning("sandbox %s: boots without a template: building template %s failed "
                        "recently: %s", self.sandbox_id, tid.key, failed)
            return None
        try:
            async with store.locked(tid):
                template = store.find(tid)  # another shim may have built it meanwhile
                if template is None:
                    template = await self._build_template(store, tid)
        except (TemplateError, errors.HuskError, OSError) as exc:
            log.error("sandbox %s: boots without a template: building template %s failed: "
                      "%s", self.sandbox_id, tid.key, exc)
            store.record_failure(tid, str(exc))
            return None
        return template

    async def _build_template(self, store: TemplateStore, tid: TemplateId) -> Template:
        """Boot a guest of this VM's shape without the pod's devices, warm its agent up
        and save it. :raise errors.HuskError, VmError: the build failed."""
        began = time.monotonic()
        log.info("sandbox %s: building VM template %s (%s)", self.sandbox_id, tid.key, self.size)
        state = store.build_path(tid)
        builder = Sandbox(dataclasses.replace(self.pod, sandbox_id=f"tmpl-{tid.key[:12]}",
                                              hostname="template", cgroup_path="",
                                              netns_path=""),
                          self.config, building_template=True)
        try:
            try:
                await builder.start()
                await builder.save_template(state)
            finally:
                await builder.stop()
            template = store.install(tid, state, time.monotonic() - began)
            pruned = store.prune(tid, self.config.template.keep_unused_days * SECONDS_PER_DAY)
            if pruned:
                log.info("removed %d VM templates unused for %d days: %s", len(pruned),
                         self.config.template.keep_unused_days, ", ".join(pruned))
        except VmError as exc:
            store.abandon(tid)
            raise TemplateError(str(exc)) from exc
        except BaseException:
            store.abandon(tid)
            raise
        self.times.template = "built"
        log.info("sandbox %s: template %s built in %.1fs (%d MiB)", self.sandbox_id, tid.key,
                 time.monotonic() - began, template.state.stat().st_size >> 20)
        return template

    def _shared_ram_bytes(self) -> int:
        """The guest RAM the shim holds in a memfd: the node virtiofsd maps."""
        split = self.config.hypervisor.guest_ram == "split"
        return RamLayout.for_memory(self.size.memory_mib, split).shared_mib << 20

    def _new_guest_ram(self, undo: AsyncExitStack) -> int:
        """A memfd for the guest's shared RAM; closed with the sandbox (QEMU opens its own)."""
        try:
            fd = new_guest_ram(self._shared_ram_bytes())
        except OSError as exc:
            raise errors.UnavailableError(f"cannot create the guest's RAM: {exc}") from exc
        undo.callback(os.close, fd)
        return fd

    async def save_template(self, state: Path) -> None:
        """A template VM: hang up on its agent (a restored guest waits for its new
        host), let the guest hand back the memory it freed, save the paused guest's
        devices and private RAM to ``state`` and its shared RAM beside it (sparse).

        :raise VmError: QEMU failed. :raise OSError: writing the RAM failed.
        """
        assert self.building_template and self.vm is not None and self._ram_fd >= 0
        if self.agent is not None:
            agent, self.agent = self.agent, None
            await agent.close()
        await self._wait_for_free_page_reporting()
        await self.vm.save(state)
        size = self._shared_ram_bytes()
        ram = state.parent / RAM_FILE
        written = await asyncio.to_thread(_copy_fd_into_file, self._ram_fd, ram, size)
        log.info("template saved: %d MiB of state and private guest RAM, %d of %d MiB of "
                 "shared guest RAM hold data", state.stat().st_size >> 20, written >> 20,
                 size >> 20)

    def _guest_ram_held(self) -> int:
        """A template VM's guest RAM in use: its memfd's pages, and QEMU's private RAM
        when split (not the rest of QEMU: TCG's buffer grows meanwhile)."""
        assert self.vm is not None
        held = allocated_bytes(self._ram_fd)
        if self.vm.spec.split_ram:
            held += mergeable_rss_bytes(self.vm.pid)
        return held

    async def _wait_for_free_page_reporting(self) -> None:
        """Until the guest RAM held stops shrinking (the guest reports what it freed after
        boot every couple of seconds), for at most TEMPLATE_SETTLE_MAX_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TEMPLATE_SETTLE_MAX_S
        last = self._guest_ram_held()
        stable_since = loop.time()
        while loop.time() < deadline and loop.time() - stable_since < TEMPLATE_SETTLE_S:
            await asyncio.sleep(TEMPLATE_SETTLE_POLL_S)
            now = self._guest_ram_held()
            if now < last:
                last, stable_since = now, loop.time()

    async def _connect_agent(self, undo: AsyncExitStack) -> None:
        assert self.vm is not None
        paths = self.vm.spec.paths
        if self._transport is AgentTransport.VSOCK:
            self._bridge = VsockBridge(paths.agent_socket, self._vsock[0])
            await self._bridge.start()
            undo.push_async_callback(self._bridge.stop)
            target = f"unix:{paths.agent_socket}"
        else:
            try:
                await self.vm.wait_guest_open(AGENT_CHARDEV, self.config.agent.dial_timeout_s)
            except VmError as exc:
                raise errors.UnavailableError(f"{exc}; {self.guest_logs()}") from exc
            target = f"unix:{paths.agent_serial_socket}"
        self.agent = AgentClient(target, self.config.agent.request_timeout_s)
        undo.push_async_callback(self.agent.close)
        try:
            await self.agent.wait_ready(self.config.agent.dial_timeout_s, self._vm_alive)
        except errors.UnavailableError as exc:
            raise errors.UnavailableError(f"{exc}; {self.guest_logs()}") from exc
        self.times.agent_ready_s = time.monotonic() - self.vm.times.spawned_at
        if self._template is not None:
            # Its template's build logged the guest's details; asking again runs crun.
            log.info("sandbox %s: agent ready after %.3fs (guest of template %s)",
                     self.sandbox_id, self.times.agent_ready_s, self._template.id.key)
            return
        details = await self.agent.guest_details()
        log.info("sandbox %s: agent ready after %.3fs (%s)", self.sandbox_id,
                 self.times.agent_ready_s, details)

    async def _create_sandbox(self, undo: AsyncExitStack) -> None:
        """The guest side: shared filesystem, /dev/shm, hostname, sysctls, network."""
        assert self.agent is not None and self.vm is not None
        network = self.networking.network if self.networking is not None else None
        try:
            await self.agent.create_sandbox(
                self.sandbox_id, self.pod.hostname, list(self.pod.dns),
                [self._shared_storage(), POD_SHM_STORAGE], self.pod.sysctl_map, network,
                random_seed=secrets.token_bytes(RANDOM_SEED_BYTES), clock_ns=time.time_ns(),
                debug_console=self.config.debug.console)
        except errors.HuskError as exc:
            # Its shared filesystem is the first thing to fail on a split guest's
            # kernel without the patch, not in a way the guest could name.
            problem = (imageid.split_ram_problem(self.config.hypervisor.image_path.parent
                                                 / imageid.MANIFEST_NAME)
                       if self.vm.spec.split_ram else "")
            if problem:
                raise type(exc)(f"{exc} ({problem})") from exc
            raise
        self.times.sandbox_ready_s = time.monotonic() - self.vm.times.spawned_at

    async def _start_port_forward(self, undo: AsyncExitStack) -> None:
        """localhost in the pod's namespace reaches the guest (for CRI PortForward).

        Without it the pod still runs; only port-forward to it fails, so a
        failure here is logged, not raised.
        """
        agent = self.agent
        if self.networking is None or agent is None:
            return
        forwarder = PortForwarder(self.pod.netns_path, agent.port_forward,
                                  f"sandbox {self.sandbox_id}")
        try:
            await forwarder.start()
        except PortForwardError as exc:
            log.error("sandbox %s: port-forward will not work: %s", self.sandbox_id, exc)
            return
        undo.push_async_callback(forwarder.stop)
        self._forward_port = forwarder.listen_port
        self._save_network_record()

    def _save_network_record(self) -> None:
        if self.networking is None:
            return
        try:
            network_setup.save_record(self.run_dir, self.networking, self._forward_port)
        except OSError as exc:
            log.warning("sandbox %s: cannot record the network setup: %s", self.sandbox_id, exc)

    async def _watch_network(self, undo: AsyncExitStack) -> None:
        """Interfaces CNI adds after boot are hot-plugged (see _carry_new_interfaces)."""
        if self.networking is None:
            return
        watcher = NetnsWatcher(self.pod.netns_path, self._carry_new_interfaces,
                               f"sandbox {self.sandbox_id}")
        try:
            await watcher.start()
        except (NetnsError, TimeoutError) as exc:
            log.error("sandbox %s: cannot watch %s (%s): interfaces added after boot will "
                      "not reach the VM", self.sandbox_id, self.pod.netns_path, exc)
            return
        undo.push_async_callback(watcher.stop)

    async def _carry_new_interfaces(self) -> None:
        """A tap, a hot-plugged NIC and the guest's configuration for each new interface."""
        if self.networking is None or self.vm is None or self.agent is None:
            return
        try:
            network, endpoints = await network_setup.connect_new(
                self.networking, self._nic_queues, self._nic_vhost)
        except network_setup.NetworkError as exc:
            log.error("sandbox %s: an interface added after boot cannot be carried into the "
                      "VM: %s", self.sandbox_id, exc)
            return
        first = len(self.networking.endpoints) - len(endpoints)
        carried = set()
        for index, endpoint in enumerate(endpoints, start=first):
            try:
                await self.vm.devices.add_nic(self._nic(index, endpoint))
                carried.add(endpoint.link.name)
            except DeviceError as exc:
                log.error("sandbox %s: interface %s was added after boot and is not in the "
                          "VM: %s", self.sandbox_id, endpoint.link.name, exc)
            finally:
                endpoint.close_fds()  # QEMU has its copies
        self._save_network_record()
        if carried:
            added = network.only(carried)
            await self.agent.update_network(added)
            log.info("sandbox %s: hot-plugged %s", self.sandbox_id, added.describe())

    async def stop(self) -> None:
        """Tear everything down; safe to call more than once and after failures."""
        began = time.monotonic()
        if self.agent is not None and self.vm is not None and self.vm.running:
            with contextlib.suppress(errors.HuskError, asyncio.TimeoutError):
                await asyncio.wait_for(self.agent.destroy_sandbox(self.sandbox_id),
                                       DESTROY_TIMEOUT_S)
        destroyed = time.monotonic()
        if self._undo is not None:
            undo, self._undo = self._undo, None
            try:
                await undo.aclose()
            except Exception:  # every undo ran; one failing must not keep the pod alive
                log.exception("sandbox %s: a teardown step failed", self.sandbox_id)
            log.debug("sandbox %s: torn down in %.3fs (DestroySandbox %.3fs)", self.sandbox_id,
                      time.monotonic() - began, destroyed - began)
        if self.run_dir.exists():  # the undo of the run directory step removed it already
            self._remove_run_dir()

    def guest_logs(self) -> str:
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


def _check_room_for_guest_ram(cgroup: SandboxCgroup, template: Template) -> None:
    """:raise errors.ResourceExhaustedError: the pod's memory limit cannot hold the guest
    RAM restored from ``template``, which is charged to the pod (writing it would get
    the shim itself OOM-killed in the pod's cgroup)."""
    headroom = cgroup.memory_headroom()
    try:
        # The private RAM is in the state (all but its zero pages), the shared in a file.
        needed = allocated_bytes_of(template.ram) + template.state.stat().st_size
    except OSError:
        return  # the restore reads it next and says what is wrong with it
    if headroom is not None and needed > headroom:
        raise errors.ResourceExhaustedError(
            f"the pod's memory limit leaves {headroom >> 20} MiB in cgroup {cgroup.path}, and "
            f"its VM's guest RAM from template {template.id.key} alone takes {needed >> 20} "
            "MiB: raise the pod's memory limit or give its RuntimeClass an overhead "
            "(overhead.podFixed.memory)")


def _copy_file_into(path: Path, fd: int, size: int) -> int:
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return copy_sparse(src, fd, size)
    finally:
        os.close(src)


def _copy_fd_into_file(fd: int, path: Path, size: int) -> int:
    dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(dst, size)
        return copy_sparse(fd, dst, size)
    finally:
        os.close(dst)
