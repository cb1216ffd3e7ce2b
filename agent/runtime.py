"""crun, the OCI runtime: one async method per crun command the agent uses.

crun runs as our child (posix_spawn) and its exit is collected by the Reaper,
so there is never a second waiter. Commands whose stdio belongs to the
container (create, exec) report their errors through ``--log file:...``;
the others through a stderr pipe.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import CommandError, DeadlineError
from agent.process import Reaper, spawn
from agent.stdio import wait_fd

log = logging.getLogger(__name__)

CRUN_TIMEOUT_S = 60.0
# After crun exits, how long its output pipes may take to reach EOF (a child
# of crun that kept them open must not hang the request).
OUTPUT_GRACE_S = 1.0
ERROR_TEXT_MAX = 2000


async def _read_pipe(fd: int, sink: list[bytes]) -> None:
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                await wait_fd(fd)
                continue
            if not data:
                return
            sink.append(data)
    finally:
        os.close(fd)


def _error_text(raw: bytes) -> str:
    text = raw.decode(errors="replace").strip()
    return text[-ERROR_TEXT_MAX:]


async def run_program(reaper: Reaper, argv: Sequence[str], timeout: float, what: str, *,
                      stdio: tuple[int, int, int] | None = None,
                      log_file: Path | None = None, stdin: int | None = None) -> str:
    """Run a program of the guest (crun, mkfs...) as a child the Reaper collects.

    Its stdout is returned; its errors come from stderr, or from ``log_file``
    when the program writes them there (then ``stdio`` are its own streams).
    ``stdin``: what it reads (/dev/null without).

    :raise CommandError: it could not run, or exited non-zero (with its message).
    :raise DeadlineError: it did not finish within ``timeout`` (it is killed).
    """
    log.debug("running %s", " ".join(argv))
    out: list[bytes] = []
    err: list[bytes] = []
    readers: list[asyncio.Task[None]] = []
    since = time.monotonic()
    try:
        if log_file is not None:
            child = stdio or (None, None, None)
            pid = spawn(list(argv), stdin=child[0], stdout=child[1], stderr=child[2])
        else:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            try:
                pid = spawn(list(argv), stdin=stdin, stdout=out_w, stderr=err_w)
            except BaseException:
                os.close(out_r)
                os.close(err_r)
                raise
            finally:
                os.close(out_w)
                os.close(err_w)
            readers = [asyncio.create_task(_read_pipe(out_r, out)),
                       asyncio.create_task(_read_pipe(err_r, err))]
    except OSError as e:
        raise CommandError(f"cannot run {argv[0]}: {e}") from e
    exited = reaper.watch(pid, since)
    try:
        status = await asyncio.wait_for(asyncio.shield(exited), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await exited
        raise DeadlineError(f"{what} did not finish within {timeout:.0f} s") from None
    finally:
        if readers:
            _, pending = await asyncio.wait(readers, timeout=OUTPUT_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    if status != 0:
        if log_file is not None:
            try:
                raw = log_file.read_bytes()
            except OSError:
                raw = b""
        else:
            raw = b"".join(err)
        detail = _error_text(raw) or f"exit status {status}"
        raise CommandError(f"{what} failed: {detail}")
    return b"".join(out).decode(errors="replace")


@dataclass
class Crun:
    """``crun --root <root> ...`` for the containers of this guest."""

    binary: str
    root: Path
    reaper: Reaper
    timeout: float = CRUN_TIMEOUT_S

    async def _run(self, args: Sequence[str], *, stdio: tuple[int, int, int] | None = None,
                   log_file: Path | None = None) -> str:
        """Run one crun command; returns its stdout.

        :raise CommandError: crun exited non-zero (the message is crun's own).
        :raise DeadlineError: crun did not finish in time (it is killed).
        """
        argv = [self.binary, "--root", str(self.root)]
        if log_file is not None:
            log_file.unlink(missing_ok=True)
            argv += ["--log", f"file:{log_file}"]
        return await run_program(self.reaper, [*argv, *args], self.timeout, f"crun {args[0]}",
                                 stdio=stdio, log_file=log_file)

    async def create(self, container_id: str, bundle: Path, pid_file: Path, *,
                     stdio: tuple[int, int, int] | None = None,
                     console_socket: Path | None = None) -> None:
        """``crun create``: the init waits in crun's exec fifo until start."""
        args = ["create", "--bundle", str(bundle), "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        await self._run([*args, container_id], stdio=stdio, log_file=bundle / "crun-create.log")

    async def start(self, container_id: str) -> None:
        await self._run(["start", container_id])

    async def exec(self, container_id: str, process_file: Path, pid_file: Path, log_file: Path, *,
                   stdio: tuple[int, int, int] | None = None,
                   console_socket: Path | None = None) -> None:
        """``crun exec --detach``: returns once the process runs; it becomes our child."""
        args = ["exec", "--process", str(process_file), "--detach", "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--tty", "--console-socket", str(console_socket)]
        await self._run([*args, container_id], stdio=stdio, log_file=log_file)

    async def kill(self, container_id: str, sig: int, all_processes: bool = False) -> None:
        args = ["kill", "--all"] if all_processes else ["kill"]
        await self._run([*args, container_id, str(sig)])

    async def delete(self, container_id: str) -> None:
        """``crun delete --force``: kills what is left and removes the state and cgroup."""
        await self._run(["delete", "--force", container_id])

    async def pause(self, container_id: str) -> None:
        await self._run(["pause", container_id])

    async def resume(self, container_id: str) -> None:
        await self._run(["resume", container_id])

    async def update(self, container_id: str, resources_file: Path) -> None:
        await self._run(["update", "--resources", str(resources_file), container_id])

    async def version(self) -> str:
        """The first line of ``crun --version`` (e.g. "crun version 1.8.1")."""
        out = await self._run(["--version"])
        return out.splitlines()[0].strip() if out.strip() else ""
