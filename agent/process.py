"""Child processes: spawning them, the single reaper, and the process records.

The agent is PID 1 in the guest (or a child subreaper), so every orphan ends up
as its child: crun itself, container inits and exec'd processes after crun
exits, and anything a container leaves behind. One SIGCHLD handler collects
every status with waitpid(-1) and hands it to whoever watches that pid. Nothing
else may wait for children: no Popen.wait(), no asyncio child watcher, or the
two would steal each other's statuses.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agent.stdio import ProcessIO

log = logging.getLogger(__name__)

# Statuses nobody watches yet: an exec that exited before its pid file was
# read, or an orphan nobody will ever ask about. Bounded in count and age.
UNCLAIMED_MAX = 4096
UNCLAIMED_TTL_S = 300.0
# Signals Python ignores that a spawned program must get back at their default.
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


def exit_status(wait_status: int) -> int:
    """The shell convention: the exit code, or 128+N when killed by signal N."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    return 255


def spawn(argv: Sequence[str], *, stdin: int | None = None, stdout: int | None = None,
          stderr: int | None = None, env: Mapping[str, str] | None = None,
          terminal: str | None = None, new_session: bool = False) -> int:
    """Start ``argv`` with the given fds as 0/1/2 (None: /dev/null); returns the pid.

    posix_spawn keeps no Python-side record of the child (unlike Popen), so the
    reaper is the only one ever waiting for it. Our own fds are close-on-exec,
    so the child inherits exactly the three it is given.

    ``new_session``: the child leads a session and process group of its own
    (killpg ends everything it started). ``terminal`` (a pty slave's path)
    implies it and gives the child that terminal as 0/1/2 and as its
    controlling tty: glibc runs setsid() before the file actions, and opening
    a tty then acquires it.
    """
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = []
    if terminal is not None:
        actions = [(os.POSIX_SPAWN_OPEN, 0, terminal, os.O_RDWR, 0),
                   (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)]
    else:
        for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
            if fd is None:
                actions.append((os.POSIX_SPAWN_OPEN, target, os.devnull, os.O_RDWR, 0))
            else:
                actions.append((os.POSIX_SPAWN_DUP2, fd, target))
    return os.posix_spawnp(argv[0], list(argv), dict(os.environ if env is None else env),
                           file_actions=actions, setsigdef=RESET_SIGNALS, setsigmask=(),
                           setsid=new_session or terminal is not None)


@dataclass
class _Unclaimed:
    status: int
    reaped_at: float


class Reaper:
    """Collects every child's exit status and hands it to the pid's watcher."""

    def __init__(self) -> None:
        self._watchers: dict[int, asyncio.Future[int]] = {}
        self._unclaimed: OrderedDict[int, _Unclaimed] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Install the SIGCHLD handler on the running loop (main thread only)."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # children that exited before the handler existed

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def watch(self, pid: int, since: float) -> asyncio.Future[int]:
        """A future for ``pid``'s exit status (128+N for a signal).

        ``since`` is a time.monotonic() taken before the pid could have existed
        (before spawning it, or the crun that forked it): an unclaimed status
        older than that belongs to an earlier process that had the same pid.
        """
        if pid in self._watchers:
            return self._watchers[pid]
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        kept = self._unclaimed.pop(pid, None)
        if kept is not None and kept.reaped_at >= since:
            fut.set_result(kept.status)
        else:
            self._watchers[pid] = fut
        return fut

    def forget(self, pid: int) -> None:
        """Stop watching ``pid`` (its future is cancelled)."""
        fut = self._watchers.pop(pid, None)
        if fut is not None and not fut.done():
            fut.cancel()

    def reap(self) -> None:
        """Collect every exited child now; the SIGCHLD handler."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            status = exit_status(wait_status)
            fut = self._watchers.pop(pid, None)
            if fut is not None:
                log.debug("reaped pid %d: status %d", pid, status)
                if not fut.done():
                    fut.set_result(status)
            else:
                log.debug("reaped unwatched pid %d: status %d", pid, status)
                self._keep(pid, status)

    def _keep(self, pid: int, status: int) -> None:
        now = time.monotonic()
        self._unclaimed.pop(pid, None)
        self._unclaimed[pid] = _Unclaimed(status, now)
        while self._unclaimed:
            oldest_pid, oldest = next(iter(self._unclaimed.items()))
            if len(self._unclaimed) <= UNCLAIMED_MAX and now - oldest.reaped_at < UNCLAIMED_TTL_S:
                break
            del self._unclaimed[oldest_pid]


@dataclass(eq=False)
class Process:
    """A container's init (exec_id "") or exec'd process, as the host sees it."""

    container_id: str
    exec_id: str
    pid: int
    io: ProcessIO
    exited: asyncio.Future[int]
    # Set once a WaitProcess has returned the status to the host.
    waited: bool = field(default=False)

    @property
    def name(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id

    @property
    def running(self) -> bool:
        return not self.exited.done()

    async def wait(self) -> int:
        status = await asyncio.shield(self.exited)
        self.waited = True
        return status

    def kill(self, sig: int) -> None:
        """Signal the process; safe against pid reuse because it is our unreaped child.

        The reaper runs on this same loop, so while ``exited`` is not done the pid
        is still ours (alive or a zombie).
        """
        if not self.running:
            raise ProcessLookupError(self.pid)
        os.kill(self.pid, sig)

    @property
    def collectable(self) -> bool:
        """The host has everything: the exit status and both output streams."""
        return not self.running and self.waited and self.io.drained
