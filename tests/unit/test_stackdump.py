"""The SIGUSR1 stack dump: where each task is suspended, through its awaits."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from shim.util.stackdump import stack_dump

REPO = Path(__file__).resolve().parents[2]


async def _innermost(event: asyncio.Event) -> None:
    await event.wait()


async def _middle(event: asyncio.Event) -> None:
    await _innermost(event)


async def test_a_task_shows_the_coroutines_it_waits_in_and_what_it_awaits() -> None:
    event = asyncio.Event()
    task = asyncio.create_task(_middle(event), name="stuck-here")
    await asyncio.sleep(0)
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="parked-thread")
    thread.start()
    try:
        dump = stack_dump()
    finally:
        release.set()
        thread.join()
        event.set()
        await task
    after = dump.split("task stuck-here:\n", 1)[1].splitlines()
    lines = [line for line in after[:next((i for i, x in enumerate(after)
                                            if not x.startswith("  ")), len(after))]]
    assert "in _middle" in lines[0] and "in _innermost" in lines[1]
    assert any("in wait" in line for line in lines), "into asyncio.Event.wait"
    assert lines[-1].strip() == "awaiting a future"
    assert "thread parked-thread:" in dump
    parked = dump.split("thread parked-thread:", 1)[1].split("\nthread ", 1)[0]
    assert "in wait" in parked and "self._target" in parked


def test_sigusr1_logs_the_dump_and_the_daemon_goes_on(tmp_path: Path) -> None:
    """The handler as the daemon installs it, in a real process and a real signal."""
    script = (
        "import asyncio, logging, signal, sys\n"
        "from shim.util.stackdump import stack_dump\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "async def main():\n"
        "    loop = asyncio.get_running_loop()\n"
        "    loop.add_signal_handler(signal.SIGUSR1, lambda: logging.info('dump: %s', stack_dump()))\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.sleep(3)\n"
        "    print('still alive', flush=True)\n"
        "asyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "task Task-1:" in out and "in main" in out and "still alive" in out
