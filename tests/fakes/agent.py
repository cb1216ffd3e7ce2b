"""FakeAgent: the AgentClient surface, in memory, with scripted processes.

A process "runs" until signalled or until the test calls exit(); its output
is whatever the test queued with emit().
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from shim import errors
from shim.agentclient.client import ContainerStats


@dataclass
class FakeProcess:
    pid: int
    spec: dict[str, Any]
    stdout: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    stderr: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    stdin: bytearray = field(default_factory=bytearray)
    stdin_closed: bool = False
    status: int | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    winsize: tuple[int, int] = (0, 0)


class FakeAgent:
    def __init__(self) -> None:
        self.procs: dict[tuple[str, str], FakeProcess] = {}
        self.removed: list[str] = []
        self.paused: set[str] = set()
        self.signals: list[tuple[str, str, int, bool]] = []
        # Containers whose processes survive every signal (a guest that cannot end them).
        self.unkillable: set[str] = set()
        self._next_pid = 100
        self.oom_events: asyncio.Queue[str] = asyncio.Queue()
        self.oom_kills: dict[str, int] = {}
        self.answering = True

    def _new(self, key: tuple[str, str], spec: dict[str, Any]) -> int:
        self._next_pid += 1
        self.procs[key] = FakeProcess(self._next_pid, spec)
        return self._next_pid

    def proc(self, container_id: str, exec_id: str = "") -> FakeProcess:
        try:
            return self.procs[(container_id, exec_id)]
        except KeyError:
            raise errors.NotFoundError(f"agent: {container_id}/{exec_id} not found") from None

    # Test controls
    def emit(self, container_id: str, data: bytes, exec_id: str = "", stderr: bool = False
             ) -> None:
        p = self.proc(container_id, exec_id)
        (p.stderr if stderr else p.stdout).put_nowait(data)

    def exit(self, container_id: str, status: int, exec_id: str = "") -> None:
        p = self.proc(container_id, exec_id)
        if p.status is None:
            p.status = status
            p.stdout.put_nowait(None)
            p.stderr.put_nowait(None)
            p.exited.set()

    # AgentClient surface
    async def create_container(self, container_id: str, spec: dict[str, Any],
                               storages: Any = (), close_stdin: bool = False) -> int:
        if (container_id, "") in self.procs:
            raise errors.AlreadyExistsError(f"agent: {container_id} exists")
        pid = self._new((container_id, ""), spec)
        self.proc(container_id).stdin_closed = close_stdin
        return pid

    async def start_container(self, container_id: str) -> int:
        return self.proc(container_id).pid

    async def exec_process(self, container_id: str, exec_id: str, process: dict[str, Any],
                           close_stdin: bool = False) -> int:
        self.proc(container_id)
        pid = self._new((container_id, exec_id), process)
        self.proc(container_id, exec_id).stdin_closed = close_stdin
        return pid

    async def signal_process(self, container_id: str, exec_id: str, signal: int,
                             all_processes: bool = False) -> None:
        self.signals.append((container_id, exec_id, signal, all_processes))
        if container_id in self.unkillable:
            return
        self.exit(container_id, 128 + signal, exec_id)

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        return (await self.wait_exit(container_id, exec_id))[0]

    async def wait_exit(self, container_id: str, exec_id: str) -> tuple[int, int]:
        p = self.proc(container_id, exec_id)
        await p.exited.wait()
        assert p.status is not None
        return p.status, 0 if exec_id else self.oom_kills.get(container_id, 0)

    async def read_output(self, container_id: str, exec_id: str, stderr: bool = False
                          ) -> AsyncIterator[bytes]:
        p = self.proc(container_id, exec_id)
        queue = p.stderr if stderr else p.stdout
        while (chunk := await queue.get()) is not None:
            yield chunk

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        self.proc(container_id, exec_id).stdin += data
        return len(data)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        self.proc(container_id, exec_id).stdin_closed = True

    async def tty_resize(self, container_id: str, exec_id: str, rows: int, columns: int
                         ) -> None:
        self.proc(container_id, exec_id).winsize = (rows, columns)

    async def remove_container(self, container_id: str, timeout_s: int = 10) -> None:
        self.removed.append(container_id)

    async def pause_container(self, container_id: str) -> None:
        self.paused.add(container_id)

    async def resume_container(self, container_id: str) -> None:
        self.paused.discard(container_id)

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        self.proc(container_id).spec["updated"] = resources

    async def list_processes(self, container_id: str) -> list[int]:
        return [p.pid for (c, _), p in self.procs.items() if c == container_id]

    async def stats_container(self, container_id: str) -> ContainerStats:
        self.proc(container_id)
        return ContainerStats(5000, 3000, 2000, 1 << 20, 1 << 30, 2 << 20, 4096, 8192, 3, 100,
                              oom_kills=self.oom_kills.get(container_id, 0))

    async def check(self, timeout_s: float) -> None:
        if not self.answering:  # a wedged agent: the real client's deadline passes
            await asyncio.sleep(timeout_s)
            raise errors.DeadlineExceededError("agent Check: DEADLINE_EXCEEDED")

    async def get_oom_event(self) -> str:
        return await self.oom_events.get()

    async def destroy_sandbox(self, sandbox_id: str, timeout_s: float | None = None) -> None:
        pass

    async def close(self) -> None:
        pass
