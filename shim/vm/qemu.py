"""Vm: one QEMU process (plus virtiofsd) for one pod, driven over QMP.

Owns the VM's run directory, its helper processes and their teardown. Knows
nothing about containers or the agent's API: the agent channel is just a
socket this module asks QEMU to create.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from shim.util import child
from shim.vm.cmdline import SharedFsType, VmSpec, build_cmdline
from shim.vm.qmp import Qmp, QmpError
from shim.vm.virtiofsd import VirtiofsdError, start_virtiofsd

log = logging.getLogger(__name__)

QMP_READY_TIMEOUT_S = 30.0
QUIT_GRACE_S = 5.0
GUEST_OPEN_POLL_S = 0.05


class VmError(Exception):
    """The VM could not be started, or failed."""


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
    times: BootTimes = field(default_factory=BootTimes)
    _qemu: asyncio.subprocess.Process | None = None
    _virtiofsd: asyncio.subprocess.Process | None = None
    _qmp: Qmp | None = None

    @property
    def pid(self) -> int:
        return self._qemu.pid if self._qemu else 0

    @property
    def virtiofsd_pid(self) -> int:
        return self._virtiofsd.pid if self._virtiofsd else 0

    @property
    def running(self) -> bool:
        return self._qemu is not None and self._qemu.returncode is None

    async def start(self) -> None:
        """Start virtiofsd (if used) and QEMU, and connect QMP.

        :raise VmError: with the reason, after undoing whatever had started.
        """
        paths = self.spec.paths
        paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            argv = build_cmdline(self.spec)
        except ValueError as exc:
            raise VmError(str(exc)) from exc
        qemu_log = paths.run_dir / "qemu.log"
        try:
            if self.spec.shared_fs is SharedFsType.VIRTIO_FS:
                self._virtiofsd = await start_virtiofsd(
                    self.virtiofsd_path, paths.virtiofsd_socket, self.spec.shared_dir,
                    self.virtiofs_cache, paths.run_dir / "virtiofsd.log", self.spec.debug)
            log.debug("starting QEMU: %s", " ".join(argv))
            self.times.spawned_at = time.monotonic()
            try:
                self._qemu = await child.spawn(argv, qemu_log, tuple(self.spec.extra_fds))
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
        except VirtiofsdError as exc:
            await self.stop()
            raise VmError(str(exc)) from exc
        except BaseException:
            await self.stop()
            raise

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """:raise VmError: the VM is not running or QEMU rejected the command."""
        if self._qmp is None or not self.running:
            raise VmError(f"VM {self.spec.name} is not running")
        try:
            return await self._qmp.execute(command, arguments)
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
                raise VmError(self.failure_reason())
            for info in await self.qmp("query-chardev"):
                if info.get("label") == chardev and info.get("frontend-open"):
                    return
            await asyncio.sleep(GUEST_OPEN_POLL_S)
        raise VmError(f"the guest did not open its agent port within {timeout_s:.0f}s")

    async def wait(self) -> int:
        """Wait for QEMU to exit; returns its status."""
        assert self._qemu is not None
        return await self._qemu.wait()

    def failure_reason(self) -> str:
        """Why QEMU stopped, from its exit status and logs (for error messages)."""
        if self._qemu is None:
            return "QEMU was never started"
        if self._qemu.returncode is None:
            return "QEMU is still running"
        tail = child.log_tail(self.spec.paths.run_dir / "qemu.log")
        return f"QEMU exited with status {self._qemu.returncode}" + (f"; qemu: {tail}" if tail else "")

    async def stop(self) -> None:
        """Stop QEMU (QMP quit, then signals) and virtiofsd; idempotent."""
        if self._qmp is not None:
            if self.running:
                with contextlib.suppress(QmpError):
                    await self._qmp.execute("quit", timeout_s=QUIT_GRACE_S)
            await self._qmp.close()
            self._qmp = None
        if self._qemu is not None:
            await child.stop(self._qemu, "qemu", grace_s=QUIT_GRACE_S)
        if self._virtiofsd is not None:
            await child.stop(self._virtiofsd, "virtiofsd")
        for sock in self.spec.paths.sockets():
            sock.unlink(missing_ok=True)
        self.spec.paths.pid_file.unlink(missing_ok=True)

    def remove_run_dir(self) -> None:
        shutil.rmtree(self.spec.paths.run_dir, ignore_errors=True)
