"""make bench-monitor: what `husk monitor`'s scrapes cost N idle husk pods.

Starts N pods (BENCH_PODS, default 10) with one idle busybox container each and
`husk monitor` for them, then alternates windows of WINDOW_S seconds: one
without scrapes, one scraped every SCRAPE_INTERVAL_S (Prometheus scrapes every
15-60 s; this is far more often). In each window it adds up the CPU time of
every pod's host processes (shim, QEMU, virtiofsd). Per scrape: its wall time,
the extra CPU the pods spent on it (scraped window minus quiet window, over the
scrapes and pods), and the monitor's own CPU. Medians of BENCH_RUNS window
pairs (default 3), as JSON.

The pods' shims are found by their run directories; runc plays no part here.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from tests.bench import emit, machine
from tests.bench.density import SETTLE_S
from tests.conftest import write_test_config
from tests.cri.harness import DEFAULT_BIN_DIR, Containerd, ContainerdOptions, scratch_dirs
from tests.cri.images import BUSYBOX_REF, build_images

PODS = int(os.environ.get("BENCH_PODS", "10"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
WINDOW_S = 20.0
SCRAPE_INTERVAL_S = 2.0
PORT = 18090


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def _pod_processes(state: Path) -> list[psutil.Process]:
    """Every shim, QEMU and virtiofsd whose command line names a run dir below ``state``."""
    marker = str(state / "sb")
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if marker in cmd or ("containerd-shim-husk" in cmd and "-id" in cmd):
            found.append(proc)
    return found


def _window(procs: list[psutil.Process], monitor: psutil.Process, url: str | None
            ) -> tuple[float, float, list[float]]:
    """(pods' CPU s, monitor's CPU s, scrape wall times) over one window."""
    pods_before, monitor_before = _cpu_seconds(procs), _cpu_seconds([monitor])
    durations = []
    end = time.monotonic() + WINDOW_S
    while time.monotonic() < end:
        if url is not None:
            started = time.monotonic()
            with urllib.request.urlopen(url, timeout=30) as reply:
                reply.read()
            durations.append(time.monotonic() - started)
        time.sleep(max(0.0, min(SCRAPE_INTERVAL_S, end - time.monotonic())))
    return (_cpu_seconds(procs) - pods_before, _cpu_seconds([monitor]) - monitor_before,
            durations)


def main() -> int:
    with scratch_dirs("bmon") as (work, state):
        config = write_test_config(work / "husk.toml", state, templates=True)
        options = ContainerdOptions(images=build_images(), husk_config=config, log_level="info")
        with Containerd.started(options) as cd:
            def bring_up(i: int) -> str:
                pod = cd.cri.run_pod(f"scraped-{i}", handler="husk", timeout=600)
                cd.cri.run_container(pod, BUSYBOX_REF, ["sleep", "3600"], timeout=600)
                return pod.id

            with ThreadPoolExecutor(PODS) as pool:
                pods = list(pool.map(bring_up, range(PODS)))
            monitor = subprocess.Popen([str(DEFAULT_BIN_DIR / "husk"), "--config", str(config),
                                        "monitor", "--listen", f"127.0.0.1:{PORT}"])
            try:
                time.sleep(SETTLE_S)
                url = f"http://127.0.0.1:{PORT}/metrics"
                procs, watcher = _pod_processes(state), psutil.Process(monitor.pid)
                extra_ms, monitor_ms, scrape_ms = [], [], []
                for i in range(RUNS):
                    quiet_cpu, quiet_monitor, _ = _window(procs, watcher, None)
                    busy_cpu, busy_monitor, durations = _window(procs, watcher, url)
                    scrapes = len(durations)
                    extra_ms.append((busy_cpu - quiet_cpu) / scrapes / PODS * 1000)
                    monitor_ms.append((busy_monitor - quiet_monitor) / scrapes * 1000)
                    scrape_ms.append(statistics.median(durations) * 1000)
                    print(f"round {i + 1}/{RUNS}: quiet {quiet_cpu:.2f} CPU-s, scraped "
                          f"{busy_cpu:.2f} CPU-s over {scrapes} scrapes", file=sys.stderr)
            finally:
                monitor.terminate()
                monitor.wait(timeout=10)
                with ThreadPoolExecutor(PODS) as pool:
                    list(pool.map(cd.cri.stop_and_remove_pod, pods))
        emit({"benchmark": "monitor", "pods": PODS, "runs": RUNS, "window_s": WINDOW_S,
              "scrape_interval_s": SCRAPE_INTERVAL_S,
              "scrape_wall_ms_median": round(statistics.median(scrape_ms), 1),
              "pods_cpu_ms_per_scrape_per_pod_median": round(statistics.median(extra_ms), 2),
              "monitor_cpu_ms_per_scrape_median": round(statistics.median(monitor_ms), 1),
              "machine": machine(state)},
             Path(__file__).resolve().parents[2] / "build" / "bench" / "monitor.json")
        return 0


if __name__ == "__main__":
    sys.exit(main())
