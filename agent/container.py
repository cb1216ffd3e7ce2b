"""One container: its bundle, init process, execs, state and crun calls.

State is explicit: created → running ⇄ paused, and stopped once the init has
exited (whatever the host asked before). A request in the wrong state fails
with FailedPreconditionError naming the state.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.cgroups import Cgroup, CgroupStats
from agent.config import AgentConfig
from agent.errors import (AlreadyExistsError, CommandError, DeadlineError,
                          FailedPreconditionError, NotFoundError)
from agent.process import Process, Reaper
from agent.runtime import Crun
from agent.stdio import ConsoleSocket, PipeSet, ProcessIO
from agent.storage import MountedStorage

log = logging.getLogger(__name__)

# RemoveContainer's wait for the init to die after crun delete --force.
DEFAULT_REMOVE_TIMEOUT_S = 10.0

_console_ids = itertools.count(1)

# crun gets either pipe ends for fds 0-2, or a console socket path.
Launch = Callable[[tuple[int, int, int] | None, Path | None], Awaitable[None]]


class ContainerState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Runtime:
    """What every container needs from the agent."""

    config: AgentConfig
    crun: Crun
    reaper: Reaper


async def _launch(runtime: Runtime, name: str, terminal: bool, run: Launch) -> ProcessIO:
    """Run a crun create/exec and return the agent's ends of the new process's stdio."""
    if not terminal:
        pipes = PipeSet.create()
        try:
            await run(pipes.child_fds, None)
        except BaseException:
            pipes.close_all()
            raise
        pipes.close_child_ends()
        return pipes.to_io(name)
    console = ConsoleSocket(runtime.config.console_dir / f"{next(_console_ids)}.sock")
    try:
        receiving = asyncio.create_task(console.receive())
        try:
            await run(None, console.path)
        except BaseException:
            receiving.cancel()
            with contextlib.suppress(BaseException):
                os.close(await receiving)
            raise
        master = await receiving
    finally:
        console.close()
    return ProcessIO.from_pty(name, master)


def _read_pid(pid_file: Path) -> int:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError) as e:
        raise CommandError(f"crun wrote no usable pid file {pid_file}: {e}") from e


class Container:
    """A container created by crun in this guest."""

    def __init__(self, runtime: Runtime, container_id: str, bundle: Path, init: Process,
                 volumes: list[MountedStorage]) -> None:
        self.id = container_id
        self.bundle = bundle
        self.init = init
        self.volumes = volumes
        self.execs: dict[str, Process] = {}
        self.cgroup = Cgroup(runtime.config.cgroup_root,
                             f"{runtime.config.cgroup_parent}/{container_id}")
        self._runtime = runtime
        self._crun = runtime.crun
        self._state = ContainerState.CREATED
        # Serializes lifecycle changes; waits, signals and stdio do not take it.
        self._lock = asyncio.Lock()
        init.exited.add_done_callback(self._on_init_exit)

    @classmethod
    async def create(cls, runtime: Runtime, container_id: str, spec: dict[str, Any],
                     volumes: list[MountedStorage]) -> Container:
        """Write the bundle and ``crun create``; the init waits for start.

        :raise CommandError: crun failed (the bundle is removed again).
        """
        bundle = runtime.config.bundles_dir / container_id
        shutil.rmtree(bundle, ignore_errors=True)  # a stale bundle from a failed remove
        bundle.mkdir(parents=True)
        try:
            (bundle / "config.json").write_text(json.dumps(spec))
            pid_file = bundle / "init.pid"
            terminal = bool(spec["process"].get("terminal", False))
            since = time.monotonic()

            async def run(stdio: tuple[int, int, int] | None, console: Path | None) -> None:
                await runtime.crun.create(container_id, bundle, pid_file, stdio=stdio,
                                          console_socket=console)

            io = await _launch(runtime, container_id, terminal, run)
            try:
                pid = _read_pid(pid_file)
            except BaseException:
                io.close()
                with contextlib.suppress(CommandError):
                    await runtime.crun.delete(container_id)
                raise
        except BaseException:
            shutil.rmtree(bundle, ignore_errors=True)
            raise
        init = Process(container_id, "", pid, io, runtime.reaper.watch(pid, since))
        log.info("created container %s: init pid %d%s", container_id, pid,
                 " (tty)" if terminal else "")
        return cls(runtime, container_id, bundle, init, volumes)

    # Section: state

    @property
    def state(self) -> ContainerState:
        return ContainerState.STOPPED if not self.init.running else self._state

    def _on_init_exit(self, fut: asyncio.Future[int]) -> None:
        if not fut.cancelled():
            log.info("container %s: init exited with status %d", self.id, fut.result())

    def _require(self, verb: str, *states: ContainerState) -> None:
        if self.state not in states:
            raise FailedPreconditionError(
                f"cannot {verb} container {self.id}: it is {self.state.value}")

    def process(self, exec_id: str) -> Process:
        """:raise NotFoundError: no such exec in this container."""
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFoundError(f"exec {exec_id!r} not found in container {self.id}") from None

    # Section: lifecycle

    async def start(self) -> int:
        async with self._lock:
            self._require("start", ContainerState.CREATED)
            await self._crun.start(self.id)
            self._state = ContainerState.RUNNING
            log.info("started container %s", self.id)
            return self.init.pid

    async def pause(self) -> None:
        async with self._lock:
            self._require("pause", ContainerState.RUNNING)
            await self._crun.pause(self.id)
            self._state = ContainerState.PAUSED

    async def resume(self) -> None:
        async with self._lock:
            self._require("resume", ContainerState.PAUSED)
            await self._crun.resume(self.id)
            self._state = ContainerState.RUNNING

    async def update(self, resources: dict[str, Any]) -> None:
        async with self._lock:
            self._require("update", ContainerState.CREATED, ContainerState.RUNNING,
                          ContainerState.PAUSED)
            path = self.bundle / "resources.json"
            path.write_text(json.dumps(resources))
            await self._crun.update(self.id, path)

    async def exec(self, exec_id: str, process: dict[str, Any]) -> Process:
        """Start ``process`` in the container (crun exec --detach).

        :raise AlreadyExistsError: an exec with this id is still running.
        """
        async with self._lock:
            self._require("exec in", ContainerState.RUNNING)
            self._collect_execs()
            old = self.execs.get(exec_id)
            if old is not None and old.running:
                raise AlreadyExistsError(f"exec {exec_id!r} already exists in container {self.id}")
            stem = self.bundle / f"exec-{exec_id}"
            process_file = stem.with_suffix(".json")
            pid_file = stem.with_suffix(".pid")
            log_file = stem.with_suffix(".log")
            process_file.write_text(json.dumps(process))
            terminal = bool(process.get("terminal", False))
            name = f"{self.id}/{exec_id}"
            since = time.monotonic()

            async def run(stdio: tuple[int, int, int] | None, console: Path | None) -> None:
                await self._crun.exec(self.id, process_file, pid_file, log_file, stdio=stdio,
                                      console_socket=console)

            try:
                io = await _launch(self._runtime, name, terminal, run)
                try:
                    pid = _read_pid(pid_file)
                except BaseException:
                    io.close()
                    raise
            finally:
                for path in (process_file, pid_file, log_file):
                    path.unlink(missing_ok=True)
            proc = Process(self.id, exec_id, pid, io, self._runtime.reaper.watch(pid, since))
            if old is not None:
                old.io.close()
            self.execs[exec_id] = proc
            log.info("exec %s in container %s: pid %d%s", exec_id, self.id, pid,
                     " (tty)" if terminal else "")
            return proc

    def _collect_execs(self) -> None:
        # There is no RPC to delete an exec: forget those the host is done with.
        for exec_id in [e for e, p in self.execs.items() if p.collectable]:
            self.execs.pop(exec_id).io.close()

    async def signal(self, exec_id: str, sig: int, all_processes: bool = False) -> None:
        """Signal the init or an exec directly (both are the agent's children, reaped
        by it: no pid reuse), or every process of the container through crun.

        Not `crun kill` for the init: what crun would do, minus running crun (~0.1 s
        under TCG, on every stop).

        :raise NotFoundError: the process already finished.
        """
        if exec_id or not all_processes:
            proc = self.process(exec_id) if exec_id else self.init
            try:
                proc.kill(sig)
            except ProcessLookupError:
                raise NotFoundError(f"process {proc.name} already finished") from None
            return
        try:
            await self._crun.kill(self.id, sig, all_processes=True)
        except CommandError:
            if self.init.running:
                raise  # else: nothing left to signal

    async def remove(self, timeout: float = DEFAULT_REMOVE_TIMEOUT_S) -> None:
        """Kill everything, ``crun delete --force``, close stdio, unmount volumes, drop the bundle."""
        await self.release(timeout)
        await self.forget()

    async def release(self, timeout: float = DEFAULT_REMOVE_TIMEOUT_S) -> None:
        """What the host waits for: the container's processes killed and gone, its
        stdio closed, its volumes unmounted (the host may unplug their disks next).
        forget() does the rest."""
        async with self._lock:
            procs = [self.init, *self.execs.values()]
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    if proc.running:
                        proc.kill(signal.SIGKILL)
            running = [p.exited for p in procs if p.running]
            if running:
                _, pending = await asyncio.wait(running, timeout=timeout or DEFAULT_REMOVE_TIMEOUT_S)
                if pending:
                    log.warning("container %s: %d processes did not exit after SIGKILL",
                                self.id, len(pending))
            for proc in procs:
                proc.io.close()
            for volume in reversed(self.volumes):
                try:
                    volume.unmount()
                except OSError as e:
                    log.warning("container %s: %s", self.id, e)
            self._state = ContainerState.STOPPED

    async def forget(self) -> None:
        """``crun delete --force`` (what is left in the container's cgroup is killed, its
        cgroup and crun's state go) and the bundle; logged, never raised."""
        async with self._lock:
            try:
                await self._crun.delete(self.id)
            except (CommandError, DeadlineError) as e:  # nobody awaits this to hear it
                log.warning("container %s: %s", self.id, e)
            shutil.rmtree(self.bundle, ignore_errors=True)
            log.info("removed container %s", self.id)

    # Section: inspection

    def stats(self) -> CgroupStats:
        """:raise FailedPreconditionError: the container has no cgroup (yet, or any more)."""
        if not self.cgroup.exists:
            raise FailedPreconditionError(f"container {self.id} has no cgroup to read stats from")
        return self.cgroup.stats()

    def pids(self) -> list[int]:
        return self.cgroup.pids()
