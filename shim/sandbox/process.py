"""A process as containerd sees it: a container's init or an exec.

State moves one way only, through _transition(): CREATED → RUNNING ⇄ PAUSED
→ STOPPED (or CREATED → STOPPED when it never started). Asking for an
operation in the wrong state raises FailedPreconditionError naming both.
"""
from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from shim import errors
from shim.sandbox.stdio import ProcessIO


class ProcessState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


_ALLOWED = {
    ProcessState.CREATED: {ProcessState.RUNNING, ProcessState.STOPPED},
    ProcessState.RUNNING: {ProcessState.PAUSED, ProcessState.STOPPED},
    ProcessState.PAUSED: {ProcessState.RUNNING, ProcessState.STOPPED},
    ProcessState.STOPPED: set(),
}


@dataclass
class Process:
    container_id: str
    exec_id: str
    io: ProcessIO
    spec: dict[str, Any] | None = None  # the OCI Process of an exec
    pid: int = 0                        # as reported to containerd (never 0 once created)
    guest_pid: int = 0
    state: ProcessState = ProcessState.CREATED
    exit_status: int = 0
    exited_at: Timestamp | None = None
    _exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id

    def require(self, *states: ProcessState, action: str) -> None:
        if self.state not in states:
            raise errors.FailedPreconditionError(
                f"cannot {action} {self.name}: it is {self.state.value}")

    def transition(self, new: ProcessState) -> None:
        if new not in _ALLOWED[self.state]:
            raise errors.FailedPreconditionError(
                f"{self.name} cannot go from {self.state.value} to {new.value}")
        self.state = new

    def set_exited(self, status: int) -> bool:
        """Record the exit once; False if it had already exited."""
        if self.state is ProcessState.STOPPED:
            return False
        self.state = ProcessState.STOPPED
        self.exit_status = status
        self.exited_at = Timestamp()
        self.exited_at.GetCurrentTime()
        self._exited.set()
        return True

    async def wait(self) -> tuple[int, Timestamp]:
        await self._exited.wait()
        assert self.exited_at is not None
        return self.exit_status, self.exited_at
