"""Vm: one QEMU process (plus virtiofsd) for one pod, driven over QMP.

Owns the VM's run directory, its helper processes, the guest's output streams
and their teardown. Knows nothing about containers or the agent's API: the
agent channel is just a socket this module asks QEMU to create.

The VM counts as gone when either QEMU or virtiofsd exits: without virtiofsd
the guest's filesystem hangs, so a dead virtiofsd takes QEMU down with it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.util import child
from shim.vm.accel import Accel
from shim.vm.cmdline import (CONSOLE_CHARDEV, GUEST_LOG_CHARDEV, SHARED_FS_CHARDEV, SHARED_FS_TAG,
                             SharedFsType, VmSpec, build_cmdline)
from shim.vm.devices import Devices, PciSlot, SlotError, SlotMap
from shim.vm.guestlog import GuestLog, GuestLogError
from shim.vm.qmp import QMP_TIMEOUT_S, Qmp, QmpError
from shim.vm.virtiofsd import VirtiofsdError, start_virtiofsd

log = logging.getLogger(__name__)

QMP_READY_TIMEOUT_S = 30.0
QUIT_GRACE_S = 5.0
GUEST_OPEN_POLL_S = 0.05
# QEMU exiting makes virtiofsd exit too (its vhost-user peer hung up), and the
# two exits may be seen in either order: a virtiofsd exit only counts as the
# cause when QEMU is still up this long after it.
VIRTIOFSD_BLAME_GRACE_S = 0.5
# A snapshot is the guest's touched memory (~100-200 MiB): written to, or read
# from, a local file.
SAVE_TIMEOUT_S = 60.0
RESTORE_TIMEOUT_S = 30.0
MIGRATION_POLL_S = 0.01
# QEMU throttles a migration to 128 MiB/s by default; a file is not a network.
SAVE_BANDWIDTH_BYTES_S = 8 << 30
MIGRATION_FD_NAME = "snapshot"
QEMU_LOG = "qemu.log"
VIRTIOFSD_LOG = "virtiofsd.log"


class VmError(Exception):
    """The VM could not be started, or failed."""

    def __init__(self, message: str, error_class: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class  # QEMU's, when QEMU refused a QMP command


@dataclass
class BootTimes:
    """Monotonic seconds since QEMU was spawned (for logs and benchmarks)."""

    spawned_at: float = 0.0
    qmp_ready_s: float = 0.0


@dataclass
class Vm:
    spec: VmSpec
    virtiofsd_path: str = "/usr/lib/qemu/virtiofsd"
    virtiofs_cache: str = "auto"
    virtiofs_xattr: bool = False
    # False for a VM that only becomes a template: it never serves files.
    with_virtiofsd: bool = True
    times: BootTimes = field(default_factory=BootTimes)
    _qemu: asyncio.subprocess.Process | None = None
    _virtiofsd: asyncio.subprocess.Process | None = None
    _qmp: Qmp | None = None
    _virtiofsd_died_first: bool = False

    def __post_init__(self) -> None:
        paths = self.spec.paths
        #: The serial console and the agent's log port; their tails outlive stop().
        self.console = GuestLog(CONSOLE_CHARDEV, paths.console_socket, paths.console_log)
        self.guest_log = GuestLog(GUEST_LOG_CHARDEV, paths.guest_log_socket, paths.guest_log)
        #: The VM's PCI slots: boot-time devices take theirs when the command line is built.
        self.slots = SlotMap(self.spec.hotplug_ports)
        #: Hot-plug and unplug of devices (NICs, disks) while the VM runs.
        self.devices = Devices(self, self.slots, split_ram=self.spec.split_ram)

    @property
    def pid(self) -> int:
        return self._qemu.pid if self._qemu else 0

    @property
    def virtiofsd_pid(self) -> int:
        """The virtiofsd process that serves the guest (for cgroups and stats).

        With sandbox=namespace virtiofsd forks once QEMU has connected, which
        is before start() returns: the child does the work in its namespaces
        and the parent only waits for it, so the child is the one to charge.
        Stopping goes through the parent: the child dies with it.
        """
        if self._virtiofsd is None:
            return 0
        children = _children(self._virtiofsd.pid) if self._virtiofsd.returncode is None else []
        return children[0] if len(children) == 1 else self._virtiofsd.pid

    @property
    def running(self) -> bool:
        """QEMU is up, and so is virtiofsd when there is one."""
        if self._qemu is None or self._qemu.returncode is not None:
            return False
        return self._virtiofsd is None or self._virtiofsd.returncode is None

    async def start(self) -> None:
        """Start the guest output readers, virtiofsd (if used) and QEMU, and connect QMP.

        :raise VmError: with the reason, after undoing whatever had started.
        """
        paths = self.spec.paths
        paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            argv = build_cmdline(self.spec, self.slots)
        except (ValueError, SlotError) as exc:
            raise VmError(str(exc)) from exc
        qemu_log = paths.run_dir / QEMU_LOG
        try:
            # Listening before QEMU starts: its connect cannot race us or wait for us.
            self.console.open()
            self.guest_log.open()
            if self.spec.shared_fs is SharedFsType.VIRTIO_FS and self.with_virtiofsd:
                self._virtiofsd = await start_virtiofsd(
                    self.virtiofsd_path, paths.virtiofsd_socket, self.spec.shared_dir,
                    self.virtiofs_cache, paths.run_dir / VIRTIOFSD_LOG, self.spec.debug,
                    xattr=self.virtiofs_xattr, pid_file=paths.virtiofsd_pid_file)
            log.debug("starting QEMU: %s", " ".join(argv))
            self.times.spawned_at = time.monotonic()
            try:
                # QEMU asks for transparent huge pages for guest RAM. Under KVM they
                # back the guest's memory with fewer TLB entries; under TCG they give
                # nothing, and a guest that touches one page of a 2 MiB region holds
                # all of it (an idle restored pod held ~15 MiB more).
                self._qemu = await child.spawn(argv, qemu_log, self.spec.passed_fds(),
                                               huge_pages=self.spec.accel.accel is Accel.KVM)
            except OSError as exc:
                raise VmError(f"cannot run {argv[0]}: {exc.strerror}") from exc
            self._qmp = Qmp(f"husk-{self.spec.name}")
            try:
                await self._qmp.connect(paths.qmp_socket, self._qemu, QMP_READY_TIMEOUT_S)
            except QmpError as exc:
                raise VmError(f"{exc}: {child.log_tail(qemu_log)}") from exc
            self.times.qmp_ready_s = time.monotonic() - self.times.spawned_at
            log.info("QEMU pid %d up, QMP ready after %.3fs (%s)", self.pid,
                     self.times.qmp_ready_s, self.spec.accel.accel.value)
        except (GuestLogError, VirtiofsdError) as exc:
            await self.stop()
            raise VmError(str(exc)) from exc
        except BaseException:
            await self.stop()
            raise

    async def save(self, path: Path, timeout_s: float = SAVE_TIMEOUT_S) -> None:
        """Pause the guest and write its state (devices and memory) to ``path``.

        The VM stays paused; stop() it afterwards.

        :raise VmError: QEMU refused (a device that cannot migrate) or did not finish
            within ``timeout_s``.
        """
        await self.qmp("stop")
        await self.qmp("migrate-set-parameters", {"max-bandwidth": SAVE_BANDWIDTH_BYTES_S})
        await self._skip_shared_ram()
        await self._pass_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        await self.qmp("migrate", {"uri": f"fd:{MIGRATION_FD_NAME}"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            info = await self.qmp("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise VmError(f"saving the VM failed: {info.get('error-desc', status)}")
            await asyncio.sleep(MIGRATION_POLL_S)
        with contextlib.suppress(VmError):
            await self.qmp("migrate_cancel")
        raise VmError(f"saving the VM took longer than {timeout_s:.0f}s")

    async def restore(self, path: Path, timeout_s: float = RESTORE_TIMEOUT_S) -> None:
        """Load the state save() wrote into this VM (started with spec.incoming) and run it.

        :raise VmError: QEMU could not load it (it exits: a stream from another
            machine type or QEMU, or a damaged file) or took longer than ``timeout_s``.
        """
        await self._pass_file(path, os.O_RDONLY)
        await self._skip_shared_ram()
        await self.qmp("migrate-incoming", {"uri": f"fd:{MIGRATION_FD_NAME}"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        status = "inmigrate"
        while status == "inmigrate":
            if not self.running:
                await self._drain_guest_logs()
                raise VmError(f"restoring the VM failed: {self.failure_reason()}")
            with contextlib.suppress(VmError):  # QEMU exiting: the check above says why
                status = (await self.qmp("query-status"))["status"]
            if status != "inmigrate":
                break
            if loop.time() >= deadline:
                raise VmError(f"restoring the VM took longer than {timeout_s:.0f}s")
            await asyncio.sleep(MIGRATION_POLL_S)
        if status != "running":
            await self.qmp("cont")

    async def _skip_shared_ram(self) -> None:
        """The shared node of guest RAM, in the shim's memfd, travels as a file of its
        own (shim.vm.ram), not in the stream (the private nodes do); both sides of a
        migration must agree on that."""
        if self.spec.ram_fd >= 0:
            await self.qmp("migrate-set-capabilities", {"capabilities": [
                {"capability": "x-ignore-shared", "state": True}]})

    async def _pass_file(self, path: Path, flags: int) -> None:
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise VmError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            await self.pass_fd(MIGRATION_FD_NAME, fd)
        finally:
            os.close(fd)

    async def attach_shared_fs(self) -> PciSlot:
        """Hot-plug the shared filesystem's device (after a restore; see VmSpec).

        :raise DeviceError: QEMU refused it.
        """
        return await self.devices.add_shared_fs(SHARED_FS_CHARDEV,
                                                str(self.spec.paths.virtiofsd_socket),
                                                SHARED_FS_TAG)

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None,
                  timeout_s: float = QMP_TIMEOUT_S) -> Any:
        """:raise VmError: the VM is not running, QEMU rejected the command or did
        not answer within ``timeout_s``."""
        if self._qmp is None or not self.running:
            raise VmError(f"VM {self.spec.name} is not running")
        try:
            return await self._qmp.execute(command, arguments, timeout_s)
        except QmpError as exc:
            raise VmError(str(exc), exc.error_class) from exc

    async def pass_fd(self, name: str, fd: int) -> None:
        """:raise VmError: the VM is not running or QEMU refused the fd."""
        if self._qmp is None or not self.running:
            raise VmError(f"VM {self.spec.name} is not running")
        try:
            await self._qmp.pass_fd(name, fd)
        except QmpError as exc:
            raise VmError(str(exc)) from exc

    def expect_event(self, name: str, device: str = "") -> asyncio.Future[dict[str, Any]]:
        """:raise VmError: the VM is not running, or too many events are awaited."""
        if self._qmp is None or not self.running:
            raise VmError(f"VM {self.spec.name} is not running")
        try:
            return self._qmp.expect_event(name, device)
        except QmpError as exc:
            raise VmError(str(exc)) from exc

    async def wait_guest_open(self, chardev: str, timeout_s: float) -> None:
        """Wait until the guest has opened the virtio-serial port behind ``chardev``.

        Dialing before that would leave bytes queued in QEMU for a guest that
        is still booting, and a client that gives up on them mid-boot would
        leave the guest reading half a conversation.

        :raise VmError: QEMU exited, or the guest did not open it in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if not self.running:
                await self._drain_guest_logs()
                raise VmError(self.failure_reason())
            for info in await self.qmp("query-chardev"):
                if info.get("label") == chardev and info.get("frontend-open"):
                    return
            await asyncio.sleep(GUEST_OPEN_POLL_S)
        raise VmError(f"the guest did not open its agent port within {timeout_s:.0f}s")

    async def wait(self) -> int:
        """Wait until QEMU or virtiofsd exits; returns the status of the one that did.

        A virtiofsd that dies first is recorded (see failure_reason) and QEMU is
        stopped, so the pod is torn down instead of hanging on its filesystem.
        """
        assert self._qemu is not None
        qemu = asyncio.ensure_future(self._qemu.wait())
        waiters: set[asyncio.Future[int]] = {qemu}
        if self._virtiofsd is not None:
            waiters.add(asyncio.ensure_future(self._virtiofsd.wait()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not qemu.done():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(qemu), VIRTIOFSD_BLAME_GRACE_S)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self._qemu.returncode is None and self._virtiofsd is not None:
            self._virtiofsd_died_first = True
            log.error("virtiofsd (pid %d) exited with status %s under a running VM; "
                      "stopping QEMU", self._virtiofsd.pid, self._virtiofsd.returncode)
            await child.stop(self._qemu, "qemu", grace_s=QUIT_GRACE_S)
            await self._drain_guest_logs()
            assert self._virtiofsd.returncode is not None
            return self._virtiofsd.returncode
        await self._drain_guest_logs()
        assert self._qemu.returncode is not None
        return self._qemu.returncode

    def _virtiofsd_failed(self) -> bool:
        vfs = self._virtiofsd
        if vfs is None or vfs.returncode is None:
            return False
        qemu_up = self._qemu is not None and self._qemu.returncode is None
        return qemu_up or self._virtiofsd_died_first

    def failure_reason(self) -> str:
        """Why the VM stopped, from exit statuses and logs (for error messages)."""
        run_dir = self.spec.paths.run_dir
        if self._virtiofsd is not None and self._virtiofsd_failed():
            tail = child.log_tail(run_dir / VIRTIOFSD_LOG)
            return (f"virtiofsd exited with status {self._virtiofsd.returncode}"
                    + (f"; virtiofsd: {tail}" if tail else ""))
        if self._qemu is None:
            return "QEMU was never started"
        if self._qemu.returncode is None:
            return "QEMU is still running"
        tail = child.log_tail(run_dir / QEMU_LOG)
        return f"QEMU exited with status {self._qemu.returncode}" + (f"; qemu: {tail}" if tail else "")

    async def _drain_guest_logs(self) -> None:
        """QEMU is gone: collect what it wrote last (a panic, say) before anyone reads a tail."""
        if self._qemu is None or self._qemu.returncode is None:
            return
        await asyncio.gather(self.console.drain(), self.guest_log.drain())

    async def stop(self) -> None:
        """Stop QEMU (QMP quit, then signals), virtiofsd and the log readers; idempotent.

        The guest logs' tails stay readable.
        """
        began = time.monotonic()
        if self._qmp is not None:
            if self._qemu is not None and self._qemu.returncode is None:
                with contextlib.suppress(QmpError):
                    await self._qmp.execute("quit", timeout_s=QUIT_GRACE_S)
            await self._qmp.close()
            self._qmp = None
        quit_s = time.monotonic() - began
        if self._qemu is not None:
            await child.stop(self._qemu, "qemu", grace_s=QUIT_GRACE_S)
        qemu_s = time.monotonic() - began
        if self._virtiofsd is not None:
            await child.stop(self._virtiofsd, "virtiofsd")
        log.debug("VM %s: QMP quit answered in %.3fs, QEMU gone in %.3fs, virtiofsd in %.3fs",
                  self.spec.name, quit_s, qemu_s, time.monotonic() - began)
        await self._drain_guest_logs()
        await self.console.close()
        await self.guest_log.close()
        for path in [*self.spec.paths.sockets(), *self.spec.paths.pid_files()]:
            path.unlink(missing_ok=True)

    def remove_run_dir(self) -> None:
        shutil.rmtree(self.spec.paths.run_dir, ignore_errors=True)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]
