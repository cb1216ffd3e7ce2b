"""The guest's own figures for `husk monitor`, read from /proc and /sys (agent/metrics.py)."""
from __future__ import annotations

from pathlib import Path

from agent.metrics import NS_PER_S, TICKS_PER_S, guest_usage


def _tree(tmp_path: Path, files: dict[str, str]) -> tuple[Path, Path]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "proc", tmp_path / "sys"


def test_reads_memory_cpu_load_and_cpus(tmp_path: Path) -> None:
    proc, sys = _tree(tmp_path, {
        "proc/meminfo": "MemTotal:  1000 kB\nMemFree:  300 kB\nMemAvailable:  600 kB\n",
        "proc/stat": "cpu  10 2 30 400 5 1 1 7 0 0\ncpu0 10 2 30 400 5 1 1 7 0 0\nintr 1\n",
        "proc/loadavg": "0.50 0.25 0.10 2/123 4567\n",
        "proc/uptime": "42.5 80.0\n",
        "sys/devices/system/cpu/online": "0-2,5\n",
    })
    usage = guest_usage(proc, sys)
    tick = NS_PER_S // TICKS_PER_S
    assert (usage.memory_total_bytes, usage.memory_free_bytes, usage.memory_available_bytes) == \
        (1000 * 1024, 300 * 1024, 600 * 1024)
    assert usage.cpu_user_ns == 12 * tick       # user + nice
    assert usage.cpu_system_ns == 32 * tick     # system + irq + softirq
    assert (usage.cpu_idle_ns, usage.cpu_iowait_ns, usage.cpu_steal_ns) == \
        (400 * tick, 5 * tick, 7 * tick)
    assert (usage.load1, usage.load5, usage.load15, usage.processes) == (0.5, 0.25, 0.1, 123)
    assert usage.online_cpus == 4
    assert usage.uptime_s == 42.5


def test_missing_or_garbled_files_give_zeros_not_errors(tmp_path: Path) -> None:
    proc, sys = _tree(tmp_path, {"proc/loadavg": "garbage\n", "proc/stat": "cpu x y\n",
                                 "proc/uptime": ""})
    usage = guest_usage(proc, sys)
    assert usage.memory_total_bytes == 0 and usage.load1 == 0.0 and usage.online_cpus == 0
