"""Helper processes: their own output goes to a capped file, and never blocks them."""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from shim.util import child
from shim.util.cappedfile import FILE_CAP_BYTES
from tests.conftest import open_files


async def test_a_chatty_child_is_capped_and_not_blocked(tmp_path: Path) -> None:
    log_path = tmp_path / "qemu.log"
    before = open_files()
    script = ("import sys\n"
              "for i in range(40000): sys.stderr.write(f'warning {i:06d} ' + 'x' * 80 + '\\n')\n"
              "sys.stderr.write('last words\\n')\n")
    proc = await child.spawn([sys.executable, "-c", script], log_path)
    assert await asyncio.wait_for(proc.wait(), 30) == 0, "the child blocked on its stderr"
    for _ in range(1000):  # the pipe's EOF arrives after the exit (later on a busy host)
        if log_path not in child._logs:
            break
        await asyncio.sleep(0.01)
    size = log_path.stat().st_size
    assert 0 < size <= FILE_CAP_BYTES
    text = log_path.read_text()
    assert text.startswith("warning 000000") and "dropped" in text
    assert open_files() - before == set(), "the log's pipe or file is still open"


async def test_the_tail_includes_what_is_still_in_the_pipe(tmp_path: Path) -> None:
    log_path = tmp_path / "virtiofsd.log"
    proc = await child.spawn(["sh", "-c", "echo first; echo 'cannot open the socket' >&2"],
                             log_path)
    await proc.wait()
    # No chance for the loop to run the reader yet: log_tail drains the pipe itself.
    assert child.log_tail(log_path).endswith("cannot open the socket")


async def test_a_child_can_be_kept_from_transparent_huge_pages_across_exec(
        tmp_path: Path) -> None:
    """QEMU under TCG: the flag must survive the exec, which only prctl's does."""
    script = "grep THP_enabled /proc/self/status"
    seen = {}
    for huge_pages in (True, False):
        log_path = tmp_path / f"huge-{huge_pages}.log"
        proc = await child.spawn(["sh", "-c", script], log_path, huge_pages=huge_pages)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        for _ in range(1000):
            if log_path not in child._logs:
                break
            await asyncio.sleep(0.01)
        seen[huge_pages] = log_path.read_text().split()
    assert seen == {True: ["THP_enabled:", "1"], False: ["THP_enabled:", "0"]}
