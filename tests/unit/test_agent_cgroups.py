"""Container stats from cgroup files (agent/cgroups.py), on fake v2 and v1 trees."""
from __future__ import annotations

import os
from pathlib import Path

from agent.cgroups import Cgroup


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_stats(tmp_path: Path) -> None:
    """What the guest reads: cgroup2 at /sys/fs/cgroup, the container at husk/<id>."""
    write(tmp_path / "cgroup.controllers", "cpu memory pids io\n")
    c = tmp_path / "husk" / "c1"
    write(c / "cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n")
    write(c / "memory.current", "4096\n")
    write(c / "memory.max", "max\n")
    write(c / "memory.peak", "8192\n")
    write(c / "memory.stat", "anon 3000\nfile 1000\nkernel 96\n")
    write(c / "pids.current", "3\n")
    write(c / "pids.max", "100\n")
    write(c / "cgroup.procs", "10\n11\n12\n")
    cgroup = Cgroup(tmp_path, "husk/c1")
    assert cgroup.unified and cgroup.exists
    s = cgroup.stats()
    assert (s.cpu_usage_ns, s.cpu_user_ns, s.cpu_system_ns) == (1_500_000, 1_000_000, 500_000)
    assert (s.memory_usage_bytes, s.memory_limit_bytes, s.memory_max_usage_bytes) == (4096, 0, 8192)
    assert (s.memory_rss_bytes, s.memory_cache_bytes) == (3000, 1000)
    assert (s.pids_current, s.pids_limit) == (3, 100)
    assert cgroup.pids() == [10, 11, 12]
    write(c / "memory.max", "1048576\n")
    (c / "memory.peak").unlink()  # kernels before 5.19 have none
    s = cgroup.stats()
    assert s.memory_limit_bytes == 1048576 and s.memory_max_usage_bytes == 0
    assert not Cgroup(tmp_path, "husk/other").exists


def test_cgroup_v1_stats(tmp_path: Path) -> None:
    """The host fallback: one hierarchy per controller, cpu and cpuacct co-mounted."""
    (tmp_path / "cpu,cpuacct").mkdir()
    os.symlink("cpu,cpuacct", tmp_path / "cpuacct")
    write(tmp_path / "cpu,cpuacct" / "t" / "c1" / "cpuacct.usage", "777\n")
    write(tmp_path / "cpu,cpuacct" / "t" / "c1" / "cpuacct.stat", "user 2\nsystem 1\n")
    m = tmp_path / "memory" / "t" / "c1"
    write(m / "memory.usage_in_bytes", "5000\n")
    write(m / "memory.limit_in_bytes", "9223372036854771712\n")
    write(m / "memory.max_usage_in_bytes", "6000\n")
    write(m / "memory.stat", "cache 10\nrss 20\ntotal_cache 11\ntotal_rss 21\n")
    p = tmp_path / "pids" / "t" / "c1"
    write(p / "pids.current", "2\n")
    write(p / "pids.max", "max\n")
    write(p / "cgroup.procs", "5\n6\n")
    cgroup = Cgroup(tmp_path, "/t/c1")
    assert not cgroup.unified and cgroup.exists
    s = cgroup.stats()
    tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    assert (s.cpu_usage_ns, s.cpu_user_ns, s.cpu_system_ns) == (777, 2 * tick_ns, tick_ns)
    assert (s.memory_usage_bytes, s.memory_limit_bytes, s.memory_max_usage_bytes) == (5000, 0, 6000)
    assert (s.memory_cache_bytes, s.memory_rss_bytes) == (11, 21)
    assert (s.pids_current, s.pids_limit) == (2, 0)
    assert cgroup.pids() == [5, 6]


def test_oom_kill_counters(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    write(v2 / "cgroup.controllers", "memory\n")
    write(v2 / "husk" / "c1" / "memory.events", "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    assert Cgroup(v2, "husk/c1").oom_kills() == 1
    assert Cgroup(v2, "husk/gone").oom_kills() == 0
    v1 = tmp_path / "v1"
    write(v1 / "memory" / "husk" / "c1" / "memory.oom_control",
          "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert Cgroup(v1, "husk/c1").oom_kills() == 2
