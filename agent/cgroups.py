"""A container's cgroup, read for stats and its process list.

The guest mounts cgroup2 at /sys/fs/cgroup. cgroup v1 is read as a fallback
(a host running the agent for tests, where crun uses the v1 hierarchies).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NS_PER_USEC = 1000
# v1 reports "no limit" as the largest page-aligned value; anything this big is unlimited.
V1_UNLIMITED = 1 << 62


@dataclass
class CgroupStats:
    cpu_usage_ns: int = 0
    cpu_user_ns: int = 0
    cpu_system_ns: int = 0
    memory_usage_bytes: int = 0
    memory_limit_bytes: int = 0  # 0: unlimited
    memory_max_usage_bytes: int = 0
    memory_cache_bytes: int = 0
    memory_rss_bytes: int = 0
    pids_current: int = 0
    pids_limit: int = 0  # 0: unlimited
    oom_kills: int = 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _int(path: Path) -> int:
    """An integer file; "max" or a missing file is 0."""
    text = _read(path)
    if text is None:
        return 0
    text = text.strip()
    if text == "max" or not text:
        return 0
    try:
        return int(text)
    except ValueError:
        return 0


def _keyed(path: Path) -> dict[str, int]:
    """A flat keyed file (cpu.stat, memory.stat)."""
    values: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        try:
            values[key] = int(value)
        except ValueError:
            continue
    return values


class Cgroup:
    """The cgroup at ``relative`` (e.g. "husk/<id>") under the cgroup mount ``root``."""

    def __init__(self, root: Path, relative: str) -> None:
        self.root = root
        self.relative = relative.strip("/")

    @property
    def unified(self) -> bool:
        return (self.root / "cgroup.controllers").exists()

    def _v1_dir(self, controller: str) -> Path | None:
        # Hierarchies are named after their controllers, sometimes co-mounted ("cpu,cpuacct").
        candidates = [self.root / controller]
        try:
            candidates += [p for p in self.root.iterdir() if controller in p.name.split(",")]
        except OSError:
            return None
        for base in candidates:
            path = base / self.relative
            if path.is_dir():
                return path
        return None

    @property
    def exists(self) -> bool:
        if self.unified:
            return (self.root / self.relative).is_dir()
        return self._v1_dir("pids") is not None or self._v1_dir("memory") is not None

    def pids(self) -> list[int]:
        """Every process in the cgroup (cgroup.procs), as guest pids."""
        if self.unified:
            directory: Path | None = self.root / self.relative
        else:
            directory = self._v1_dir("pids") or self._v1_dir("memory")
        if directory is None:
            return []
        text = _read(directory / "cgroup.procs") or ""
        return [int(p) for p in text.split() if p.isdigit()]

    def oom_kills(self) -> int:
        """How many processes the OOM killer took in this cgroup so far."""
        if self.unified:
            return _keyed(self.root / self.relative / "memory.events").get("oom_kill", 0)
        memory = self._v1_dir("memory")
        if memory is None:
            return 0
        # memory.oom_control is "key value" lines too; oom_kill appeared in Linux 4.13.
        return _keyed(memory / "memory.oom_control").get("oom_kill", 0)

    def stats(self) -> CgroupStats:
        stats = self._stats_v2() if self.unified else self._stats_v1()
        stats.oom_kills = self.oom_kills()
        return stats

    def _stats_v2(self) -> CgroupStats:
        d = self.root / self.relative
        cpu = _keyed(d / "cpu.stat")
        memory = _keyed(d / "memory.stat")
        return CgroupStats(
            cpu_usage_ns=cpu.get("usage_usec", 0) * NS_PER_USEC,
            cpu_user_ns=cpu.get("user_usec", 0) * NS_PER_USEC,
            cpu_system_ns=cpu.get("system_usec", 0) * NS_PER_USEC,
            memory_usage_bytes=_int(d / "memory.current"),
            memory_limit_bytes=_int(d / "memory.max"),
            memory_max_usage_bytes=_int(d / "memory.peak"),
            memory_cache_bytes=memory.get("file", 0),
            memory_rss_bytes=memory.get("anon", 0),
            pids_current=_int(d / "pids.current"),
            pids_limit=_int(d / "pids.max"),
        )

    def _stats_v1(self) -> CgroupStats:
        stats = CgroupStats()
        cpuacct = self._v1_dir("cpuacct")
        if cpuacct is not None:
            stats.cpu_usage_ns = _int(cpuacct / "cpuacct.usage")
            ticks = _keyed(cpuacct / "cpuacct.stat")
            ns_per_tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
            stats.cpu_user_ns = ticks.get("user", 0) * ns_per_tick
            stats.cpu_system_ns = ticks.get("system", 0) * ns_per_tick
        memory = self._v1_dir("memory")
        if memory is not None:
            stats.memory_usage_bytes = _int(memory / "memory.usage_in_bytes")
            limit = _int(memory / "memory.limit_in_bytes")
            stats.memory_limit_bytes = 0 if limit >= V1_UNLIMITED else limit
            stats.memory_max_usage_bytes = _int(memory / "memory.max_usage_in_bytes")
            keyed = _keyed(memory / "memory.stat")
            stats.memory_cache_bytes = keyed.get("total_cache", keyed.get("cache", 0))
            stats.memory_rss_bytes = keyed.get("total_rss", keyed.get("rss", 0))
        pids = self._v1_dir("pids")
        if pids is not None:
            stats.pids_current = _int(pids / "pids.current")
            stats.pids_limit = _int(pids / "pids.max")
        return stats
