"""A host process's CPU time and memory (RSS, and PSS when asked: it costs a page walk)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
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
