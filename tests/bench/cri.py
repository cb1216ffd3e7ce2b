"""make bench-cri: pod operations through the CRI, husk against runc on one containerd.

For each handler, RUNS rounds (medians printed as JSON): RunPodSandbox,
CreateContainer+StartContainer, an ExecSync round trip, and
StopPodSandbox+RemovePodSandbox; for husk also the RSS of the shim daemon,
QEMU and virtiofsd of a running pod.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil

from tests.bench import emit, machine, medians
from tests.conftest import write_test_config
from tests.cri.cri import CriClient
from tests.cri.harness import Containerd, ContainerdOptions, scratch_dirs
from tests.cri.images import BUSYBOX_REF, build_images

RUNS = 5
HANDLERS = ("runc", "husk")
STEPS = ("run_pod_s", "create_start_s", "exec_sync_s", "stop_remove_pod_s")


def _rss_mib(marker: str, name: str) -> float:
    """Summed RSS of processes called ``name`` whose command line mentions ``marker``."""
    total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if name in cmd and marker in cmd and proc.info["memory_info"]:
            total += proc.info["memory_info"].rss
    return round(total / (1 << 20), 1)


def _shim_rss_mib(pod_id: str) -> float:
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = proc.info["cmdline"] or []
        if "serve" in cmd and "-id" in cmd and pod_id in cmd and proc.info["memory_info"]:
            return round(proc.info["memory_info"].rss / (1 << 20), 1)
    return 0.0


def one_round(cri: CriClient, handler: str, state: Path, index: int) -> dict[str, float]:
    t0 = time.monotonic()
    pod = cri.run_pod(f"bench-{handler}-{index}", handler=handler)
    t1 = time.monotonic()
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
    t2 = time.monotonic()
    result = cri.exec_sync(cid, ["echo", "pong"])
    t3 = time.monotonic()
    assert result.out == "pong\n", result
    sample = {}
    if handler == "husk":
        marker = str(state / "sb" / pod.id)
        sample = {"shim_rss_mib": _shim_rss_mib(pod.id),
                  "qemu_rss_mib": _rss_mib(marker, "qemu-system"),
                  "virtiofsd_rss_mib": _rss_mib(marker, "virtiofsd")}
    t4 = time.monotonic()
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    t5 = time.monotonic()
    return {"run_pod_s": t1 - t0, "create_start_s": t2 - t1, "exec_sync_s": t3 - t2,
            "stop_remove_pod_s": t5 - t4, **sample}


def main() -> int:
    with scratch_dirs("bcri") as (work, state):
        config = write_test_config(work / "husk.toml", state)
        options = ContainerdOptions(images=build_images(), husk_config=config, log_level="info")
        results: dict[str, dict[str, float]] = {}
        with Containerd.started(options) as cd:
            for handler in HANDLERS:
                rounds = []
                for i in range(RUNS):
                    rounds.append(one_round(cd.cri, handler, state, i))
                    print(f"{handler} {i + 1}/{RUNS}: {json.dumps(rounds[-1])}", file=sys.stderr)
                results[handler] = medians(rounds)
        ratio = {k: round(results["husk"][k] / results["runc"][k], 1) for k in STEPS
                 if results["runc"][k] > 0}
        emit({"benchmark": "cri", "runs": RUNS, "median": results, "husk_over_runc": ratio,
              "machine": machine(state)})
        return 0


if __name__ == "__main__":
    sys.exit(main())
