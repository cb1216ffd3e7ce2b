"""The guest's own usage for `husk monitor`: memory, CPU time, load, from /proc.

Read on each scrape (a few small files); nothing is kept between scrapes.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
# /proc/stat counts in USER_HZ ticks.
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# /proc/stat's "cpu" line: user nice system idle iowait irq softirq steal ...
STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


@dataclass
class GuestUsage:
    memory_total_bytes: int = 0
    memory_available_bytes: int = 0
    memory_free_bytes: int = 0
    cpu_user_ns: int = 0
    cpu_system_ns: int = 0
    cpu_idle_ns: int = 0
    cpu_iowait_ns: int = 0
    cpu_steal_ns: int = 0
    load1: float = 0.0
    load5: float = 0.0
    load15: float = 0.0
    online_cpus: int = 0
    processes: int = 0
    uptime_s: float = 0.0


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        log.debug("metrics: cannot read %s: %s", path, exc)
        return ""


def _meminfo(text: str, usage: GuestUsage) -> None:
    wanted = {"MemTotal": "memory_total_bytes", "MemAvailable": "memory_available_bytes",
              "MemFree": "memory_free_bytes"}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in wanted and (fields := rest.split()) and fields[0].isdigit():
            setattr(usage, wanted[key], int(fields[0]) * 1024)


def _cpu(text: str, usage: GuestUsage) -> None:
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = dict(zip(STAT_FIELDS, (int(v) for v in fields[1:] if v.isdigit())))
            ns = NS_PER_S // TICKS_PER_S
            usage.cpu_user_ns = (ticks.get("user", 0) + ticks.get("nice", 0)) * ns
            usage.cpu_system_ns = (ticks.get("system", 0) + ticks.get("irq", 0)
                                   + ticks.get("softirq", 0)) * ns
            usage.cpu_idle_ns = ticks.get("idle", 0) * ns
            usage.cpu_iowait_ns = ticks.get("iowait", 0) * ns
            usage.cpu_steal_ns = ticks.get("steal", 0) * ns
            return


def _loadavg(text: str, usage: GuestUsage) -> None:
    # "0.00 0.01 0.05 1/123 4567": three averages, running/total tasks, last pid.
    fields = text.split()
    try:
        usage.load1, usage.load5, usage.load15 = (float(v) for v in fields[:3])
        usage.processes = int(fields[3].partition("/")[2])
    except (ValueError, IndexError):
        pass


def _online_cpus(text: str) -> int:
    """Count a cpulist like "0-3,6"."""
    count = 0
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            count += int(high or low) - int(low) + 1
    return count


def guest_usage(proc: Path = Path("/proc"), sysfs: Path = Path("/sys")) -> GuestUsage:
    usage = GuestUsage()
    _meminfo(_read(proc / "meminfo"), usage)
    _cpu(_read(proc / "stat"), usage)
    _loadavg(_read(proc / "loadavg"), usage)
    usage.online_cpus = _online_cpus(_read(sysfs / "devices/system/cpu/online"))
    try:
        usage.uptime_s = float(_read(proc / "uptime").split()[0])
    except (ValueError, IndexError):
        pass
    return usage
