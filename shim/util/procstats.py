"""A host process's CPU time and memory (RSS, and PSS when asked: it costs a page walk)."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


@dataclass(frozen=True)
class ProcessUsage:
    cpu_user_s: float
    cpu_system_s: float
    rss_bytes: int
    # Proportional set size: shared pages divided among their users (smaps_rollup);
    # 0 when not asked for.
    pss_bytes: int = 0


def process_usage(pid: int, pss: bool = False) -> ProcessUsage | None:
    """None when the process is gone (or was never there: pid 0)."""
    if pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            times = proc.cpu_times()
            if pss:
                full = proc.memory_full_info()
                rss, pss_bytes = full.rss, full.pss
            else:
                rss, pss_bytes = proc.memory_info().rss, 0
    except psutil.Error:
        return None
    return ProcessUsage(times.user, times.system, rss, pss_bytes)


def host_usage(pids: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Usage (with PSS) of each named process that exists, as plain dicts."""
    found = {name: process_usage(pid, pss=True) for name, pid in pids.items()}
    return {name: dataclasses.asdict(usage) for name, usage in found.items() if usage}


def memfd_bytes(pid: int, seen: set[int]) -> int:
    """Bytes allocated in the memfds ``pid`` holds open (a VM's guest RAM), each inode
    once across calls sharing ``seen``. Unlike RSS, this counts pages no process has
    touched since they were written (a restored guest's RAM, copied in by the shim)."""
    total = 0
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return 0
    for fd in fds:
        try:
            if not os.readlink(fd).startswith("/memfd:"):
                continue
            st = fd.stat()
        except OSError:
            continue  # closed meanwhile
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total


def private_rss_bytes(pid: int) -> int:
    """Resident anonymous and file pages, leaving out shared memory (``RssShmem``: the
    guest RAM QEMU and virtiofsd map, which memfd_bytes counts once); 0 when gone."""
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total


def vm_memory_bytes(pids: Iterable[int]) -> int:
    """What a VM's host processes (QEMU, virtiofsd) hold: their private RSS and the
    guest RAM in their memfds, shared pages counted once."""
    seen: set[int] = set()
    return sum(private_rss_bytes(pid) + memfd_bytes(pid, seen) for pid in pids)


def mergeable_rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid``'s mappings marked for KSM (VmFlags "mg": QEMU's private
    guest RAM), from /proc/<pid>/smaps; 0 when gone."""
    total = rss = 0
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmFlags:") and "mg" in line.split()[1:]:
                    total += rss
    except (OSError, ValueError, IndexError):
        return 0
    return total
