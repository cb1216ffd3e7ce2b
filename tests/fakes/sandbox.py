"""FakeSandbox: a Sandbox without a VM (its agent is a FakeAgent)."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from shim.config import Config
from shim.storage.share import SharedDir
from tests.fakes.agent import FakeAgent

FAKE_VM_PID = 4242


class FakeVm:
    pid = FAKE_VM_PID
    running = True

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
    def __init__(self, sandbox_id: str, config: Config, root: Path) -> None:
        self.sandbox_id = sandbox_id
        self.config = config
        self.run_dir = root / "sb" / sandbox_id
        self.shared = SharedDir(self.run_dir)
        self.agent: FakeAgent | None = None
        self.vm: FakeVm | None = None
        self.stopped = False
        self.hostname = ""
        self.sysctls: dict[str, str] = {}

    async def start(self, hostname: str = "", dns: list[str] | None = None,
                    sysctls: dict[str, str] | None = None) -> None:
        self.hostname = hostname
        self.sysctls = dict(sysctls or {})
        self.shared.create()
        self.agent = FakeAgent()
        self.vm = FakeVm()

    async def stop(self) -> None:
        self.stopped = True
        self.shared.destroy()
        shutil.rmtree(self.run_dir, ignore_errors=True)
