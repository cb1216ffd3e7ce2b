"""make bench-cri: pod operations through the CRI, husk against runc on one containerd.

Handlers: runc, husk (pods restored from a VM template; the template is built
by a first pod that is not counted, and its build time reported) and
husk-cold (templates off: every guest boots). For each, RUNS rounds (medians
printed as JSON): RunPodSandbox, CreateContainer+StartContainer, an ExecSync
round trip, and StopPodSandbox+RemovePodSandbox; for husk also the RSS of the
shim daemon, QEMU and virtiofsd of a running pod. Then PARALLEL_RUNS rounds of
PARALLEL_PODS pods started at once: seconds until every one has its container
running.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from tests.bench import emit, machine, medians
from tests.conftest import write_test_config
from tests.cri.cri import CriClient, CriError
from tests.cri.harness import (HUSK_RUNTIME_TYPE, Containerd, ContainerdOptions, RuntimeHandler,
                               scratch_dirs)
from tests.cri.images import BUSYBOX_REF, build_images

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
PARALLEL_PODS = 10
PARALLEL_RUNS = int(os.environ.get("BENCH_PARALLEL_RUNS", "3"))
COLD_HANDLER = "husk-cold"
HANDLERS = ("runc", "husk", COLD_HANDLER)
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
    if handler != "runc":
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


def parallel_round(cri: CriClient, handler: str, index: int) -> tuple[float, int]:
    """Seconds until PARALLEL_PODS pods started at once all run their container (or
    failed), and how many failed."""
    def bring_up(i: int) -> str | CriError:
        try:
            pod = cri.run_pod(f"many-{handler}-{index}-{i}", handler=handler, timeout=600)
        except CriError as exc:
            return exc
        try:
            cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"], timeout=600)
        except CriError as exc:
            cri.stop_and_remove_pod(pod.id)
            return exc
        return pod.id

    began = time.monotonic()
    with ThreadPoolExecutor(PARALLEL_PODS) as pool:
        outcomes = list(pool.map(bring_up, range(PARALLEL_PODS)))
    elapsed = time.monotonic() - began
    pods = [o for o in outcomes if isinstance(o, str)]
    for failure in (o for o in outcomes if not isinstance(o, str)):
        print(f"{handler}: a pod failed: {str(failure)[:300]}", file=sys.stderr)
    with ThreadPoolExecutor(PARALLEL_PODS) as pool:
        list(pool.map(cri.stop_and_remove_pod, pods))
    return elapsed, PARALLEL_PODS - len(pods)


def build_template(cri: CriClient) -> float:
    """Seconds of the first pod of its shape: a cold boot, the template's save and a restore."""
    began = time.monotonic()
    pod = cri.run_pod("bench-template", handler="husk")
    elapsed = time.monotonic() - began
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    return elapsed


def main() -> int:
    with scratch_dirs("bcri") as (work, state):
        templates = work / "templates"  # a fresh one: the first pod builds it
        # The agent's dial timeout of the tests: ten cold TCG boots at once take minutes.
        agent: dict[str, object] = {"dial_timeout_s": 300.0}
        config = write_test_config(work / "husk.toml", state, agent, templates_dir=templates,
                                   templates=True)
        cold = write_test_config(work / "husk-cold.toml", state, agent, templates=False)
        options = ContainerdOptions(images=build_images(), husk_config=config, log_level="info",
                                    extra_handlers=(RuntimeHandler(
                                        COLD_HANDLER, HUSK_RUNTIME_TYPE,
                                        options={"ConfigPath": str(cold)}),))
        results: dict[str, dict[str, float]] = {}
        with Containerd.started(options) as cd:
            first_pod_s = build_template(cd.cri)
            for handler in HANDLERS:
                rounds = []
                for i in range(RUNS):
                    rounds.append(one_round(cd.cri, handler, state, i))
                    print(f"{handler} {i + 1}/{RUNS}: {json.dumps(rounds[-1])}", file=sys.stderr)
                results[handler] = medians(rounds)
            for handler in HANDLERS:
                at_once = [parallel_round(cd.cri, handler, i) for i in range(PARALLEL_RUNS)]
                print(f"{handler} {PARALLEL_PODS} at once: {at_once}", file=sys.stderr)
                results[handler].update(medians(
                    [{"parallel_all_ready_s": t, "parallel_failed": n} for t, n in at_once]))
        ratio = {handler: {k: round(results[handler][k] / results["runc"][k], 1)
                           for k in (*STEPS, "parallel_all_ready_s") if results["runc"][k] > 0}
                 for handler in HANDLERS[1:]}
        emit({"benchmark": "cri", "runs": RUNS, "parallel_pods": PARALLEL_PODS,
              "parallel_runs": PARALLEL_RUNS, "median": results, "over_runc": ratio,
              "template_first_pod_s": round(first_pod_s, 3), "machine": machine(state)},
             Path(__file__).resolve().parents[2] / "build" / "bench" / "cri.json")
        return 0


if __name__ == "__main__":
    sys.exit(main())
