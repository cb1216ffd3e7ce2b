"""FakeSandbox: a Sandbox without a VM (its agent is a FakeAgent)."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from shim.config import Config
from shim.sandbox.description import PodDescription
from shim.sandbox.sizing import size_vm
from shim.storage.share import SharedDir
from tests.fakes.agent import FakeAgent

FAKE_VM_PID = 4242


class FakeVm:
    pid = FAKE_VM_PID
    running = True
    devices = None  # no hot-plug: a fake VM has no direct volumes
    virtiofsd_pid = 0

    def __init__(self) -> None:
        self._exit = asyncio.get_event_loop().create_future()

    async def wait(self) -> int:
        return await self._exit

    def failure_reason(self) -> str:
        return "fake VM stopped"

    def crash(self, status: int = 1) -> None:
        self.running = False
        if not self._exit.done():
            self._exit.set_result(status)

    async def stop(self) -> None:
        self.crash(-9)


class FakeSandbox:
    def __init__(self, pod: PodDescription, config: Config, root: Path) -> None:
        self.pod = pod
        self.sandbox_id = pod.sandbox_id
        self.config = config
        self.run_dir = root / "sb" / pod.sandbox_id
        self.shared = SharedDir(self.run_dir)
        self.size = size_vm(config.hypervisor, pod.resources, pod.size_overrides)
        self.present_vcpus = self.size.vcpus
        self.agent: FakeAgent | None = None
        self.vm: FakeVm | None = None
        self.stopped = False

    async def start(self) -> None:
        self.shared.create()
        self.agent = FakeAgent()
        self.vm = FakeVm()

    def guest_logs(self) -> str:
        return "guest console: (fake); agent log: (fake)"

    async def stop(self) -> None:
        self.stopped = True
        self.shared.destroy()
        shutil.rmtree(self.run_dir, ignore_errors=True)
